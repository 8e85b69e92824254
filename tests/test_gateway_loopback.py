"""Gateway listeners and the DNS forwarder on loopback: real processes, sockets and protocol."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mptun.client.dns import DnsForwarder
from mptun.client.dnscache import DnsCache
from mptun.client.redirect import NoTarget, redirected_target
from mptun.common import dns
from mptun.common.address import Address
from mptun.common.crypto import DEFAULT_CIPHER, cipher_by_name, load_key_file
from mptun.common.handshake import ConnectStatus, NeedData, ServerHandshake
from mptun.common.replay import ReplayGuard
from tests.helpers import (
    ROOT,
    MptunProcess,
    ServerProcess,
    closed_port,
    start_listener,
)
from tests.peers import (
    A_TTL,
    TXT_COUNT,
    http_server,
    sha256_of_stream,
    start_gated_server,
    tcp_dns_server,
    tcp_exchange,
)


def test_forwarded_first_bytes_ride_in_the_first_flight(tmp_path: Path, key_file: Path):
    """A protocol-speaking server checks what the first flight carried: target and request."""
    psk = load_key_file(key_file)
    lsock = socket.create_server(("127.0.0.1", 0))
    seen: list = []

    def serve() -> None:
        while True:  # a connection without first bytes would be tunnelled too
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                hs = ServerHandshake(psk, cipher_by_name(DEFAULT_CIPHER), ReplayGuard())
                while isinstance(ev := hs.next_event(), NeedData):
                    data = conn.recv(hs.bytes_needed())
                    if not data:
                        break
                    hs.receive_data(data)
                else:
                    seen.append(ev)
                    conn.sendall(hs.respond(ConnectStatus.SUCCEEDED) + b"pong")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    cli = MptunProcess(
        [
            "client",
            "--server",
            f"127.0.0.1:{lsock.getsockname()[1]}",
            "--key-file",
            str(key_file),
            "--forward",
            "127.0.0.1:0=example.test:80",  # the kernel picks the port; the log says which
            "--bulk",
            "plain",  # this server speaks the handshake only, not the encrypted records
        ],
        tmp_path / "client.log",
    )
    try:
        (port,) = cli.ports("forward")
        request = b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            assert s.recv(100) == b"pong"
        mine = [r for r in seen if getattr(r, "early_data", b"")]  # not the server checks
        assert len(mine) == 1 and mine[0].early_data == request
        assert mine[0].target == Address("example.test", 80)
    finally:
        cli.stop()
        lsock.close()


def test_forward_end_to_end(mptun_pair):
    with http_server() as (host, hport):
        pair = mptun_pair(
            server_args=("--allow-target", "127.0.0.0/8"),
            client_args=("--forward", f"127.0.0.1:0={host}:{hport}"),
        )
        (port,) = pair.client.ports("forward")
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{port}/bytes/3000000/5"],
            capture_output=True,
        )
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(3_000_000, 5)
        assert "forward 127.0.0.1:" in pair.client.log()


def udp_ask(port: int, query: bytes, tries: int = 20, timeout: float = 0.5) -> bytes | None:
    """Send a query to 127.0.0.1:port over UDP; retry while the listener may still be starting."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        for _ in range(tries):
            try:
                s.send(query)
                return s.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                continue
    return None


def tcp_ask(port: int, *queries: bytes) -> list[bytes]:
    """Pipeline queries over one TCP connection; answers in arrival order."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"".join(dns.TcpFramer.frame(q) for q in queries))
        f = dns.TcpFramer()
        out: list[bytes] = []
        while len(out) < len(queries):
            data = s.recv(65536)
            assert data, "the DNS server closed early"
            f.receive_data(data)
            while (m := f.next_message()) is not None:
                out.append(m)
        return out


def test_dns_through_the_tunnel(tmp_path: Path, key_file: Path):
    """--dns answers over UDP and TCP through the tunnel; the cache spares the upstream."""
    clients: list[MptunProcess] = []
    with (
        tcp_dns_server() as up,
        ServerProcess(tmp_path, key_file, "--allow-target", "127.0.0.0/8", stats=False) as srv,
    ):

        def start(port: int):
            """--dns takes no port 0 (one port for UDP and TCP): a port free now, proven ours."""
            c = MptunProcess(
                ["client", "--server", f"127.0.0.1:{srv.port}", "--key-file", str(key_file),
                 "--dns", f"127.0.0.1:{port}", "--dns-upstream", f"127.0.0.1:{up.port}"],
                tmp_path / f"client-{len(clients)}.log",
            )  # fmt: skip
            clients.append(c)
            return c.proc

        try:
            _, dport = start_listener(start, protocols=("tcp", "udp"))
            _dns_answers(dport, up, clients[-1])
        finally:
            for c in clients:
                c.stop()


def _dns_answers(dport: int, up, client: MptunProcess) -> None:
    """What test_dns_through_the_tunnel asks of the client's DNS listener on `dport`."""
    a = dns.parse(udp_ask(dport, dns.build_query("www.example.test", dns.Type.A, 0x1111)))
    assert a.id == 0x1111 and a.rcode == 0
    rec = a.section(dns.Section.ANSWER)[0]
    assert rec.ttl == A_TTL
    assert up.queries == ["www.example.test"] and up.connections == 1
    # again, another ID: from the cache, the upstream sees nothing new
    b = dns.parse(udp_ask(dport, dns.build_query("www.example.test", dns.Type.A, 0x2222)))
    assert b.id == 0x2222 and b.records[0].ttl <= A_TTL and up.connections == 1
    # too big for plain UDP: truncated, then whole over TCP or with EDNS
    big = dns.build_query("big.example.test", dns.Type.TXT, 0x3333)
    t = dns.parse(udp_ask(dport, big))
    assert t.truncated and not t.records and t.id == 0x3333
    full, nx = tcp_ask(dport, big, dns.build_query("nope.example.test", dns.Type.A, 0x4444))
    answers = {dns.parse(full).id: dns.parse(full), dns.parse(nx).id: dns.parse(nx)}
    assert len(answers[0x3333].section(dns.Section.ANSWER)) == TXT_COUNT
    assert answers[0x4444].rcode == dns.Rcode.NXDOMAIN
    edns = bytearray(big)
    struct.pack_into("!H", edns, 10, 1)
    edns += b"\0" + struct.pack("!HHIH", 41, 4096, 0, 0)
    e = dns.parse(udp_ask(dport, bytes(edns)))
    assert not e.truncated and len(e.section(dns.Section.ANSWER)) == TXT_COUNT
    # garbage gets no answer; the server keeps serving
    assert udp_ask(dport, b"\x00\x01garbage", tries=1, timeout=0.3) is None
    c = dns.parse(udp_ask(dport, dns.build_query("mail.example.test", dns.Type.A, 5)))
    assert c.rcode == 0 and c.records[0].rdata_len == 4
    assert " dns " in client.log() or "dns mptcp" in client.log()


async def wait_async(predicate, what: str, timeout: float = 10.0) -> None:
    """Poll `predicate` on the running loop until true (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


def _forwarder(port: int, **kw) -> DnsForwarder:
    return DnsForwarder(lambda q: tcp_exchange("127.0.0.1", port, q), DnsCache(), **kw)


def test_identical_queries_share_one_upstream_exchange():
    async def main() -> None:
        gate = asyncio.Event()
        server, up = await start_gated_server(gate)
        fwd = _forwarder(up.port)
        tasks = [
            asyncio.create_task(fwd.resolve(dns.build_query("www.example.test", 1, i)))
            for i in range(20)
        ]
        while not up.queries:
            await asyncio.sleep(0.01)
        gate.set()
        answers = [dns.parse(a) for a in await asyncio.gather(*tasks)]
        assert [a.id for a in answers] == list(range(20))
        assert all(a.rcode == 0 and a.records for a in answers)
        assert up.connections == 1 and fwd.counters["dns-coalesced"] == 19
        server.close()

    asyncio.run(main())


def test_inflight_and_pending_limits():
    async def main() -> None:
        gate = asyncio.Event()
        server, up = await start_gated_server(gate)
        fwd = _forwarder(up.port, max_inflight=2, max_pending=4)
        names = [f"n{i}.example.test" for i in range(6)]
        tasks = [
            asyncio.create_task(fwd.resolve(dns.build_query(n, 1, i))) for i, n in enumerate(names)
        ]
        # two beyond max_pending are answered SERVFAIL without waiting for the gate; the
        # other four cannot end before it opens, so the count is exact once two have ended
        await wait_async(lambda: sum(t.done() for t in tasks) >= 2, "two early answers")
        # only max_inflight tunnels at once: two reach the upstream (and `peak` below says
        # never more)
        await wait_async(lambda: up.open_now >= 2, "two upstream exchanges")
        early = [t for t in tasks if t.done()]
        assert len(early) == 2
        assert all(dns.parse(t.result()).rcode == dns.Rcode.SERVFAIL for t in early)
        assert up.open_now == 2
        gate.set()
        rest = [dns.parse(a) for a in await asyncio.gather(*tasks)]
        assert sum(a.rcode == dns.Rcode.NXDOMAIN for a in rest) == 4
        assert up.peak == 2 and fwd.counters["dns-overload"] == 2
        server.close()

    asyncio.run(main())


@pytest.mark.timing
def test_upstream_failures_answer_servfail():
    async def main() -> None:
        q = dns.build_query("www.example.test", 1, 77)
        with closed_port() as closed:  # held, never listening: connection refused
            fwd = _forwarder(closed)
            r = dns.parse(await fwd.resolve(q))
        assert r.id == 77 and r.rcode == dns.Rcode.SERVFAIL and r.questions
        # a silent upstream: SERVFAIL once the timeout has passed (an event loop's timer fires
        # no earlier than asked, give or take its clock's resolution); the upper bound only
        # says it does not wait for the upstream, which never answers, and is wide for a
        # loaded machine
        gate = asyncio.Event()
        server, up = await start_gated_server(gate)
        fwd = _forwarder(up.port, timeout=0.3)
        t0 = time.monotonic()
        r = dns.parse(await fwd.resolve(q))
        took = time.monotonic() - t0
        assert r.rcode == dns.Rcode.SERVFAIL and 0.3 - 0.01 < took < 0.3 + 5, took

        # an answer for another question is not passed on
        async def wrong(query: bytes) -> bytes:
            return await tcp_exchange(
                "127.0.0.1", up.port, dns.build_query("mail.example.test", 1, 77)
            )

        gate.set()
        fwd = DnsForwarder(wrong, DnsCache())
        assert dns.parse(await fwd.resolve(q)).rcode == dns.Rcode.SERVFAIL
        # queries that are not plain queries
        assert await fwd.resolve(b"junk") is None
        assert await fwd.resolve(dns.reply_header_only(q, dns.parse(q), 0)) is None
        notify = bytearray(q)
        notify[2] |= 4 << 3  # opcode NOTIFY
        assert dns.parse(await fwd.resolve(bytes(notify))).rcode == dns.Rcode.NOTIMP
        server.close()

    asyncio.run(main())


def test_a_direct_connection_has_no_redirect_target():
    with (
        socket.create_server(("127.0.0.1", 0)) as lsock,
        socket.create_connection(lsock.getsockname()),
    ):
        conn, _ = lsock.accept()
        with conn, pytest.raises(NoTarget):
            redirected_target(conn)


def test_client_cli_errors():
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mptun", "client", "--server", "127.0.0.1:1", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"MPTUN_KEY": "A" * 43 + "="},
        )

    for args, msg in [
        (("--dns", "127.0.0.1:5353"), "--dns-upstream"),
        (("--forward", "127.0.0.1:1"), "LOCAL_HOST:PORT=TARGET_HOST:PORT"),
        (("--forward", "example.test:1=127.0.0.1:2"), "give an IP address"),
        (("--redir", "127.0.0.1:99999"), "port"),
    ]:
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr
