"""The DNS forwarder is no amplifier: where it binds, how large a UDP answer gets, the rate per
source address, and DNS over TCP's whole-query deadline and connection caps."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mptun.client.dns import (
    MAX_UDP_ANSWER,
    DnsForwarder,
    DnsTcpHandler,
    SourceRateLimit,
    check_dns_bind,
    fit_for_udp,
    udp_answer_limit,
)
from mptun.client.dnscache import DnsCache
from mptun.common import dns
from mptun.common.address import Address
from mptun.common.errors import ConfigError
from mptun.common.listener import AcceptLoop
from mptun.lab.netns import Netns, have_netns
from mptun.lab.wait import start_listener
from tests.helpers import (
    ROOT,
    MptunProcess,
    ServerProcess,
    read_stats_after_usr1,
    run_mptun,
    wait_listening,
)
from tests.peers import HUGE_COUNT, tcp_dns_server, tcp_exchange

HUGE = "huge.example.test"


def edns_query(name: str, qtype: int, msg_id: int, size: int) -> bytes:
    """A query with an OPT record announcing `size` bytes of UDP payload (RFC 6891 6.1.2)."""
    q = bytearray(dns.build_query(name, qtype, msg_id))
    struct.pack_into("!H", q, 10, 1)
    return bytes(q) + b"\0" + struct.pack("!HHIH", dns.Type.OPT, size, 0, 0)


def udp_ask(host: str, port: int, query: bytes, tries: int = 20) -> bytes:
    """One UDP exchange (retried while the listener and the tunnel start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.connect((host, port))
        for _ in range(tries):
            try:
                s.send(query)
                return s.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise AssertionError(f"no answer from {host}:{port}")


def tcp_ask(port: int, query: bytes) -> bytes:
    """One query over a new DNS-over-TCP connection to 127.0.0.1:port."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(dns.TcpFramer.frame(query))
        f = dns.TcpFramer()
        while (m := f.next_message()) is None:
            data = s.recv(65536)
            assert data, "the DNS server closed early"
            f.receive_data(data)
        return m


@contextlib.contextmanager
def dns_client(tmp: Path, key_file: Path, upstream_port: int, bind: str, *args: str):
    """A server on loopback (targets on 127.0.0.0/8 allowed) and `mptun client --dns BIND:PORT`
    asking the DNS peer at `upstream_port`: (the client, PORT). One port serves UDP and TCP, so
    it cannot be 0: `start_listener` proves the client holds both."""
    srv = ServerProcess(tmp, key_file, "--allow-target", "127.0.0.0/8", stats=False)
    started: list[MptunProcess] = []

    def start(port: int):
        c = MptunProcess(
            [
                "client", "--server", f"127.0.0.1:{srv.port}", "--key-file", str(key_file),
                "--dns", f"{bind}:{port}", "--dns-upstream", f"127.0.0.1:{upstream_port}", *args,
            ],
            tmp / f"client-{port}-{len(started)}.log",
        )  # fmt: skip
        started.append(c)
        return c.proc

    try:
        host = bind.strip("[]")
        proc, port = start_listener(start, host, protocols=("tcp", "udp"))
        yield next(c for c in started if c.proc is proc), port
    finally:
        for c in started:
            c.stop()
        srv.stop()


# ---- sizes, binds and buckets, pure -----------------------------------------------------------


def test_udp_answer_limit_is_the_askers_size_up_to_1232_or_512():
    def limit(raw: bytes) -> int:
        return udp_answer_limit(dns.parse(raw))

    assert limit(dns.build_query("a.test", 1, 1)) == 512
    assert limit(edns_query("a.test", 1, 1, 65535)) == MAX_UDP_ANSWER == 1232
    assert limit(edns_query("a.test", 1, 1, 4096)) == 1232
    assert limit(edns_query("a.test", 1, 1, 1000)) == 1000
    assert limit(edns_query("a.test", 1, 1, 100)) == 512  # below 512 counts as 512 (RFC 6891)


def test_fit_for_udp_keeps_the_question_and_an_opt():
    from tests.peers import respond

    query = edns_query(HUGE, dns.Type.TXT, 9, 65535)
    raw = respond(dns.build_query(HUGE, dns.Type.TXT, 9))
    assert len(raw) > 60_000
    out = fit_for_udp(raw, udp_answer_limit(dns.parse(query)))
    m = dns.parse(out)
    assert len(out) <= 1232 and m.truncated and m.id == 9 and not m.section(dns.Section.ANSWER)
    assert m.questions == dns.parse(raw).questions and m.opt is None  # upstream sent no OPT
    # an upstream answer with EDNS keeps an OPT record (RFC 6891 7), with this server's size
    with_opt = bytearray(raw)
    struct.pack_into("!H", with_opt, 10, 1)
    with_opt += b"\0" + struct.pack("!HHIH", dns.Type.OPT, 4096, 0x8000, 0)
    m = dns.parse(fit_for_udp(bytes(with_opt), 1232))
    assert m.truncated and m.opt is not None and m.opt.rclass == 1232 and m.dnssec_ok
    small = respond(dns.build_query("www.example.test", 1, 3))
    assert fit_for_udp(small, 512) == small


@pytest.mark.parametrize(
    "bind, ok",
    [
        ("127.0.0.1:5353", True),
        ("[::1]:5353", True),
        ("192.168.1.1:53", True),
        ("[fd00::1]:53", True),
        ("[fe80::1%2]:53", True),
        ("[::ffff:127.0.0.1]:53", True),
        ("0.0.0.0:5353", False),
        ("[::]:5353", False),
        ("[::ffff:0.0.0.0]:5353", False),  # binds every IPv4 address
        ("[::%1]:5353", False),
        ("9.9.9.9:53", False),
        ("[2a00:1450::1]:53", False),
        ("[::ffff:9.9.9.9]:53", False),
    ],
)
def test_dns_bind_check(bind: str, ok: bool):
    addr = Address.parse(bind)
    check_dns_bind(addr, allow_open=True)  # the explicit option allows everything
    if ok:
        check_dns_bind(addr, allow_open=False)
    else:
        with pytest.raises(ConfigError, match="--dns-open"):
            check_dns_bind(addr, allow_open=False)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_token_bucket():
    clock = Clock()
    rl = SourceRateLimit(5, clock=clock)  # bursts of 10
    lan, other = ipaddress.ip_address("192.168.1.20"), ipaddress.ip_address("192.168.1.21")
    assert sum(rl.allow(lan) for _ in range(100)) == 10
    assert rl.allow(other)  # each address has its own bucket
    clock.now += 1.0
    assert sum(rl.allow(lan) for _ in range(100)) == 5  # refilled at 5 a second
    clock.now += 1000
    assert sum(rl.allow(lan) for _ in range(100)) == 10  # never more than the burst
    mapped = ipaddress.ip_address("::ffff:192.168.1.20")
    assert not rl.allow(mapped)  # a dual-stack socket's spelling is the same source
    for lo in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
        assert all(rl.allow(ipaddress.ip_address(lo)) for _ in range(1000))
    off = SourceRateLimit(0, clock=clock)
    assert all(off.allow(lan) for _ in range(1000))


def test_rate_limit_table_is_bounded():
    rl = SourceRateLimit(1, max_sources=100, clock=Clock())
    for i in range(10_000):
        rl.allow(ipaddress.ip_address(f"2001:db8::{i:x}"))
    assert len(rl) == 100


# ---- the real client on loopback ------------------------------------------------------------


def test_large_answer_is_capped_over_udp_and_whole_over_tcp(tmp_path: Path, key_file: Path):
    """An amplifier's payoff: a 61 KB answer to a 46-byte query. It is at most 1232 bytes
    with TC set (512 without EDNS), from upstream and from the cache; TCP still gets it all."""
    with tcp_dns_server() as up, dns_client(tmp_path, key_file, up.port, "127.0.0.1") as (_, port):
        for i, size in enumerate((65535, 65535, 4096, 1232)):  # upstream first, then the cache
            query = edns_query(HUGE, dns.Type.TXT, 0x100 + i, size)
            answer = udp_ask("127.0.0.1", port, query)
            m = dns.parse(answer)
            assert len(answer) <= 1232 and m.truncated and m.id == 0x100 + i, len(answer)
            assert len(answer) / len(query) < 2  # the question again, and no more
        plain = udp_ask("127.0.0.1", port, dns.build_query(HUGE, dns.Type.TXT, 0x200))
        assert len(plain) <= 512 and dns.parse(plain).truncated
        full = tcp_ask(port, dns.build_query(HUGE, dns.Type.TXT, 0x300))
        m = dns.parse(full)
        assert len(full) > 60_000 and len(m.section(dns.Section.ANSWER)) == HUGE_COUNT
        assert up.queries.count(HUGE) == 1  # the rest came from the cache


@pytest.mark.parametrize("bind, ask", [("0.0.0.0", "127.0.0.1"), ("[::]", "::1")])
def test_wildcard_bind_with_dns_open_starts_and_answers(
    tmp_path: Path, key_file: Path, bind: str, ask: str
):
    """`--dns 0.0.0.0:PORT` crashed on Python 3.11, whose socket module has no IP_PKTINFO."""
    with (
        tcp_dns_server() as up,
        dns_client(tmp_path, key_file, up.port, bind, "--dns-open") as (client, port),
    ):
        m = dns.parse(udp_ask(ask, port, dns.build_query("www.example.test", dns.Type.A, 5)))
        assert m.id == 5 and m.rcode == dns.Rcode.NOERROR and m.section(dns.Section.ANSWER)
        assert "Traceback" not in client.log() and "internal error" not in client.log()


@pytest.mark.parametrize("bind", ["0.0.0.0", "[::]", "[::ffff:0.0.0.0]", "9.9.9.9"])
def test_open_bind_is_refused_without_the_option(key_file: Path, bind: str):
    r = run_mptun(
        "client", "--server", "127.0.0.1:1", "--key-file", str(key_file),
        "--dns", f"{bind}:5353", "--dns-upstream", "127.0.0.1", timeout=30,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "open resolver" in r.stderr and "--dns-open" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---- DNS over TCP: a trickle cannot hold a connection -------------------------------------------

DEADLINE = 1.5  # the handler's whole-query deadline in these tests
TRICKLE = 0.25  # one byte this often: well inside the deadline (1 byte per 8 s against 10 s)
SLACK = 2.0  # the loop's lateness in closing, on a loaded machine


@contextlib.asynccontextmanager
async def tcp_handler(upstream_port: int, **kw):
    """A DnsTcpHandler behind an accept loop on loopback, asking a real DNS-over-TCP peer."""
    fwd = DnsForwarder(lambda q: tcp_exchange("127.0.0.1", upstream_port, q), DnsCache())
    handler = DnsTcpHandler(fwd, **kw)
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    accept = AcceptLoop(asyncio.get_running_loop(), lsock, handler.handle, logging.getLogger())
    accept.start()
    try:
        yield lsock.getsockname()[1], fwd
    finally:
        accept.close()
        await accept.drain(5)


async def trickle(port: int, budget: float) -> float:
    """Send a query a byte every TRICKLE seconds, never its last byte; seconds until the server
    closed the connection, or inf when it held on for `budget` seconds."""
    loop = asyncio.get_running_loop()
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    query = dns.TcpFramer.frame(dns.build_query("www.example.test", dns.Type.A, 1))
    t0 = loop.time()
    try:
        for b in query[:-1]:
            if loop.time() - t0 > budget:
                break
            try:
                await loop.sock_sendall(s, bytes([b]))
                if not await asyncio.wait_for(loop.sock_recv(s, 100), TRICKLE):
                    return loop.time() - t0
            except TimeoutError:
                continue
            except OSError:
                return loop.time() - t0
        return math.inf
    finally:
        s.close()


@pytest.mark.timing
def test_tcp_trickle_is_closed_at_the_query_deadline():
    """A trickle (with an idle timeout that restarts on each read, 1 byte every 8 s held 50 of 50
    connections for 32 s), scaled down:
    every connection closes between the deadline and the deadline plus the loop's lateness,
    and a real query on another connection is answered meanwhile."""
    n = 20

    async def main() -> None:
        with tcp_dns_server() as up:
            async with tcp_handler(up.port, query_timeout=DEADLINE) as (port, fwd):
                held = [asyncio.create_task(trickle(port, DEADLINE + SLACK + 2)) for _ in range(n)]
                await asyncio.sleep(TRICKLE)
                query = dns.build_query("www.example.test", dns.Type.A, 9)
                m = dns.parse(await tcp_exchange("127.0.0.1", port, query))
                assert m.id == 9 and m.rcode == dns.Rcode.NOERROR
                closed = await asyncio.gather(*held)
                # not before the deadline (the client's clock starts first), nor long after
                assert all(DEADLINE - 0.05 <= t <= DEADLINE + SLACK for t in closed), closed
                assert fwd.counters["dns-tcp-timeout"] == n

    asyncio.run(main())


@pytest.mark.timing
def test_tcp_deadline_is_per_query_not_per_connection():
    """A client that keeps asking whole queries keeps its connection past the deadline."""

    async def main() -> None:
        with tcp_dns_server() as up:
            async with tcp_handler(up.port, query_timeout=DEADLINE) as (port, _):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    for i in range(6):  # 6 x DEADLINE / 3: twice the deadline in all
                        q = dns.build_query("www.example.test", dns.Type.A, i)
                        writer.write(dns.TcpFramer.frame(q))
                        n = int.from_bytes(await reader.readexactly(2), "big")
                        assert dns.parse(await reader.readexactly(n)).id == i
                        await asyncio.sleep(DEADLINE / 3)
                finally:
                    writer.close()

    asyncio.run(main())


async def tcp_exchange_nowhere(query: bytes) -> bytes:
    raise OSError("not asked in this test")


def test_tcp_caps_apply_to_other_sources_only():
    """The caps' bookkeeping: loopback is never counted; a released connection frees its slot."""
    fwd = DnsForwarder(tcp_exchange_nowhere, DnsCache())
    h = DnsTcpHandler(fwd, max_connections=3, per_source=2)
    a, b, c = (ipaddress.ip_address(f"192.168.1.{i}") for i in (1, 2, 3))
    assert h._admit(a) and h._admit(a) and not h._admit(a)  # per source
    assert h._admit(b) and not h._admit(c)  # in total
    assert all(h._admit(ipaddress.ip_address("127.0.0.1")) for _ in range(100))
    h._release(a)
    assert h._admit(c)


# ---- a source other than loopback, in a namespace ------------------------------------------------

WILD, SRC = "198.51.100.1", "198.51.100.2"
RATE = 5  # --dns-rate-limit in the namespace test: bursts of 2 x RATE


def run_tool(ns: Netns, *args: object) -> dict:
    r = ns.exec(sys.executable, "-m", "tests.tools.dns_flood", *map(str, args), cwd=ROOT)
    return json.loads(r.stdout)


@pytest.mark.root
@pytest.mark.netns
def test_rate_limit_and_tcp_cap_for_a_lan_source(tmp_path: Path, key_file: Path):
    """`mptun client --dns 0.0.0.0:PORT --dns-open` in a namespace: answers from the address
    asked; a UDP flood from one non-loopback address gets at most its bucket's worth, loopback
    is not limited; TCP from one such address holds at most 16 connections."""
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    with Netns("dnsrl") as ns:
        for a in (WILD, SRC):
            ns.ip("addr", "add", f"{a}/32", "dev", "lo")
        logs = []

        def start(name: str, *argv: str) -> subprocess.Popen:
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 (closed below)
            logs.append(log)
            return ns.popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

        try:
            peer = start("peer", "-m", "tests.peers", "dns", "--bind", "127.0.0.1", "--port", "53")
            wait_listening("127.0.0.1", 53, proc=peer, prefix=ns.prefix())
            mptun = ("-m", "mptun", "--log-level", "debug")
            srv = start(
                "server", *mptun, "server", "--listen", "127.0.0.1:8443",
                "--key-file", str(key_file), "--allow-target", "127.0.0.0/8",
            )  # fmt: skip
            wait_listening("127.0.0.1", 8443, proc=srv, prefix=ns.prefix())
            stats = tmp_path / "client-stats.json"
            cli = start(
                "client", *mptun, "client", "--server", "127.0.0.1:8443",
                "--key-file", str(key_file), "--dns", "0.0.0.0:5353", "--dns-open",
                "--dns-upstream", "127.0.0.1:53", "--dns-rate-limit", str(RATE),
                "--stats-file", str(stats),
            )  # fmt: skip
            wait_listening("0.0.0.0", 5353, proc=cli, prefix=ns.prefix(), udp=True)
            wait_listening("0.0.0.0", 5353, proc=cli, prefix=ns.prefix())

            # loopback: 100 queries one after another, far over the rate, all answered
            lo = run_tool(ns, "lockstep", "127.0.0.1", "127.0.0.1", 5353, 100)
            assert lo["answered"] == 100, lo
            # the LAN address, from the address asked (the socket is connected to it)
            flood = run_tool(ns, "flood", SRC, WILD, 5353, 100)
            most = 2 * RATE + RATE * flood["seconds"] + 1  # the burst and what refilled
            assert 1 <= flood["answered"] <= most, flood
            counters = read_stats_after_usr1(cli.pid, stats)["counters"]
            assert counters["dns-rate-limited"] >= 1, counters
            # TCP: 16 connections per source address; loopback has no such cap
            hold = run_tool(ns, "tcp-hold", SRC, WILD, 5353, 20)
            assert hold == {"opened": 20, "closed": 4, "answered": True}, hold
            hold = run_tool(ns, "tcp-hold", "127.0.0.1", "127.0.0.1", 5353, 20)
            assert hold == {"opened": 20, "closed": 0, "answered": True}, hold
            counters = read_stats_after_usr1(cli.pid, stats)["counters"]
            assert counters["dns-tcp-refused"] == 4, counters
        finally:
            ns.stop_processes()
            for log in logs:
                log.close()
