"""The client's control socket: `mptun status` connects, gets one JSON document, done.

Why a socket in the client and not inet_diag: only the client knows which MPTCP sockets are
tunnels, for which LAN peer and target; it reads each tunnel's subflows with getsockopt on the
socket it owns (common/mptcpinfo.py), which needs no privileges and works per connection.

Where: by default an abstract unix socket `@mptun/client/<pid>-<16 random hex digits>`.
Abstract names belong to the network namespace (unix(7)), so clients in different namespaces or
test beds never collide, and `mptun status` finds every client of its namespace in
/proc/net/unix. Abstract names have no owner or permissions: any local user may bind any name
first, or bind one that looks like a client's. Hence the random part (a name bound in advance
cannot be the one a client picks), and credentials checked both ways with SO_PEERCRED
(unix(7): the peer's pid, uid and gid when it called connect or listen): the client answers
only root and its own user (the answer names LAN peers and targets), and `mptun status` reads
only a socket whose listener runs as its own user (root reads root's clients), so another
user's socket cannot pose as a client. What status reads is bounded in size and time, and
checked for shape before anything is printed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mptun.common.errors import ConfigError, MptunError
from mptun.common.logutil import BurstLog
from mptun.common.mptcpinfo import connection_info

if TYPE_CHECKING:  # `mptun status` reads this module: no tunnel code, no cryptography
    from mptun.client.tunnel import Tunneler

log = logging.getLogger("mptun.client")

PREFIX = "@mptun/client/"
# sun_path holds 108 bytes (unix(7)): a path needs its NUL, an abstract name its leading NUL.
MAX_NAME_BYTES = 107
# The largest status answer: the client drops tunnels from its answer to stay below it, and
# `mptun status` stops reading there. A tunnel is about 200 bytes of JSON plus 150 a subflow
# (measured), so this holds about 10,000 tunnels of 8 subflows.
MAX_ANSWER = 16 * 1024 * 1024
ANSWER_TIMEOUT = 5.0  # seconds for the whole answer, however it trickles


def default_name() -> str:
    """`@mptun/client/PID-RANDOM`: the random part is 64 bits, so no one can bind it first."""
    # os.urandom, as secrets does, without importing secrets (hashlib, ~1 MB on the router)
    return f"{PREFIX}{os.getpid()}-{os.urandom(8).hex()}"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def encode_answer(doc: dict, limit: int = MAX_ANSWER) -> bytes:
    """The status document as one JSON line of at most `limit` bytes: tunnels are left out
    (newest last, so the oldest stay), and counted in `connections_omitted`, when it is bigger."""
    import json  # at the first status asked for: a client nobody watches never loads it

    data = json.dumps(doc).encode() + b"\n"
    conns = doc.get("connections")
    if len(data) <= limit or not isinstance(conns, list) or not conns:
        return data
    keep = len(conns)
    while keep > 0 and len(data) > limit:
        keep = keep * limit // len(data) * 9 // 10
        trimmed = {**doc, "connections": conns[:keep], "connections_omitted": len(conns) - keep}
        data = json.dumps(trimmed).encode() + b"\n"
    return data


def _bind_address(name: str) -> str:
    """`@name` is abstract (a leading NUL byte for the kernel), anything else a path."""
    return "\0" + name[1:] if name.startswith("@") else name


def tunnels_snapshot(tunneler: Tunneler) -> list[dict]:
    """Every relaying tunnel with what the kernel says about its subflows."""
    now = time.monotonic()
    out = []
    for t in list(tunneler.live.values()):
        try:
            info = connection_info(t.sock).to_dict()
        except (OSError, ValueError) as e:  # closed under us, or an unexpected kernel answer
            info = {"kind": "unknown", "subflows": [], "detail": str(e)}
        out.append(
            {
                "id": t.cid,
                "source": t.source,
                "target": str(t.target),
                "seconds": round(now - t.started, 1),
                **info,
            }
        )
    return out


class ControlServer:
    """Accepts status requests on `name` inside the client's event loop."""

    def __init__(self, name: str, snapshot: Callable[[], dict]) -> None:
        self.name = name
        self.snapshot = snapshot
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._refused_log = BurstLog(log, logging.INFO)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                s.bind(_bind_address(self.name))
            except OSError as e:
                if e.errno != errno.EADDRINUSE or not _remove_stale(self.name):
                    raise
                s.bind(_bind_address(self.name))
        except OSError as e:
            s.close()
            raise ConfigError(f"control socket {self.name}: {e.strerror or e}") from None
        if not self.name.startswith("@"):
            os.chmod(self.name, 0o600)
        s.listen(8)
        s.setblocking(False)
        self.sock, self.loop = s, loop
        loop.add_reader(s.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.sock is not None and self.loop is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("control socket accept: %s", e.strerror)
            return
        self.loop.create_task(self._answer(conn))

    async def _answer(self, conn: socket.socket) -> None:
        assert self.loop is not None
        with conn:
            conn.setblocking(False)
            pid, uid, _gid = peer_credentials(conn)
            if uid not in (0, os.geteuid()):
                self._refused_log("control socket: refused status to uid %d (pid %d)", uid, pid)
                return
            data = encode_answer(self.snapshot())
            try:
                await self.loop.sock_sendall(conn, data)
            except OSError:
                pass

    def close(self) -> None:
        if self.sock is None:
            return
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        if not self.name.startswith("@"):
            try:
                os.unlink(self.name)
            except OSError:
                pass


def _remove_stale(name: str) -> bool:
    """Unlink a socket file nobody listens on (a client killed by SIGKILL leaves one behind,
    and every later start would fail with EADDRINUSE); True if it was removed."""
    try:
        if name.startswith("@") or not stat.S_ISSOCK(os.lstat(name).st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(name) != errno.ECONNREFUSED:
                return False  # someone answers: another client uses it
        os.unlink(name)
    except OSError:
        return False
    log.info("control socket %s: removed a stale socket file", name)
    return True


def discover() -> list[str]:
    """The listening sockets in this network namespace whose names look like a client's (from
    /proc/net/unix). Anyone can bind such a name: `query` checks who listens."""
    try:
        with open("/proc/net/unix", "rb") as f:
            raw = f.read(64 * 1024 * 1024)
    except OSError:
        return []
    found = set()
    for line in raw.decode("utf-8", "replace").splitlines()[1:]:
        parts = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening
        listening = len(parts) == 8 and parts[3] == "00010000"
        if listening and parts[7].startswith(PREFIX) and check_control_name(parts[7]) is None:
            found.add(parts[7])
    return sorted(found, key=_pid_of)


def _pid_of(name: str) -> tuple[int, str]:
    head = name[len(PREFIX) :].split("-", 1)[0] if name.startswith(PREFIX) else ""
    return (int(head) if head.isdigit() and len(head) < 10 else 0, name)


class NotRead(MptunError):
    """A control socket `mptun status` did not read; the text says why, without the name."""


def query(name: str, timeout: float = ANSWER_TIMEOUT, limit: int = MAX_ANSWER) -> dict:
    """Ask one client for its status; NotRead when it cannot or must not be read.

    Only a socket whose listener runs as this user is read (root reads root's clients): any
    user can bind an abstract name that looks like a client's. The answer is read for at most
    `timeout` seconds in all and `limit` bytes.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    chunks: list[bytes] = []
    size = 0
    try:
        s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        s.connect(_bind_address(name))
        pid, uid, _gid = peer_credentials(s)
        me = os.geteuid()
        if uid != me:
            who = "root" if uid == 0 else f"uid {uid}"
            if me == 0:
                raise NotRead(
                    f"listened on by {who} (pid {pid}), not root: not read, as any user can "
                    "bind such a name (run `mptun status` as that user to read it)"
                )
            raise NotRead(
                f"its client runs as {who} (pid {pid}); it answers only root and its own user "
                f"(you are uid {me}): run `mptun status` as root"
            )
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotRead(f"no complete answer within {timeout:g} s")
            s.settimeout(left)
            got = s.recv(min(1 << 20, limit + 1 - size))
            if not got:
                break
            chunks.append(got)
            size += len(got)
            if size > limit:
                raise NotRead(f"answer longer than {limit} bytes: not a client's status")
    except TimeoutError:
        raise NotRead(f"no complete answer within {timeout:g} s") from None
    except OSError as e:
        raise NotRead(e.strerror or str(e)) from None
    finally:
        s.close()
    if not chunks:
        raise NotRead("closed without an answer")
    import json

    try:
        doc = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise NotRead("not a status document (not JSON)") from None
    return check_document(doc)


# The fields `mptun status` uses, with their JSON types; everything else in an answer is ignored.
_NUMBER = (int, float)
_CLIENT_FIELDS: dict[str, tuple[type, ...]] = {
    "pid": (int,),
    "server": (str,),
    "servers": (list,),
    "server_policy": (str,),
    "when_down": (str,),
    "transport": (str,),
    "listeners": (list,),
    "connections": (list,),
    "counters": (dict,),
    "uplink_health": (list,),
}
_UPLINK_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "state": (str,),
    "reason": (str,),
    "since": _NUMBER,
    "changes": (int,),
    "loss": _NUMBER,
    "rtt_ms": _NUMBER,
    "addresses": (list,),
}
_CONN_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "source": (str,),
    "target": (str,),
    "seconds": _NUMBER,
    "kind": (str,),
    "bytes_received": _NUMBER,
    "bytes_acked": _NUMBER,
    "subflows_max": (int,),
    "subflows": (list,),
    "detail": (str,),
}
_SERVER_FIELDS: dict[str, tuple[type, ...]] = {
    "server": (str,),
    "state": (str,),
    "for_seconds": _NUMBER,
    "rtt_ms": _NUMBER,
    "reason": (str,),
    "checks": (int,),
    "checks_failed": (int,),
}
_SUBFLOW_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (int, str),
    "local": (str,),
    "remote": (str,),
    "local_ip": (str,),
    "bytes_received": _NUMBER,
    "bytes_acked": _NUMBER,
    "rtt_ms": _NUMBER,
}


def _typed(obj: object, fields: dict[str, tuple[type, ...]], where: str) -> dict:
    """`obj` as a dict whose known fields have their types (None allowed), or NotRead."""
    if not isinstance(obj, dict):
        raise NotRead(f"not a status document ({where} is not an object)")
    for key, types in fields.items():
        value = obj.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise NotRead(f"not a status document ({where}.{key} has the wrong type)")
    return obj


def check_document(doc: object) -> dict:
    """The answer, if it has the shape `mptun status` reads (types only: the text is cleaned
    where it is printed); NotRead otherwise."""
    doc = _typed(doc, _CLIENT_FIELDS, "the answer")
    for item in doc.get("listeners") or []:
        if not isinstance(item, str):
            raise NotRead("not a status document (a listener is not text)")
    for key, value in (doc.get("counters") or {}).items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise NotRead(f"not a status document (counter {clean(key)!r} is not a number)")
    for server in doc.get("servers") or []:
        _typed(server, _SERVER_FIELDS, "a server")
    for uplink in doc.get("uplink_health") or []:
        _typed(uplink, _UPLINK_FIELDS, "an uplink")
    for conn in doc.get("connections") or []:
        _typed(conn, _CONN_FIELDS, "a connection")
        for sf in conn.get("subflows") or []:
            _typed(sf, _SUBFLOW_FIELDS, "a subflow")
    return doc


def clean(value: object, limit: int = 200) -> str:
    """`value` as text safe for a terminal: control, format and separator characters (an
    escape sequence, a bidi override, a newline) shown as Python escapes; at most `limit` chars."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def check_control_name(value: str, allow_none: bool = True) -> str | None:
    """Why `value` cannot be a --control value, or None: caught at parse time, before any
    listener starts. `allow_none`: `none` (no control socket) is a choice for the client, not
    for `mptun status`."""
    if value == "auto" or (value == "none" and allow_none):
        return None
    if value == "none":
        return "give auto, @NAME or a file path (none is for `mptun client`: no control socket)"
    if not value or value == "@":
        return f"give auto, {'none, ' if allow_none else ''}@NAME or a file path"
    raw = value[1:] if value.startswith("@") else value
    try:
        size = len(raw.encode())
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if size > MAX_NAME_BYTES:
        return f"{size} bytes; a unix socket name holds at most {MAX_NAME_BYTES}"
    if value.startswith("@"):
        return None
    path = Path(value)
    if not path.parent.is_dir():
        return f"directory {str(path.parent)!r} does not exist"
    if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
        return "exists and is not a socket"
    return None


def wrap_service(
    control: str,
    start: Callable[[asyncio.AbstractEventLoop], object],
    stop: Callable[[float], object],
    snapshot: Callable[[], dict],
) -> tuple[Callable, Callable]:
    """The service's start/stop with the control socket opened and closed around them."""
    if control == "none":
        return start, stop
    server = ControlServer(default_name() if control == "auto" else control, snapshot)

    def start_all(loop: asyncio.AbstractEventLoop) -> None:
        server.start(loop)  # first: a bad --control fails before any listener is logged
        try:
            start(loop)
        except BaseException:
            server.close()
            raise
        log.info("status on control socket %s (mptun status)", server.name)

    async def stop_all(drain_timeout: float) -> int:
        server.close()
        return await stop(drain_timeout)  # type: ignore[misc]

    return start_all, stop_all
