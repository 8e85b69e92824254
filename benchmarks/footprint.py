"""Router footprint: the idle client's memory against a bare Python, and what `mptun uci` costs.

Side by side in one run, with the same interpreter and site-packages:

- baseline: a Python that imports asyncio and cryptography's AES-GCM (and makes one AESGCM
  object), then sleeps: the least any Python tunnel with this crypto can hold;
- the idle client: `mptun client --socks 127.0.0.1:0` listening, no tunnel open; once with
  asyncio's own loop (as on a router, where uvloop is not packaged) and once with uvloop when it
  is installed;
- `mptun uci FILE client`: the Python processes one call starts (counted with strace when it is
  installed), its wall time, peak RSS and whether it imported cryptography or pyroute2.

RSS and PSS come from /proc/PID/smaps_rollup (PSS shares each shared page among the processes
mapping it, so it is the fairer figure when several Pythons run). The target is the idle
client at most 6 MiB above the baseline (RSS).

With `--cpu` it weighs what uvloop buys against its memory instead: a server, a page server
(mptun/bench/pages.py) and two clients on 127.0.0.1, one on asyncio's loop and one on uvloop;
rounds alternate between them, each loads the page set (41 fresh connections) `--loads` times
and downloads `--mib` MiB with curl through the client's SOCKS port, and counts the client's CPU
time (its scheduler clock). CPU time per connection and per MiB is what a small CPU budget
divides: a client with half the CPU per MiB moves twice the bytes in the same quota.

    .venv/bin/python benchmarks/footprint.py [--json] [--settle 1.0]
    .venv/bin/python benchmarks/footprint.py --cpu [--rounds 3] [--loads 3] [--mib 64]

Figures and the uvloop trade-off: benchmarks/results/footprint-2026-12.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
TARGET_MIB = 6.0
BASELINE = (
    "import asyncio, signal, sys\n"
    "from cryptography.hazmat.primitives.ciphers.aead import AESGCM\n"
    "AESGCM(bytes(32))\n"
    "print('ready', flush=True)\n"
    "signal.pause()\n"
)
# Runs mptun's command line with uvloop hidden (an import of it fails), as on a router.
NO_UVLOOP = "import sys; sys.modules['uvloop'] = None; from mptun.cli import main; main()"
PEAK = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], check=True, capture_output=True)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
)
UCI_CONFIG = """config client 'main'
\toption enabled '1'
\toption server '192.0.2.1:8443'
\toption key_file '/etc/mptun/key'
\toption socks '127.0.0.1:1080'
"""


def memory(pid: int) -> dict[str, int]:
    """RSS and PSS of a process, in bytes (smaps_rollup reports kB)."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    out = {}
    for name in ("Rss", "Pss"):
        m = re.search(rf"^{name}:\s+(\d+) kB", text, re.M)
        if m is None:
            raise RuntimeError(f"/proc/{pid}/smaps_rollup has no {name}")
        out[name.lower()] = int(m.group(1)) * 1024
    return out


def settled(pid: int, settle: float) -> dict[str, int]:
    """Memory after `settle` seconds, the largest of three samples (a lazy import or a
    collection a little late still counts)."""
    time.sleep(settle)
    samples = []
    for _ in range(3):
        samples.append(memory(pid))
        time.sleep(0.2)
    return {k: max(s[k] for s in samples) for k in ("rss", "pss")}


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(read: callable, pattern: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, read()):
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode} before {pattern!r}: {read()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {pattern!r} within {timeout:.0f} s: {read()[-2000:]}")
        time.sleep(0.05)


def measure_baseline(settle: float) -> dict[str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BASELINE], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the baseline did not start")
        return settled(proc.pid, settle)
    finally:
        stop(proc)


def measure_client(tmp: Path, uvloop: bool, settle: float) -> dict:
    """The idle client's memory, and the modules it imported (from `-X importtime`)."""
    key = tmp / "key"
    if not key.exists():
        subprocess.run(
            [sys.executable, "-m", "mptun", "genkey", "-o", str(key)],
            check=True,
            capture_output=True,
        )
    log = tmp / f"client-{'uvloop' if uvloop else 'asyncio'}.log"
    head = ["-m", "mptun"] if uvloop else ["-c", NO_UVLOOP]
    args = ["client", "--server", "192.0.2.1:8443", "--key-file", str(key)]
    args += ["--socks", "127.0.0.1:0"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", *head, *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        wait_for(lambda: log.read_text(errors="replace"), r"socks listening on", proc)
        mem = settled(proc.pid, settle)
        idle = log.read_text(errors="replace")  # what it holds idle, not what stopping loads
    finally:
        stop(proc)
    return {**mem, "modules": imported(idle)}


def imported(importtime_log: str) -> list[str]:
    """The modules an `-X importtime` log shows imported, in order."""
    return [
        m.group(1)
        for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", importtime_log, re.M)
    ]


def measure_uci(tmp: Path) -> dict:
    """One `mptun uci FILE client` call: processes, wall time, peak RSS, heavy imports."""
    conf = tmp / "mptun"
    conf.write_text(UCI_CONFIG)
    argv = [sys.executable, "-X", "importtime", "-m", "mptun", "uci", str(conf), "client"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - started
    modules = imported(r.stderr)
    # Peak RSS of one call: a fresh parent, so ru_maxrss covers that child alone (kB on Linux).
    peak = int(
        subprocess.run(
            [sys.executable, "-c", PEAK, *argv[:1], *argv[3:]],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            check=True,
        ).stdout
    )
    processes = None
    if shutil.which("strace"):
        trace = tmp / "uci.strace"
        subprocess.run(
            ["strace", "-f", "-qq", "-e", "trace=execve", "-o", str(trace), *argv],
            capture_output=True,
            cwd=ROOT,
            env=env,
            check=True,
        )
        processes = len(
            {line.split()[0] for line in trace.read_text().splitlines() if "execve(" in line}
        )
    return {
        "processes": processes,
        "wall_s": round(wall, 3),
        "peak_rss": peak,
        "modules": len(modules),
        "cryptography": any(m.startswith("cryptography") for m in modules),
        "pyroute2": any(m.startswith("pyroute2") for m in modules),
    }


def source_size() -> dict[str, int]:
    """Bytes of Python source: all of mptun, and what a router needs (no server, bench, lab or
    demo), as the folders of pyproject's package-dir hold them."""
    folders = {"mptun": ROOT / "mptun", "client": ROOT / "client", "common": ROOT / "common"}
    tools = (ROOT / "mptun" / "bench", ROOT / "mptun" / "lab", ROOT / "mptun" / "demo.py")
    router = 0
    for folder in folders.values():
        for f in folder.rglob("*.py"):
            if not any(f == t or t in f.parents for t in tools):
                router += f.stat().st_size
    total = router + sum(
        f.stat().st_size for t in tools for f in ([t] if t.is_file() else t.rglob("*.py"))
    )
    total += sum(f.stat().st_size for f in (ROOT / "server").rglob("*.py"))
    return {"all": total, "router": router}


def start_logged(cmd: list[str], log: Path, pattern: str) -> tuple[subprocess.Popen, str]:
    """Start `cmd`; once its log shows `pattern` + HOST:PORT, the process and that address."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
        )
    wait_for(lambda: log.read_text(errors="replace"), re.escape(pattern) + r"\S+", proc, 30)
    m = re.search(re.escape(pattern) + r"(\S+)", log.read_text(errors="replace"))
    assert m is not None
    return proc, m.group(1)


def measure_cpu(rounds: int, loads: int, mib: int) -> dict[str, dict[str, list[float]]]:
    """Client CPU ms per connection and per MiB, asyncio's loop against uvloop (module doc)."""
    from mptun.bench.procstat import cpu_seconds
    from mptun.common.crypto import generate_key

    py = sys.executable
    procs: list[subprocess.Popen] = []
    out: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mptun-footprint-cpu-") as d:
        tmp = Path(d)
        key = tmp / "key"
        key.write_text(generate_key() + "\n")
        key.chmod(0o600)
        try:
            srv, saddr = start_logged(
                [py, "-m", "mptun", "server", "--listen", "127.0.0.1:0", "--key-file", str(key),
                 "--allow-target", "127.0.0.0/8"],
                tmp / "server.log", "listening on ",
            )  # fmt: skip
            procs.append(srv)
            pages = subprocess.Popen(
                [py, "-m", "mptun.bench.pages", "serve", "--port", "0"],
                stdout=subprocess.PIPE, text=True, cwd=ROOT,
            )  # fmt: skip
            procs.append(pages)
            assert pages.stdout is not None
            port = json.loads(pages.stdout.readline())["ports"][0]
            args = ["client", "--server", saddr, "--key-file", str(key), "--socks",
                    "127.0.0.1:0", "--control", "none"]  # fmt: skip
            clients = {}
            for name, head in (("asyncio", ["-c", NO_UVLOOP]), ("uvloop", ["-m", "mptun"])):
                p, caddr = start_logged(
                    [py, *head, *args], tmp / f"{name}.log", "socks listening on "
                )
                procs.append(p)
                clients[name] = (p, caddr)
                out[name] = {"ms_per_connection": [], "ms_per_mib": []}
            for _ in range(rounds):
                for name, (p, caddr) in clients.items():
                    cpu0 = cpu_seconds(p.pid)
                    r = subprocess.run(
                        [py, "-m", "mptun.bench.pages", "load", "--target", f"127.0.0.1:{port}",
                         "--socks", caddr, "--loads", str(loads)],
                        capture_output=True, text=True, timeout=300, check=True, cwd=ROOT,
                    )  # fmt: skip
                    conns = len(json.loads(r.stdout)["loads"]) * 41
                    cpu1 = cpu_seconds(p.pid)
                    out[name]["ms_per_connection"].append((cpu1 - cpu0) / conns * 1e3)
                    # 1 MiB objects (the page server's largest) on one kept-alive connection
                    url = f"http://127.0.0.1:{port}/{MIB}"
                    got = subprocess.run(
                        ["curl", "-sS", "--socks5", caddr, "-w", "%{size_download}\\n",
                         *(x for _ in range(mib) for x in ("-o", "/dev/null", url))],
                        capture_output=True, text=True, timeout=300, check=True,
                    )  # fmt: skip
                    if sum(map(int, got.stdout.split())) != mib * MIB:
                        raise RuntimeError(f"curl got {got.stdout.split()} bytes, not {mib} MiB")
                    out[name]["ms_per_mib"].append((cpu_seconds(p.pid) - cpu1) / mib * 1e3)
        finally:
            for p in procs:
                stop(p)
    return out


def print_cpu(cpu: dict[str, dict[str, list[float]]], rounds: int, loads: int, mib: int) -> None:
    def fig(xs: list[float]) -> str:
        return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"

    load = os.getloadavg()
    print(
        f"client CPU, ms, median [min-max] of {rounds} rounds ({loads} page loads of 41 "
        f"connections, {mib} MiB down each); loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    for name, c in cpu.items():
        print(
            f"  {name:8s} per connection {fig(c['ms_per_connection'])}, "
            f"per MiB {fig(c['ms_per_mib'])}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds idle before sampling")
    ap.add_argument("--cpu", action="store_true", help="client CPU: asyncio's loop vs uvloop")
    ap.add_argument("--rounds", type=int, default=3, help="--cpu: rounds per loop")
    ap.add_argument("--loads", type=int, default=3, help="--cpu: page loads per round")
    ap.add_argument("--mib", type=int, default=64, help="--cpu: MiB downloaded per round")
    a = ap.parse_args()
    if a.cpu:
        for name, value in (("--rounds", a.rounds), ("--loads", a.loads), ("--mib", a.mib)):
            if not 1 <= value <= 1000:
                ap.error(f"{name} {value}: give 1-1000")
        if shutil.which("curl") is None:
            ap.error("--cpu needs curl")
        try:
            import uvloop
        except ImportError:
            ap.error("--cpu compares with uvloop, which is not installed")
        cpu = measure_cpu(a.rounds, a.loads, a.mib)
        if a.json:
            print(json.dumps(cpu, indent=2))
        else:
            print_cpu(cpu, a.rounds, a.loads, a.mib)
        return 0
    try:
        import uvloop  # noqa: F401

        loops = [False, True]
    except ImportError:
        loops = [False]
    with tempfile.TemporaryDirectory(prefix="mptun-footprint-") as d:
        tmp = Path(d)
        base = measure_baseline(a.settle)
        clients = {("uvloop" if u else "asyncio"): measure_client(tmp, u, a.settle) for u in loops}
        uci = measure_uci(tmp)
    result = {
        "python": sys.version.split()[0],
        "baseline": base,
        "clients": {
            name: {
                "rss": c["rss"],
                "pss": c["pss"],
                "rss_above_baseline": c["rss"] - base["rss"],
                "pss_above_baseline": c["pss"] - base["pss"],
                "modules": len(c["modules"]),
                "tools_imported": sorted(
                    m
                    for m in c["modules"]
                    if m.startswith(("mptun.bench", "mptun.lab", "mptun.demo", "pyroute2"))
                ),
            }
            for name, c in clients.items()
        },
        "uci": uci,
        "source_bytes": source_size(),
        "target_mib": TARGET_MIB,
    }
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"Python {result['python']}; MiB (RSS / PSS); "
        f"target: client RSS <= baseline + {TARGET_MIB:g}"
    )
    print(f"  baseline (asyncio + AESGCM)   {base['rss'] / MIB:6.1f} / {base['pss'] / MIB:6.1f}")
    for name, c in result["clients"].items():
        print(
            f"  idle client, {name:8s}        {c['rss'] / MIB:6.1f} / {c['pss'] / MIB:6.1f}"
            f"   (+{c['rss_above_baseline'] / MIB:.1f} / +{c['pss_above_baseline'] / MIB:.1f};"
            f" {c['modules']} modules imported; tools: {', '.join(c['tools_imported']) or 'none'})"
        )
    print(
        f"  mptun uci FILE client: {uci['processes'] if uci['processes'] is not None else '?'} "
        f"process(es), {uci['wall_s']:.2f} s, peak RSS {uci['peak_rss'] / MIB:.1f} MiB, "
        f"{uci['modules']} modules; cryptography {'yes' if uci['cryptography'] else 'no'}, "
        f"pyroute2 {'yes' if uci['pyroute2'] else 'no'}"
    )
    src = result["source_bytes"]
    print(
        f"  Python source: {src['all'] / 1024:.0f} KiB in all, {src['router'] / 1024:.0f} KiB "
        "for a router (no server, bench, lab, demo; before compiling to .pyc)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
