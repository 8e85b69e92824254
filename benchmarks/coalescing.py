"""Coalescing settings side by side: relay CPU per GB and reads per MB at the receiving end.

What `mptun bench` does not sweep: `--coalesce-ms` values, on the three shaped uplinks or on one
MPTCP path (the setting of the drain measurements in docs/design/batching.md). Every variant runs
in the same test bed, round-robin, and is printed as a ratio against no coalescing. Needs root.

    sudo .venv/bin/python benchmarks/coalescing.py --paths 1 --rate 200 --delays 0,2,8
    sudo .venv/bin/python benchmarks/coalescing.py --paths 3 --delays 0,2,8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

from mptun.bench.cases import Case, Starter
from mptun.bench.env import NetnsEnv
from mptun.bench.procstat import cpu_seconds
from mptun.bench.runner import Runner, Settings

READS = re.compile(r"closed after .* \((\d+) reads\)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--paths", type=int, choices=(1, 3), default=3)
    ap.add_argument("--rate", type=float, default=200, help="Mbit/s of the single path")
    ap.add_argument("--delays", default="0,2,8", help="--coalesce-ms values to compare")
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--direction", choices=("up", "down"), default="down")
    a = ap.parse_args()
    os.environ["MPTUN_BENCH_RELAY_LOG"] = "info"  # a line per connection, with its read count
    os.environ["MPTUN_LOG_CONNECTIONS"] = "1"  # (those lines are debug without it)
    delays = [x.strip() for x in a.delays.split(",")]
    env = NetnsEnv()
    work = Path(tempfile.mkdtemp(prefix="mptun-coalescing-"))
    try:
        if a.paths == 1:
            assert env.bed.router is not None
            env.bed.router.exec("ip", "mptcp", "endpoint", "flush")  # the first subflow only
            env.bed.shape(env.bed.uplinks[0], a.rate)
        else:
            env.set_shaped(True)
        cases = [
            Case(f"ms{d}", f"coalesce {d} ms", "mptun", ("--bulk", "plain", "--coalesce-ms", d))
            for d in delays
        ]
        starter = Starter(env, work)
        runner = Runner(env, cases, Settings(seconds=a.seconds), work)
        runner._start_target()
        running = [starter.start(c) for c in cases]
        end = "server" if a.direction == "up" else "client"
        cpu: dict[str, list[float]] = {c.id: [] for c in cases}
        mbps: dict[str, list[float]] = {c.id: [] for c in cases}
        for i in range(a.runs):
            for r in running:
                before = cpu_seconds(r.pids[end])
                cmd = runner._traffic(a.direction, r, "--seconds", str(a.seconds))
                res = json.loads(env.run("lan", cmd, a.seconds + 120))
                used = cpu_seconds(r.pids[end]) - before
                cpu[r.case.id].append(used / (res["bytes"] / 1e9))
                mbps[r.case.id].append(res["steady_bps"] / 1e6)
                print(
                    f"run {i + 1} {r.case.label}: {mbps[r.case.id][-1]:.0f} Mbit/s, "
                    f"{cpu[r.case.id][-1]:.2f} s/GB",
                    file=sys.stderr,
                    flush=True,
                )
        for r in running:
            starter.stop(r)
        base = statistics.median(cpu[cases[0].id])
        where = f"1 MPTCP path at {a.rate:g} Mbit" if a.paths == 1 else "3 uplinks 100/60/40"
        print(f"\n{where}, {a.direction}, receiving end ({end}), {a.runs} runs of {a.seconds:g} s")
        print(f"{'setting':18} {'Mbit/s':>7} {'s/GB med':>9} {'[min-max]':>12} {'x first':>8} "
              f"{'KiB/read':>9}")  # fmt: skip
        for c in cases:
            reads = [
                int(m.group(1))
                for m in READS.finditer((work / f"{c.id}-{end}.log").read_text(errors="replace"))
            ]
            moved_kib = statistics.median(mbps[c.id]) / 8 * 1e6 * a.seconds / 1024
            per_read = moved_kib / statistics.median(reads) if reads else float("nan")
            med = statistics.median(cpu[c.id])
            print(
                f"{c.label:18} {statistics.median(mbps[c.id]):7.0f} {med:9.2f} "
                f"{min(cpu[c.id]):5.2f}-{max(cpu[c.id]):<5.2f} {med / base:8.2f} {per_read:9.0f}"
            )
    finally:
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
