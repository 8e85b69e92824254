"""Ports, listeners and waiting, here or inside a namespace: the one place the lab, the benchmark
and the tests get a port and wait for a condition.

No port is ever picked and then handed to another program to bind (a bind-close-rebind race:
anything on the machine may take the port in between). Instead:

- mptun itself listens on port 0 and says which port it got (`listening on HOST:PORT` in its
  log): `logged_listeners` reads those lines back;
- a program that cannot listen on port 0 (or whose log nobody reads, as the benchmark's) gets
  a `ReservedPort`, held (bound with SO_REUSEADDR, not listening) until `wait_owned` has seen
  the process itself hold the listening socket (its own fd, read from /proc), so no one else
  can take the port meanwhile;
- a program that cannot share a reserved port either is started by `start_listener`, which
  starts it again on another port if it lost the port to something else;
- a port where connections are refused is `closed_port()`: bound and held, never listening;
- inside a namespace this test bed just created, fixed ports are safe (nothing else runs there).

`prefix` is the argv prefix that runs a command inside a namespace (`Netns.prefix()`, `nsenter
...`); empty means this process's own network. Here a listener is found by connecting to it (so
the listener sees one probe connection, as the loopback tests expect); inside a namespace by
`ss` (no connection at all).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from mptun.common.sockets import family_of

# How much slower than this machine the tests run: the QEMU guest (tests/test_vm.py) sets it,
# since its software-emulated CPU starts a Python process in seconds, not milliseconds.
SLOWDOWN = float(os.environ.get("MPTUN_TEST_SLOWDOWN", "1"))

T = TypeVar("T")

# What mptun logs once a listener is bound (server/service.py, client/service.py): the server
# `listening on ADDR (...)`, the client `<kind> listening on ADDR` (socks, redir, tproxy,
# forward, dns (tcp), dns (udp)), ADDR as `1.2.3.4:PORT` or `[2001:db8::1]:PORT`.
_LISTENING = re.compile(
    r": (?:(?P<kind>[a-z][a-z ()]*?) )?listening on "
    r"(?P<host>\[[0-9a-fA-F:.]+\]|[0-9.]+):(?P<port>\d+)"
)


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str = "the condition",
    *,
    interval: float = 0.05,
    proc: subprocess.Popen | None = None,
) -> T:
    """Poll `predicate` until it returns something true, and return that (never a fixed sleep).

    A TimeoutError naming `what` after `timeout` x SLOWDOWN s; a RuntimeError as soon as `proc`
    (when given) has exited while the predicate still fails."""
    limit = timeout * SLOWDOWN
    deadline = time.monotonic() + limit
    while True:
        got = predicate()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            got = predicate()  # what the process did just before it exited
            if got:
                return got
            raise RuntimeError(f"process exited with {proc.returncode} before {what}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {limit:g} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port where connections are refused, for the duration of the block: a socket bound to it
    and never listening holds it, so nothing else can take it meanwhile (a connection gets RST)."""
    with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        yield s.getsockname()[1]


def logged_listeners(log: str) -> list[tuple[str, str, int]]:
    """(kind, host, port) of every `listening on` line of an mptun log, in order; the server's
    kind is ""."""
    return [
        (m["kind"] or "", m["host"].strip("[]"), int(m["port"])) for m in _LISTENING.finditer(log)
    ]


def wait_logged_listeners(
    read_log: Callable[[], str],
    count: int,
    proc: subprocess.Popen | None = None,
    timeout: float = 10.0,
) -> list[tuple[str, str, int]]:
    """The first `count` listeners an mptun process logs (`logged_listeners`), once it has
    logged them: how a test learns the ports of listeners started on port 0."""
    found = wait_until(
        lambda: (got := logged_listeners(read_log())) and len(got) >= count and got,
        timeout,
        f"{count} 'listening on' line(s) in the log",
        proc=proc,
    )
    return found[:count]


class ReservedPort:
    """A port held for a program that will listen on it with SO_REUSEADDR (mptun, iperf3,
    ss-server, Python's `create_server` all set it): a socket bound to it with SO_REUSEADDR and
    never listening. While it is held the kernel gives the port to no one else (neither a bind to
    port 0 nor a connect's ephemeral port takes a port that has a bound socket), yet the
    program's own SO_REUSEADDR bind and listen succeed (Linux allows a second SO_REUSEADDR bind
    while no socket on the port listens: inet_csk_bind_conflict, net/ipv4/inet_connection_sock.c).
    `release()` once the program listens (`wait_owned`) or has been stopped."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port: int = self.sock.getsockname()[1]

    def release(self) -> None:
        self.sock.close()


def wait_owned(
    proc: subprocess.Popen, port: int, timeout: float = 10.0, protocols: Sequence[str] = ("tcp",)
) -> None:
    """Until `proc` (or a child of it) itself listens on `port` (a bound socket for "udp"): not
    merely something on the port. A RuntimeError if it exits first, a TimeoutError after
    `timeout` x SLOWDOWN."""
    wait_until(
        lambda: all(_holds_port(proc.pid, port, p == "udp") for p in protocols),
        timeout,
        f"a {'+'.join(protocols)} listener of process {proc.pid} on port {port}",
        proc=proc,
    )


def start_listener(
    start: Callable[[int], subprocess.Popen],
    host: str = "127.0.0.1",
    *,
    protocols: Sequence[str] = ("tcp",),
    timeout: float = 10.0,
    attempts: int = 5,
) -> tuple[subprocess.Popen, int]:
    """Start a program that can neither listen on port 0 nor share a reserved port (mptun's
    `--dns`, one port for UDP and TCP) on a port that is free now, and prove it listens there.

    `start(port)` starts it; the port is its own once the process holds a listening socket on it
    (`wait_owned`). Another program that took the port first makes it exit: then it is started
    again on another port, up to `attempts` times."""
    err: Exception | None = None
    for _ in range(attempts):
        port = _unused_port(host, "udp" in protocols)
        proc = start(port)
        try:
            wait_owned(proc, port, timeout, protocols)
        except RuntimeError as e:  # it exited: the port may have been taken meanwhile
            err = e
            continue
        except BaseException:
            _stop(proc)
            raise
        return proc, port
    raise RuntimeError(f"no listener after {attempts} starts: {err}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _unused_port(host: str, udp: bool = False) -> int:
    """A TCP port the kernel picks as unused now (and free for UDP too, with `udp`): a candidate
    only, which `start_listener` proves, never to be handed on unchecked."""
    family = family_of(host)
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
            if not udp:
                return port
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue  # taken for UDP: another
                return port


def _holds_port(pid: int, port: int, udp: bool = False) -> bool:
    """Whether process `pid` or one of its children holds a listening TCP (bound UDP) socket on
    `port`: the socket inodes in /proc/PID/fd against /proc/PID/net/{tcp,tcp6,udp,udp6} (proc(5);
    the net files show the namespace of that process, so this works inside one too)."""
    for p in _family(pid):
        inodes = _socket_inodes(p)
        if inodes and inodes & _bound_inodes(p, port, udp):
            return True
    return False


def _family(pid: int) -> list[int]:
    """`pid` and its descendants (a wrapper that forks rather than execs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def _bound_inodes(pid: int, port: int, udp: bool) -> set[int]:
    """Inodes of `pid`'s namespace's sockets on local `port`: TCP in LISTEN (state 0A), or UDP."""
    out = set()
    for name in ("udp", "udp6") if udp else ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if int(fields[1].rsplit(":", 1)[1], 16) != port:
                continue
            if udp or fields[3] == "0A":
                out.add(int(fields[9]))
    return out


def wait_listening(
    host: str,
    port: int,
    timeout: float | None = None,
    proc: subprocess.Popen | None = None,
    *,
    prefix: Sequence[str] = (),
    udp: bool = False,
) -> None:
    """Poll until something listens on host:port (never a fixed sleep); 10 s x SLOWDOWN unless
    told. A RuntimeError if `proc` exits first, a TimeoutError after `timeout`. Inside a
    namespace (`prefix`), any address on `port` counts; `udp` looks for a bound UDP socket."""
    timeout = timeout or 10.0 * SLOWDOWN
    where = f" in {' '.join(prefix)}" if prefix else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process exited with {proc.returncode} before listening on {port}{where}"
            )
        if _listening(host, port, prefix, udp):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}{where} after {timeout} s")


def _listening(host: str, port: int, prefix: Sequence[str], udp: bool) -> bool:
    if prefix or udp:
        flags = "-Hlnu" if udp else "-Hlnt"
        r = subprocess.run(
            [*prefix, "ss", flags, f"sport = :{port}"], capture_output=True, text=True
        )
        return bool(r.stdout.strip())
    with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
