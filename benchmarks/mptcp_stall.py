"""Catch a raw-speed MPTCP transfer that stalls, and record what the sockets say during it.

docs/design/batching.md ("Raw-speed MPTCP stalls"): about one raw transfer in 6-20 stalls for
seconds on this kernel. This loops 3 s transfers through one mptun client+server on the
namespace test bed; 2 s into each it records, for both relays, the epoll set
(/proc/PID/fdinfo), each socket's protocol, poll state and FIONREAD (through pidfd_getfd), and
`ss -tinmM` in every namespace. The record of the first transfer below --threshold is written
to --out. Needs root.

    sudo .venv/bin/python benchmarks/mptcp_stall.py --runs 40 -- --bulk plain --coalesce-ms 0
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

from mptun.bench.cases import Case, Starter
from mptun.bench.env import NetnsEnv
from mptun.bench.runner import Runner, Settings

SYS_PIDFD_GETFD = 438  # x86-64 and arm64


def socket_state(pid: int, fd: int) -> str:
    """Protocol, poll events and FIONREAD of another process's socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if dup < 0:
        return "pidfd_getfd failed"
    try:
        poller = select.poll()
        poller.register(dup, select.POLLIN | select.POLLOUT)
        events = poller.poll(0)
        inq = bytearray(4)
        fcntl.ioctl(dup, termios.FIONREAD, inq)
        s = socket.socket(fileno=dup)
        try:
            p = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        finally:
            s.detach()  # dup is closed below
        return f"proto {p} poll {events} inq {int.from_bytes(inq, 'little')}"
    except OSError as e:
        return f"({e.strerror})"
    finally:
        os.close(dup)


def relay_state(end: str, pid: int) -> list[str]:
    out = [f"## {end} (pid {pid})"]
    fds = {}
    for f in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(f)] = os.readlink(f"/proc/{pid}/fd/{f}")
        except OSError:
            pass
    for f, target in sorted(fds.items()):
        if "eventpoll" in target:
            out.append(f"epoll fd {f}:\n" + Path(f"/proc/{pid}/fdinfo/{f}").read_text())
        elif target.startswith("socket:"):
            out.append(f"fd {f} {target}: {socket_state(pid, f)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=40, help="transfers per direction (bounded)")
    ap.add_argument("--threshold", type=float, default=1000, help="Mbit/s below which it stalled")
    ap.add_argument("--out", default="mptcp-stall.txt")
    ap.add_argument(
        "--count", action="store_true", help="run every transfer and count stalls (no record)"
    )
    ap.add_argument(
        "--direction", choices=("both", "down", "up"), default="both", help="transfers to run"
    )
    ap.add_argument(
        "--ping", action="store_true", help="with the bench's RTT ping-pong on a second connection"
    )
    ap.add_argument(
        "--sysctl",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set in the router and VPS namespaces first (repeatable): what changes the odds",
    )
    ap.add_argument("mptun_args", nargs="*", help="options for both mptun ends (after --)")
    a = ap.parse_args()
    os.environ["MPTUN_BENCH_RELAY_LOG"] = "info"
    args = tuple(a.mptun_args or ("--bulk", "plain", "--coalesce-ms", "0"))
    env = NetnsEnv()
    work = Path(tempfile.mkdtemp(prefix="mptun-stall-"))
    running = None
    try:
        case = Case("stall", "stall", "mptun", args)
        starter = Starter(env, work)
        runner = Runner(env, [case], Settings(seconds=3), work)
        for kv in a.sysctl:
            key, _, value = kv.partition("=")
            for ns in (env.bed.router, env.bed.vps):
                ns.sysctl(key, value)
        runner._start_target()
        running = starter.start(case)
        directions = ("down", "up") if a.direction == "both" else (a.direction,)
        stalls = 0
        for i in range(a.runs):
            for direction in directions:
                cmd = runner._traffic(direction, running, "--seconds", "3")
                p = env.popen("lan", cmd, stdout=subprocess.PIPE)
                ping = None
                if a.ping:
                    rtt = runner._traffic("rtt", running, "--seconds", "2.4")
                    ping = env.popen("lan", rtt, stdout=subprocess.DEVNULL)
                time.sleep(2.0)
                record = []
                for end, pid in running.pids.items():
                    record += relay_state(end, pid)
                for ns in ("router", "vps"):
                    record.append(f"## ss -tinmM in {ns}\n" + env.run(ns, ["ss", "-tinmM"], 10))
                record.append("## MPTcpExt counters\n" + json.dumps(env.mptcp_counters()))
                out, _ = p.communicate(timeout=60)
                if ping is not None:
                    ping.wait(timeout=60)
                mbps = json.loads(out).get("steady_bps", 0) / 1e6
                print(f"run {i + 1} {direction}: {mbps:.0f} Mbit/s", flush=True)
                if mbps < a.threshold:
                    stalls += 1
                    if not a.count:
                        Path(a.out).write_text("\n".join(record) + "\n")
                        print(f"stalled: recorded in {a.out}")
                        return 0
        print(f"{stalls} stalled of {a.runs * len(directions)}" if stalls else "no stall")
        return 0 if stalls else 1
    finally:
        if running is not None:
            starter.stop(running)
        env.close()


if __name__ == "__main__":
    sys.exit(main())
