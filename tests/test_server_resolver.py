"""The server's resolver (server/resolver.py) against a real DNS server on loopback.

`ZonePeer` is a small authoritative server on UDP and TCP, written byte by byte (independent of
common/dns.py), that never answers names under `silent.test`. The end-to-end tests run the real
`mptun server` pointed at it with `--nameserver`; the others drive `Resolver` in this process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mptun.common.address import Address
from mptun.common.handshake import ConnectStatus
from mptun.server.resolver import (
    FAMILY_GRACE,
    ResolveError,
    Resolver,
    literal,
    parse_hosts,
    parse_resolv_conf,
)
from tests.helpers import ServerProcess
from tests.peers import closing_target, connect_status

SILENT = "silent.test"
BIG_COUNT = 40  # A records in big.example.test: 40 * 16 bytes, over the 512 of plain UDP


def wire(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


def rr(name: str, rtype: int, rdata: bytes, ttl: int = 60) -> bytes:
    return wire(name) + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def a(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


# name -> records of the answer section, by query type (1 A, 28 AAAA); CNAMEs answer any type.
ZONE: dict[str, list[tuple[str, int, bytes]]] = {
    "www.example.test": [
        ("www.example.test", 1, a("127.0.0.1")),
        ("www.example.test", 28, a("::1")),
    ],
    "v4.example.test": [("v4.example.test", 1, a("127.0.0.1"))],
    "v6.example.test": [("v6.example.test", 28, a("2001:db8::6"))],
    # A whole chain in one answer, as recursive resolvers send it.
    "alias.example.test": [
        ("alias.example.test", 5, wire("mid.example.test")),
        ("mid.example.test", 5, wire("v4.example.test")),
        ("v4.example.test", 1, a("127.0.0.1")),
        ("other.example.test", 1, a("198.51.100.66")),  # not on the chain: never used
    ],
    # A chain that stops: the resolver must ask for the name it ends at...
    "hop.example.test": [("hop.example.test", 5, wire("v4.example.test"))],
    # ...unless the answer proves there is no data there (a SOA: RFC 2308 2.2).
    "proven.example.test": [
        ("proven.example.test", 5, wire("v4.example.test")),
        ("v4.example.test", 1, a("127.0.0.1")),
    ],
    "noaaaa.example.test": [("noaaaa.example.test", 1, a("127.0.0.1"))],  # AAAA never answered
    "loop1.example.test": [("loop1.example.test", 5, wire("loop2.example.test"))],
    "loop2.example.test": [("loop2.example.test", 5, wire("loop1.example.test"))],
    "big.example.test": [
        ("big.example.test", 1, a(f"198.51.100.{i + 1}")) for i in range(BIG_COUNT)
    ],
    "empty.example.test": [],
}


class ZonePeer:
    """UDP and TCP DNS on one loopback port; logs (name, qtype, transport) of every query."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, servfail: bool = False) -> None:
        self.host, self.servfail = host, servfail
        self.queries: list[tuple[str, int, str]] = []
        self.lock = threading.Lock()
        for _ in range(20):  # the same port free for both protocols
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((host, port))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind((host, self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(16)
        self.threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for t in self.threads:
            t.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def names(self) -> list[str]:
        with self.lock:
            return [q[0] for q in self.queries]

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()

    def answer(self, query: bytes, transport: str) -> list[bytes]:
        """The datagrams to send for one query (none for a silent name)."""
        qid, qflags = struct.unpack_from("!HH", query)
        pos, labels = 12, []
        while query[pos]:
            labels.append(query[pos + 1 : pos + 1 + query[pos]].decode().lower())
            pos += 1 + query[pos]
        name = ".".join(labels)
        qtype = struct.unpack_from("!H", query, pos + 1)[0]
        question = query[12 : pos + 5]
        with self.lock:
            self.queries.append((name, qtype, transport))
        if name.endswith(SILENT) or (name == "noaaaa.example.test" and qtype == 28):
            return []
        rcode, answers = 3, []
        if self.servfail:
            rcode = 2
        elif name in ZONE:
            rcode = 0
            answers = [rr(n, t, d) for n, t, d in ZONE[name] if t in (qtype, 5)]
        authority = []
        if name.startswith("proven.") and not any(t == qtype for _, t, _ in ZONE[name]):
            soa = wire("ns.example.test") + wire("admin.example.test")
            authority.append(rr("example.test", 6, soa + struct.pack("!IIIII", 1, 60, 60, 60, 30)))
        flags = 0x8000 | 0x0400 | (qflags & 0x0100) | 0x0080 | rcode
        head = struct.pack("!HHHHHH", qid, flags, 1, len(answers), len(authority), 0)
        body = head + question + b"".join(answers) + b"".join(authority)
        if transport == "udp" and len(body) > 512:  # RFC 1035 4.2.1: truncate, set TC
            return [struct.pack("!HHHHHH", qid, flags | 0x0200, 1, 0, 0, 0) + question]
        if name == "spoof.example.test":
            # Two answers that must be ignored (wrong ID; another question), then the real one.
            wrong_id = struct.pack("!H", qid ^ 1) + body[2:]
            other = body[:12] + wire("evil.test") + question[-4:]
            real = rr(name, 1, a("127.0.0.1"))
            fake = rr(name, 1, a("198.51.100.99"))
            return [
                wrong_id[:6] + b"\0\1" + wrong_id[8:] + fake,
                other[:6] + b"\0\1" + other[8:] + fake,
                head[:6] + b"\0\1" + head[8:] + question + real,
            ]
        return [body]

    def _serve_udp(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(4096)
            except OSError:
                return
            try:
                for out in self.answer(data, "udp"):
                    self.udp.sendto(out, peer)
            except (IndexError, struct.error, UnicodeDecodeError, OSError):
                continue

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    n = struct.unpack("!H", conn.recv(2, socket.MSG_WAITALL))[0]
                    for out in self.answer(conn.recv(n, socket.MSG_WAITALL), "tcp"):
                        conn.sendall(struct.pack("!H", len(out)) + out)
                except (OSError, struct.error, IndexError):
                    continue


@pytest.fixture
def zone() -> Iterator[ZonePeer]:
    peer = ZonePeer()
    try:
        yield peer
    finally:
        peer.close()


def ns(*peers: ZonePeer) -> tuple[Address, ...]:
    return tuple(Address.parse(p.address) for p in peers)


def ips(*texts: str) -> list:
    return [ipaddress.ip_address(t) for t in texts]


def lookup(resolver: Resolver, name: str, servers, timeout: float = 5.0, source: str = "s"):
    async def go():
        return await resolver.resolve(
            name, asyncio.get_running_loop().time() + timeout, source, servers
        )

    return asyncio.run(go())


def empty_files(tmp_path: Path) -> Resolver:
    """A resolver whose hosts file and resolv.conf are empty files (tests name the servers)."""
    (tmp_path / "hosts").write_text("")
    (tmp_path / "resolv.conf").write_text("")
    return Resolver(resolv_conf=tmp_path / "resolv.conf", hosts=tmp_path / "hosts")


# -- pure parts ------------------------------------------------------------------------------------
def test_literals_are_getaddrinfo_numeric_hosts():
    for text, want in [
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("2001:db8::1", "2001:db8::1"),
    ]:
        assert literal(text) == ipaddress.ip_address(want), text
    for text in ["www.example.test", "1.2.3.4.", "256.1.1.1", "1.2.3.4.5", "a:b"]:
        assert literal(text) is None, text


def test_resolv_conf_and_hosts_parsing():
    conf = parse_resolv_conf(
        "# comment\nsearch example.test\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n"
        "nameserver bogus\nnameserver 192.0.2.54 ; note\nnameserver 192.0.2.55\n"
        "options ndots:2 timeout:3 attempts:9\n"
    )
    assert conf.nameservers == (("192.0.2.53", 53), ("2001:db8::53", 53, 0, 0), ("192.0.2.54", 53))
    assert (conf.timeout, conf.attempts) == (3.0, 5)  # attempts capped as glibc does
    assert parse_resolv_conf("").nameservers == (("127.0.0.1", 53),)  # glibc's default
    hosts = parse_hosts(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
        "198.51.100.7 Web.Example.Test. web # the VPS\n#198.51.100.8 web\nnot-an-ip name\n"
        "2001:db8::7 web\n"
    )
    assert hosts["localhost"] == ips("127.0.0.1", "::1")
    assert hosts["web.example.test"] == ips("198.51.100.7")
    assert hosts["web"] == ips("198.51.100.7", "2001:db8::7")
    assert "name" not in hosts


# -- the resolver against the peer -----------------------------------------------------------------
def test_a_aaaa_cname_chains_and_failures(tmp_path: Path, zone: ZonePeer):
    r = empty_files(tmp_path)
    servers = ns(zone)
    assert set(lookup(r, "www.example.test", servers)) == set(ips("127.0.0.1", "::1"))
    assert lookup(r, "WWW.Example.Test.", servers)[0] in ips("127.0.0.1", "::1")
    assert lookup(r, "v6.example.test", servers) == ips("2001:db8::6")
    assert lookup(r, "alias.example.test", servers) == ips("127.0.0.1")
    before = len(zone.queries)
    assert lookup(r, "hop.example.test", servers) == ips("127.0.0.1")
    assert ("v4.example.test", 1, "udp") in zone.queries[before:]  # the chain's end was asked
    before = len(zone.queries)
    assert lookup(r, "proven.example.test", servers) == ips("127.0.0.1")
    assert sorted(q[:2] for q in zone.queries[before:]) == [
        ("proven.example.test", 1),
        ("proven.example.test", 28),
    ]
    for name, why in [
        ("nx.example.test", "NXDOMAIN"),
        ("empty.example.test", "no A or AAAA"),
        ("loop1.example.test", "no A or AAAA"),
        ("a..b", "bad name"),
        ("x" * 64 + ".test", "bad name"),
        ("bad name.test", "bad name"),
    ]:
        with pytest.raises(ResolveError, match=why):
            lookup(r, name, servers)


def test_truncated_answer_is_asked_again_over_tcp(tmp_path: Path, zone: ZonePeer):
    got = lookup(empty_files(tmp_path), "big.example.test", ns(zone))
    assert got == ips(*(f"198.51.100.{i + 1}" for i in range(BIG_COUNT)))
    assert ("big.example.test", 1, "tcp") in zone.queries


def test_answers_that_do_not_match_the_query_are_ignored(tmp_path: Path, zone: ZonePeer):
    assert lookup(empty_files(tmp_path), "spoof.example.test", ns(zone)) == ips("127.0.0.1")


def test_literals_are_never_looked_up_and_hosts_comes_first(tmp_path: Path, zone: ZonePeer):
    r = empty_files(tmp_path)
    (tmp_path / "hosts").write_text("198.51.100.7 www.example.test\n")
    for name in ["127.1", "2130706433", "198.51.100.1", "2001:db8::1"]:
        assert len(lookup(r, name, ns(zone))) == 1
    assert lookup(r, "www.example.test", ns(zone)) == ips("198.51.100.7")
    assert zone.queries == []
    (tmp_path / "hosts").write_text("# emptied\n")  # re-read on change, as glibc does
    assert ipaddress.ip_address("127.0.0.1") in lookup(r, "www.example.test", ns(zone))


def test_servfail_moves_on_to_the_next_server_at_once(tmp_path: Path, zone: ZonePeer):
    bad = ZonePeer(servfail=True)
    try:
        (tmp_path / "resolv.conf").write_text("options timeout:5\n")
        r = empty_files(tmp_path)
        t0 = time.monotonic()
        assert lookup(r, "v4.example.test", ns(bad, zone)) == ips("127.0.0.1")
        assert time.monotonic() - t0 < 4  # not the 5 s a silent server would cost
        assert "v4.example.test" in bad.names()
        with pytest.raises(ResolveError, match="SERVFAIL"):
            lookup(r, "v4.example.test", ns(bad))
    finally:
        bad.close()


@pytest.mark.timing
def test_deadline_and_per_source_cap(tmp_path: Path, zone: ZonePeer):
    r = Resolver(resolv_conf=tmp_path / "none", hosts=tmp_path / "none", per_source=3)

    async def go():
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        silent = [
            asyncio.create_task(r.resolve(f"n{i}.{SILENT}", deadline, "192.0.2.1", ns(zone)))
            for i in range(3)
        ]
        async with asyncio.timeout(10):
            while len(zone.queries) < 6:  # A and AAAA of each
                await asyncio.sleep(0.01)
        t0 = loop.time()
        with pytest.raises(ResolveError, match="already under way"):
            await r.resolve("www.example.test", deadline, "192.0.2.1", ns(zone))
        refused_in = loop.time() - t0
        other = await r.resolve("www.example.test", loop.time() + 2, "192.0.2.2", ns(zone))
        results = await asyncio.gather(*silent, return_exceptions=True)
        return refused_in, other, results, loop.time() - deadline

    refused_in, other, results, late = asyncio.run(go())
    assert refused_in < 0.5  # refused at once, not queued behind the silent ones
    assert ipaddress.ip_address("127.0.0.1") in other  # another source is not capped
    assert all(isinstance(e, ResolveError) and "no answer" in str(e) for e in results)
    assert 0 <= late < 1.0  # the silent lookups ended at their deadline
    assert r.pending == {}


@pytest.mark.timing
def test_one_family_answered_the_other_gets_a_grace_period(tmp_path: Path, zone: ZonePeer):
    t0 = time.monotonic()
    assert lookup(empty_files(tmp_path), "noaaaa.example.test", ns(zone), timeout=8) == ips(
        "127.0.0.1"
    )
    assert FAMILY_GRACE - 0.1 < time.monotonic() - t0 < 8 - 2  # not the whole deadline


@pytest.mark.root
def test_nameservers_come_from_resolv_conf(tmp_path: Path):
    """The real file format, with a server on port 53 (root) on an unused loopback address."""
    peer = ZonePeer(host="127.83.0.53", port=53)
    try:
        (tmp_path / "resolv.conf").write_text("nameserver 127.83.0.53\noptions timeout:1\n")
        (tmp_path / "hosts").write_text("")
        r = Resolver(resolv_conf=tmp_path / "resolv.conf", hosts=tmp_path / "hosts")
        assert lookup(r, "v4.example.test", ()) == ips("127.0.0.1")
        assert peer.names() == ["v4.example.test", "v4.example.test"]  # A and AAAA
    finally:
        peer.close()


# -- the real server ------------------------------------------------------------------------------
SILENT_LOOKUPS = 8
CONNECT_TIMEOUT = 6.0
UNRELATED_BOUND = 2.0  # an answering lookup on loopback: far below CONNECT_TIMEOUT


@pytest.mark.timing
def test_silent_names_do_not_delay_an_unrelated_lookup(tmp_path: Path, key_file: Path, zone):
    """Before the resolver, 4 pending silent names held this lookup for the whole 10 s."""
    args = ("--nameserver", zone.address, "--allow-target", "127.0.0.0/8")
    args += ("--connect-timeout", str(CONNECT_TIMEOUT))
    with closing_target() as tport, ServerProcess(tmp_path, key_file, *args) as srv:
        psk = srv.psk
        with ThreadPoolExecutor(SILENT_LOOKUPS) as pool:
            t_silent = time.monotonic()
            silent = [
                pool.submit(connect_status, srv.port, psk, Address(f"n{i}.{SILENT}", 80), 30)
                for i in range(SILENT_LOOKUPS)
            ]
            deadline = time.monotonic() + 10
            while sum(n.endswith(SILENT) for n in zone.names()) < SILENT_LOOKUPS:
                assert time.monotonic() < deadline, zone.queries
                time.sleep(0.01)
            t0 = time.monotonic()
            status = connect_status(srv.port, psk, Address("www.example.test", tport))
            took = time.monotonic() - t0
            assert not any(f.done() for f in silent)  # still pending while it was answered
            statuses = [f.result() for f in silent]
            silent_took = time.monotonic() - t_silent
        literal_status = connect_status(srv.port, psk, Address("127.1", tport))
        log = srv.log()
    print(f"unrelated lookup with {SILENT_LOOKUPS} silent pending: {took:.3f} s")
    assert status == ConnectStatus.SUCCEEDED, log[-2000:]
    assert took < UNRELATED_BOUND, log[-2000:]
    assert statuses == [ConnectStatus.DNS_FAILURE] * SILENT_LOOKUPS
    assert CONNECT_TIMEOUT - 0.5 < silent_took < CONNECT_TIMEOUT + 5  # ended by the deadline
    assert literal_status == ConnectStatus.SUCCEEDED
    assert "127.1" not in zone.names()  # a numeric host is never looked up


def test_nameserver_option_is_checked(tmp_path: Path, key_file: Path):
    base = [sys.executable, "-m", "mptun", "server", "--listen", "127.0.0.1:0"]
    base += ["--key-file", str(key_file)]
    for extra, why in [
        (["--nameserver", "ns.example.test"], "give the DNS server's IP address"),
        (["--nameserver", "192.0.2.1:0"], "port must be"),
        (["--nameserver", "192.0.2.1"] * 4, "at most 3"),
    ]:
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
