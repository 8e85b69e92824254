#!/usr/bin/env python3
"""Loopback throughput and CPU cost of the tunnel, side by side with a direct connection.

Starts `mptun server` and `mptun client` (SOCKS) on loopback once per engine (plain bulk data with
the splice and copy engines, encrypted bulk data with the aead engine), then moves
bytes with kernel-speed endpoints (sendfile out of a tmpfs file, splice into /dev/null) so the
generator is not the bottleneck. Prints, for each case and direction, the median throughput and
the CPU seconds per GB spent by the two mptun processes (their CPU-time clocks), and ratios
against the direct connection measured in the same run.

    .venv/bin/python benchmarks/loopback_relay.py [--gib 2] [--runs 3] [--transport mptcp]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mptun.bench.procstat import cpu_seconds
from mptun.lab.wait import ReservedPort
from tests.helpers import wait_listening

CHUNK = 64 << 20  # the tmpfs source file; sent repeatedly


def recv_exact(s: socket.socket, n: int) -> bytes:
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b


def sink(s: socket.socket) -> int:
    """Splice everything into /dev/null (no user-space copy); returns the byte count."""
    r, w = os.pipe()
    total = 0
    with open(os.devnull, "wb") as null:
        try:
            while True:
                n = os.splice(s.fileno(), w, 1 << 20)
                if n == 0:
                    return total
                total += n
                while n:
                    n -= os.splice(r, null.fileno(), n)
        finally:
            os.close(r)
            os.close(w)


def send_bytes(s: socket.socket, src: Path, n: int) -> None:
    """sendfile the tmpfs source repeatedly until n bytes are sent."""
    with open(src, "rb") as f:
        left = n
        while left:
            off = 0
            while off < CHUNK and left:
                sent = os.sendfile(s.fileno(), f.fileno(), off, min(left, CHUNK - off))
                if sent == 0:
                    raise EOFError
                off += sent
                left -= sent


class Endpoint:
    """A target on loopback: per connection it either discards (upload) or sends N bytes."""

    def __init__(self, src_file: Path) -> None:
        self.src = src_file
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        with conn:
            hdr = recv_exact(conn, 9)
            mode, n = hdr[:1], struct.unpack(">Q", hdr[1:])[0]
            if mode == b"U":
                sink(conn)
            else:
                send_bytes(conn, self.src, n)
                conn.shutdown(socket.SHUT_WR)
                sink(conn)


def socks_connect(port: int, target_port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", target_port))
    if recv_exact(s, 2) != b"\x05\x00" or recv_exact(s, 10)[1] != 0:
        raise RuntimeError("SOCKS refused")
    return s


def one_transfer(connect, ep: Endpoint, direction: str, nbytes: int) -> float:
    """Seconds to move nbytes one way, end to end (sender's start to receiver's EOF)."""
    s = connect()
    t0 = time.perf_counter()
    if direction == "up":
        s.sendall(b"U" + struct.pack(">Q", nbytes))
        send_bytes(s, ep.src, nbytes)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # EOF once the target has everything and closed
    else:
        s.sendall(b"D" + struct.pack(">Q", nbytes))
        got = sink(s)
        if got != nbytes:
            raise RuntimeError(f"short download: {got} of {nbytes}")
    dt = time.perf_counter() - t0
    s.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="GiB per transfer")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--transport", default="mptcp", choices=["mptcp", "tcp"])
    args = ap.parse_args()
    nbytes = int(args.gib * (1 << 30))
    tmp = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    src = tmp / "src"
    src.write_bytes(os.urandom(CHUNK))
    key = tmp / "key"
    key.write_text(subprocess.check_output([sys.executable, "-m", "mptun", "genkey"], text=True))
    key.chmod(0o600)
    ep = Endpoint(src)
    results: dict[tuple[str, str], tuple[float, float | None]] = {}

    def measure(name: str, connect, pids: list[int]) -> None:
        for direction in ("up", "down"):
            rates, cpus = [], []
            for _ in range(args.runs):
                c0 = sum(cpu_seconds(p) for p in pids)
                dt = one_transfer(connect, ep, direction, nbytes)
                c1 = sum(cpu_seconds(p) for p in pids)
                rates.append(nbytes * 8 / dt / 1e9)
                cpus.append((c1 - c0) / (nbytes / 1e9))
            med_cpu = statistics.median(cpus) if pids else None
            results[(name, direction)] = (statistics.median(rates), med_cpu)
            runs = ", ".join(f"{r:.1f}" for r in rates)
            print(
                f"  {name:8} {direction:4} {statistics.median(rates):6.2f} Gbit/s ({runs})",
                flush=True,
            )

    print(f"{args.gib} GiB per transfer, {args.runs} runs, tunnel transport {args.transport}")
    try:
        measure("direct", lambda: socket.create_connection(("127.0.0.1", ep.port)), [])
        cases = {
            "splice": ["--bulk", "plain", "--relay", "splice"],
            "copy": ["--bulk", "plain", "--relay", "copy"],
            "aead": ["--bulk", "aead"],
        }
        for engine, engine_args in cases.items():
            held = [ReservedPort(), ReservedPort()]  # until mptun listens: no one else takes them
            sport, cport = (h.port for h in held)
            common = ["--key-file", str(key), *engine_args, "--transport", args.transport]
            mptun = [sys.executable, "-m", "mptun", "--log-level", "warning"]
            procs = [
                subprocess.Popen(
                    [
                        *mptun,
                        "server",
                        "--listen",
                        f"127.0.0.1:{sport}",
                        "--allow-target",
                        "127.0.0.0/8",
                        *common,
                    ]
                )
            ]
            try:
                wait_listening("127.0.0.1", sport)
                procs.append(
                    subprocess.Popen(
                        [
                            *mptun,
                            "client",
                            "--server",
                            f"127.0.0.1:{sport}",
                            "--socks",
                            f"127.0.0.1:{cport}",
                            *common,
                        ]
                    )
                )
                wait_listening("127.0.0.1", cport)
                measure(
                    engine,
                    lambda cport=cport: socks_connect(cport, ep.port),
                    [p.pid for p in procs],
                )
            finally:
                for p in procs:
                    p.terminate()
                    p.wait()
                for h in held:
                    h.release()
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    print()
    print(f"{'case':10}{'dir':6}{'Gbit/s':>8}{'x direct':>10}{'mptun CPU s/GB':>16}")
    for (name, direction), (rate, cpu) in results.items():
        ratio = rate / results[("direct", direction)][0]
        cpu_s = f"{cpu:.3f}" if cpu is not None else "-"
        print(f"{name:10}{direction:6}{rate:8.2f}{ratio:10.2f}{cpu_s:>16}")


if __name__ == "__main__":
    main()
