"""CPU per relayed small message: 64-byte round trips through mptun client + server on loopback.

What the bulk benchmarks cannot see: the fixed cost of one wakeup, paid by every interactive
message (and by every read of a stream). The settings, and shadowsocks-libev when installed,
run side by side in one invocation, on `mptun bench`'s loopback environment and echo peer:

    .venv/bin/python benchmarks/pingpong.py --round-trips 10000 --rounds 2

The first setting measured is consistently slower (seen 2026-12-07: splice 124-176 µs per round
trip when first, ~118 otherwise), so compare within a later round: `--rounds` runs the whole
list again.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mptun.bench.cases import Case, Running, Starter
from mptun.bench.env import LoopbackEnv
from mptun.bench.procstat import cpu_seconds
from mptun.bench.runner import Runner, Settings
from mptun.bench.traffic import dial

SETTINGS = {
    "splice": ("--bulk", "plain", "--relay", "splice"),
    "splice, no coalescing": ("--bulk", "plain", "--relay", "splice", "--coalesce-ms", "0"),
    "copy": ("--bulk", "plain", "--relay", "copy"),
    "aead": ("--bulk", "aead"),
}
MESSAGE = b"x" * 64


def measure(target: tuple[str, int], r: Running, n: int) -> tuple[float, float, float]:
    """Round trips per second and CPU microseconds per round trip of client and server."""
    s = dial(target, r.socks)
    try:
        s.sendall(b"ECHO\n")
        for i in range(n + 200):  # 200 to warm up
            if i == 200:
                c0, s0 = cpu_seconds(r.pids["client"]), cpu_seconds(r.pids["server"])
                t0 = time.monotonic()
            s.sendall(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                chunk = s.recv(len(MESSAGE) - got)
                if not chunk:
                    raise SystemExit("the tunnel closed")
                got += len(chunk)
        dt = time.monotonic() - t0
        c1, s1 = cpu_seconds(r.pids["client"]), cpu_seconds(r.pids["server"])
    finally:
        s.close()
    return n / dt, 1e6 * (c1 - c0) / n, 1e6 * (s1 - s0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--round-trips", type=int, default=10000)
    ap.add_argument("--transport", choices=("mptcp", "tcp"), default="mptcp")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the settings")
    a = ap.parse_args()
    env = LoopbackEnv()
    work = Path(tempfile.mkdtemp(prefix="mptun-pingpong-"))
    mptcp = a.transport == "mptcp"
    cases = [
        Case(f"pp{i}", name, "mptun", args, mptcp=mptcp)
        for i, (name, args) in enumerate(SETTINGS.items())
    ]
    # the incumbent, when installed: the same echo through ss-local + ss-server
    ss = shutil.which("ss-local") and shutil.which("ss-server")
    if ss and (not mptcp or shutil.which("mptcpize")):
        cases.append(Case("ppss", "ss-libev", "sslibev", mptcp=mptcp))
    starter = Starter(env, work)
    runner = Runner(env, cases, Settings(), work)
    runner._start_target()
    try:
        print(f"{a.round_trips} round trips of 64 bytes, {a.transport} tunnel, loopback")
        print(f"{'setting':24} {'rt/s':>7} {'client us/rt':>13} {'server us/rt':>13}")
        for case in [c for _ in range(max(1, a.rounds)) for c in cases]:
            r = starter.start(case)
            try:
                rate, c, s = measure(runner.target, r, a.round_trips)
            finally:
                starter.stop(r)
            print(f"{case.label:24} {rate:7.0f} {c:13.1f} {s:13.1f}", flush=True)
    finally:
        if runner._server is not None:
            env.stop(runner._server)
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
