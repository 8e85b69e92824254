"""Several servers, real processes: failover when one stops and back when it returns, a
blackholed server left for the next, lowest-rtt picking the faster.

The stop-and-restart tests run in a network namespace of their own, so the servers can take
the same fixed port again; the lowest-rtt check runs on loopback with a delaying relay in
front of one server (this kernel has no netem).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_netns
from tests.helpers import ROOT, ClientProcess, ServerProcess, curl, wait_listening, wait_until
from tests.peers import http_server

PORT_A, PORT_B = 18443, 18444
SOCKS_PORT = 1080
HTTP_PORT = 8000
A, B = f"127.0.0.1:{PORT_A}", f"127.0.0.1:{PORT_B}"
URL = f"http://127.0.0.1:{HTTP_PORT}/bytes/20000/3"


@dataclass
class Bed:
    """One namespace: servers, an HTTP peer and the client, all on its loopback."""

    ns: Netns
    tmp: Path
    key: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        log = self.tmp / f"{name}-{time.monotonic_ns()}.log"
        self.logs[name] = log
        with open(log, "wb") as f:
            p = self.ns.popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs[name] = p
        return p

    def mptun(self, name: str, *args: str) -> subprocess.Popen:
        return self.start(name, sys.executable, "-m", "mptun", "--log-level", "debug", *args)

    def server(self, name: str, port: int) -> None:
        listen = ["--listen", f"127.0.0.1:{port}", "--key-file", str(self.key)]
        p = self.mptun(name, "server", *listen, "--allow-target", "127.0.0.0/8")
        wait_listening("127.0.0.1", port, 10.0, p, prefix=self.ns.prefix())

    def stop(self, name: str) -> None:
        p = self.procs.pop(name)
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def fetch(self) -> tuple[bool, float]:
        """One download through the client's SOCKS listener: (it worked, seconds it took)."""
        t = time.monotonic()
        r = self.ns.exec(
            "curl", "-sS", "--max-time", "20", "--socks5", f"127.0.0.1:{SOCKS_PORT}", URL,
            check=False, text=False,
        )  # fmt: skip
        return r.returncode == 0 and len(r.stdout) == 20000, time.monotonic() - t

    def vias(self) -> list[str]:
        """The server of each tunnel the client connected, in order."""
        return [
            line.rsplit(" via ", 1)[1].strip()
            for line in self.log("client").splitlines()
            if "connected in" in line and " via " in line
        ]


@pytest.fixture
def bed(tmp_path: Path, key_file: Path) -> Iterator[Bed]:
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    with Netns("servers") as ns:
        b = Bed(ns, tmp_path, key_file)
        http = b.start(
            "http", sys.executable, "-m", "tests.peers", "http", "--port", str(HTTP_PORT)
        )
        wait_listening("[::]", HTTP_PORT, 10.0, http, prefix=ns.prefix())
        yield b


def start_client(b: Bed, *args: str) -> None:
    p = b.mptun(
        "client", "client", "--server", A, "--server", B, "--key-file", str(b.key),
        "--socks", f"127.0.0.1:{SOCKS_PORT}", *args,
    )  # fmt: skip
    wait_listening("127.0.0.1", SOCKS_PORT, 10.0, p, prefix=b.ns.prefix())


def status(b: Bed) -> dict:
    r = b.ns.exec(sys.executable, "-m", "mptun", "status", "--json", cwd=ROOT)
    (client,) = json.loads(r.stdout)["clients"]
    return client


def states(b: Bed) -> list[str]:
    return [s["state"] for s in status(b)["servers"]]


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.timing
def test_failover_to_the_second_and_back_to_the_first(bed: Bed):
    b = bed
    b.server("a", PORT_A)
    b.server("b", PORT_B)
    start_client(b)
    wait_until(lambda: states(b) == ["up", "up"], 10, "both servers checked up")
    ok, _ = b.fetch()
    assert ok and b.vias() == [A], b.log("client")

    b.stop("a")
    stopped = time.monotonic()
    # New connections succeed through the second within 5 s of the stop (the first one already:
    # a refused connect moves on to the next server at once).
    attempts = 0
    while True:
        attempts += 1
        ok, took = b.fetch()
        if ok and b.vias()[-1] == B:
            break
        assert time.monotonic() - stopped < 5, b.log("client")
    assert time.monotonic() - stopped < 5
    assert attempts == 1, "the tunnel should have tried the second server at once"
    assert took < 2, f"a connection took {took:.1f} s after the failover"
    wait_until(lambda: states(b) == ["down", "up"], 10, "the first server down in status")
    text = b.ns.exec(sys.executable, "-m", "mptun", "status", cwd=ROOT).stdout
    assert f"{A}  down" in text and f"{B}  up" in text, text
    assert b.log("client").count(f"server {A} is down") == 1  # one line per change

    b.server("a", PORT_A)
    restarted = time.monotonic()
    wait_until(lambda: states(b)[0] == "up", 10, "the first server up again")
    assert time.monotonic() - restarted < 10  # checks every 2 s by default
    ok, _ = b.fetch()
    assert ok and b.vias()[-1] == A, "new connections return to the first server"
    assert b.log("client").count(f"server {A} is up again") == 1


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.timing
def test_a_blackholed_server_is_left_by_the_checks(bed: Bed):
    """The first server's packets are dropped (its process runs, its port answers nothing):
    the checks find it down and new connections go to the second, none waiting for it."""
    b = bed
    b.server("a", PORT_A)
    b.server("b", PORT_B)
    start_client(b, "--server-check-interval", "1")
    wait_until(lambda: states(b) == ["up", "up"], 10, "both servers checked up")
    b.ns.exec("nft", "add table inet blackhole")
    b.ns.exec(
        "nft",
        "add chain inet blackhole in { type filter hook input priority 0; "
        f"tcp dport {PORT_A} drop; }}",
    )
    dropped = time.monotonic()
    # interval + timeout + retry + timeout = 1 + 1 + 0.5 + 1 s; wide margin for a loaded machine
    wait_until(lambda: states(b)[0] == "down", 15, "the checks find the first server down")
    assert time.monotonic() - dropped < 15
    for _ in range(3):
        ok, took = b.fetch()
        assert ok and b.vias()[-1] == B and took < 2, b.log("client")
    b.ns.exec("nft", "delete table inet blackhole")
    wait_until(lambda: states(b)[0] == "up", 10, "the first server answers again")
    ok, _ = b.fetch()
    assert ok and b.vias()[-1] == A


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.timing
def test_a_new_tunnel_does_not_wait_for_a_silent_server(bed: Bed):
    """The first server's packets are dropped and no check has noticed yet (checks every 60 s):
    a new tunnel tries the second beside it after 2 s instead of waiting out the 10 s
    --connect-timeout; the slow one is checked at once and found down."""
    b = bed
    b.server("a", PORT_A)
    b.server("b", PORT_B)
    start_client(b, "--server-check-interval", "60")
    wait_until(lambda: states(b) == ["up", "up"], 10, "both servers checked up")
    b.ns.exec("nft", "-f", "-", input=BLACKHOLE_A)
    try:
        ok, took = b.fetch()
        assert ok and b.vias()[-1] == B, b.log("client")
        assert 1.5 < took < 6, f"took {took:.1f} s"  # 2 s head start, never the 10 s timeout
        # the check it woke finds the first server down (60 s before the next otherwise)
        wait_until(lambda: states(b)[0] == "down", 15, "the slow server checked down")
        ok, took = b.fetch()
        assert ok and b.vias()[-1] == B and took < 1.5, took
    finally:
        b.ns.exec("nft", "delete", "table", "inet", "blackhole", check=False)


BLACKHOLE_A = (
    "table inet blackhole {\n chain in {\n  type filter hook input priority 0;\n"
    f"  tcp dport {PORT_A} drop\n }}\n}}\n"
)


class DelayRelay:
    """A TCP relay on loopback that holds every chunk `delay` seconds each way: a server
    further away, without netem."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port, self.delay = target_port, delay
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DelayRelay:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            w1.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    await asyncio.sleep(self.delay)
                    w.write(data)
                    await w.drain()
                if w.can_write_eof():
                    w.write_eof()
            except OSError:
                w.close()

        await asyncio.gather(pipe(r1, w2), pipe(r2, w1))
        w1.close()
        w2.close()


@pytest.mark.timing
@pytest.mark.parametrize(("policy", "want"), [("lowest-rtt", "fast"), ("failover", "slow")])
def test_lowest_rtt_picks_the_faster_server(tmp_path: Path, key_file: Path, policy: str, want: str):
    """The slow server (200 ms more each way, through the relay) is given first: lowest-rtt
    takes the other once both are checked; failover keeps the first."""
    with (
        ServerProcess(tmp_path, key_file, "--allow-target", "127.0.0.0/8", stats=False) as slow,
        ServerProcess(tmp_path, key_file, "--allow-target", "127.0.0.0/8", stats=False) as fast,
        DelayRelay(slow.port, 0.2) as relay,
        http_server() as (host, port),
    ):
        args = ["--server", f"127.0.0.1:{fast.port}", "--server-policy", policy]
        args += ["--server-check-interval", "0.5"]
        with ClientProcess(tmp_path, key_file, relay.port, *args, stats=False) as cli:
            wait_until(lambda: cli.log().count("is up (check round trip") == 2, 15, "both checked")
            for _ in range(2):
                r = curl("--socks5", cli.socks, f"http://{host}:{port}/bytes/1000/1", timeout=20)
                assert r.returncode == 0 and len(r.stdout) == 1000, r.stderr
            servers = {"slow": f"127.0.0.1:{relay.port}", "fast": f"127.0.0.1:{fast.port}"}
            vias = [ln.rsplit(" via ", 1)[1] for ln in cli.log().splitlines() if " via " in ln]
            assert vias[-2:] == [servers[want]] * 2, cli.log()
