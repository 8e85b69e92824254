"""CPU per relayed small message: 64-byte round trips through mptun client + server on loopback.

What the bulk benchmarks cannot see: the fixed cost of one wakeup, paid by every interactive
message (and by every read of a stream). Each setting runs in the same invocation, side by side:

    .venv/bin/python benchmarks/pingpong.py --round-trips 10000
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SETTINGS = {
    "splice": ("--bulk", "plain", "--relay", "splice"),
    "splice, no coalescing": ("--bulk", "plain", "--relay", "splice", "--coalesce-ms", "0"),
    "copy": ("--bulk", "plain", "--relay", "copy"),
    "aead": ("--bulk", "aead"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def echo_server() -> int:
    """A thread echoing one connection at a time; returns its port."""
    ls = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            c, _ = ls.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with c:
                try:
                    while d := c.recv(65536):
                        c.sendall(d)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return ls.getsockname()[1]


def wait_listening(port: int) -> None:
    """Until something listens on 127.0.0.1:port (`ss`, so the server sees no probe)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
        if out.stdout.strip():
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def connect_socks(port: int, target_port: int) -> socket.socket:
    wait_listening(port)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"\x05\x01\x00")
    s.recv(2)
    addr = socket.inet_aton("127.0.0.1") + struct.pack("!H", target_port)
    s.sendall(b"\x05\x01\x00\x01" + addr)
    if s.recv(10)[1:2] != b"\x00":
        raise SystemExit("SOCKS5 CONNECT refused")
    return s


def measure(args: tuple[str, ...], key: Path, echo_port: int, n: int, transport: str):
    mptun = [sys.executable, "-m", "mptun", "--log-level", "warning"]
    sport, cport = free_port(), free_port()
    common = ("--key-file", str(key), "--transport", transport, *args)
    srv = subprocess.Popen(
        [*mptun, "server", "--listen", f"127.0.0.1:{sport}", "--allow-target", "127.0.0.0/8",
         *common]
    )  # fmt: skip
    wait_listening(sport)
    cli = subprocess.Popen(
        [*mptun, "client", "--server", f"127.0.0.1:{sport}", "--socks", f"127.0.0.1:{cport}",
         *common]
    )  # fmt: skip
    try:
        s = connect_socks(cport, echo_port)
        msg = b"x" * 64
        for i in range(n + 200):  # 200 to warm up
            if i == 200:
                c0, s0, t0 = cpu_seconds(cli.pid), cpu_seconds(srv.pid), time.monotonic()
            s.sendall(msg)
            got = 0
            while got < 64:
                chunk = s.recv(64 - got)
                if not chunk:
                    raise SystemExit("the tunnel closed")
                got += len(chunk)
        dt = time.monotonic() - t0
        c1, s1 = cpu_seconds(cli.pid), cpu_seconds(srv.pid)
        s.close()
        return n / dt, 1e6 * (c1 - c0) / n, 1e6 * (s1 - s0) / n
    finally:
        for p in (srv, cli):
            p.terminate()
            p.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--round-trips", type=int, default=10000)
    ap.add_argument("--transport", choices=("mptcp", "tcp"), default="mptcp")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mptun-pingpong-") as d:
        key = Path(d) / "key"
        out = subprocess.run([sys.executable, "-m", "mptun", "genkey"], capture_output=True)
        key.write_bytes(out.stdout)
        key.chmod(0o600)
        echo = echo_server()
        print(f"{a.round_trips} round trips of 64 bytes, {a.transport} tunnel, loopback")
        print(f"{'setting':24} {'rt/s':>7} {'client us/rt':>13} {'server us/rt':>13}")
        for name, args in SETTINGS.items():
            rate, c, s = measure(args, key, echo, a.round_trips, a.transport)
            print(f"{name:24} {rate:7.0f} {c:13.1f} {s:13.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
