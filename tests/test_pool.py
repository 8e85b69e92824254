"""`--pool N`: tunnels connected ahead, recycled before the server would close them, never
handed out dead (client/pool.py). Real sockets: a loopback listener in the test, a real server
and client, and a server killed and restarted under a full pool in a namespace."""

from __future__ import annotations

import asyncio
import os
import resource
import select
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from mptun.client.pool import MAX_AGE, TunnelPool
from mptun.common.address import Address
from mptun.common.sockets import connect
from tests.fastopen_bed import Bed, need_bed
from tests.helpers import ClientProcess, ServerProcess, read_stats_after_usr1, wait_until


async def _until(predicate, timeout: float = 5.0) -> None:
    """Run the loop until `predicate()` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


class _Listener:
    """A loopback listener standing in for the server: accepts, holds, closes on demand."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = Address.parse(f"127.0.0.1:{self.sock.getsockname()[1]}")
        self.accepted: list[socket.socket] = []

    async def opener(self, server: Address) -> tuple[socket.socket, bool | None]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        await connect(asyncio.get_running_loop(), s, server.sockaddr(), 5.0)
        return s, None

    def accept_all(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        for s in self.accepted:
            s.close()
        self.sock.close()


def _pool(listener: _Listener, counters: Counter, **kw) -> TunnelPool:
    return TunnelPool(2, listener.opener, lambda: listener.address, counters, **kw)


def test_tunnels_the_server_closed_are_never_handed_out() -> None:
    """The server closes both pooled tunnels; `take` right after (before the loop has seen the
    FINs) hands out none of them, and the refilled pool's tunnel carries bytes."""

    async def main() -> None:
        listener, counters = _Listener(), Counter()
        pool = _pool(listener, counters, max_age=60.0)
        pool.start(asyncio.get_running_loop())
        try:
            await _until(lambda: len(pool.ready) == 2)
            pooled = [e.sock for e in pool.ready]
            listener.accept_all()
            for s in listener.accepted:
                s.close()  # the server's FIN
            listener.accepted.clear()
            for s in pooled:  # the FINs are in (no loop turn: the pool's readers have not run)
                assert select.select([s], [], [], 5.0)[0]
            assert pool.take(listener.address) is None
            assert counters["pool-dead"] == 2
            await _until(lambda: len(pool.ready) == 2)
            taken = pool.take(listener.address)
            assert taken is not None
            taken[0].setblocking(True)
            taken[0].sendall(b"first flight")
            listener.accept_all()
            got = []
            for s in listener.accepted:
                s.settimeout(0.2)
                try:
                    got.append(s.recv(100))
                except TimeoutError:
                    pass
            assert got == [b"first flight"]
            taken[0].close()
        finally:
            pool.close()
            listener.close()

    asyncio.run(main())


def test_recycled_silently_and_idle_pool_stops() -> None:
    """A pooled tunnel older than max_age is closed with a FIN having sent nothing, and
    replaced while the pool is in use; once unused for `warm` s, nothing is replaced."""

    async def main() -> None:
        listener, counters = _Listener(), Counter()
        pool = _pool(listener, counters, max_age=0.3, warm=1.0)
        pool.start(asyncio.get_running_loop())
        try:
            await _until(lambda: counters["pool-recycled"] >= 2)
            listener.accept_all()
            for s in listener.accepted[:2]:  # the first two: closed by the pool
                s.settimeout(5.0)
                assert s.recv(100) == b""  # nothing, then the FIN
            # unused: once `warm` has passed (and the last one's max_age), the pool is empty
            cold = time.monotonic() + 1.0 + 0.3
            await _until(lambda: not pool.ready and time.monotonic() > cold, timeout=5.0)
            connected = counters["pool-connected"]
            await asyncio.sleep(0.5)
            assert counters["pool-connected"] == connected and not pool.ready
            # a take warms it again
            assert pool.take(listener.address) is None
            await _until(lambda: len(pool.ready) == 2)
        finally:
            pool.close()
            listener.close()

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.timing
def test_recycled_before_the_server_closes_them(tmp_path: Path, key_file: Path) -> None:
    """Against a real server (deferred accept, 10 s handshake timeout), pooled tunnels end by
    the client's FIN (`incomplete` at the server), never by the server's timeout, and a tunnel
    taken from the pool carries a connection."""
    with (
        ServerProcess(tmp_path, key_file, "--allow-target", "127.0.0.0/8") as server,
        ClientProcess(tmp_path, key_file, server.port, "--pool", "2") as client,
    ):
        # two rounds of recycling: the first pooled tunnels lived MAX_AGE s
        def recycled() -> dict | None:
            c = client.stats()["counters"]
            return c if c.get("pool-recycled", 0) >= 4 else None

        counters = wait_until(recycled, 3 * MAX_AGE + 10, "two rounds recycled")
        assert counters.get("pool-dead", 0) == 0, counters
        s = server.counters()
        assert s.get("timeout", 0) == 0, s
        assert s.get("incomplete", 0) >= 1 + 4, s  # the start's probe, then the pool's
        from tests.peers import http_server, socks_open

        with http_server() as (host, port):
            sock, code = socks_open(client.socks_port, Address.parse(f"{host}:{port}"))
            with sock:
                assert code == 0
                sock.sendall(b"GET /bytes/10/1 HTTP/1.0\r\n\r\n")
                assert sock.recv(12).startswith(b"HTTP/1.")
        assert client.stats()["counters"]["pool-used"] >= 1


@pytest.mark.root
@pytest.mark.netns
def test_server_killed_and_restarted_under_a_full_pool(tmp_path: Path, key_file: Path) -> None:
    """SIGKILL the server while the pool is full. Tunnels the server had accepted get its
    kernel's FIN: the pool drops each as it arrives. Tunnels it had not accepted yet (deferred
    accept) vanish without a packet to the client; the first flight on one draws a reset from
    the restarted server and goes again on a fresh tunnel. Every connection works."""
    need_bed()
    with Bed(tmp_path, key_file) as bed:
        bed.start_server()
        bed.start_client("--pool", "3")
        bed.wait_client("pool-connected", 3)

        def accepted() -> bool:
            assert bed.server is not None
            stats = read_stats_after_usr1(bed.server.pid, bed.server_stats)
            return stats["handshakes"]["open"] >= 3

        wait_until(accepted, 10.0, "the server accepted the pooled tunnels")
        bed.kill_server()
        bed.wait_client("pool-dead", 3)
        bed.start_server()
        connected = bed.wait_client("pool-connected", 6)["pool-connected"]
        bed.kill_server()  # before the server accepts them: nothing reaches the client
        bed.start_server()
        _wait_up(bed)
        for _ in range(5):
            assert bed.fetch()[1] == 200
        counters = bed.wait_client("relayed", 5)  # each relay counts as it ends
        assert counters["relayed"] == 5, counters
        assert counters["pool-retried"] >= 1, counters
        assert counters["pool-connected"] > connected, counters
        assert counters.get("refused", 0) == 0 and counters.get("auth", 0) == 0, counters


def _wait_up(bed: Bed) -> None:
    """Until the client's checks have found the restarted server up (if they saw it down)."""

    def up() -> bool:
        log = bed.log_of(bed.client)  # type: ignore[arg-type]
        return log.count(" is down: ") == log.count(" is up again")

    wait_until(up, 15.0, "the client sees the server up")


def test_a_reload_keeps_fast_open_and_the_pool() -> None:
    """SIGHUP names --fast-open and --pool as needing a restart, and keeps them as they were."""
    from mptun.client.app import ClientSettings, build_tunneler
    from mptun.client.reload import _apply_tunnel, _restart_fields
    from mptun.common.crypto import decode_key, generate_key

    psk = decode_key(generate_key())
    old = ClientSettings(server=Address.parse("192.0.2.1:8443"), psk=psk)
    tunneler = build_tunneler(old)
    new = ClientSettings(old.server, psk, fast_open=True, pool=2)
    _apply_tunnel(tunneler, new)
    assert not tunneler.config.fast_open and tunneler.config.pool == 0
    assert {"fast_open", "pool"} <= set(_restart_fields())


def test_alive_past_descriptor_1024() -> None:
    """The pool's look before handing a tunnel out works for any descriptor number (a router's
    may pass select()'s 1024)."""
    from mptun.client.pool import alive

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= 1500:
        pytest.skip("the open-file limit is below 1501")
    a, b = socket.socketpair()
    with a:
        high = socket.socket(fileno=os.dup2(a.fileno(), 1500))
    with high:
        assert alive(high)
        b.close()  # the far end's FIN
        assert not alive(high)
