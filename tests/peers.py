"""Peers: what a test puts at either end of mptun (the process plumbing is in tests/helpers.py).

- an HTTP peer (`http_server`): GET /bytes/SIZE/SEED streams `deterministic_bytes`, PUT and POST
  answer the body's sha256;
- TCP targets: `StreamTarget` (streams until told or broken), `closing_target` (accepts, closes);
- clients: `socks_open` (a SOCKS5 CONNECT), hand-made tunnel first flights (`flight`, `exchange`,
  `connect_status`) and the counters they move (`delta`);
- a tiny authoritative DNS server (`tcp_dns_server`, `start_gated_server`, `respond`);
- `python -m tests.peers http|udp-echo|dns ...`: peers run inside test-bed namespaces. HTTP and
  UDP echo print one line per client they serve, `<kind> <source address>`, flushed at once, so
  a test can tell which address a connection came from (the VPS's: through the tunnel; the LAN
  host's: around it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mptun.common.address import Address
from mptun.common.crypto import DEFAULT_CIPHER, cipher_by_name
from mptun.common.handshake import ClientHandshake, NeedData, Response, WireMode
from mptun.common.sockets import family_of

# --- the HTTP peer and its stream


def deterministic_bytes(size: int, seed: int = 1) -> Iterator[bytes]:
    """A reproducible pseudo-random stream, in 1 MiB chunks (cheap: SHAKE-256)."""
    chunk = 1 << 20
    done = 0
    block = 0
    while done < size:
        n = min(chunk, size - done)
        yield hashlib.shake_256(f"{seed}:{block}".encode()).digest(n)
        done += n
        block += 1


def sha256_of_stream(size: int, seed: int = 1) -> str:
    h = hashlib.sha256()
    for c in deterministic_bytes(size, seed):
        h.update(c)
    return h.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # /bytes/<size>/<seed>
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "bytes":
            self.send_error(404)
            return
        size, seed = int(parts[1]), int(parts[2])
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        for c in deterministic_bytes(size, seed):
            self.wfile.write(c)

    def do_PUT(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        while n:
            c = self.rfile.read(min(n, 1 << 20))
            if not c:
                break
            h.update(c)
            n -= len(c)
        body = (h.hexdigest() + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


class _V4Server(ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def http_server(host: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """A local HTTP peer: GET /bytes/SIZE/SEED streams a known stream; PUT returns sha256."""
    cls = _V6Server if family_of(host) == socket.AF_INET6 else _V4Server
    srv = cls((host, 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield host, srv.server_address[1]
    finally:
        srv.shutdown()


# --- TCP targets and clients (SOCKS5, hand-made first flights)

# The statuses a failed first flight is counted under (server/service.py, common/errors.py).
HANDSHAKE_STATUSES = ("auth", "replay", "clock", "replay-full", "timeout", "incomplete", "protocol")


def delta(after: dict[str, int], before: dict[str, int], keys=HANDSHAKE_STATUSES) -> dict:
    """Counter increments between two dumps, restricted to `keys`, zeros left out."""
    out = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return {k: v for k, v in out.items() if v}


def flight(psk: bytes, target: Address, clock=time.time, early: bytes = b"") -> ClientHandshake:
    """A client handshake whose first flight has no padding (short and deterministic in size)."""
    # Encrypted: the mode a default server accepts (plain only with --bulk plain).
    hs = ClientHandshake(
        psk,
        cipher_by_name(DEFAULT_CIPHER),
        target,
        WireMode.ENCRYPTED,
        clock=clock,
        padding=_no_pad,
    )
    return hs


def _no_pad(_: int) -> int:
    return 0


def exchange(port: int, data: bytes, hs: ClientHandshake, timeout: float = 10.0) -> bytes:
    """Send a first flight, read the whole authenticated response; returns its raw bytes."""
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        while True:
            event = hs.next_event()
            if isinstance(event, Response):
                return raw
            assert isinstance(event, NeedData)
            chunk = s.recv(hs.bytes_needed())
            assert chunk, "server closed before its response"
            raw += chunk
            hs.receive_data(chunk)


def connect_status(port: int, psk: bytes, target: Address, timeout: float = 15.0):
    """One tunnel request to `target`: the server's ConnectStatus."""
    hs = flight(psk, target)
    data = hs.first_flight()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        while not isinstance(event := hs.next_event(), Response):
            chunk = s.recv(hs.bytes_needed())
            assert chunk, "server closed before its response"
            hs.receive_data(chunk)
    return event.status


@contextlib.contextmanager
def closing_target() -> Iterator[int]:
    """A loopback TCP target that accepts and closes at once; yields its port."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join()
        srv.close()


def socks_open(
    socks_port: int, target: Address, timeout: float = 10.0
) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT through the client; returns the socket and the reply code."""
    s = socket.create_connection(("127.0.0.1", socks_port), timeout=timeout)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00" + target.encode())
    head = b""
    while len(head) < 4:  # VER REP RSV ATYP, then an address whose length ATYP gives
        c = s.recv(4 - len(head))
        if not c:
            return s, -1
        head += c
    rest = {1: 4 + 2, 4: 16 + 2}.get(head[3], 0)
    while rest:
        rest -= len(s.recv(rest))
    return s, head[1]


class StreamTarget:
    """A loopback target that streams `chunk`-sized pieces every `interval` s until told or
    broken; `ends` collects how each connection ended ("eof", "reset", "stopped")."""

    def __init__(self, chunk: int = 16384, interval: float = 0.01, total: int | None = None):
        self.chunk, self.interval, self.total = chunk, interval, total
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.stop = threading.Event()
        self.ends: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> Address:
        return Address.parse(f"127.0.0.1:{self.port}")

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        sent, data = 0, os.urandom(self.chunk)
        try:
            while not self.stop.is_set() and (self.total is None or sent < self.total):
                conn.sendall(data)
                sent += len(data)
                time.sleep(self.interval)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
            self.ends.append("eof" if not self.stop.is_set() else "stopped")
        except OSError:
            self.ends.append("reset")
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.srv.close()


def read_until_end(s: socket.socket, timeout: float) -> tuple[int, str]:
    """Read until EOF, reset or `timeout`; (bytes read, "eof" | "reset" | "hang")."""
    s.settimeout(timeout)
    n = 0
    try:
        while chunk := s.recv(65536):
            n += len(chunk)
    except ConnectionResetError:
        return n, "reset"
    except TimeoutError:
        return n, "hang"
    return n, "eof"


# --- DNS: a tiny authoritative server, written byte by byte (independent of common/dns.py).
#
# Zone `example.test`:
# - `<name>.example.test A` for names in `A_RECORDS`: one A record, TTL 60;
# - `big.example.test TXT`: twelve 100-byte strings (over 1,200 bytes: too big for plain UDP);
# - any other name under example.test: NXDOMAIN with a SOA (TTL 300, MINIMUM 30);
# - anything else: REFUSED.
# Served over TCP (RFC 1035 4.2.2 framing), by a thread or by an asyncio server with a gate.

A_RECORDS = {"www.example.test": "198.51.100.80", "mail.example.test": "198.51.100.25"}
A_TTL = 60
SOA_TTL, SOA_MINIMUM = 300, 30
# big.example.test TXT: over 512 bytes (truncated without EDNS), under the 1232-byte UDP cap
TXT_COUNT, TXT_LEN = 10, 100
# huge.example.test TXT: an answer near the 64 KiB TCP message limit (an amplifier's payoff)
HUGE_COUNT, HUGE_LEN = 229, 255


def _labels(wire: bytes, pos: int) -> tuple[str, int]:
    parts = []
    while wire[pos]:
        n = wire[pos]
        parts.append(wire[pos + 1 : pos + 1 + n].decode("ascii").lower())
        pos += 1 + n
    return ".".join(parts), pos + 1


def _name(text: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in text.split(".")) + b"\0"


def respond(query: bytes) -> bytes:
    """The answer to one query (uncompressed question, as stub resolvers send)."""
    qid, qflags = struct.unpack_from("!HH", query)
    name, pos = _labels(query, 12)
    qtype, _qclass = struct.unpack_from("!HH", query, pos)
    question = query[12 : pos + 4]
    answers: list[bytes] = []
    authority: list[bytes] = []
    rcode = 0
    ptr = b"\xc0\x0c"  # the question's name
    if name in A_RECORDS and qtype == 1:
        ip = socket.inet_aton(A_RECORDS[name])
        answers.append(ptr + struct.pack("!HHIH", 1, 1, A_TTL, 4) + ip)
    elif name == "big.example.test" and qtype == 16:
        for i in range(TXT_COUNT):
            text = bytes([TXT_LEN]) + bytes([0x61 + i % 26]) * TXT_LEN
            answers.append(ptr + struct.pack("!HHIH", 16, 1, A_TTL, len(text)) + text)
    elif name == "huge.example.test" and qtype == 16:
        for i in range(HUGE_COUNT):
            text = bytes([HUGE_LEN]) + bytes([0x61 + i % 26]) * HUGE_LEN
            answers.append(ptr + struct.pack("!HHIH", 16, 1, A_TTL, len(text)) + text)
    elif name.endswith("example.test") and name not in A_RECORDS:
        rcode = 3 if name != "example.test" else 0
        rdata = _name("ns.example.test") + _name("admin.example.test")
        rdata += struct.pack("!IIIII", 1, 3600, 600, 86400, SOA_MINIMUM)
        zone = _name("example.test")
        authority.append(zone + struct.pack("!HHIH", 6, 1, SOA_TTL, len(rdata)) + rdata)
    elif not name.endswith("example.test"):
        rcode = 5
    flags = 0x8000 | 0x0400 | (qflags & 0x0100) | rcode  # QR, AA, RD copied
    header = struct.pack("!HHHHHH", qid, flags, 1, len(answers), len(authority), 0)
    return header + question + b"".join(answers) + b"".join(authority)


@dataclass
class Upstream:
    """What the server saw: queries answered, connections, and the most open at once."""

    host: str
    port: int
    queries: list[str] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _serve_stream(recv, send, up: Upstream) -> None:
    buf = b""
    while True:
        data = recv()
        if not data:
            return
        buf += data
        while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
            n = int.from_bytes(buf[:2], "big")
            query, buf = buf[2 : 2 + n], buf[2 + n :]
            with up.lock:
                up.queries.append(_labels(query, 12)[0])
            answer = respond(query)
            send(len(answer).to_bytes(2, "big") + answer)


@contextlib.contextmanager
def tcp_dns_server(host: str = "127.0.0.1") -> Iterator[Upstream]:
    """A threaded DNS-over-TCP server on a free port."""
    up = Upstream(host, 0)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with up.lock:
                up.connections += 1
            self.request.settimeout(10)
            try:
                _serve_stream(lambda: self.request.recv(65536), self.request.sendall, up)
            except OSError:
                pass

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = family_of(host)

    srv = Server((host, 0), Handler)
    up.port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield up
    finally:
        srv.shutdown()
        srv.server_close()


async def start_gated_server(gate: asyncio.Event) -> tuple[asyncio.Server, Upstream]:
    """An asyncio DNS-over-TCP server on loopback that answers only once `gate` is set."""
    up = Upstream("127.0.0.1", 0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up.connections += 1
        up.open_now += 1
        up.peak = max(up.peak, up.open_now)
        try:
            n = int.from_bytes(await reader.readexactly(2), "big")
            query = await reader.readexactly(n)
            up.queries.append(_labels(query, 12)[0])
            await gate.wait()
            answer = respond(query)
            writer.write(len(answer).to_bytes(2, "big") + answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            up.open_now -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    return server, up


async def tcp_exchange(host: str, port: int, query: bytes) -> bytes:
    """One query over a new TCP connection (what the tunnel does, minus the tunnel)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(len(query).to_bytes(2, "big") + query)
        await writer.drain()
        n = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(n)
    finally:
        writer.close()


# --- peers inside test-bed namespaces (`python -m tests.peers`)


class _LoggingHandler(_Handler):
    def setup(self) -> None:
        super().setup()
        _report("http", self.client_address[0])


def _report(kind: str, host: str) -> None:
    if host.startswith("::ffff:"):
        host = host[len("::ffff:") :]
    print(kind, host, flush=True)


def serve_http(bind: str, port: int) -> None:
    """GET /bytes/SIZE/SEED (`http_server`'s stream) on a dual-stack socket."""
    srv = _V6Server((bind, port), _LoggingHandler)
    print("ready", flush=True)
    srv.serve_forever()


def serve_udp_echo(bind: str, port: int) -> None:
    """Echo every datagram back (stands in for a QUIC server)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((bind, port))
    print("ready", flush=True)
    while True:
        data, addr = sock.recvfrom(65535)
        _report("udp", addr[0])
        sock.sendto(data, addr)


def serve_dns(bind: str, port: int) -> None:
    """DNS over TCP answered by `respond` (the upstream a namespace's `mptun client --dns` asks)."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(10)
            with contextlib.suppress(OSError):
                _serve_stream(lambda: self.request.recv(65536), self.request.sendall, up)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = family_of(bind)

    up = Upstream(bind, port)
    srv = Server((bind, port), Handler)
    print("ready", flush=True)
    srv.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.peers")
    p.add_argument("kind", choices=["http", "udp-echo", "dns"])
    p.add_argument("--bind", default="::")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    target = {"http": serve_http, "udp-echo": serve_udp_echo, "dns": serve_dns}[a.kind]
    t = threading.Thread(target=target, args=(a.bind, a.port), daemon=True)
    t.start()
    try:
        t.join()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
