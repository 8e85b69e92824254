"""A tiny authoritative DNS server for tests, written byte by byte (independent of common/dns.py).

Zone `example.test`:
- `<name>.example.test A` for names in `A_RECORDS`: one A record, TTL 60;
- `big.example.test TXT`: twelve 100-byte strings (over 1,200 bytes: too big for plain UDP);
- any other name under example.test: NXDOMAIN with a SOA (TTL 300, MINIMUM 30);
- anything else: REFUSED.
Served over TCP (RFC 1035 4.2.2 framing), by a thread or by an asyncio server with a gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

A_RECORDS = {"www.example.test": "198.51.100.80", "mail.example.test": "198.51.100.25"}
A_TTL = 60
SOA_TTL, SOA_MINIMUM = 300, 30
TXT_COUNT, TXT_LEN = 12, 100


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
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

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
