"""The benchmark's traffic generator: one peer program for every case, so only the path differs.

`serve` runs at the far end (the "internet" host) and answers one command line per connection:

    UP <sec>\n      the client streams; <sec> seconds after the first byte the server answers
                    one JSON line with what it received (bytes, seconds, steady rate), the
                    client stops and closes (no half-close: shadowsocks-libev has none)
    DOWN <sec>\n    the server streams for <sec> seconds, then closes
    ECHO\n          everything after the line comes back (small-message RTT, connection rate,
                    idle connections)

The client side (`up`, `down`, `rtt`, `connrate`, `hold`) connects directly or through a SOCKS5
proxy (mptun's client, ss-local) and prints one JSON line. Bulk data is cheap for the generator
itself: the sender uses sendfile from a memfd, the receiver discards with MSG_TRUNC (TCP drops
the bytes in the kernel, net/ipv4/tcp.c), so the relays, not the generator, are measured.

`--mptcp` (both sides) makes the generator's own sockets MPTCP: the bench's "kernel MPTCP, no
relay" reference. MPTCP ignores MSG_TRUNC (6.18 copies up to the buffer's size, checked
here), so that receiver pays one copy to user space that the TCP receivers do not.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

from mptun.common.sockets import IPPROTO_MPTCP

CHUNK = 1 << 20  # per sendfile / recv call
SAMPLE = 0.1  # seconds between throughput samples


# -- shared helpers ------------------------------------------------------------------------------
def _payload_fd(size: int = 8 << 20) -> int:
    """A memfd of random bytes to sendfile from (random: nothing on the path can compress it)."""
    fd = os.memfd_create("mptun-bench", 0)
    os.write(fd, os.urandom(size))
    return fd


def send_for(sock: socket.socket, seconds: float, until_readable: bool = False) -> int:
    """Stream for `seconds`, or until the peer speaks (zero-copy from a memfd); bytes sent."""
    fd = _payload_fd()
    size = os.fstat(fd).st_size
    sent = offset = 0
    deadline = time.monotonic() + seconds
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    try:
        while time.monotonic() < deadline:
            if until_readable and poll.poll(0):
                break
            n = os.sendfile(sock.fileno(), fd, offset, min(CHUNK, size - offset))
            sent += n
            offset = (offset + n) % size
    finally:
        os.close(fd)
    return sent


def receive_all(sock: socket.socket, seconds: float | None = None) -> dict:
    """Discard until EOF (or `seconds` after the first byte); bytes, time, rate after warm-up."""
    buf = bytearray(CHUNK)
    tally = Tally(seconds)
    while True:
        n = sock.recv_into(buf, CHUNK, socket.MSG_TRUNC)
        if not n or not tally.add(time.monotonic(), n):
            break
    return tally.result(time.monotonic())


class Tally:
    """Bytes received over time, and the rates `receive_all` reports.

    The transfer ends at the last byte counted: a read that comes after the deadline is not
    counted, and neither is its time. (Ending at that read's time penalised a relay that
    delivers in batches: with a batch every T, the window gained up to T without its bytes,
    0.7% of a 4 s transfer at T = 32 ms.)
    """

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds
        self.total = 0
        self.first = self.last = self.last_sample = 0.0
        self.samples: list[tuple[float, int]] = []

    def add(self, now: float, n: int) -> bool:
        """Count `n` bytes read at `now`; False (not counted) once past the deadline."""
        if self.seconds is not None and self.total and now - self.first >= self.seconds:
            return False
        if not self.total:
            self.first = self.last_sample = now
            self.samples.append((now, 0))
        self.total += n
        self.last = now
        if now - self.last_sample >= SAMPLE:
            self.samples.append((now, self.total))
            self.last_sample = now
        return True

    def result(self, now: float) -> dict:
        if not self.total:
            return summarize(0, now, now, [(now, 0)])
        samples = [*self.samples, (self.last, self.total)]
        return summarize(self.total, self.first, self.last, samples)


def summarize(total: int, first: float, end: float, samples: list[tuple[float, int]]) -> dict:
    """Rates over the whole transfer and after the warm-up (20% of it, at most 1 s)."""
    seconds = max(end - first, 1e-9)
    warm = first + min(1.0, 0.2 * seconds)
    start = next(((t, b) for t, b in samples if t >= warm), samples[0])
    steady_s = end - start[0]
    steady = (total - start[1]) * 8 / steady_s if steady_s > 0.2 else total * 8 / seconds
    return {"bytes": total, "seconds": seconds, "bps": total * 8 / seconds, "steady_bps": steady}


def socks5_connect(
    sock: socket.socket, host: str, port: int, recv: Callable[[int], bytes] | None = None
) -> None:
    """A SOCKS5 CONNECT (no auth) on a connected blocking socket; raises OSError on refusal."""
    recv = recv or (lambda n: _recv_exact(sock, n))
    sock.sendall(b"\x05\x01\x00")
    if recv(2) != b"\x05\x00":
        raise OSError("SOCKS5 proxy refused the greeting")
    sock.sendall(_socks_request(host, port))
    rep = recv(4)
    if rep[1] != 0:
        raise OSError(f"SOCKS5 CONNECT failed: reply {rep[1]}")
    alen = {1: 4, 4: 16}.get(rep[3]) or recv(1)[0]  # IPv4, IPv6, or a length-prefixed name
    recv(alen + 2)


def _socks_request(host: str, port: int) -> bytes:
    ip = ipaddress.ip_address(host)
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    return b"\x05\x01\x00" + atyp + ip.packed + struct.pack(">H", port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        c = sock.recv(n - len(out))
        if not c:
            raise OSError("connection closed early")
        out += c
    return bytes(out)


def dial(
    target: tuple[str, int],
    socks: tuple[str, int] | None,
    timeout: float = 10,
    mptcp: bool = False,
) -> socket.socket:
    """A blocking TCP (or MPTCP) connection to target, through a SOCKS5 proxy when given."""
    first = socks or target
    if mptcp:
        family = socket.AF_INET6 if ":" in first[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
        try:
            sock.settimeout(timeout)
            sock.connect(first)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(first, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if socks:
            socks5_connect(sock, *target)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


# -- server ----------------------------------------------------------------------------------------
class Server:
    """The far-end peer: asyncio for ECHO (many connections), a thread per bulk stream."""

    def __init__(self, host: str, port: int, mptcp: bool = False) -> None:
        self.host, self.port = host, port
        self.proto = IPPROTO_MPTCP if mptcp else 0

    async def run(self, ready: Callable[[int], None]) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        lst = socket.socket(family, socket.SOCK_STREAM, self.proto)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((self.host, self.port))
        lst.listen(4096)
        lst.setblocking(False)
        ready(lst.getsockname()[1])
        tasks: set[asyncio.Task] = set()
        while True:
            conn, _ = await loop.sock_accept(lst)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = loop.create_task(self.handle(conn))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    async def handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            head = b""
            while b"\n" not in head and len(head) < 64:
                c = await loop.sock_recv(conn, 64 - len(head))
                if not c:
                    return
                head += c
            line, _, rest = head.partition(b"\n")
            cmd = line.split()
            if cmd[:1] == [b"ECHO"]:
                if rest:
                    await loop.sock_sendall(conn, rest)
                while data := await loop.sock_recv(conn, 65536):
                    await loop.sock_sendall(conn, data)
            elif cmd[:1] == [b"UP"] and len(cmd) == 2:
                await loop.run_in_executor(None, self._sink, conn, len(rest), float(cmd[1]))
            elif cmd[:1] == [b"DOWN"] and len(cmd) == 2:
                await loop.run_in_executor(None, self._source, conn, float(cmd[1]))
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    @staticmethod
    def _sink(conn: socket.socket, already: int, seconds: float) -> None:
        conn.setblocking(True)
        result = receive_all(conn, seconds)
        result["bytes"] += already
        conn.sendall(json.dumps(result).encode() + b"\n")
        buf = bytearray(CHUNK)
        while conn.recv_into(buf, CHUNK, socket.MSG_TRUNC):  # until the client closes
            pass

    @staticmethod
    def _source(conn: socket.socket, seconds: float) -> None:
        conn.setblocking(True)
        send_for(conn, seconds)
        conn.shutdown(socket.SHUT_WR)
        try:
            while conn.recv(4096):  # wait for the client's close: nothing left unread
                pass
        except OSError:
            pass


# -- client jobs -----------------------------------------------------------------------------------
def job_up(target, socks, seconds: float, mptcp: bool = False) -> dict:
    with dial(target, socks, mptcp=mptcp) as s:
        s.sendall(f"UP {seconds}\n".encode())
        started = time.monotonic()
        sent = send_for(s, seconds + 60, until_readable=True)
        line = s.makefile("rb").readline()
    if not line:
        raise OSError("the server closed without a result")
    result = json.loads(line)
    result["sent"] = sent
    result["wall"] = time.monotonic() - started
    return result


def job_down(target, socks, seconds: float, mptcp: bool = False) -> dict:
    with dial(target, socks, mptcp=mptcp) as s:
        s.sendall(f"DOWN {seconds}\n".encode())
        return receive_all(s)


def job_rtt(
    target, socks, seconds: float, size: int = 64, interval: float = 0.01, mptcp: bool = False
) -> dict:
    """Ping-pong `size`-byte messages every `interval` s: RTT samples in milliseconds."""
    msg = os.urandom(size)
    samples: list[float] = []
    with dial(target, socks, mptcp=mptcp) as s:
        s.sendall(b"ECHO\n")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            s.sendall(msg)
            _recv_exact(s, size)
            samples.append((time.perf_counter() - t0) * 1000)
            time.sleep(interval)
    return {"rtt_ms": samples}


async def _connrate(target, socks, seconds: float, concurrency: int) -> dict:
    loop = asyncio.get_running_loop()
    done = errors = 0
    deadline = loop.time() + seconds
    latencies: list[float] = []

    async def recv_exact(sock: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            c = await loop.sock_recv(sock, n - len(out))
            if not c:
                raise OSError("closed early")
            out += c
        return out

    async def one() -> None:
        first = socks or target
        sock = socket.socket(socket.AF_INET6 if ":" in first[0] else socket.AF_INET)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, first)
            if socks:
                await loop.sock_sendall(sock, b"\x05\x01\x00")
                if await recv_exact(sock, 2) != b"\x05\x00":
                    raise OSError("greeting refused")
                await loop.sock_sendall(sock, _socks_request(*target))
                rep = await recv_exact(sock, 10)
                if rep[1] != 0:
                    raise OSError(f"reply {rep[1]}")
            await loop.sock_sendall(sock, b"ECHO\nping")
            if await recv_exact(sock, 4) != b"ping":
                raise OSError("bad echo")
        finally:
            sock.close()

    async def worker() -> None:
        nonlocal done, errors
        while loop.time() < deadline:
            t0 = loop.time()
            try:
                await asyncio.wait_for(one(), 10)
            except (OSError, TimeoutError):
                errors += 1
                await asyncio.sleep(0.01)
                continue
            done += 1
            latencies.append((loop.time() - t0) * 1000)

    t0 = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = loop.time() - t0
    return {
        "connections": done,
        "errors": errors,
        "seconds": elapsed,
        "per_s": done / elapsed,
        "latency_ms": sorted(latencies)[len(latencies) // 2] if latencies else None,
    }


def job_hold(target, socks, count: int) -> None:
    """Open `count` echo connections (one round trip each), print a line, hold until stdin ends."""
    held = []
    try:
        for _ in range(count):
            s = dial(target, socks)
            s.sendall(b"ECHO\nping")
            _recv_exact(s, 4)
            held.append(s)
        print(json.dumps({"open": len(held)}), flush=True)
        sys.stdin.read()
    finally:
        for s in held:
            s.close()


def _run_loop(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mptun.bench.traffic", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=0)
    sv.add_argument("--mptcp", action="store_true", help="listen with MPTCP")
    for name in ("up", "down", "rtt", "connrate", "hold"):
        p = sub.add_parser(name)
        p.add_argument("--target", required=True, help="HOST:PORT of `serve`")
        p.add_argument("--socks", help="HOST:PORT of a SOCKS5 proxy to go through")
        p.add_argument("--seconds", type=float, default=5.0)
        p.add_argument("--concurrency", type=int, default=16)
        p.add_argument("--count", type=int, default=1000)
        p.add_argument("--mptcp", action="store_true", help="connect with MPTCP (up/down/rtt)")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        threading.stack_size(512 * 1024)

        def ready(port: int) -> None:
            print(json.dumps({"port": port}), flush=True)

        _run_loop(Server(a.host, a.port, a.mptcp).run(ready))
        return 0
    target = _hostport(a.target)
    socks = _hostport(a.socks) if a.socks else None
    try:
        if a.cmd == "up":
            out = job_up(target, socks, a.seconds, mptcp=a.mptcp)
        elif a.cmd == "down":
            out = job_down(target, socks, a.seconds, mptcp=a.mptcp)
        elif a.cmd == "rtt":
            out = job_rtt(target, socks, a.seconds, mptcp=a.mptcp)
        elif a.cmd == "connrate":
            out = _run_loop(_connrate(target, socks, a.seconds, a.concurrency))
        else:
            job_hold(target, socks, a.count)
            return 0
    except OSError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


if __name__ == "__main__":
    sys.exit(main())
