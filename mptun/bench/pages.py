"""Page loads for `mptun bench`: an HTTP/1.1 server for the inet host and a page-like client.

A page is what a browser fetches for one web page: one 100 KiB object (the document), then 40
objects of 5-60 KiB (its resources) over at most 6 parallel connections to the host, each
connection fresh (a new TCP connection, and through a relay a new tunnel), which is the part of
real traffic that a relay pays per connection rather than per byte. The whole set is timed.

The server is an asyncio HTTP/1.1 server written for this (no HTTP server is installed on the
bench machines, and Python's `http.server` serves a connection per thread, which is the
bottleneck under load rather than the path): `GET /<bytes>` answers that many random bytes with
a Content-Length, from one buffer, keeping the connection open unless asked to close. The
client speaks HTTP/1.1 itself (the same asyncio loop for every path, so only the path differs),
optionally through a SOCKS5 proxy (mptun's client, ss-local); every request carries
`Connection: close` and every object gets its own connection, as after a browser's pool is
cold.

    python -m mptun.bench.pages serve --host H --port P [--port P2 ...]
    python -m mptun.bench.pages load --target H:P [--socks H:P] [--loads N]

`load` prints one JSON line: per load, the seconds of the whole set and of the first object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import time

from mptun.bench.traffic import _hostport, _run_loop, _socks_request

FIRST_OBJECT = 100 * 1024
OBJECTS = 40
OBJECT_MIN, OBJECT_MAX = 5 * 1024, 60 * 1024
PARALLEL = 6  # a browser's connections per host (HTTP/1.1)
MAX_OBJECT = 1 << 20  # the server refuses larger requests
HEAD_LIMIT = 8192
TIMEOUT = 30.0  # one object, connection to last byte


def page_sizes(seed: int = 18) -> list[int]:
    """The page: the first object's size, then the 40 resources' (fixed by `seed`)."""
    rnd = random.Random(seed)
    return [FIRST_OBJECT] + [rnd.randint(OBJECT_MIN, OBJECT_MAX) for _ in range(OBJECTS)]


# -- server --------------------------------------------------------------------------------------
class HttpServer(asyncio.Protocol):
    """One connection: requests are parsed as they arrive; each answer is written at once."""

    body = os.urandom(MAX_OBJECT)  # the same random bytes for every answer

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            if not self._answer(head):
                self.transport.close()
                return
        if len(self.buf) > HEAD_LIMIT:
            self._error(431, "Request Header Fields Too Large")
            self.transport.close()

    def _answer(self, head: bytes) -> bool:
        """Answer one request; False when the connection is to close after it."""
        assert self.transport is not None
        lines = head.split(b"\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or parts[0] != b"GET" or not parts[2].startswith(b"HTTP/1."):
            self._error(400, "Bad Request")
            return False
        try:
            size = int(parts[1].lstrip(b"/"))
        except ValueError:
            size = -1
        if not 0 <= size <= MAX_OBJECT:
            self._error(404, "Not Found")
            return False
        close = parts[2] == b"HTTP/1.0" or any(
            line.lower().replace(b" ", b"") == b"connection:close" for line in lines[1:]
        )
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (size, b"Connection: close\r\n" if close else b"")
        )
        self.transport.write(memoryview(self.body)[:size])
        return not close

    def _error(self, code: int, reason: str) -> None:
        assert self.transport is not None
        self.transport.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )


async def serve(host: str, ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(HttpServer, host, port, backlog=4096, reuse_address=True)
        for port in ports
    ]
    bound = [s.sockets[0].getsockname()[1] for s in servers]
    print(json.dumps({"ports": bound}), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


# -- client --------------------------------------------------------------------------------------
async def _read_exact(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise OSError("connection closed early") from None


async def fetch(target: tuple[str, int], socks: tuple[str, int] | None, size: int) -> int:
    """GET one object on a fresh connection (through SOCKS5 when given); its body's length."""
    first = socks or target
    reader, writer = await asyncio.open_connection(*first)
    try:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if socks:
            # greeting and request in one flight, as the bench's connection-rate client does
            writer.write(b"\x05\x01\x00" + _socks_request(*target))
            if await _read_exact(reader, 2) != b"\x05\x00":
                raise OSError("the SOCKS5 proxy refused the greeting")
            rep = await _read_exact(reader, 10)
            if rep[1] != 0:
                raise OSError(f"SOCKS5 CONNECT failed: reply {rep[1]}")
        writer.write(
            f"GET /{size} HTTP/1.1\r\nHost: {target[0]}\r\nConnection: close\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status:
            raise OSError(f"HTTP answer {status[:60]!r}")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            -1,
        )
        if length != size:
            raise OSError(f"Content-Length {length}, asked for {size}")
        got = 0
        while got < size:
            chunk = await reader.read(min(65536, size - got))
            if not chunk:
                raise OSError(f"connection closed after {got} of {size} bytes")
            got += len(chunk)
        return got
    except asyncio.LimitOverrunError:
        raise OSError("HTTP header too long") from None
    finally:
        writer.close()


async def load_page(
    target: tuple[str, int], socks: tuple[str, int] | None, sizes: list[int]
) -> dict:
    """One page: the first object, then the rest over at most PARALLEL connections at a time."""
    t0 = time.perf_counter()
    got = await asyncio.wait_for(fetch(target, socks, sizes[0]), TIMEOUT)
    first = time.perf_counter() - t0
    queue = list(sizes[1:])

    async def worker() -> int:
        n = 0
        while queue:
            n += await asyncio.wait_for(fetch(target, socks, queue.pop()), TIMEOUT)
        return n

    got += sum(await asyncio.gather(*(worker() for _ in range(PARALLEL))))
    return {"seconds": time.perf_counter() - t0, "first": first, "bytes": got}


async def load(
    target: tuple[str, int], socks: tuple[str, int] | None, loads: int, seed: int = 18
) -> dict:
    sizes = page_sizes(seed)
    out = []
    for _ in range(loads):
        out.append(await load_page(target, socks, sizes))
    return {
        "loads": out,
        "objects": len(sizes),
        "page_bytes": sum(sizes),
        "wall": time.time(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mptun.bench.pages", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, action="append", help="one per listener (0: any)")
    ld = sub.add_parser("load")
    ld.add_argument("--target", required=True, help="HOST:PORT of `serve`")
    ld.add_argument("--socks", help="HOST:PORT of a SOCKS5 proxy to go through")
    ld.add_argument("--loads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        _run_loop(serve(a.host, a.port or [0]))
        return 0
    target = _hostport(a.target)
    socks = _hostport(a.socks) if a.socks else None
    try:
        out = _run_loop(load(target, socks, max(1, a.loads)))
    except (TimeoutError, OSError) as e:
        print(json.dumps({"error": str(e) or type(e).__name__}), flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
