"""Page-load time, CPU and syscalls per tunneled connection: mptun's variants side by side with
shadowsocks-libev, on loopback.

Each variant is a server and a client of its own (127.0.0.1, aes-256-gcm); shadowsocks-libev's
ss-server and ss-local run under `mptcpize` (as `mptun bench`'s `ss-mptcp`). One page server
(mptun/bench/pages.py) serves all. Rounds alternate between the variants; each round loads the
page (41 fresh connections: one 100 KiB object, then 40 of 5-60 KiB over 6 parallel
connections) `--loads` times through the variant's SOCKS port and records the page times, each
end's CPU time per connection (its scheduler clock) and, as root with perf, each end's
syscalls per connection (`perf stat` on raw_syscalls:sys_enter: no ptrace, full speed).

A variant other than `mptun` is mptun with one change undone in both its processes (the
patches below), so a cut is measured against the same code without it, on the same machine
at the same time:

- `mptun`: as is;
- `no-pool`: the aead engine maps and unmaps every stage buffer (no `BufferPool`);
- `waits`: handshake and SOCKS reads always wait for the event loop first (no `recv_now`);
- `two-replies`: the SOCKS greeting's reply is sent on its own, not with the CONNECT's;
- `bulk-plain`, `pool`: mptun with `--bulk plain` or `--pool 6` (options, not patches).

    .venv/bin/python benchmarks/connection_cost.py --rounds 5 --loads 5 \\
        [--variants mptun,no-pool,ss] [--socks-ip 127.0.0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mptun.bench.procstat import cpu_seconds
from mptun.common.crypto import generate_key
from mptun.lab.wait import wait_until

# Run mptun with one change undone, in that process only.
RUN = """
import sys
{patch}
from mptun.cli import main
sys.argv[0] = "mptun"
main()
"""
PATCHES = {
    "no-pool": """
import mptun.common.relay.buffers as b
b.BufferPool.take = lambda self, size: b.stage_buffer(size)
b.BufferPool.give = lambda self, *bufs: b.free_buffers(*bufs)
""",
    "waits": """
import mptun.common.drive as d
d.recv_now = lambda sock, n: None  # drive.recv_ready, which both sides call, then always waits
""",
    "two-replies": """
import mptun.client.socks as s
negotiate = s._negotiate
async def _negotiate(loop, sock, hs, held, deadline):
    target = await negotiate(loop, sock, hs, held, deadline)
    if held:
        await loop.sock_sendall(sock, bytes(held))
        held.clear()
    return target
s._negotiate = _negotiate
""",
}
OPTIONS = {"bulk-plain": ["--bulk", "plain"], "pool": ["--pool", "6"]}  # the client's
SERVER_OPTIONS = {"bulk-plain": ["--bulk", "plain"]}
VARIANTS = ("mptun", *PATCHES, *OPTIONS, "ss")
CONNECTIONS_PER_LOAD = 41


def start(cmd: list[str], log: Path, pattern: str) -> tuple[subprocess.Popen, str]:
    """Start `cmd`, wait for its log line with `pattern` + HOST:PORT; the process and address."""
    with open(log, "wb") as f:  # the child keeps its own copy of the descriptor
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def address() -> str | None:
        for line in log.read_text(errors="replace").splitlines():
            if pattern in line:
                return line.split(pattern, 1)[1].split()[0]
        return None

    return p, wait_until(address, 30, f"{pattern} in {log}", proc=p)


def free_port() -> int:
    """A port for ss-libev, which cannot listen on port 0 and say which it got (loopback only,
    a benchmark: a lost race fails the start, which `start_ss` retries)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ss(tmp: Path) -> tuple[list[subprocess.Popen], str]:
    """ss-server and ss-local under mptcpize; the processes and ss-local's address."""
    for _ in range(5):
        sport, lport = free_port(), free_port()
        common = ["-k", "connection-cost", "-m", "aes-256-gcm"]
        server = subprocess.Popen(
            ["mptcpize", "run", "ss-server", "-s", "127.0.0.1", "-p", str(sport), *common],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        local = subprocess.Popen(
            ["mptcpize", "run", "ss-local", "-s", "127.0.0.1", "-p", str(sport), "-b",
             "127.0.0.1", "-l", str(lport), *common],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def up(port: int = lport, procs: tuple = (server, local)) -> bool:
            if any(p.poll() is not None for p in procs):
                raise OSError("an ss-libev process exited")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        try:
            wait_until(up, 10, "ss-local listening")
            return [server, local], f"127.0.0.1:{lport}"
        except (OSError, TimeoutError, AssertionError):
            for p in (server, local):
                p.kill()
                p.wait(10)
    raise SystemExit("ss-libev did not start")


def perf_start(pid: int, out: Path) -> subprocess.Popen | None:
    """`perf stat` counting `pid`'s syscalls, when perf is here and we are root."""
    if not (shutil.which("perf") and os.geteuid() == 0):
        return None
    p = subprocess.Popen(
        ["perf", "stat", "-x", ",", "-o", str(out), "-e", "raw_syscalls:sys_enter", "-p",
         str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.3)  # attached
    return p


def perf_stop(p: subprocess.Popen, out: Path) -> int:
    p.send_signal(signal.SIGINT)
    p.wait(30)
    return next(
        int(line.split(",")[0]) for line in out.read_text().splitlines() if "raw_syscalls" in line
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--variants", default="mptun,no-pool,ss", help=", ".join(VARIANTS))
    a = ap.parse_args()
    variants = a.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"unknown variants {bad}: choose from {', '.join(VARIANTS)}")
    if "ss" in variants and not (shutil.which("ss-local") and shutil.which("mptcpize")):
        raise SystemExit("variant ss needs ss-local, ss-server and mptcpize")
    py = sys.executable
    procs: list[subprocess.Popen] = []
    ends: dict[str, tuple[int, int, str]] = {}  # variant -> client pid, server pid, SOCKS
    with tempfile.TemporaryDirectory(prefix="mptun-conncost-") as tmpname:
        tmp = Path(tmpname)
        key = tmp / "key"
        key.write_text(generate_key() + "\n")
        key.chmod(0o600)
        results: dict[str, dict[str, list[float]]] = {
            v: {"page": [], "client": [], "server": [], "sys": [], "ssys": []} for v in variants
        }
        try:
            pages = subprocess.Popen(
                [py, "-m", "mptun.bench.pages", "serve", "--port", "0"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(pages)
            assert pages.stdout is not None
            port = json.loads(pages.stdout.readline())["ports"][0]
            for v in variants:
                if v == "ss":
                    pair, socks = start_ss(tmp)
                    procs.extend(pair)
                    ends[v] = (pair[1].pid, pair[0].pid, socks)
                    continue
                head = [py, "-c", RUN.format(patch=PATCHES.get(v, ""))]
                srv, saddr = start(
                    [*head, "server", "--listen", "127.0.0.1:0", "--key-file", str(key),
                     "--allow-target", "127.0.0.0/8", *SERVER_OPTIONS.get(v, [])],
                    tmp / f"{v}-server.log", "listening on ",
                )  # fmt: skip
                procs.append(srv)
                cli, socks = start(
                    [*head, "client", "--server", saddr, "--key-file", str(key), "--socks",
                     "127.0.0.1:0", "--control", "none", *OPTIONS.get(v, [])],
                    tmp / f"{v}-client.log", "socks listening on ",
                )  # fmt: skip
                procs.append(cli)
                ends[v] = (cli.pid, srv.pid, socks)
            for _ in range(a.rounds):
                for v in variants:
                    cpid, spid, socks = ends[v]
                    out, sout = tmp / "perf.txt", tmp / "perf-server.txt"
                    perf, sperf = perf_start(cpid, out), perf_start(spid, sout)
                    c0, s0 = cpu_seconds(cpid), cpu_seconds(spid)
                    r = subprocess.run(
                        [py, "-m", "mptun.bench.pages", "load", "--target", f"127.0.0.1:{port}",
                         "--socks", socks, "--loads", str(a.loads)],
                        capture_output=True, text=True, timeout=300, check=True,
                    )  # fmt: skip
                    c1, s1 = cpu_seconds(cpid), cpu_seconds(spid)
                    loads = json.loads(r.stdout)["loads"]
                    conns = len(loads) * CONNECTIONS_PER_LOAD
                    res = results[v]
                    res["page"].extend(x["seconds"] * 1e3 for x in loads)
                    res["client"].append((c1 - c0) / conns * 1e3)
                    res["server"].append((s1 - s0) / conns * 1e3)
                    if perf is not None and sperf is not None:
                        res["sys"].append(perf_stop(perf, out) / conns)
                        res["ssys"].append(perf_stop(sperf, sout) / conns)
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    print(
        f"loopback, {a.rounds} rounds x {a.loads} page loads x {CONNECTIONS_PER_LOAD} "
        f"connections, loadavg {os.getloadavg()[0]:.2f}; medians [min-max]"
    )
    print(
        "| variant | page ms | CPU ms/connection: client | server | syscalls/connection: "
        "client | server |"
    )
    print("|---|---|---|---|---|---|")

    def cell(xs: list[float], f: str = ".2f") -> str:
        if not xs:
            return "-"
        return f"{statistics.median(xs):{f}} [{min(xs):{f}}-{max(xs):{f}}]"

    for v, r in results.items():
        sysc = " | ".join(
            f"{statistics.median(r[k]):.1f}" if r[k] else "-" for k in ("sys", "ssys")
        )
        print(
            f"| {v} | {cell(r['page'], '.0f')} | {cell(r['client'], '.3f')} | "
            f"{cell(r['server'], '.3f')} | {sysc} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
