"""UDP in `mptun bench`: an offered UDP load and a voice-like flow over the shaped uplinks.

Three paths from the lan host to the inet host, side by side in one run, round-robin:

- `route`: the router routes and NATs the datagrams itself, out of its default route (one
  uplink, the fastest: 100 Mbit/s);
- `mptun`: the router's gateway path, nftables `tproxy` into `mptun client --tproxy-udp`, one
  tunnel connection (MPTCP, a subflow per uplink) per LAN source address and port;
- `ss-libev`: nftables `tproxy` into `ss-redir -u`, each datagram sealed and sent as one UDP
  datagram to `ss-server -u` on the VPS (one plain UDP path: the default route's uplink).

Per path and round: the voice flow idle (50 datagrams a second of 160 bytes to an echo and
back), then `iperf3 -u` offering 150 Mbit/s (more than any one uplink) with the voice flow
beside it. The iperf3 server's one-second windows after the warm-up give the delivered rate
and the share of datagrams lost; the voice flow's round trips give the latency added by the
load and the path; the relays' CPU time over the load gives their CPU per GB delivered.

The module is also the peers' program: `python -m mptun.bench.udp echo|voice ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import select
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mptun.bench.cases import SS_METHOD, Case, Running, Starter
from mptun.bench.env import SHAPED_MBIT, BenchError, Environment
from mptun.bench.procstat import cpu_seconds
from mptun.bench.runner import Progress, loadavg
from mptun.client.nftables import DEFAULT_MARK, DEFAULT_ROUTE_TABLE
from mptun.lab.wait import wait_listening

STUDY = "udp"
LABEL = "UDP: 150 Mbit/s offered and a 50 pps voice flow, routing/mptun tproxy/ss-redir -u"
ROUTE, MPTUN, SSLIBEV = "route", "mptun", "ss-libev"
LABELS = {
    ROUTE: "kernel routing (NAT, one uplink)",
    MPTUN: "mptun --tproxy-udp (defaults)",
    SSLIBEV: "shadowsocks-libev ss-redir -u",
}
OFFERED_MBIT = 150.0  # above the fastest uplink (100), below the link sum (200)
DATAGRAM = 1400  # iperf3's payload: with its headers under the 1500-byte MTU, relays included
WARM = 2.0  # seconds of iperf3's start and the subflows joining, left out of the windows
TAIL = 1.0  # the last window, cut short by the sender's end, left out too
VOICE_PPS = 50
VOICE_BYTES = 160
VOICE_GRACE = 1.0  # seconds the voice flow waits for the last echoes
GOAL_SHARE = 0.85  # of what the links can carry of the offer
GOAL_P99_MS = 50.0  # mptun's p99 under load above kernel routing's
# the mark and routing table of `mptun nft`'s tproxy rules
MARK, ROUTE_TABLE = DEFAULT_MARK, DEFAULT_ROUTE_TABLE
NFT_TABLE = "mptun_bench_udp"
PEER = [sys.executable, "-m", "mptun.bench.udp"]


# -- pure: windows, percentiles, summary, goals, table -------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q` percentile (0 < q <= 1): the smallest value with at least q of the
    values at or below it; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def steady_windows(intervals: list[dict], duration: float) -> list[dict]:
    """The iperf3 receiver's interval sums inside [WARM, duration - TAIL]."""
    out = []
    for iv in intervals:
        s = iv.get("sum", iv)
        if s["start"] >= WARM - 0.01 and s["end"] <= duration - TAIL + 0.01 and s["seconds"] > 0:
            out.append(s)
    return out


def window_stats(windows: list[dict]) -> dict | None:
    """Delivered Mbit/s and loss over the windows together, and per window (median, worst).

    Loss is of what the sender offered (iperf3 numbers its datagrams: `packets` is what a
    window should have held, `lost_packets` what never came), not of the nominal rate: a
    sender starved on a loaded machine offers less, which is no fault of the path's."""
    if not windows:
        return None
    seconds = sum(w["seconds"] for w in windows)
    rates = [w["bytes"] * 8 / w["seconds"] / 1e6 for w in windows]
    packets = sum(w.get("packets", 0) for w in windows)
    lost = sum(w.get("lost_packets", 0) for w in windows)
    shares = [w["lost_packets"] / w["packets"] for w in windows if w.get("packets")]
    return {
        "windows": len(windows),
        "mbps": sum(w["bytes"] for w in windows) * 8 / seconds / 1e6,
        "mbps_median": statistics.median(rates),
        "mbps_min": min(rates),
        "loss": lost / packets if packets else None,
        "loss_median": statistics.median(shares) if shares else None,
        "loss_max": max(shares) if shares else None,
    }


def voice_stats(rtt_ms: list[float], sent: int) -> dict:
    """p50/p99 of the round trips, and the share of the flow's datagrams that never came back."""
    return {
        "p50": percentile(rtt_ms, 0.5),
        "p99": percentile(rtt_ms, 0.99),
        "loss": 1 - len(rtt_ms) / sent if sent else None,
        "samples": len(rtt_ms),
    }


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_udp(records: list[dict]) -> list[dict]:
    """One row per path: medians over the rounds; the added latency is against kernel
    routing's idle p50 (the test bed's own round trip, no relay, no load)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["case"], []).append(r)
    rows = []
    for case in sorted(groups, key=lambda c: list(LABELS).index(c) if c in LABELS else 9):
        group = groups[case]
        ok = [r for r in group if "load" in r]
        row: dict = {"case": case, "runs": len(ok)}
        row["errors"] = [r["error"] for r in group if "error" in r]
        if ok:
            mbps = [r["load"]["mbps"] for r in ok]
            row.update(mbps=statistics.median(mbps), mbps_min=min(mbps), mbps_max=max(mbps))
            row["loss"] = _median([r["load"]["loss"] for r in ok])
            row["loss_max"] = max((r["load"].get("loss_max") or 0) for r in ok)
            per_gb = [
                r["cpu_s"] / (r["bytes"] / 1e9) for r in ok if r.get("bytes") and "cpu_s" in r
            ]
            row["cpu_s_per_gb"] = _median(per_gb)
            for end in ("client", "server"):
                ends = [
                    r["cpu"][end] / (r["bytes"] / 1e9)
                    for r in ok
                    if r.get("bytes") and end in r.get("cpu", {})
                ]
                row[f"cpu_{end}"] = _median(ends)
        for phase in ("idle", "loaded"):
            rtts = [x for r in group for x in r.get(f"voice_{phase}", {}).get("rtt_ms", [])]
            sent = sum(r.get(f"voice_{phase}", {}).get("sent", 0) for r in group)
            if sent:
                row[f"voice_{phase}"] = voice_stats(rtts, sent)
        rows.append(row)
    base = next((r for r in rows if r["case"] == ROUTE), {}).get("voice_idle", {}).get("p50")
    for row in rows:
        for phase in ("idle", "loaded"):
            v = row.get(f"voice_{phase}")
            if v and base is not None and v["p50"] is not None:
                v["added_p50"] = v["p50"] - base
                v["added_p99"] = v["p99"] - base
    return rows


def link_sum(rates: Sequence[float] = SHAPED_MBIT) -> float:
    return float(sum(rates))


def udp_targets(
    rows: list[dict], rates: Sequence[float] = SHAPED_MBIT, offered: float = OFFERED_MBIT
) -> list[tuple[str, bool | None, str]]:
    """The issue's goals: mptun delivers at least 0.85 of what the links can carry of the offer
    (the offer, or the link sum when it offers more), where shadowsocks-libev's one UDP path
    gets one uplink's rate; mptun's p99 under load at most 50 ms above kernel routing's."""
    idx = {r["case"]: r for r in rows}
    mp, ss, rt = idx.get(MPTUN, {}), idx.get(SSLIBEV, {}), idx.get(ROUTE, {})
    checks: list[tuple[str, bool | None, str]] = []
    can = min(offered, link_sum(rates))
    what = f"udp: mptun delivers >= {GOAL_SHARE:g} of {can:.0f} Mbit/s offered over the links"
    if mp.get("mbps") is None:
        checks.append((what, None, "not measured"))
    else:
        x = mp["mbps"] / can
        detail = f"{mp['mbps']:.1f} Mbit/s = {x:.2f} (need >= {GOAL_SHARE:g})"
        one = max(rates)
        if ss.get("mbps") is not None:
            detail += f"; ss-libev {ss['mbps']:.1f} Mbit/s = {ss['mbps'] / one:.2f} of one uplink"
            if ss["mbps"]:
                detail += f", mptun {mp['mbps'] / ss['mbps']:.2f}x ss-libev"
        checks.append((what, x >= GOAL_SHARE, detail))
    what = f"udp: mptun p99 under load vs kernel routing's (<= +{GOAL_P99_MS:g} ms)"
    a, b = mp.get("voice_loaded", {}), rt.get("voice_loaded", {})
    if a.get("p99") is None or b.get("p99") is None:
        checks.append((what, None, "not measured"))
    else:
        gap = a["p99"] - b["p99"]
        checks.append(
            (what, gap <= GOAL_P99_MS, f"{a['p99']:.1f} vs {b['p99']:.1f} ms = {gap:+.1f} ms")
        )
    return checks


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def udp_table(rows: list[dict], meta: dict) -> str:
    """One line per path: delivered rate and its ratios, loss, the voice flow's round trips
    idle and loaded (and what the load and the path add), the relay's CPU per GB."""
    if not rows:
        return ""
    rates = meta.get("uplinks_mbit") or list(SHAPED_MBIT)
    offered = meta.get("offered_mbit", OFFERED_MBIT)
    total = link_sum(rates)
    idx = {r["case"]: r for r in rows}
    ss = idx.get(SSLIBEV, {}).get("mbps")
    rt = idx.get(ROUTE, {}).get("mbps")
    out = [
        "",
        f"== UDP: iperf3 -u offering {offered:g} Mbit/s over uplinks "
        f"{'/'.join(f'{x:g}' for x in rates)} Mbit; voice: {VOICE_PPS} pps of {VOICE_BYTES} B, "
        "round trip ms p50/p99 (added: above routing's idle p50), v.loss: its loss % under load; "
        "CPU: the relay's two ends, s per GB",
    ]
    head = (
        f"{'path':34} {'Mbit/s med [min-max]':>20} {'x sum':>5} {'x rt':>5} {'x ss':>5} "
        f"{'loss %':>6} {'idle p50/p99':>13} {'load p50/p99':>13} {'added p99':>9} "
        f"{'v.loss':>6} {'CPU/GB':>6}"
    )
    out += [head, "-" * len(head)]
    for r in rows:
        name = LABELS.get(r["case"], r["case"])
        if r.get("mbps") is None:
            out.append(f"{name:34} failed: " + "; ".join(r["errors"])[:90])
            continue
        spread = f"{r['mbps']:.0f} [{r['mbps_min']:.0f}-{r['mbps_max']:.0f}]"
        idle, load = r.get("voice_idle", {}), r.get("voice_loaded", {})
        out.append(
            f"{name:34} {spread:>20} {r['mbps'] / total:>5.2f} "
            f"{_f(r['mbps'] / rt if rt else None, '.2f'):>5} "
            f"{_f(r['mbps'] / ss if ss else None, '.2f'):>5} "
            f"{_f(r['loss'] * 100 if r.get('loss') is not None else None, '.1f'):>6} "
            f"{_f(idle.get('p50'), '.1f') + '/' + _f(idle.get('p99'), '.1f'):>13} "
            f"{_f(load.get('p50'), '.1f') + '/' + _f(load.get('p99'), '.1f'):>13} "
            f"{_f(load.get('added_p99'), '.1f'):>9} "
            f"{_f(load['loss'] * 100 if load.get('loss') is not None else None, '.1f'):>6} "
            f"{_f(r.get('cpu_s_per_gb'), '.2f'):>6}"
        )
    return "\n".join(out)


def skip_reason(gateway: bool | None = None, uplinks: int = len(SHAPED_MBIT)) -> str | None:
    """Why the UDP study cannot run here (None: it can); `gateway` None: not known yet."""
    for tool, pkg in (("iperf3", "iperf3"), ("nft", "nftables")):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install {pkg})"
    if gateway is False:
        return "needs the namespace test bed (shaped uplinks, a router to tproxy in)"
    if uplinks != len(SHAPED_MBIT):
        return f"needs {len(SHAPED_MBIT)} uplinks (one shaped link each), not {uplinks}"
    return None


# -- the run -------------------------------------------------------------------------------------
@dataclass
class UdpPath:
    """A started path: the iperf3 and echo ports on the inet host, the relay's processes."""

    case: str
    iperf_port: int = 0
    echo_port: int = 0
    udp_port: int = 0  # the relay's tproxy port in the router (0: routed, no relay)
    pids: dict[str, int] = field(default_factory=dict)  # "client"/"server" -> PID
    procs: list[subprocess.Popen] = field(default_factory=list)


@dataclass
class UdpSettings:
    seconds: float = 5.0  # of load inside the windows (iperf3 runs WARM + this + TAIL)
    runs: int = 3  # rounds over the paths


class UdpStudy:
    """Shapes the uplinks, loads the tproxy rules, starts the peers and the relays, runs the
    rounds, undoes it all."""

    def __init__(self, env: Environment, settings: UdpSettings, workdir: Path) -> None:
        self.env = env
        self.s = settings
        self.workdir = workdir
        self.starter = Starter(env, workdir)
        self.cases = [ROUTE, MPTUN] + ([SSLIBEV] if _have_sslibev() else [])
        self.results: dict = {"udp": [], "udp_meta": {}}
        self._procs: list[subprocess.Popen] = []
        self._rules = False
        self._routing: list[list[str]] = []

    def steps(self) -> int:
        return self.s.runs * len(self.cases) * 2

    def run(self, progress: Progress) -> dict:
        bed = getattr(self.env, "bed", None)
        if bed is None:
            raise BenchError("the UDP study needs the namespace test bed")
        paths: list[UdpPath] = []
        try:
            self.env.set_shaped(True)
            ports = {c: (self.env.port("inet"), self.env.port("inet")) for c in self.cases}
            self._peers(ports)
            for c in self.cases:
                paths.append(self._start(c, *ports[c]))
            self._tproxy(paths)
            self.results["udp_meta"] = {
                "uplinks_mbit": list(SHAPED_MBIT),
                "offered_mbit": OFFERED_MBIT,
                "seconds": self.s.seconds,
                "cases": {c: LABELS[c] for c in self.cases},
                "skipped": None if SSLIBEV in self.cases else "shadowsocks-libev not installed",
            }
            for i in range(self.s.runs):
                for p in paths:
                    rec = {"case": p.case, "run": i, "loadavg": loadavg()}
                    self._idle(p, rec)
                    progress.step(f"udp {p.case} run {i + 1}: idle voice {_voice_note(rec)}")
                    self._loaded(p, rec)
                    self.results["udp"].append(rec)
                    note = rec.get("error") or (
                        f"{rec['load']['mbps']:.0f} Mbit/s, loss "
                        f"{(rec['load']['loss'] or 0) * 100:.1f}%, "
                        f"voice {_voice_note(rec, 'loaded')}"
                    )
                    progress.step(f"udp {p.case} run {i + 1}: {note}")
        finally:
            for p in paths:
                for proc in p.procs:
                    self.env.stop(proc)
            for proc in self._procs:
                self.env.stop(proc)
            self._undo()
            self.env.set_shaped(False)
        return self.results

    # -- setting up ------------------------------------------------------------------------------
    def _peers(self, ports: dict[str, tuple[int, int]]) -> None:
        """An iperf3 server per path and one echo for every path's voice port."""
        host = self.env.target_host
        for c, (iperf, _) in ports.items():
            with open(self.workdir / f"udp-iperf3-{c}.log", "ab") as log:
                cmd = ["iperf3", "-s", "-B", host, "-p", str(iperf), "-J"]
                p = self.env.popen("inet", cmd, stdout=log, stderr=subprocess.STDOUT)
            self._procs.append(p)
            self.env.wait_listening("inet", host, iperf, p)
        cmd = [*PEER, "echo", "--host", host]
        for _, echo in ports.values():
            cmd += ["--port", str(echo)]
        with open(self.workdir / "udp-echo.log", "ab") as log:
            p = self.env.popen("inet", cmd, stdout=subprocess.DEVNULL, stderr=log)
        self._procs.append(p)
        for _, echo in ports.values():
            self._wait_udp("inet", host, echo, p)

    def _wait_udp(self, role: str, host: str, port: int, p: subprocess.Popen) -> None:
        try:
            wait_listening(host, port, 15, p, prefix=self.env.prefix(role), udp=True)
        except RuntimeError:
            raise BenchError(f"{p.args[len(self.env.prefix(role))]} exited") from None
        except TimeoutError:
            raise BenchError(f"no UDP socket on {host}:{port} in {role} after 15 s") from None

    def _start(self, case: str, iperf: int, echo: int) -> UdpPath:
        p = UdpPath(case, iperf, echo)
        if case == ROUTE:
            return p
        running = Running(Case(f"udp-{case}", LABELS[case], case))
        try:
            if case == MPTUN:
                self._mptun(running)
            else:
                self._sslibev(running)
        except BaseException:
            self.starter.stop(running)
            raise
        p.procs, p.pids = running.procs, dict(running.pids)
        p.udp_port = running.redir or 0
        return p

    def _mptun(self, r: Running) -> None:
        env, st = self.env, self.starter
        mptun = [sys.executable, "-m", "mptun", "--log-level", "warning"]
        sport = env.port("vps")
        server = [*mptun, "server", "--listen", f"{env.server_host}:{sport}"]
        server += ["--key-file", str(st.key), "--allow-target", f"{env.target_host}/32"]
        st._spawn(r, "server", "vps", server, sport, env.server_host)
        cport, uport = env.port("router"), env.port("router")
        client = [*mptun, "client", "--server", f"{env.server_host}:{sport}"]
        client += ["--key-file", str(st.key), "--socks", f"{env.socks_host}:{cport}"]
        client += ["--tproxy-udp", f"0.0.0.0:{uport}"]
        st._spawn(r, "client", "router", client, cport, env.socks_host)
        self._wait_udp("router", "0.0.0.0", uport, r.procs[-1])
        r.redir = uport

    def _sslibev(self, r: Running) -> None:
        env, st = self.env, self.starter
        common = ["-k", st.password, "-m", SS_METHOD, "-u"]
        sport = env.port("vps")
        server = ["ss-server", "-s", env.server_host, "-p", str(sport), *common]
        st._spawn(r, "server", "vps", server, sport, env.server_host)
        rport = env.port("router")
        redir = ["ss-redir", "-s", env.server_host, "-p", str(sport), "-b", env.socks_host]
        redir += ["-l", str(rport), *common]
        st._spawn(r, "client", "router", redir, rport, env.socks_host)
        self._wait_udp("router", env.socks_host, rport, r.procs[-1])
        r.redir = rport

    def _tproxy(self, paths: list[UdpPath]) -> None:
        """The lan host's datagrams to a relayed path's ports, tproxied into its relay (as
        `mptun nft --udp-port` does for a whole LAN), and the policy routing tproxy needs."""
        router = self.env.bed.router  # type: ignore[attr-defined]
        rules = []
        for p in paths:
            if p.case == ROUTE:
                continue
            ports = f"{{ {p.iperf_port}, {p.echo_port} }}"
            rules.append(
                f'        iifname "lan0" udp dport {ports} tproxy to :{p.udp_port} '
                f"meta mark set {MARK:#x} accept"
            )
        table = (
            f"table ip {NFT_TABLE} {{\n    chain prerouting {{\n"
            "        type filter hook prerouting priority mangle; policy accept;\n"
            + "\n".join(rules)
            + "\n    }\n}\n"
        )
        router.exec("nft", "-f", "-", input=table)
        self._rules = True
        for cmd in (
            ["ip", "rule", "add", "fwmark", f"{MARK:#x}", "lookup", str(ROUTE_TABLE)],
            ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)],
        ):
            router.exec(*cmd)
            self._routing.append(cmd)

    def _undo(self) -> None:
        bed = getattr(self.env, "bed", None)
        if bed is None or bed.router is None:
            return
        if self._rules:
            bed.router.exec("nft", "delete", "table", "ip", NFT_TABLE, check=False)
        for cmd in reversed(self._routing):
            bed.router.exec(*[("del" if x == "add" else x) for x in cmd], check=False)
        self._routing.clear()

    # -- measuring -------------------------------------------------------------------------------
    def _voice_cmd(self, p: UdpPath, seconds: float, skip: float) -> list[str]:
        return [
            *PEER, "voice", "--target", f"{self.env.target_host}:{p.echo_port}",
            "--seconds", f"{seconds:g}", "--skip", f"{skip:g}",
        ]  # fmt: skip

    def _idle(self, p: UdpPath, rec: dict) -> None:
        """The voice flow alone (its first half second left out: the association opening)."""
        seconds = max(2.0, self.s.seconds)
        try:
            out = self.env.run("lan", self._voice_cmd(p, seconds, 0.5), timeout=seconds + 30)
            rec["voice_idle"] = json.loads(out)
        except (BenchError, ValueError) as e:
            rec["error"] = f"idle voice: {e}"

    def _loaded(self, p: UdpPath, rec: dict) -> None:
        """iperf3 -u at OFFERED_MBIT with the voice flow beside it; CPU of the relay's ends."""
        duration = WARM + self.s.seconds + TAIL
        cmd = [
            "iperf3", "-c", self.env.target_host, "-p", str(p.iperf_port), "-u",
            "-b", f"{OFFERED_MBIT:g}M", "-l", str(DATAGRAM), "-t", f"{duration:g}", "-J",
            # the receiver's socket buffer (iperf3 sends it to the server): 2 MB, not the
            # default 208 KB, so the iperf3 server itself does not drop on a loaded machine
            "-w", "2M", "--get-server-output", "--connect-timeout", "5000",
        ]  # fmt: skip
        before = self._cpu(p)
        bulk = self.env.popen("lan", cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        voice = self.env.popen(
            "lan", self._voice_cmd(p, WARM + self.s.seconds, WARM), stdout=subprocess.PIPE
        )
        try:
            out, err = bulk.communicate(timeout=duration + 60)
            vout, _ = voice.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            rec["error"] = "iperf3 -u: no result in time"
            return
        finally:
            self.env.stop(bulk)
            self.env.stop(voice)
        after = self._cpu(p)
        try:
            rec["voice_loaded"] = json.loads(vout)
        except ValueError:
            rec["error"] = "voice flow output unreadable"
        try:
            server = json.loads(out)["server_output_json"]
            intervals = server["intervals"]
        except (ValueError, KeyError, TypeError):
            rec["error"] = "iperf3 -u: " + _iperf3_error(out, err)
            return
        stats = window_stats(steady_windows(intervals, duration))
        if stats is None:
            rec["error"] = "iperf3 -u: no steady window"
            return
        rec["load"] = stats
        rec["bytes"] = sum(iv["sum"]["bytes"] for iv in intervals)
        rec["remote"] = server.get("start", {}).get("connected", [{}])[0].get("remote_host")
        if p.pids:
            rec["cpu"] = {k: after[k] - before[k] for k in after}
            rec["cpu_s"] = sum(rec["cpu"].values())

    def _cpu(self, p: UdpPath) -> dict[str, float]:
        out = {}
        for end, pid in p.pids.items():
            try:
                out[end] = cpu_seconds(pid)
            except OSError:
                out[end] = 0.0
        return out


def _voice_note(rec: dict, phase: str = "idle") -> str:
    v = rec.get(f"voice_{phase}")
    if not v:
        return rec.get("error", "-")
    s = voice_stats(v["rtt_ms"], v["sent"])
    return f"p50 {_f(s['p50'], '.1f')} p99 {_f(s['p99'], '.1f')} ms"


def _iperf3_error(out: bytes | str, err: bytes | str) -> str:
    text = out.decode(errors="replace") if isinstance(out, bytes) else out
    try:
        return str(json.loads(text).get("error", ""))[:200] or "no result"
    except (ValueError, AttributeError):
        e = err.decode(errors="replace") if isinstance(err, bytes) else err
        return (text.strip() or e.strip())[-200:] or "no result"


def _have_sslibev() -> bool:
    return all(shutil.which(x) for x in ("ss-server", "ss-redir"))


# -- the peers (run in the namespaces) -----------------------------------------------------------
def serve_echo(host: str, ports: list[int]) -> None:
    """Send every datagram back to where it came from, on each of `ports`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for port in ports:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((host, port))
        socks.append(s)
    while True:
        ready, _, _ = select.select(socks, [], [])
        for s in ready:
            data, addr = s.recvfrom(65535)
            s.sendto(data, addr)


def voice(target: tuple[str, int], seconds: float, skip: float) -> dict:
    """VOICE_PPS datagrams a second of VOICE_BYTES to an echo for `seconds`: the round trips
    (ms) of those sent after `skip` s, and how many were sent then."""
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect(target)
    s.settimeout(0.1)
    sent_at: list[float] = []
    rtts: dict[int, float] = {}
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data = s.recv(2048)
            except (TimeoutError, ConnectionRefusedError):
                continue
            now = time.monotonic()
            seq = int.from_bytes(data[:8], "big")
            if seq < len(sent_at) and seq not in rtts:
                rtts[seq] = (now - sent_at[seq]) * 1000

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    start = time.monotonic()
    n = 0
    pad = b"v" * (VOICE_BYTES - 8)
    while (now := time.monotonic()) < start + seconds:
        sent_at.append(now)
        try:
            s.send(n.to_bytes(8, "big") + pad)
        except OSError:
            pass  # counted as lost
        n += 1
        time.sleep(max(0.0, start + n / VOICE_PPS - time.monotonic()))
    time.sleep(VOICE_GRACE)
    stop.set()
    t.join()
    first = math.ceil(skip * VOICE_PPS)
    kept = [rtts[i] for i in range(first, n) if i in rtts]
    return {"sent": max(0, n - first), "rtt_ms": kept}


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mptun.bench.udp", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--host", default="0.0.0.0")
    e.add_argument("--port", type=int, action="append", required=True)
    v = sub.add_parser("voice")
    v.add_argument("--target", required=True, help="HOST:PORT of the echo")
    v.add_argument("--seconds", type=float, default=5.0)
    v.add_argument("--skip", type=float, default=0.0)
    a = ap.parse_args(argv)
    if a.cmd == "echo":
        serve_echo(a.host, a.port)
    else:
        print(json.dumps(voice(_hostport(a.target), a.seconds, a.skip)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
