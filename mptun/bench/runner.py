"""Runs every case in one environment, round-robin, and collects raw measurements.

Per link setting (raw, then shaped) all cases' relays are started once; each round then runs
every case once per direction, so a slow spell on this shared machine touches every case alike
(ratios are read within one run); the gateway cases may have more rounds of their own on the
raw links (`--gateway-runs`). Per run: throughput at the receiver, CPU of each relay process
and of the machine over the run, and the RTT of 64-byte ping-pongs on a second connection while
the bulk stream runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mptun.bench.cases import Case, Running, Starter
from mptun.bench.env import BenchError, Environment
from mptun.bench.procstat import cpu_seconds, machine_busy_seconds, rss_bytes

TRAFFIC = [sys.executable, "-m", "mptun.bench.traffic"]


@dataclass
class Settings:
    seconds: float = 5.0  # per bulk run
    runs: int = 3  # per case, link and direction
    gateway_runs: int | None = None  # the gateway cases' on the raw links (None: `runs`)
    links: tuple[str, ...] = ("raw", "shaped")
    directions: tuple[str, ...] = ("up", "down")
    connrate_seconds: float = 3.0
    idle_connections: int = 1000


@dataclass
class Progress:
    """One line per step on stderr (rewritten in place on a terminal), with elapsed time."""

    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    out: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)

    def step(self, what: str) -> None:
        self.done += 1
        el = time.monotonic() - self.started
        eta = el / self.done * (self.total - self.done) if self.done > 1 else 0
        self.out(f"[{self.done:3d}/{self.total}] {el:5.0f}s (~{eta:4.0f}s left) {what}")

    def note(self, what: str) -> None:
        self.out(f"          {what}")


class Runner:
    def __init__(self, env: Environment, cases: list[Case], settings: Settings, workdir: Path):
        self.env = env
        self.cases = [c for c in cases if c.skip is None]
        self.settings = settings
        self.starter = Starter(env, workdir)
        self.results: dict = {"runs": [], "connrate": [], "idle": [], "rtt_idle": []}
        self.target: tuple[str, int] = ("", 0)
        self._server: subprocess.Popen | None = None
        self._do_connrate = settings.connrate_seconds > 0
        self._do_idle = settings.idle_connections > 0

    def skip_extras(self, connrate: bool, idle: bool) -> None:
        """Leave out the connection-rate or the idle-RSS measurement."""
        self._do_connrate = self._do_connrate and not connrate
        self._do_idle = self._do_idle and not idle

    def runs(self, link: str, case: Case) -> int:
        """Transfers per direction of `case` on `link`: the gateway cases on the raw links
        have their own count (issue 17's stall target counts ten runs)."""
        s = self.settings
        if link == "raw" and case.generator == "iperf3" and s.gateway_runs:
            return s.gateway_runs
        return s.runs

    def steps(self) -> int:
        s = self.settings
        per_link = sum(
            len(s.directions) * self.runs(link, c) + 1 for link in s.links for c in self.cases
        )
        extra = 0
        if "raw" in s.links:
            extra = sum(c.connrate for c in self.cases) * self._do_connrate
            extra += sum(c.idle for c in self.cases) * self._do_idle
        return per_link + extra

    def run(self, progress: Progress) -> dict:
        self._start_target()
        try:
            for link in self.settings.links:
                self.env.set_shaped(link == "shaped")
                self._link(link, progress)
        finally:
            if self._server:
                self.env.stop(self._server)
        return self.results

    def _start_target(self) -> None:
        port = self.env.port("inet")
        cmd = [*TRAFFIC, "serve", "--host", self.env.target_host, "--port", str(port)]
        self._server = self.env.popen("inet", cmd, stdout=subprocess.PIPE, text=True)
        self.env.wait_listening("inet", self.env.target_host, port, self._server)
        self.target = (self.env.target_host, port)

    def _link(self, link: str, progress: Progress) -> None:
        running: list[Running] = []
        try:
            for case in self.cases:
                running.append(self.starter.start(case))
            for r in running:
                self._rtt_idle(link, r)
                progress.step(f"{link} {r.case.id}: started, idle RTT")
            rounds = max((self.runs(link, r.case) for r in running), default=0)
            for i in range(rounds):
                for direction in self.settings.directions:
                    for r in running:
                        if i >= self.runs(link, r.case):
                            continue  # its runs are done; the gateway cases may have more
                        m = self._bulk(link, r, direction, i)
                        progress.step(
                            f"{link} {r.case.id} {direction} run {i + 1}: "
                            + (f"{m['mbps']:.1f} Mbit/s" if "mbps" in m else m["error"])
                        )
            if link == "raw" and self._do_connrate:
                for r in running:
                    if not r.case.connrate:
                        continue
                    m = self._connrate(r)
                    progress.step(f"{r.case.id}: {m.get('per_s', 0):.0f} connections/s")
            if link == "raw" and self._do_idle:
                for r in running:
                    if r.case.idle:
                        m = self._idle(r)
                        progress.step(f"{r.case.id}: idle connections {m.get('summary', '')}")
        finally:
            for r in running:
                self.starter.stop(r)

    # -- measurements ---------------------------------------------------------------------------
    def _traffic(self, job: str, r: Running, *extra: str) -> list[str]:
        host, port = r.target or self.target
        cmd = [*TRAFFIC, job, "--target", f"{host}:{port}", *r.generator_args, *extra]
        if r.socks:
            cmd += ["--socks", f"{r.socks[0]}:{r.socks[1]}"]
        return cmd

    def _cpu(self, r: Running) -> dict[str, float]:
        out = {"machine": machine_busy_seconds()}
        for end, pid in r.pids.items():
            out[end] = cpu_seconds(pid)
        return out

    def _rtt_idle(self, link: str, r: Running) -> None:
        if r.case.generator == "iperf3":
            return  # iperf3 measures no RTT; the bench generator's cases do
        out = self.env.run(r.origin, self._traffic("rtt", r, "--seconds", "1"), timeout=30)
        self.results["rtt_idle"].append(
            {"link": link, "case": r.case.id, "rtt_ms": json.loads(out)["rtt_ms"]}
        )

    def _bulk(self, link: str, r: Running, direction: str, index: int) -> dict:
        if r.case.generator == "iperf3":
            return self._iperf3(link, r, direction, index)
        s = self.settings.seconds
        rec: dict = {"link": link, "case": r.case.id, "direction": direction, "run": index}
        rec["loadavg"] = loadavg()
        before = self._cpu(r)
        counters = self._mptcp_counters()
        bulk = self.env.popen(
            r.origin, self._traffic(direction, r, "--seconds", str(s)), stdout=subprocess.PIPE
        )
        rtt = self.env.popen(
            r.origin, self._traffic("rtt", r, "--seconds", str(s * 0.8)), stdout=subprocess.PIPE
        )
        try:
            out, _ = bulk.communicate(timeout=s + 120)
            rtt_out, _ = rtt.communicate(timeout=s + 60)
        except subprocess.TimeoutExpired:
            rec["error"] = "no result in time"
            return self._record(rec)
        finally:
            self.env.stop(bulk)
            self.env.stop(rtt)
        after = self._cpu(r)
        try:
            res = json.loads(out)
            rtts = json.loads(rtt_out).get("rtt_ms", [])
        except ValueError:
            rec["error"] = "generator output unreadable"
            return self._record(rec)
        if "error" in res:
            rec["error"] = res["error"]
            return self._record(rec)
        rec.update(
            bytes=res["bytes"],
            seconds=res["seconds"],
            mbps=res["steady_bps"] / 1e6,
            mbps_whole=res["bps"] / 1e6,
            cpu={k: after[k] - before[k] for k in after},
            rtt_ms=rtts,
        )
        joined = self._mptcp_counters()
        if counters and joined:
            rec["mp_joins"] = joined.get("MPTcpExtMPJoinSynAckRx", 0) - counters.get(
                "MPTcpExtMPJoinSynAckRx", 0
            )
        return self._record(rec)

    def _iperf3(self, link: str, r: Running, direction: str, index: int) -> dict:
        """One iperf3 test (`-R` for down): the receiver's rate, per-second rates, CPU of the
        relays, and the MPTCP-level retransmissions of router and VPS during it."""
        s = self.settings.seconds
        rec: dict = {"link": link, "case": r.case.id, "direction": direction, "run": index}
        rec["loadavg"] = loadavg()
        host, port = r.target or self.target
        cmd = [*r.generator_args, "iperf3", "-c", host, "-p", str(port), "-t", f"{s:g}", "-J"]
        cmd += ["--connect-timeout", "5000"] + (["-R"] if direction == "down" else [])
        before, counters = self._cpu(r), self._retrans()
        try:
            out = self.env.run(r.origin, cmd, timeout=s + 60)
        except BenchError as e:
            out = str(e)
        after = self._cpu(r)
        try:
            res = json.loads(out)
            received = res["end"]["sum_received"]
        except (ValueError, KeyError, TypeError):
            rec["error"] = "iperf3: " + (_iperf3_error(out) or "no result")
            return self._record(rec)
        rec.update(
            bytes=received["bytes"],
            seconds=received["seconds"],
            mbps=received["bits_per_second"] / 1e6,
            cpu={k: after[k] - before[k] for k in after},
            rtt_ms=[],
            interval_mbps=[iv["sum"]["bits_per_second"] / 1e6 for iv in res.get("intervals", [])],
        )
        joined = self._retrans()
        if counters and joined:
            delta = {
                role: {k: v - counters[role].get(k, 0) for k, v in joined[role].items()}
                for role in joined
            }
            rec["mptcp_retrans"] = {o: d.get("MPTcpExtMPTCPRetrans", 0) for o, d in delta.items()}
            rec["counters"] = {o: {k: v for k, v in d.items() if v} for o, d in delta.items()}
        return self._record(rec)

    def _retrans(self) -> dict[str, dict[str, int]]:
        """MPTcpExt and TCP drop counters of router and VPS (MPTCPRetrans: where the data is
        sent, the VPS for down, the router for up)."""
        get = getattr(self.env, "mptcp_counters", None)
        if not get:
            return {}
        return {role: get(role) for role in ("router", "vps")}

    def _mptcp_counters(self) -> dict[str, int]:
        get = getattr(self.env, "mptcp_counters", None)
        return get() if get else {}

    def _record(self, rec: dict) -> dict:
        self.results["runs"].append(rec)
        return rec

    def _connrate(self, r: Running) -> dict:
        s = self.settings.connrate_seconds
        before = self._cpu(r)
        try:
            out = self.env.run(r.origin, self._traffic("connrate", r, "--seconds", str(s)), s + 60)
            m = json.loads(out)
        except (BenchError, ValueError) as e:
            m = {"error": str(e)}
        after = self._cpu(r)
        m.update(case=r.case.id, cpu={k: after[k] - before[k] for k in after})
        self.results["connrate"].append(m)
        return m

    def _idle(self, r: Running) -> dict:
        """RSS of each relay process before and while N idle tunneled connections are open."""
        n = self.settings.idle_connections
        before = {end: rss_bytes(pid) for end, pid in r.pids.items()}
        cmd = self._traffic("hold", r, "--count", str(n))
        p = self.env.popen(r.origin, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        m: dict = {"case": r.case.id, "connections": n}
        try:
            assert p.stdout is not None and p.stdin is not None
            line = p.stdout.readline()
            if not line or "open" not in line:
                m["error"] = "could not open the connections"
            else:
                time.sleep(0.5)  # let both ends finish their handshakes' bookkeeping
                during = {end: rss_bytes(pid) for end, pid in r.pids.items()}
                m["rss_before"], m["rss_during"] = before, during
                m["per_connection"] = {e: (during[e] - before[e]) / n for e in during}
                m["summary"] = ", ".join(
                    f"{e} +{(during[e] - before[e]) / 2**20:.1f} MiB" for e in during
                )
            p.stdin.close()
        finally:
            self.env.stop(p)
        self.results["idle"].append(m)
        return m


def loadavg() -> str:
    """The machine's load averages (it is shared: every run records them)."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def _iperf3_error(out: str) -> str:
    try:
        return str(json.loads(out).get("error", ""))[:200]
    except (ValueError, AttributeError):
        return out.strip()[-200:]
