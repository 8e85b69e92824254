"""Raw-speed MPTCP gaps with no mptun in the path: the kernel alone, for a report upstream.

On the bench's namespace test bed (three unshaped uplinks, `mptun uplinks` endpoints in the
router) a sender in the router streams over one MPTCP connection to a receiver in the VPS that
reads as fast as it can (or slowly, --nap-us). Per transfer: Mbit/s, the longest time between
two reads, and the router's MPTCP counters (the sender's: MPTCPRetrans counts MPTCP-level
retransmissions, which follow data the receiver dropped after its subflow acknowledged it).
`--ping` adds the bench's 64-byte ping-pong on a second MPTCP connection; `--tcp` runs the
same transfers over one plain TCP connection instead (one path). Needs root.

    sudo .venv/bin/python benchmarks/mptcp_kernel_gaps.py --runs 10 --ping
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys

from mptun.bench.env import NetnsEnv
from mptun.common.sockets import IPPROTO_MPTCP

# The receiver: an MPTCP listener that reads each connection to EOF, a read of `size` bytes at
# most, sleeping `nap` seconds after each (0: as fast as it can).
SINK = r"""
import json, socket, sys, time
lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM, int(sys.argv[5]))
lst.bind((sys.argv[1], int(sys.argv[2])))
lst.listen()
print("ready", flush=True)
buf, nap = bytearray(int(sys.argv[3])), float(sys.argv[4])
while True:
    conn, _ = lst.accept()
    total, first, last, gap = 0, time.monotonic(), 0.0, 0.0
    while n := conn.recv_into(buf):  # MPTCP ignores MSG_TRUNC: a plain copying read
        now = time.monotonic()
        if total:
            gap = max(gap, now - last)
        total, last = total + n, now
        if nap:
            time.sleep(nap)
    conn.close()
    print(json.dumps({"mbps": total * 8 / (last - first) / 1e6, "gap_ms": gap * 1e3}), flush=True)
"""

# The sender: sendfile from an 8 MiB memfd for the given seconds.
SOURCE = r"""
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, int(sys.argv[4]))
s.connect((sys.argv[1], int(sys.argv[2])))
fd, size = os.memfd_create("payload"), 8 << 20
os.ftruncate(fd, size)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    off = 0
    while off < size:
        off += os.sendfile(s.fileno(), fd, off, size - off)
s.close()
"""

COUNTERS = ("MPTCPRetrans", "WinProbe", "RcvWndConflict", "NoDSSInWindow", "DuplicateData")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="transfers (bounded: at most 100)")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each transfer")
    ap.add_argument("--ping", action="store_true", help="a 64-byte ping-pong alongside")
    ap.add_argument("--tcp", action="store_true", help="plain TCP instead, for comparison")
    ap.add_argument("--read-size", type=int, default=1 << 20, help="receiver's read size")
    ap.add_argument(
        "--nap-us",
        type=float,
        default=0.0,
        help="receiver sleeps this long after each read: a slow reader whose buffer stays full",
    )
    a = ap.parse_args()
    runs, seconds = min(a.runs, 100), min(a.seconds, 60.0)
    proto = str(socket.IPPROTO_TCP if a.tcp else IPPROTO_MPTCP)
    env = NetnsEnv()
    try:
        host, port = env.server_host, env.port("vps")
        sink = env.popen(
            "vps",
            [
                sys.executable,
                "-c",
                SINK,
                host,
                str(port),
                str(a.read_size),
                str(a.nap_us / 1e6),
                proto,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sink.stdout is not None
        if not sink.stdout.readline().startswith("ready"):
            print("the receiver did not start", file=sys.stderr)
            return 1
        if a.ping:
            eport = env.port("vps")
            serve = ["-m", "mptun.bench.traffic", "serve", "--mptcp", "--host", host]
            echo = env.popen(
                "vps", [sys.executable, *serve, "--port", str(eport)], stdout=subprocess.DEVNULL
            )
            env.wait_listening("vps", host, eport, echo)
        for i in range(runs):
            before = env.mptcp_counters()
            ping = None
            if a.ping:
                rtt = ["-m", "mptun.bench.traffic", "rtt", "--mptcp", "--target", f"{host}:{eport}"]
                ping = env.popen(
                    "router",
                    [sys.executable, *rtt, "--seconds", str(seconds)],
                    stdout=subprocess.DEVNULL,
                )
            src = [sys.executable, "-c", SOURCE, host, str(port), str(seconds), proto]
            env.run("router", src, timeout=seconds + 60)
            if ping is not None:
                ping.wait(timeout=seconds + 60)
            after = env.mptcp_counters()
            r = json.loads(sink.stdout.readline())
            moved = {
                k: after[f"MPTcpExt{k}"] - before.get(f"MPTcpExt{k}", 0)
                for k in COUNTERS
                if after.get(f"MPTcpExt{k}", 0) != before.get(f"MPTcpExt{k}", 0)
            }
            print(
                f"transfer {i + 1}: {r['mbps']:7.0f} Mbit/s, longest gap between reads "
                f"{r['gap_ms']:5.0f} ms, sender counters {moved}",
                flush=True,
            )
    finally:
        env.close()  # stops every process started in it, then deletes the namespaces
    return 0


if __name__ == "__main__":
    sys.exit(main())
