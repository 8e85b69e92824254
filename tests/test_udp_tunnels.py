"""The client's UDP core (`UdpTunnels`, client/udp.py) against a real `mptun server` process:
datagrams to real UDP sockets on loopback, IPv4 and IPv6, mapping, hairpinning, refusals."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.client.app import ClientSettings, build_tunneler
from mptun.client.udp import UdpTunnels
from mptun.common.address import Address
from mptun.common.crypto import cipher_by_name
from mptun.common.datagram import MAX_PAYLOAD
from mptun.common.handshake import (
    CHECK_TARGET,
    TYPE_UDP,
    ClientHandshake,
    ConnectStatus,
    Response,
    WireMode,
)
from mptun.common.relay import Session, Side
from tests.helpers import ServerProcess
from tests.udppeer import udp_peer

ALLOW = ("--allow-target", "127.0.0.0/8", "--allow-target", "::1/128")


def tunnels(srv: ServerProcess, tunnel: dict | None = None, **kw) -> UdpTunnels:
    """The UDP core of a client of `srv` (`tunnel`: more ClientSettings, e.g. fast_open)."""
    settings = ClientSettings(
        server=Address.parse(f"127.0.0.1:{srv.port}"), psk=srv.psk, **(tunnel or {})
    )
    return UdpTunnels(build_tunneler(settings), **kw)


async def until(predicate, timeout: float = 10.0) -> None:
    """Poll `predicate` on the loop until true; fail after `timeout` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path, key_file: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path, key_file, *ALLOW) as srv:
        yield srv


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_datagrams_both_ways(server: ServerProcess, host: str) -> None:
    """A LAN source's datagrams reach an IPv4/IPv6 target and the echoes come back, framed
    with the target as their source; the association appears in the snapshot."""
    got: list[tuple[Address, bytes]] = []

    async def main() -> None:
        u = tunnels(server)
        with udp_peer(host) as peer:
            for i in range(5):
                u.send(
                    ("192.0.2.7", 5000),
                    peer.address,
                    b"hello %d" % i,
                    lambda a, p: got.append((a, p)),
                )
            await until(lambda: len(got) == 5)
            snap = u.snapshot()
            await u.aclose()
        assert {p for _, p in got} == {b"echo:hello %d" % i for i in range(5)}
        assert {a for a, _ in got} == {peer.address}
        assert len(snap) == 1 and snap[0]["source"] == "192.0.2.7:5000"
        assert snap[0]["destinations"] == [str(peer.address)]
        assert snap[0]["up_bytes"] == sum(len(b"hello %d" % i) for i in range(5))

    asyncio.run(main())
    c = server.counters()
    assert c["udp-associations"] == 1
    assert c["udp-datagrams-up"] == 5


def test_endpoint_independent_mapping(server: ServerProcess) -> None:
    """One LAN source sending to two ports of a target: both see the same address and port."""

    async def main() -> None:
        u = tunnels(server)
        with udp_peer() as a, udp_peer() as b:
            got: list[bytes] = []
            for peer in (a, b):
                u.send(("192.0.2.7", 6000), peer.address, b"x", lambda _a, p: got.append(p))
            await until(lambda: len(got) == 2)
            await u.aclose()
            assert a.seen[0][:2] == b.seen[0][:2]

    asyncio.run(main())


def test_hairpinning(server: ServerProcess) -> None:
    """Two associations reach each other through their mappings on the server's address."""

    async def main() -> None:
        u = tunnels(server)
        with udp_peer(echo=True) as peer:
            first: list[tuple[Address, bytes]] = []
            second: list[tuple[Address, bytes]] = []
            u.send(("192.0.2.7", 1), peer.address, b"a", lambda a, p: first.append((a, p)))
            u.send(("192.0.2.8", 2), peer.address, b"b", lambda a, p: second.append((a, p)))
            await until(lambda: len(first) == 1 and len(second) == 1)
            port_a = peer.seen[0][1] if peer.seen[0][2] == b"a" else peer.seen[1][1]
            port_b = peer.seen[1][1] if peer.seen[1][2] == b"b" else peer.seen[0][1]
            mapping_b = Address.parse(f"127.0.0.1:{port_b}")
            u.send(("192.0.2.7", 1), mapping_b, b"to b", lambda a, p: first.append((a, p)))
            await until(lambda: len(second) == 2)
            await u.aclose()
        assert second[1] == (Address.parse(f"127.0.0.1:{port_a}"), b"to b")

    asyncio.run(main())
    assert server.counters()["udp-hairpin"] == 1


def test_refused_targets_never_leave(tmp_path: Path, key_file: Path) -> None:
    """Without --allow-target, datagrams to loopback are dropped on the server and counted:
    the receiving socket gets nothing."""
    with ServerProcess(tmp_path, key_file) as srv, udp_peer() as peer:

        async def main() -> None:
            u = tunnels(srv)
            for _ in range(3):
                u.send(("192.0.2.7", 1), peer.address, b"no", lambda a, p: None)
            await until(lambda: u.snapshot() and u.snapshot()[0]["state"] == "open")
            await asyncio.sleep(0)
            await u.aclose()

        asyncio.run(main())
        c = srv.wait_counter("udp-refused", 3)
        assert c["udp-refused"] == 3
        assert peer.seen == []


@pytest.mark.timing
def test_idle_timeout_ends_the_association(server: ServerProcess) -> None:
    """An association idle for the client's idle timeout ends; the next datagram opens another."""

    async def main() -> None:
        u = tunnels(server, idle_timeout=0.3)
        with udp_peer() as peer:
            got: list[bytes] = []
            u.send(("192.0.2.7", 1), peer.address, b"1", lambda a, p: got.append(p))
            await until(lambda: len(got) == 1)
            await until(lambda: len(u) == 0, timeout=5)
            assert u.counters["udp-idle"] == 1
            u.send(("192.0.2.7", 1), peer.address, b"2", lambda a, p: got.append(p))
            await until(lambda: len(got) == 2)
            await u.aclose()
        assert u.counters["udp-associations"] == 2

    asyncio.run(main())


def test_caps_per_host_and_total(server: ServerProcess) -> None:
    """Beyond the per-host and total caps, new sources' datagrams are dropped and counted."""

    async def main() -> None:
        u = tunnels(server, per_host=2, total=3)
        with udp_peer() as peer:
            for port in range(1, 5):
                u.send(("192.0.2.7", port), peer.address, b"x", lambda a, p: None)
            assert len(u) == 2 and u.counters["udp-cap-host"] == 2
            u.send(("192.0.2.8", 1), peer.address, b"x", lambda a, p: None)
            u.send(("192.0.2.9", 1), peer.address, b"x", lambda a, p: None)
            assert len(u) == 3 and u.counters["udp-cap-total"] == 1
            await u.aclose()

    asyncio.run(main())


def raw_association(srv: ServerProcess, mode: WireMode = WireMode.ENCRYPTED):
    """A hand-driven UDP association: the tunnel socket and the sealer of its records."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    cipher = cipher_by_name("aes-256-gcm")
    hs = ClientHandshake(srv.psk, cipher, CHECK_TARGET, mode, kind=TYPE_UDP)
    sock.sendall(hs.first_flight())
    while not isinstance(event := hs.next_event(), Response):
        hs.receive_data(sock.recv(hs.bytes_needed()))
    assert event.status is ConnectStatus.SUCCEEDED
    return sock, Session(WireMode.ENCRYPTED, Side.CLIENT, cipher, hs.bulk_keys()).sealer()


def closed_by_peer(sock: socket.socket) -> bool:
    """Read until the server closes (it may send its closing record first)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize(
    ("frame", "counter"),
    [
        (b"\x00\x01\x09" + bytes(10), "address"),  # unknown address type
        ((MAX_PAYLOAD + 1).to_bytes(2, "big") + Address.parse("192.0.2.1:9").encode(), "protocol"),
    ],
    ids=["bad-address-type", "oversize"],
)
def test_malformed_frames_end_only_their_association(
    server: ServerProcess, frame: bytes, counter: str
) -> None:
    """A frame the server cannot parse ends that association (counted) and no other."""

    async def other() -> list[bytes]:
        u = tunnels(server)
        got: list[bytes] = []
        with udp_peer() as peer:
            u.send(("192.0.2.7", 1), peer.address, b"a", lambda _a, p: got.append(p))
            await until(lambda: len(got) == 1)
            sock, sealer = raw_association(server)
            sock.sendall(sealer.seal(frame))
            assert closed_by_peer(sock)
            sock.close()
            u.send(("192.0.2.7", 1), peer.address, b"b", lambda _a, p: got.append(p))
            await until(lambda: len(got) == 2)
            await u.aclose()
        return got

    assert asyncio.run(other()) == [b"echo:a", b"echo:b"]
    assert server.wait_counter(counter, 1)[counter] == 1


@pytest.mark.timing
def test_server_idle_timeout_ends_the_mapping(tmp_path: Path, key_file: Path) -> None:
    """With --udp-idle-timeout 1, the server ends an idle association: its tunnel closes and
    the client's next datagram opens a new mapping (a new source port at the target)."""
    with ServerProcess(tmp_path, key_file, *ALLOW, "--udp-idle-timeout", "1") as srv:

        async def main() -> None:
            u = tunnels(srv)
            got: list[bytes] = []
            with udp_peer() as peer:
                u.send(("192.0.2.7", 1), peer.address, b"1", lambda _a, p: got.append(p))
                await until(lambda: len(got) == 1)
                await until(lambda: len(u) == 0, timeout=10)  # the server ended it
                u.send(("192.0.2.7", 1), peer.address, b"2", lambda _a, p: got.append(p))
                await until(lambda: len(got) == 2)
                await u.aclose()
                assert peer.seen[0][1] != peer.seen[1][1]

        asyncio.run(main())
        assert srv.counters()["udp-idle"] >= 1


def test_address_dependent_filtering(tmp_path: Path, key_file: Path) -> None:
    """--udp-filter address: a peer the association never sent to cannot reach its mapping;
    one it sent to can (and endpoint-independent filtering lets both in: the default)."""
    for mode, expect_stranger in (("address", False), ("endpoint", True)):
        with ServerProcess(tmp_path, key_file, *ALLOW, "--udp-filter", mode) as srv:

            async def main() -> list[bytes]:
                u = tunnels(srv)
                got: list[bytes] = []
                with udp_peer() as peer:
                    u.send(("192.0.2.7", 1), peer.address, b"x", lambda _a, p: got.append(p))
                    await until(lambda: len(got) == 1)
                    mapping = peer.seen[0][1]
                    stranger = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                    stranger.bind(("::1", 0))
                    stranger.sendto(b"stranger", ("::1", mapping))
                    peer.sock.sendto(b"known", ("127.0.0.1", mapping))
                    await until(lambda: b"known" in got)
                    await asyncio.sleep(0.2)
                    stranger.close()
                    await u.aclose()
                return got

            got = asyncio.run(main())
            assert (b"stranger" in got) is expect_stranger, mode
            if not expect_stranger:
                assert srv.counters()["udp-filtered"] == 1


def test_oversize_datagram_is_dropped_at_the_client(server: ServerProcess) -> None:
    """A payload over 65,507 bytes is dropped and counted; the association is not harmed."""

    async def main() -> UdpTunnels:
        u = tunnels(server)
        got: list[bytes] = []
        with udp_peer() as peer:
            u.send(("192.0.2.7", 1), peer.address, bytes(MAX_PAYLOAD + 1), lambda *_: None)
            u.send(("192.0.2.7", 1), peer.address, b"ok", lambda _a, p: got.append(p))
            await until(lambda: got == [b"echo:ok"])
            await u.aclose()
        return u

    assert asyncio.run(main()).counters["udp-oversize"] == 1


@pytest.mark.parametrize("tunnel", [{"fast_open": True}, {"pool": 2}], ids=["fast-open", "pool"])
def test_with_fast_open_and_the_pool(server: ServerProcess, tunnel: dict) -> None:
    """With --fast-open the first flight made at the connect is a UDP association's (type 0x04,
    the first datagrams in it), and with --pool an association takes a pooled tunnel."""

    async def main() -> UdpTunnels:
        u = tunnels(server, tunnel)
        u.tunneler.start(asyncio.get_running_loop())
        if u.tunneler.pool is not None:
            await until(lambda: u.tunneler.pool is not None and len(u.tunneler.pool.ready) == 2)
        got: list[bytes] = []
        with udp_peer() as peer:
            for i in range(3):
                u.send(("192.0.2.7", 1), peer.address, b"%d" % i, lambda _a, p: got.append(p))
            await until(lambda: len(got) == 3)
            await u.aclose()
        u.tunneler.close()
        return u

    u = asyncio.run(main())
    assert server.counters()["udp-associations"] == 1
    if "pool" in tunnel:
        assert u.counters["pool-used"] == 1


@pytest.mark.timing
def test_a_mapping_idle_less_than_the_timeout_is_kept(tmp_path: Path, key_file: Path) -> None:
    """Idle for half the timeout (both ends' timeouts 4 s), the association and its mapping
    stay: the target sees the same source port before and after (the 90 s idle of a 300 s
    timeout, scaled down)."""
    with ServerProcess(tmp_path, key_file, *ALLOW, "--udp-idle-timeout", "4") as srv:

        async def main() -> None:
            u = tunnels(srv, idle_timeout=4.0)
            got: list[bytes] = []
            with udp_peer() as peer:
                u.send(("192.0.2.7", 1), peer.address, b"1", lambda _a, p: got.append(p))
                await until(lambda: len(got) == 1)
                await asyncio.sleep(2.0)
                u.send(("192.0.2.7", 1), peer.address, b"2", lambda _a, p: got.append(p))
                await until(lambda: len(got) == 2)
                await u.aclose()
                assert peer.seen[0][1] == peer.seen[1][1]
            assert u.counters["udp-associations"] == 1

        asyncio.run(main())


@pytest.mark.slow
@pytest.mark.timing
def test_a_mapping_idle_for_90_s_still_works(server: ServerProcess) -> None:
    """The issue's case with the default timeouts (300 s): idle 90 s, same mapping after."""

    async def main() -> None:
        u = tunnels(server)
        got: list[bytes] = []
        with udp_peer() as peer:
            u.send(("192.0.2.7", 1), peer.address, b"1", lambda _a, p: got.append(p))
            await until(lambda: len(got) == 1)
            await asyncio.sleep(90.0)
            u.send(("192.0.2.7", 1), peer.address, b"2", lambda _a, p: got.append(p))
            await until(lambda: len(got) == 2)
            await u.aclose()
            assert peer.seen[0][1] == peer.seen[1][1]
        assert u.counters["udp-associations"] == 1

    asyncio.run(main())
