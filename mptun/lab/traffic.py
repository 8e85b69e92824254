"""Verified, time-driven traffic for the demo, the multipath tests and benchmarks.

    python -m mptun.lab.traffic serve --listen HOST:PORT
    python -m mptun.lab.traffic fetch --target HOST:PORT [--socks HOST:PORT] --seconds S
    python -m mptun.lab.traffic counters IFACE... [--interval S]

`serve` answers a request line `SEND <seconds>\\n` by streaming a known pattern for that long, then
closes its sending side and prints `{"event": "sent", "bytes": N}`. `fetch` (through SOCKS5 when
given) checks every byte against the pattern at its offset, so a lost, duplicated or reordered
byte is caught where it happens, and prints one JSON line per interval with the running count
and a final `{"event": "done", "bytes": N, "ok": ...}`; equal totals at both ends mean nothing was
lost. The pattern repeats a random block of prime length, so no shift by a whole number of
chunks can line up by accident. `counters` prints the interfaces' byte counters (from /sys) per
interval. Timestamps are CLOCK_MONOTONIC, shared by every process and namespace on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from pathlib import Path

from mptun.common.address import Address
from mptun.common.errors import MptunError
from mptun.common.sockets import family_of

BLOCK = 1_048_573  # a prime just under 1 MiB
CHUNK = 256 * 1024


def pattern() -> bytes:
    """The block, followed by its first CHUNK bytes so any chunk is one contiguous slice."""
    block = hashlib.shake_256(b"mptun traffic pattern").digest(BLOCK)
    return block + block[:CHUNK]


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- serve ----------------------------------------------------------------------------------------
def _serve_one(conn: socket.socket, pat: memoryview) -> None:
    with conn:
        conn.settimeout(30)
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            got = conn.recv(64 - len(line))
            if not got:
                return
            line += got
        parts = line.split()
        if len(parts) != 2 or parts[0] != b"SEND":
            return
        seconds = float(parts[1])
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = 0
        start = time.monotonic()
        end = start + seconds
        error = None
        try:
            while time.monotonic() < end:
                off = sent % BLOCK
                sent += conn.send(pat[off : off + CHUNK])
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(CHUNK):  # wait for the reader's close: everything arrived
                pass
        except OSError as e:
            error = e.strerror or str(e)
        emit(
            {
                "event": "sent",
                "bytes": sent,
                "seconds": round(time.monotonic() - start, 3),
                "error": error,
            }
        )


def serve(listen: Address) -> None:
    pat = memoryview(pattern())
    srv = socket.socket(family_of(str(listen.host)), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(listen.sockaddr())
    srv.listen(16)
    emit({"event": "listening", "port": srv.getsockname()[1]})
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn, pat), daemon=True).start()


# -- fetch ----------------------------------------------------------------------------------------
def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = s.recv(n - len(out))
        if not got:
            raise ConnectionError("SOCKS server closed the connection")
        out += got
    return out


def socks_connect(s: socket.socket, target: Address) -> None:
    """A SOCKS5 CONNECT without authentication (RFC 1928)."""
    s.sendall(b"\x05\x01\x00")
    if _recv_exact(s, 2) != b"\x05\x00":
        raise ConnectionError("SOCKS server refused the no-auth method")
    s.sendall(b"\x05\x01\x00" + target.encode())
    head = _recv_exact(s, 4)
    if head[1] != 0:
        raise ConnectionError(f"SOCKS CONNECT failed: reply {head[1]}")
    atyp = head[3]
    n = {1: 4, 4: 16}.get(atyp)
    rest = _recv_exact(s, n + 2) if n else _recv_exact(s, _recv_exact(s, 1)[0] + 2)
    del rest


def fetch(target: Address, socks: Address | None, seconds: float, interval: float) -> bool:
    pat = memoryview(pattern())
    peer = socks or target
    s = socket.create_connection(peer.sockaddr()[:2], timeout=10)
    s.settimeout(max(30.0, seconds))
    if socks is not None:
        socks_connect(s, target)
    s.sendall(f"SEND {seconds}\n".encode())
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    ok, error = True, None
    start = time.monotonic()
    emit({"event": "start", "mono": start})
    next_report = start + interval
    try:
        while True:
            n = s.recv_into(view, CHUNK)
            if not n:
                break
            off = got % BLOCK
            # bytearray == memoryview compares with memcmp; memoryview == memoryview does not
            if buf[:n] != pat[off : off + n]:
                ok, error = False, f"wrong bytes in the {n} bytes at offset {got}"
                break
            got += n
            now = time.monotonic()
            if now >= next_report:
                emit({"event": "progress", "mono": now, "bytes": got})
                next_report += interval * (1 + int((now - next_report) / interval))
    except OSError as e:
        ok, error = False, e.strerror or str(e)
    finally:
        s.close()
    end = time.monotonic()
    emit({"event": "done", "mono": end, "bytes": got, "seconds": end - start, "ok": ok,
          "error": error})  # fmt: skip
    return ok


# -- counters -------------------------------------------------------------------------------------
def counters(ifaces: list[str], interval: float, count: int | None) -> None:
    base = Path("/sys/class/net")
    n = 0
    while count is None or n < count:
        row: dict = {"event": "counters", "mono": time.monotonic(), "rx": {}, "tx": {}}
        for i in ifaces:
            try:
                row["rx"][i] = int((base / i / "statistics/rx_bytes").read_text())
                row["tx"][i] = int((base / i / "statistics/tx_bytes").read_text())
            except OSError:
                row["rx"][i] = row["tx"][i] = None  # the interface is gone for now
        emit(row)
        n += 1
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mptun.lab.traffic", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--listen", required=True)
    p = sub.add_parser("fetch")
    p.add_argument("--target", required=True)
    p.add_argument("--socks")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--interval", type=float, default=0.5)
    p = sub.add_parser("counters")
    p.add_argument("ifaces", nargs="+")
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--count", type=int)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "serve":
            serve(Address.parse(args.listen))
        elif args.cmd == "fetch":
            socks = Address.parse(args.socks) if args.socks else None
            return 0 if fetch(Address.parse(args.target), socks, args.seconds, args.interval) else 1
        else:
            counters(args.ifaces, args.interval, args.count)
    except (MptunError, OSError) as e:
        print(f"mptun.lab.traffic: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
