"""SOCKS5 UDP ASSOCIATE (RFC 1928 section 7) through real `mptun client` and `mptun server`
processes: PySocks as the SOCKS client, UDP echo peers on loopback, raw clients for what PySocks
does not do (foreign sources, fragments, malformed headers)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.client import socks5
from mptun.common.address import Address
from mptun.common.errors import ProtocolError
from mptun.common.handshake import ConnectStatus, NeedData, ServerHandshake, UdpRequest
from mptun.common.replay import ReplayGuard
from tests.helpers import ClientProcess, ServerProcess, run_mptun, wait_until
from tests.udppeer import udp_peer

socks = pytest.importorskip("socks", reason="PySocks is not installed (pip install PySocks)")

ALLOW = ("--allow-target", "127.0.0.0/8", "--allow-target", "::1/128")


@pytest.fixture
def pair(tmp_path: Path, key_file: Path) -> Iterator[tuple[ServerProcess, ClientProcess]]:
    with (
        ServerProcess(tmp_path, key_file, *ALLOW) as srv,
        ClientProcess(tmp_path, key_file, srv.port, "--udp-per-host", "4") as cli,
    ):
        yield srv, cli


def pysocks_udp(socks_port: int) -> socks.socksocket:
    s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    s.set_proxy(socks.SOCKS5, "127.0.0.1", socks_port)
    s.settimeout(10)
    return s


class RawAssociation:
    """A hand-made UDP ASSOCIATE: the control connection and the relay's address."""

    def __init__(self, socks_port: int, announce: tuple[str, int] = ("0.0.0.0", 0)) -> None:
        self.control = socket.create_connection(("127.0.0.1", socks_port), timeout=10)
        self.control.sendall(b"\x05\x01\x00")
        assert self.control.recv(2) == b"\x05\x00"
        ann = Address(ipaddress.ip_address(announce[0]), announce[1])
        self.control.sendall(b"\x05\x03\x00" + ann.encode())
        rep = b""
        while len(rep) < 10:
            rep += self.control.recv(10 - len(rep))
        assert rep[:4] == b"\x05\x00\x00\x01", rep
        self.relay = (str(ipaddress.IPv4Address(rep[4:8])), struct.unpack(">H", rep[8:10])[0])

    def close(self) -> None:
        self.control.close()


def header(target: Address, frag: int = 0) -> bytes:
    return b"\0\0" + bytes([frag]) + target.encode()


def udp_from(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(10)
    return s


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_pysocks_udp_echo(pair, host: str) -> None:
    """PySocks sends through UDP ASSOCIATE to an IPv4 / IPv6 echo target; the replies come back
    with the header naming the target as their source."""
    _, cli = pair
    with udp_peer(host) as peer:
        s = pysocks_udp(cli.socks_port)
        try:
            for i in range(3):
                s.sendto(b"ping %d" % i, (host, peer.port))
                data, source = s.recvfrom(65535)
                assert data == b"echo:ping %d" % i
                assert (ipaddress.ip_address(source[0]), source[1]) == (
                    ipaddress.ip_address(host),
                    peer.port,
                )
        finally:
            s.close()
    c = cli.stats()["counters"]
    assert c["socks-udp-associate"] == 1 and c["udp-datagrams-down"] == 3


def test_bound_address_is_the_control_connections(pair) -> None:
    """BND.ADDR is the address the control connection reached, never 0.0.0.0."""
    _, cli = pair
    a = RawAssociation(cli.socks_port)
    try:
        assert a.relay[0] == "127.0.0.1" and a.relay[1] != 0
    finally:
        a.close()


def test_foreign_sources_are_dropped(pair) -> None:
    """Datagrams from another address, or another port than the announced one, never leave;
    the client's own keep working."""
    _, cli = pair
    with udp_peer() as peer:
        own = udp_from()
        a = RawAssociation(cli.socks_port, ("127.0.0.1", own.getsockname()[1]))
        other_host, other_port = udp_from("127.0.0.2"), udp_from()
        try:
            for s in (other_host, other_port):
                s.sendto(header(peer.address) + b"foreign", a.relay)
            own.sendto(header(peer.address) + b"mine", a.relay)
            reply = own.recv(65535)
            assert reply == header(peer.address) + b"echo:mine"
            c = wait_until(
                lambda: (c := cli.stats()["counters"]).get("socks-udp-foreign", 0) >= 2 and c,
                10,
                "foreign datagrams counted",
            )
            assert c["socks-udp-foreign"] == 2
            assert [d for _, _, d in peer.seen] == [b"mine"]
        finally:
            for s in (own, other_host, other_port):
                s.close()
            a.close()


def test_fragments_and_malformed_headers_are_counted_once_logged(pair) -> None:
    """A burst of fragments and malformed headers: counted each, one log line for the burst
    (and perhaps its summary), and the association keeps serving."""
    _, cli = pair
    with udp_peer() as peer:
        own = udp_from()
        a = RawAssociation(cli.socks_port)
        try:
            for _ in range(20):
                own.sendto(header(peer.address, frag=1) + b"frag", a.relay)
                own.sendto(b"\x01\x00\x00\x01", a.relay)  # RSV not zero
                own.sendto(b"\x00\x00\x00\x09" + b"xxxxxx", a.relay)  # unknown address type
            own.sendto(header(peer.address) + b"after", a.relay)
            assert own.recv(65535) == header(peer.address) + b"echo:after"
            c = cli.stats()["counters"]
            assert c["socks-udp-frag"] == 20 and c["socks-udp-malformed"] == 40
            lines = [x for x in cli.log().splitlines() if "UDP" in x and "dropped" in x]
            assert 1 <= len(lines) <= 2, lines  # the first of the burst, at most one summary
            assert [d for _, _, d in peer.seen] == [b"after"]
        finally:
            own.close()
            a.close()


def test_association_ends_with_its_control_connection(pair) -> None:
    """Closing the control connection closes the relay socket (ICMP port unreachable) and the
    client's association."""
    _, cli = pair
    with udp_peer() as peer:
        own = udp_from()
        a = RawAssociation(cli.socks_port)
        own.sendto(header(peer.address) + b"x", a.relay)
        assert own.recv(65535).endswith(b"echo:x")
        a.close()
        own.connect(a.relay)

        def refused() -> bool:
            try:
                own.send(header(peer.address) + b"y")
                own.settimeout(0.2)
                own.recv(100)
            except ConnectionRefusedError:
                return True
            except TimeoutError:
                return False
            return False

        wait_until(refused, 10, "the relay socket closed")
        own.close()


def test_association_flood_is_capped_and_others_keep_working(pair) -> None:
    """More source ports than --udp-per-host (4): the extra ones are dropped, counted and
    logged once; the first ones keep working."""
    _, cli = pair
    with udp_peer() as peer:
        socks_ = [udp_from() for _ in range(12)]
        a = RawAssociation(cli.socks_port)
        try:
            for s in socks_:
                s.sendto(header(peer.address) + b"hi", a.relay)
            for s in socks_[:4]:
                assert s.recv(65535).endswith(b"echo:hi")
            c = wait_until(
                lambda: (c := cli.stats()["counters"]).get("udp-cap-host", 0) >= 8 and c,
                10,
                "capped datagrams counted",
            )
            assert c["udp-cap-host"] == 8 and c["udp-associations"] == 4
            lines = [x for x in cli.log().splitlines() if "--udp-per-host" in x]
            assert len(lines) == 1, lines
            socks_[0].sendto(header(peer.address) + b"still", a.relay)
            assert socks_[0].recv(65535).endswith(b"echo:still")
        finally:
            for s in socks_:
                s.close()
            a.close()


class OldServer:
    """A server of the protocol before UDP associations: it authenticates the flight and, not
    knowing type 0x04, answers status 10 (unsupported), as docs/PROTOCOL.md "Versioning" says."""

    def __init__(self, psk: bytes) -> None:
        from mptun.common.crypto import cipher_by_name

        self.psk, self.cipher = psk, cipher_by_name("aes-256-gcm")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answered = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                hs = ServerHandshake(self.psk, self.cipher, ReplayGuard(60, 1000))
                try:
                    while True:
                        data = conn.recv(hs.bytes_needed() or 1)
                        if not data:
                            break
                        hs.receive_data(data)
                        event = hs.next_event()
                        if isinstance(event, UdpRequest):
                            conn.sendall(hs.respond(ConnectStatus.UNSUPPORTED))
                            self.answered += 1
                            break
                        if not isinstance(event, NeedData):
                            break
                except (OSError, ProtocolError):
                    pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_old_server_says_server_too_old(tmp_path: Path, key_file: Path) -> None:
    """A server that answers a UDP association 'unsupported': the client logs 'server too old'
    and counts it; the SOCKS client's datagram is dropped."""
    from mptun.common.crypto import load_key_file

    old = OldServer(load_key_file(key_file))
    try:
        with ClientProcess(tmp_path, key_file, old.port) as cli, udp_peer() as peer:
            own = udp_from()
            a = RawAssociation(cli.socks_port)
            own.sendto(header(peer.address) + b"x", a.relay)
            wait_until(lambda: "too old" in cli.log(), 10, "the client's 'server too old' line")
            assert cli.stats()["counters"]["udp-server-too-old"] == 1
            assert old.answered == 1 and peer.seen == []
            own.close()
            a.close()
    finally:
        old.close()


def test_socks5_codec_udp_request() -> None:
    """The RFC 1928 section 7 header: parsed, and refused when malformed."""
    target = Address.parse("192.0.2.1:53")
    r = socks5.parse_udp_request(header(target) + b"data")
    assert (r.frag, r.target, r.data) == (0, target, b"data")
    assert socks5.udp_reply(target, b"x") == header(target) + b"x"
    for bad in (b"", b"\0\0", b"\0\1\0\1", b"\0\0\0\x09abc", b"\0\0\0\x01\1\2"):
        with pytest.raises(socks5.SocksError):
            socks5.parse_udp_request(bad)


def test_status_lists_udp_associations(tmp_path: Path, key_file: Path) -> None:
    """`mptun status` shows each UDP association: LAN source, destination, bytes, drops, age;
    and the counters in the stats output."""
    name = f"@mptun/client/{os.getpid()}-test-udp-{os.urandom(4).hex()}"
    with (
        ServerProcess(tmp_path, key_file, *ALLOW) as srv,
        ClientProcess(tmp_path, key_file, srv.port, "--control", name) as cli,
        udp_peer() as peer,
    ):
        own = udp_from()
        a = RawAssociation(cli.socks_port)
        try:
            own.sendto(header(peer.address) + b"12345", a.relay)
            assert own.recv(65535).endswith(b"echo:12345")
            r = run_mptun("status", "--control", name)
            assert r.returncode == 0, r.stderr
            line = next(
                x for x in r.stdout.splitlines() if f"127.0.0.1:{own.getsockname()[1]}" in x
            )
            assert str(peer.address) in line and "open" in line and "up 5 B" in line, line
            assert "down 10 B" in line and "0 dropped" in line, line
            assert "1 UDP association(s)" in r.stdout
            doc = json.loads(run_mptun("status", "--control", name, "--json").stdout)
            (udp,) = doc["clients"][0]["udp"]
            assert udp["destinations"] == [str(peer.address)] and udp["up_bytes"] == 5
            assert cli.stats()["counters"]["udp-associations"] == 1
        finally:
            own.close()
            a.close()


def test_a_reload_keeps_one_set_of_associations(tmp_path: Path, key_file: Path) -> None:
    """A reload that gives the SOCKS listener a new handler (a changed --socks-per-client) still
    serves UDP with the running associations: old and new ones show in one status list."""
    name = f"@mptun/client/{os.getpid()}-test-udp-{os.urandom(4).hex()}"
    conf = tmp_path / "client.toml"
    conf.write_text("[client]\nsocks-per-client = 10\n")
    with (
        ServerProcess(tmp_path, key_file, *ALLOW) as srv,
        ClientProcess(
            tmp_path, key_file, srv.port, "--control", name, "--config", str(conf)
        ) as cli,
        udp_peer() as peer,
    ):
        socks_ = [udp_from(), udp_from()]
        assocs = []
        try:
            for i, s in enumerate(socks_):
                if i == 1:
                    conf.write_text("[client]\nsocks-per-client = 20\n")
                    cli.proc.send_signal(signal.SIGHUP)
                    wait_until(lambda: "socks-per-client changed" in cli.log(), 10, "reloaded")
                assocs.append(RawAssociation(cli.socks_port))
                s.sendto(header(peer.address) + b"x", assocs[-1].relay)
                assert s.recv(65535).endswith(b"echo:x")
            doc = json.loads(run_mptun("status", "--control", name, "--json").stdout)
            sources = {u["source"] for u in doc["clients"][0]["udp"]}
            assert sources == {f"127.0.0.1:{s.getsockname()[1]}" for s in socks_}
        finally:
            for s in socks_:
                s.close()
            for a in assocs:
                a.close()


def test_udp_is_dropped_while_every_server_is_down_even_with_when_down_direct(
    tmp_path: Path, key_file: Path
) -> None:
    """UDP never falls back to the direct path (docs/CLI.md, "When no server answers"): with
    its one server stopped and `--when-down direct`, a datagram is counted `udp-no-tunnel` and
    the target sees nothing."""
    srv = ServerProcess(tmp_path, key_file, *ALLOW)
    port = srv.port
    srv.stop()
    with (
        ClientProcess(tmp_path, key_file, port, "--when-down", "direct") as cli,
        udp_peer() as peer,
    ):
        wait_until(lambda: f"server 127.0.0.1:{port} is down" in cli.log(), 20, "server down")
        own = udp_from()
        a = RawAssociation(cli.socks_port)
        try:
            own.sendto(header(peer.address) + b"while down", a.relay)
            wait_until(lambda: cli.stats()["counters"].get("udp-no-tunnel", 0) >= 1, 20, "counted")
            assert peer.seen == []
        finally:
            own.close()
            a.close()
