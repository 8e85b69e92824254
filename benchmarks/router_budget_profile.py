"""Where a router-side relay's CPU goes at a small CPU budget: syscalls per relayed MB and per
connection, and (with py-spy) which Python functions the samples land in.

On the namespace test bed of `mptun bench` (uplinks 500/300/200 Mbit, home 1 Gbit), each relay
of the bench's `budget` case (mptun defaults, mptun `--bulk plain`, shadowsocks-libev) runs with
its router-side process in a cgroup CPU quota (10 ms period). For each: one download of
`--seconds` through SOCKS, then `--loads` page loads (41 fresh connections each) through SOCKS,
each measured by `perf stat` on the kernel's syscall tracepoints of the router-side process
(no ptrace: the process runs at full speed, unlike under strace) and its CPU time; with
`--py-spy`, a sampled profile of the same spans (py-spy, `pip install py-spy`; mptun only).

    sudo .venv/bin/python benchmarks/router_budget_profile.py --quota 10 --seconds 5 --loads 5

Prints one JSON object per relay and span, then a table: syscalls and CPU ms per MB and per
connection, the top syscalls, and the top self-time functions from py-spy. Root only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mptun.bench.budget import PAGES, TRAFFIC, VARIANTS, RelayStarter, Study, StudySettings
from mptun.bench.cpuquota import CpuQuota
from mptun.bench.env import NetnsEnv
from mptun.bench.procstat import cpu_seconds


def perf_start(pid: int, out: Path) -> subprocess.Popen:
    """`perf stat` of every syscall tracepoint of `pid` (all its threads) until SIGINT."""
    events = "raw_syscalls:sys_enter,syscalls:sys_enter_*"
    cmd = ["perf", "stat", "-x", ",", "-o", str(out), "-e", events, "-p", str(pid)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # perf opens ~400 events before it counts
    return p


def perf_stop(p: subprocess.Popen, out: Path) -> dict[str, int]:
    p.send_signal(signal.SIGINT)
    p.wait(30)
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            name = parts[2].replace("syscalls:sys_enter_", "").replace("raw_syscalls:", "")
            if int(parts[0]):
                counts[name] = int(parts[0])
    return counts


def pyspy_start(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(exe):
        return None
    cmd = [exe, "record", "-p", str(pid), "-d", str(int(seconds) + 1), "-r", "250"]
    cmd += ["--nonblocking", "-f", "raw", "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pyspy_top(out: Path, n: int = 12) -> list[tuple[str, float]]:
    """Self-time share of the innermost frames (py-spy's collapsed stacks)."""
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    if not out.exists():
        return []
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frame = stack.split(";")[-1]
        # "func (path/file.py:line)" -> "func (file.py)": lines of one function together
        name, _, where = frame.partition(" (")
        self_time[f"{name} ({Path(where.split(':')[0]).name})"] += int(count)
        total += int(count)
    return [(k, v / total) for k, v in self_time.most_common(n)] if total else []


def span(env, relay, pid: int, work, tmp: Path, tag: str, pyspy: bool, seconds: float) -> dict:
    """Run `work()` under perf (and py-spy): syscalls, CPU seconds, throttling, its result."""
    pf = tmp / f"{tag}.perf"
    ps = tmp / f"{tag}.pyspy"
    perf = perf_start(pid, pf)
    spy = pyspy_start(pid, seconds, ps) if pyspy and relay.variant.kind == "mptun" else None
    cpu0, stat0 = cpu_seconds(pid), relay.quota.stat()
    result = work()
    cpu = cpu_seconds(pid) - cpu0
    stat = relay.quota.stat()
    counts = perf_stop(perf, pf)
    if spy is not None:
        spy.wait(seconds + 30)
    return {
        "result": result,
        "cpu": cpu,
        "syscalls": counts,
        "throttled": {k: stat.get(k, 0) - stat0.get(k, 0) for k in ("nr_periods", "nr_throttled")},
        "pyspy": pyspy_top(ps) if spy is not None else [],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quota", type=float, default=10.0, help="%% of one core (10-100)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--variants", default=",".join(v.id for v in VARIANTS))
    ap.add_argument("--py-spy", action="store_true", dest="pyspy")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("perf"):
        print("needs root and perf", file=sys.stderr)
        return 2
    wanted = [v for v in VARIANTS if v.id in a.variants.split(",")]
    env = NetnsEnv(3)
    out: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mptun-profile-") as tmpname:
        tmp = Path(tmpname)
        study = Study(env, StudySettings(("budget", "pages")), tmp)
        try:
            study._shape()
            target = study._start_target()
            http = study._start_http(0)
            starter = RelayStarter(env, tmp)
            for v in wanted:
                relay = starter.start_variant(v, redir=False)
                relay.quota = CpuQuota(v.id)
                try:
                    pid = relay.router_pids["client"]
                    relay.quota.add(pid)
                    relay.quota.set(a.quota)
                    socks = f"{relay.socks[0]}:{relay.socks[1]}"

                    def bulk(direction: str, socks: str = socks) -> dict:
                        cmd = [*TRAFFIC, direction, "--target", f"{target[0]}:{target[1]}"]
                        cmd += ["--seconds", str(a.seconds), "--socks", socks]
                        return json.loads(env.run("lan", cmd, timeout=a.seconds + 60))

                    def pages(socks: str = socks) -> dict:
                        cmd = [*PAGES, "load", "--target", f"{target[0]}:{http['socks']}"]
                        cmd += ["--socks", socks, "--loads", str(a.loads)]
                        return json.loads(env.run("lan", cmd, timeout=300))

                    for tag, work, secs in (
                        ("down", lambda: bulk("down"), a.seconds),
                        ("up", lambda: bulk("up"), a.seconds),
                        ("pages", pages, a.loads),
                    ):
                        rec = span(env, relay, pid, work, tmp, f"{v.id}-{tag}", a.pyspy, secs)
                        rec.update(variant=v.id, span=tag, quota=a.quota)
                        out.append(rec)
                        print(json.dumps(rec), flush=True)
                finally:
                    for p in relay.procs:
                        env.stop(p)
                    relay.quota.close()
        finally:
            for p in study._procs:
                env.stop(p)
            study._unshape()
            env.close()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    print(table(out))
    return 0


def table(out: list[dict]) -> str:
    lines = []
    for rec in out:
        res = rec["result"]
        total = rec["syscalls"].get("sys_enter", 0)
        if rec["span"] == "pages":
            conns = len(res.get("loads", [])) * res.get("objects", 0)
            per, unit = max(conns, 1), "connection"
        else:
            per, unit = max(res.get("bytes", 0) / 1e6, 1e-9), "MB"
        top = sorted(
            ((k, c) for k, c in rec["syscalls"].items() if k != "sys_enter"),
            key=lambda kv: -kv[1],
        )[:8]
        th = rec["throttled"]
        lines.append(
            f"{rec['variant']:14} {rec['span']:5} {total / per:8.1f} syscalls/{unit}, "
            f"{rec['cpu'] / per * 1e3:7.3f} ms CPU/{unit}, throttled "
            f"{th['nr_throttled']}/{th['nr_periods']} periods"
            + (f", {res['steady_bps'] / 1e6:.0f} Mbit/s" if "steady_bps" in res else "")
        )
        lines.append("    " + ", ".join(f"{k} {c / per:.2f}" for k, c in top))
        for name, share in rec["pyspy"][:8]:
            lines.append(f"    {share * 100:5.1f}%  {name}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
