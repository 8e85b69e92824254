"""A router's CPU budget and page loads in `mptun bench`: the router-side relay held to a quota.

Routers have slow cores; here the router-side relay (mptun's client, ss-local/ss-redir) runs in a
cgroup CPU quota with a 10 ms period (mptun/bench/cpuquota.py), a stand-in for a slow core. The
uplinks are shaped to 500/300/200 Mbit/s and the home (lan host <-> router) to 1 Gbit/s, fast
enough that the quota, not the links, becomes the limit. The server end (VPS) is not limited.

Two studies share the relays, the quotas and the shaping:

- `budget`: one bulk stream each way through SOCKS at every quota, for mptun's defaults, mptun
  `--bulk plain` and shadowsocks-libev (under mptcpize, as the bench's `ss-mptcp`) side by
  side; the smallest quota that reaches 0.9 of the link sum, and the issue's goals.
- `pages`: a page-like set of fresh connections (mptun/bench/pages.py) through SOCKS and through
  the router's redirect (nft `redirect` into `--redir` or ss-redir), and by plain routing, without
  a quota and at the smallest quota.

Rounds are round-robin over the relays (every relay once per direction and run at a quota), so
a slow spell on a shared machine touches them alike.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mptun.bench.cases import SS_METHOD, Case, Running, Starter
from mptun.bench.cpuquota import CpuQuota, QuotaError, availability
from mptun.bench.env import BenchError, Environment
from mptun.bench.procstat import cpu_seconds
from mptun.bench.runner import Progress, loadavg

BUDGET_MBIT = (500, 300, 200)  # the uplinks
HOME_MBIT = 1000  # lan host <-> router
DEFAULT_QUOTAS = (10.0, 15.0, 20.0, 30.0, 40.0)  # % of one core
GOOD_SHARE = 0.9  # "reaches the links": this share of the link sum
GOAL_RATIO = 2.0  # mptun's defaults vs shadowsocks-libev where it is CPU-limited
GOAL_PLAIN_QUOTA = 10.0  # `--bulk plain` reaches GOOD_SHARE within this quota
STUDIES = ("budget", "pages")
DEFAULT, PLAIN, SSLIBEV, DIRECT = "mptun-default", "mptun-plain", "ss-libev", "direct"
TRAFFIC = [sys.executable, "-m", "mptun.bench.traffic"]
PAGES = [sys.executable, "-m", "mptun.bench.pages"]


@dataclass(frozen=True)
class Variant:
    """A router-side relay and its server end: kind `mptun` (with `args` at both ends) or
    `sslibev`."""

    id: str
    label: str
    kind: str
    args: tuple[str, ...] = ()


VARIANTS = (
    Variant(DEFAULT, "mptun defaults (aead without kTLS)", "mptun"),
    Variant(PLAIN, "mptun --bulk plain (splice)", "mptun", ("--bulk", "plain")),
    Variant(SSLIBEV, "shadowsocks-libev (mptcpize)", "sslibev"),
)
LABELS = {**{v.id: v.label for v in VARIANTS}, DIRECT: "direct routing (NAT)"}


def skip_reason(
    study: str, gateway: bool | None = None, uplinks: int = len(BUDGET_MBIT)
) -> str | None:
    """Why `study` cannot run here (None: it can); `gateway` is None before the environment
    exists. On the test bed both studies shape its uplinks to BUDGET_MBIT, one rate each."""
    if study == "budget":
        why = availability()
        if why:
            return f"no CPU quota: {why}"
        if gateway is False:
            return "needs the namespace test bed (shaped uplinks)"
    if gateway is not False and uplinks != len(BUDGET_MBIT):  # loopback pages: no uplinks
        return f"needs {len(BUDGET_MBIT)} uplinks (one shaped link each), not {uplinks}"
    return None


def link_sum(rates: Iterable[float] = BUDGET_MBIT, home: float = HOME_MBIT) -> float:
    """What the links can carry each way: the uplinks together, at most the home link."""
    return min(sum(rates), home)


# -- starting the relays -------------------------------------------------------------------------
@dataclass
class Relay:
    """A started variant: SOCKS address, redirect listener port (None: no redirect path),
    router-side PIDs (what the quota holds), processes, and its quota."""

    variant: Variant
    socks: tuple[str, int] | None = None
    redir: int | None = None
    router_pids: dict[str, int] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    quota: CpuQuota | None = None


class RelayStarter(Starter):
    """Starts a variant's two ends with a SOCKS listener and, with `redir`, a redirect one."""

    def start_variant(self, v: Variant, redir: bool) -> Relay:
        running = Running(Case(f"budget-{v.id}", v.label, v.kind, v.args))
        relay = Relay(v)
        try:
            if v.kind == "mptun":
                self._mptun_ends(running, v, relay, redir)
            else:
                self._ss_ends(running, relay, redir)
        except BaseException:
            self.stop(running)
            raise
        relay.procs = running.procs
        relay.router_pids = {k: p for k, p in running.pids.items() if k != "server"}
        return relay

    def _mptun_ends(self, r: Running, v: Variant, relay: Relay, redir: bool) -> None:
        env = self.env
        mptun = [sys.executable, "-m", "mptun", "--log-level", "warning"]
        sport = env.port("vps")
        allow = "127.0.0.0/8" if env.target_host.startswith("127.") else f"{env.target_host}/32"
        server = [*mptun, "server", "--listen", f"{env.server_host}:{sport}"]
        server += ["--key-file", str(self.key), "--allow-target", allow, *v.args]
        self._spawn(r, "server", "vps", server, sport, env.server_host)
        cport = env.port("router")
        listen = ["--socks", f"{env.socks_host}:{cport}"]
        if redir:
            relay.redir = env.port("router")
            listen += ["--redir", f"{env.socks_host}:{relay.redir}"]
        client = [*mptun, "client", "--server", f"{env.server_host}:{sport}"]
        client += ["--key-file", str(self.key), *listen, *v.args]
        client += ["--socks-per-client", "100000", "--max-connections", "100000"]
        self._spawn(r, "client", "router", client, cport, env.socks_host)
        if relay.redir is not None:
            env.wait_listening("router", env.socks_host, relay.redir, r.procs[-1])
        relay.socks = (env.socks_host, cport)

    def _ss_ends(self, r: Running, relay: Relay, redir: bool) -> None:
        env = self.env
        wrap = ["mptcpize", "run"]
        common = ["-k", self.password, "-m", SS_METHOD, "-n", "20000", "--no-delay"]
        sport = env.port("vps")
        server = [*wrap, "ss-server", "-s", env.server_host, "-p", str(sport), *common]
        self._spawn(r, "server", "vps", server, sport, env.server_host)
        up = ["-s", env.server_host, "-p", str(sport), "-b", env.socks_host]
        cport = env.port("router")
        local = [*wrap, "ss-local", *up, "-l", str(cport), *common]
        self._spawn(r, "client", "router", local, cport, env.socks_host)
        relay.socks = (env.socks_host, cport)
        if redir:
            relay.redir = env.port("router")
            self._spawn(
                r, "redir", "router", [*wrap, "ss-redir", *up, "-l", str(relay.redir), *common],
                relay.redir, env.socks_host,
            )  # fmt: skip


# -- the run -------------------------------------------------------------------------------------
@dataclass
class StudySettings:
    studies: tuple[str, ...] = STUDIES
    quotas: tuple[float, ...] = DEFAULT_QUOTAS
    seconds: float = 5.0  # per bulk transfer
    runs: int = 3  # per relay, quota and direction; rounds of page loads
    page_loads: int = 3  # page loads per round, relay, path and quota


class Study:
    """Shapes the links, starts the relays and their quotas, runs the studies, undoes it all."""

    def __init__(self, env: Environment, settings: StudySettings, workdir: Path) -> None:
        self.env = env
        self.s = settings
        self.starter = RelayStarter(env, workdir)
        self.workdir = workdir
        self.variants = [v for v in VARIANTS if v.kind == "mptun" or _have_sslibev()]
        self.quota_ok = availability() is None
        self.results: dict = {"budget": [], "pages": [], "budget_meta": {}}
        self._procs: list[subprocess.Popen] = []
        self._lan_shaped = False

    def steps(self) -> int:
        n = 0
        if "budget" in self.s.studies:
            n += len(self.s.quotas) * self.s.runs * 2 * len(self.variants)
        if "pages" in self.s.studies:
            paths = 2 if self.env.gateway else 1
            conditions = 2 if self.quota_ok and self.s.quotas else 1
            n += self.s.runs * (conditions * len(self.variants) * paths + 1)
        return n

    def run(self, progress: Progress) -> dict:
        relays: list[Relay] = []
        try:
            rates = self._shape()
            self.results["budget_meta"] = {
                "uplinks_mbit": list(rates),
                "home_mbit": HOME_MBIT if rates else None,
                "link_sum_mbit": link_sum(rates) if rates else None,
                "period_us": 10_000,
                "quotas": list(self.s.quotas),
                "variants": {v.id: v.label for v in self.variants},
            }
            target = self._start_target() if "budget" in self.s.studies else None
            http = self._start_http(len(self.variants)) if "pages" in self.s.studies else None
            for v in self.variants:
                relays.append(self.starter.start_variant(v, redir=self.env.gateway))
                if self.quota_ok:
                    relays[-1].quota = CpuQuota(v.id)
                    for pid in relays[-1].router_pids.values():
                        relays[-1].quota.add(pid)
            if target is not None:
                self._budget(relays, target, progress)
            if http is not None:
                self._pages(relays, http, progress)
        except QuotaError as e:
            raise BenchError(f"CPU quota: {e}") from None
        finally:
            for r in relays:
                for p in r.procs:
                    self.env.stop(p)
                if r.quota is not None:
                    r.quota.close()
            for p in self._procs:
                self.env.stop(p)
            self._unshape()
        return self.results

    def _shape(self) -> tuple[float, ...]:
        """Uplinks 500/300/200, home 1 Gbit (tbf, as the test bed shapes); () on loopback."""
        bed = getattr(self.env, "bed", None)
        if bed is None:
            return ()
        if len(bed.uplinks) != len(BUDGET_MBIT):
            raise BenchError(f"the CPU budget needs {len(BUDGET_MBIT)} uplinks")
        for up, rate in zip(bed.uplinks, BUDGET_MBIT, strict=True):
            bed.shape(up, rate)
        # the home link: router egress is the download, the lan host's the upload
        burst = str(int(HOME_MBIT * 1e6 / 8 * 0.01))  # 10 ms of the rate, as Testbed.shape
        for ns, dev in ((bed.router, "lan0"), (bed.lan, "eth0")):
            ns.exec(
                "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{HOME_MBIT}mbit",
                "burst", burst, "latency", f"{bed.tbf_latency_ms}ms",
            )  # fmt: skip
        self._lan_shaped = True
        return BUDGET_MBIT

    def _unshape(self) -> None:
        bed = getattr(self.env, "bed", None)
        if bed is None or bed.router is None:
            return
        if self._lan_shaped:
            for ns, dev in ((bed.router, "lan0"), (bed.lan, "eth0")):
                ns.exec("tc", "qdisc", "del", "dev", dev, "root", check=False)
        self.env.set_shaped(False)

    def _start_target(self) -> tuple[str, int]:
        port = self.env.port("inet")
        cmd = [*TRAFFIC, "serve", "--host", self.env.target_host, "--port", str(port)]
        p = self.env.popen("inet", cmd, stdout=subprocess.DEVNULL)
        self._procs.append(p)
        self.env.wait_listening("inet", self.env.target_host, port, p)
        return (self.env.target_host, port)

    def _start_http(self, redirected: int) -> dict:
        """The HTTP server on one port for SOCKS, one for routing, one per relay's redirect."""
        n = 2 + (redirected if self.env.gateway else 0)
        ports = [self.env.port("inet") for _ in range(n)]
        cmd = [*PAGES, "serve", "--host", self.env.target_host]
        for port in ports:
            cmd += ["--port", str(port)]
        with open(self.workdir / "pages-server.log", "ab") as log:
            p = self.env.popen("inet", cmd, stdout=subprocess.DEVNULL, stderr=log)
        self._procs.append(p)
        for port in ports:
            self.env.wait_listening("inet", self.env.target_host, port, p)
        return {"socks": ports[0], "direct": ports[1], "redirect": ports[2:]}

    def _set_quota(self, relays: list[Relay], percent: float | None) -> None:
        for r in relays:
            if r.quota is not None:
                r.quota.set(percent)

    def _cpu(self, r: Relay) -> float:
        total = 0.0
        for pid in r.router_pids.values():
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
        return total

    def _budget(self, relays: list[Relay], target: tuple[str, int], progress: Progress) -> None:
        host, port = target
        for q in self.s.quotas:
            self._set_quota(relays, q)
            for i in range(self.s.runs):
                for direction in ("down", "up"):
                    for r in relays:
                        rec = self._bulk(r, q, direction, i, host, port)
                        progress.step(
                            f"budget {q:g}% {r.variant.id} {direction} run {i + 1}: "
                            + (f"{rec['mbps']:.0f} Mbit/s" if "mbps" in rec else rec["error"])
                        )

    def _bulk(self, r: Relay, q: float, direction: str, i: int, host: str, port: int) -> dict:
        assert r.socks is not None
        rec: dict = {"variant": r.variant.id, "quota": q, "direction": direction, "run": i}
        rec["loadavg"] = loadavg()
        cmd = [*TRAFFIC, direction, "--target", f"{host}:{port}", "--seconds", f"{self.s.seconds}"]
        cmd += ["--socks", f"{r.socks[0]}:{r.socks[1]}"]
        cpu0 = self._cpu(r)
        stat0 = r.quota.stat() if r.quota else {}
        try:
            res = json.loads(self.env.run("lan", cmd, timeout=self.s.seconds + 60))
        except (BenchError, ValueError) as e:
            res = {"error": str(e)}
        if "error" in res:
            rec["error"] = res["error"] + self._log_tail(r.variant.id)
        else:
            rec.update(bytes=res["bytes"], seconds=res["seconds"], mbps=res["steady_bps"] / 1e6)
            rec["cpu"] = self._cpu(r) - cpu0
            if r.quota:
                stat = r.quota.stat()
                rec["throttled"] = {
                    k: stat.get(k, 0) - stat0.get(k, 0)
                    for k in ("nr_periods", "nr_throttled", "throttled_us")
                }
        self.results["budget"].append(rec)
        return rec

    def _log_tail(self, variant: str) -> str:
        """The last line the variant's ends logged (warnings and errors only), to say why."""
        lines = []
        for log in sorted(self.workdir.glob(f"budget-{variant}-*.log")):
            text = log.read_text(errors="replace").strip().splitlines()
            if text:
                lines.append(f"{log.stem.rsplit('-', 1)[-1]}: {text[-1][-200:]}")
        return f" ({'; '.join(lines)})" if lines else ""

    def _pages(self, relays: list[Relay], http: dict, progress: Progress) -> None:
        host = self.env.target_host
        conditions: list[float | None] = [None]
        if self.quota_ok and self.s.quotas:
            conditions.append(min(self.s.quotas))
        for k, r in enumerate(relays):
            if r.redir is not None:
                self.env.redirect(http["redirect"][k], r.redir)
        for q in conditions:
            self._set_quota(relays, q)
            for i in range(self.s.runs):
                jobs: list[tuple[str, str, tuple[str, int], tuple[str, int] | None]] = []
                if q is None:
                    jobs.append((DIRECT, "route", (host, http["direct"]), None))
                for k, r in enumerate(relays):
                    jobs.append((r.variant.id, "socks", (host, http["socks"]), r.socks))
                    if r.redir is not None:
                        jobs.append((r.variant.id, "redirect", (host, http["redirect"][k]), None))
                for variant, path, target, socks in jobs:
                    rec = self._page(variant, path, q, i, target, socks)
                    times = [x["seconds"] for x in rec.get("loads", [])]
                    progress.step(
                        f"pages {'no quota' if q is None else f'{q:g}%'} {variant} {path} "
                        f"round {i + 1}: "
                        + (
                            f"{statistics.median(times) * 1e3:.0f} ms"
                            if times
                            else rec.get("error", "?")
                        )
                    )

    def _page(self, variant, path, q, i, target, socks) -> dict:
        rec: dict = {"variant": variant, "path": path, "quota": q, "run": i, "loadavg": loadavg()}
        cmd = [*PAGES, "load", "--target", f"{target[0]}:{target[1]}"]
        cmd += ["--loads", str(self.s.page_loads)]
        if socks:
            cmd += ["--socks", f"{socks[0]}:{socks[1]}"]
        try:
            res = json.loads(self.env.run("lan", cmd, timeout=120))
        except (BenchError, ValueError) as e:
            res = {"error": str(e)}
        if "error" in res:
            rec["error"] = res["error"] + self._log_tail(variant)
        else:
            rec["loads"] = res["loads"]
        self.results["pages"].append(rec)
        return rec


def _have_sslibev() -> bool:
    return all(shutil.which(x) for x in ("ss-server", "ss-local", "ss-redir", "mptcpize"))


# -- summaries, goals, tables, chart (pure) ------------------------------------------------------
def summarize_budget(runs: list[dict]) -> list[dict]:
    """One row per (variant, direction, quota): median and spread of Mbit/s, throttled share."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["direction"], r["quota"]), []).append(r)
    rows = []
    for (variant, direction, quota), group in sorted(groups.items()):
        ok = [r for r in group if "mbps" in r]
        row: dict = {"variant": variant, "direction": direction, "quota": quota}
        row["runs"], row["errors"] = len(ok), [r["error"] for r in group if "error" in r]
        if ok:
            mbps = [r["mbps"] for r in ok]
            row.update(mbps=statistics.median(mbps), mbps_min=min(mbps), mbps_max=max(mbps))
            periods = sum(r.get("throttled", {}).get("nr_periods", 0) for r in ok)
            if periods:
                throttled = sum(r["throttled"]["nr_throttled"] for r in ok)
                row["throttled_share"] = throttled / periods
            per_gb = [r["cpu"] / (r["bytes"] / 1e9) for r in ok if r.get("cpu") and r["bytes"]]
            if per_gb:
                row["cpu_s_per_gb"] = statistics.median(per_gb)
        rows.append(row)
    return rows


def curve(rows: list[dict], variant: str, direction: str) -> dict[float, float]:
    """Quota -> median Mbit/s of one variant and direction."""
    return {
        r["quota"]: r["mbps"]
        for r in rows
        if r["variant"] == variant and r["direction"] == direction and "mbps" in r
    }


def smallest_quota(points: dict[float, float], need: float) -> float | None:
    """The smallest measured quota whose throughput reaches `need` (None: none does)."""
    return min((q for q, mbps in points.items() if mbps >= need), default=None)


def budget_targets(rows: list[dict], total: float) -> list[tuple[str, bool | None, str]]:
    """The issue's goals, per direction: where shadowsocks-libev is CPU-limited (below 0.9 of
    the link sum) mptun's defaults deliver at least 2x its Mbit/s, or the links themselves
    where 2x would exceed them; `--bulk plain` reaches 0.9 of the link sum within 10% of one
    core."""
    need = GOOD_SHARE * total
    checks: list[tuple[str, bool | None, str]] = []
    for d in ("down", "up"):
        ss, de, pl = (curve(rows, v, d) for v in (SSLIBEV, DEFAULT, PLAIN))
        what = f"budget {d}: mptun defaults vs ss-libev where ss-libev is CPU-limited"
        limited = sorted(q for q, m in ss.items() if m < need and q in de)
        if not ss or not de:
            checks.append((what, None, "not measured"))
        elif not limited:
            checks.append((what, None, f"ss-libev reaches {need:.0f} Mbit/s at every quota"))
        else:
            # 2x is out of reach where twice ss-libev exceeds the links: there mptun's
            # defaults hold the goal by reaching the links themselves (0.9 of the sum)
            held = all(de[q] >= GOAL_RATIO * ss[q] or de[q] >= need for q in limited)
            detail = ", ".join(
                f"{q:g}%: {de[q] / ss[q] if ss[q] else float('inf'):.2f}x"
                + (" (at the links)" if de[q] >= need else "")
                for q in limited
            )
            need_text = f"need >= {GOAL_RATIO:g}x, or {need:.0f} Mbit/s: the links"
            checks.append((what, held, f"{detail} ({need_text})"))
        what = f"budget {d}: --bulk plain reaches {GOOD_SHARE:g} of the link sum"
        if not pl:
            checks.append((what, None, "not measured"))
            continue
        q = smallest_quota(pl, need)
        if q is None:
            detail = f"at no quota up to {max(pl):g}% (best {max(pl.values()):.0f} Mbit/s)"
        else:
            detail = f"at {q:g}% of one core"
        checks.append(
            (
                what,
                q is not None and q <= GOAL_PLAIN_QUOTA,
                f"{detail} (need <= {GOAL_PLAIN_QUOTA:g}%)",
            )
        )
    return checks


def summarize_pages(records: list[dict]) -> list[dict]:
    """One row per (variant, path, quota): median and spread of the page's seconds."""
    groups: dict[tuple, list[float]] = {}
    errors: dict[tuple, list[str]] = {}
    for r in records:
        key = (r["variant"], r["path"], r["quota"])
        groups.setdefault(key, []).extend(x["seconds"] for x in r.get("loads", []))
        if "error" in r:
            errors.setdefault(key, []).append(r["error"])
    rows = []
    for key in sorted(groups, key=lambda k: (k[2] is not None, k[2] or 0, k[1], k[0])):
        variant, path, quota = key
        row: dict = {"variant": variant, "path": path, "quota": quota}
        row["loads"], row["errors"] = len(groups[key]), errors.get(key, [])
        if groups[key]:
            t = groups[key]
            row.update(seconds=statistics.median(t), seconds_min=min(t), seconds_max=max(t))
        rows.append(row)
    return rows


def page_targets(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """The issue's goal: mptun's time for the page at most shadowsocks-libev's, per path, with
    and without the quota."""
    idx = {(r["variant"], r["path"], r["quota"]): r for r in rows if "seconds" in r}
    checks: list[tuple[str, bool | None, str]] = []
    for path, quota in sorted(
        {(r["path"], r["quota"]) for r in rows if r["variant"] == DEFAULT},
        key=lambda k: (k[1] is not None, k[1] or 0, k[0]),
    ):
        cond = "no quota" if quota is None else f"{quota:g}% quota"
        what = f"pages {path}, {cond}: mptun defaults vs ss-libev"
        a, b = idx.get((DEFAULT, path, quota)), idx.get((SSLIBEV, path, quota))
        if not a or not b:
            checks.append((what, None, "not measured"))
            continue
        checks.append(
            (
                what,
                a["seconds"] <= b["seconds"],
                f"{a['seconds'] * 1e3:.0f} vs {b['seconds'] * 1e3:.0f} ms (need <=)",
            )
        )
    return checks


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def budget_table(rows: list[dict], meta: dict) -> str:
    """Mbit/s per quota, one line per variant and direction, and the smallest quota reaching
    0.9 of the link sum."""
    if not rows:
        return ""
    quotas = sorted({r["quota"] for r in rows})
    total = meta.get("link_sum_mbit") or 0
    need = GOOD_SHARE * total
    rates = "/".join(f"{x:g}" for x in meta.get("uplinks_mbit", []))
    period, home = meta.get("period_us", 0) // 1000, meta.get("home_mbit")
    out = [
        "",
        f"== router CPU budget: the router-side relay in a CPU quota ({period} ms period); "
        f"uplinks {rates} Mbit, home {home} Mbit; Mbit/s median (throttled share of periods)",
    ]
    head = f"{'relay':38} {'dir':4} " + " ".join(f"{q:>11g}%" for q in quotas)
    head += f" {'>= ' + format(need, '.0f'):>9}"
    out += [head, "-" * len(head)]
    order = {v.id: i for i, v in enumerate(VARIANTS)}
    pairs = sorted(
        {(r["variant"], r["direction"]) for r in rows},
        key=lambda k: (k[1] != "down", order.get(k[0], 9)),
    )
    for variant, d in pairs:
        cells = []
        for q in quotas:
            r = next(
                (x for x in rows if (x["variant"], x["direction"], x["quota"]) == (variant, d, q)),
                None,
            )
            if not r or "mbps" not in r:
                cells.append(f"{'failed':>12}")
                continue
            share = r.get("throttled_share")
            cells.append(f"{r['mbps']:>5.0f} ({_f(share and share * 100, '3.0f')}%)")
        q = smallest_quota(curve(rows, variant, d), need)
        out.append(
            f"{LABELS.get(variant, variant):38} {d:4} "
            + " ".join(cells)
            + f" {_f(q, 'g'):>8}"
            + ("%" if q is not None else " ")
        )
    return "\n".join(out)


def pages_table(rows: list[dict]) -> str:
    """The page's seconds per relay and path, without and with the quota."""
    if not rows:
        return ""
    out = [
        "",
        "== page loads: one 100 KiB object, then 40 of 5-60 KiB over <= 6 fresh connections; "
        "ms, median [min-max]",
    ]
    conds = sorted({r["quota"] for r in rows}, key=lambda q: (q is not None, q or 0))
    head = f"{'relay':38} {'path':9}" + "".join(
        f" {'no quota' if q is None else f'{q:g}% quota':>22}" for q in conds
    )
    out += [head, "-" * len(head)]
    keys = sorted({(r["variant"], r["path"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for variant, path in keys:
        cells = []
        for q in conds:
            r = next(
                (x for x in rows if (x["variant"], x["path"], x["quota"]) == (variant, path, q)),
                None,
            )
            if r is None:
                cell = "-"
            elif "seconds" not in r:
                cell = "failed"
            else:
                cell = (
                    f"{r['seconds'] * 1e3:.0f} [{r['seconds_min'] * 1e3:.0f}-"
                    f"{r['seconds_max'] * 1e3:.0f}]"
                )
            cells.append(f" {cell:>22}")
        out.append(f"{LABELS.get(variant, variant):38} {path:9}" + "".join(cells))
    return "\n".join(out)


def chart(budget_rows: list[dict], page_rows: list[dict], meta: dict, path: Path) -> str:
    """A PNG: throughput against quota each way (the 0.9 line of the link sum), and the page
    times; needs matplotlib (the `chart` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "budget chart skipped: matplotlib is not installed (pip install 'mptun[chart]')"
    panels = [d for d in ("down", "up") if any(r["direction"] == d for r in budget_rows)]
    n = len(panels) + (1 if page_rows else 0)
    if not n:
        return "budget chart skipped: nothing measured"
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    total = meta.get("link_sum_mbit")
    for col, d in enumerate(panels):
        ax = axes[0][col]
        for v in VARIANTS:
            pts = sorted(curve(budget_rows, v.id, d).items())
            if pts:
                ax.plot([q for q, _ in pts], [m for _, m in pts], marker="o", label=v.label)
        if total:
            ax.axhline(GOOD_SHARE * total, color="grey", linestyle="--", linewidth=1,
                       label=f"{GOOD_SHARE:g} of the link sum")  # fmt: skip
        ax.set_xlabel("router-side relay's CPU quota, % of one core (10 ms period)")
        ax.set_ylabel("Mbit/s")
        ax.set_title(f"{'download' if d == 'down' else 'upload'} through SOCKS")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    if page_rows:
        ax = axes[0][n - 1]
        ok = [r for r in page_rows if "seconds" in r]
        names = [
            f"{r['variant']}\n{r['path']}" + ("" if r["quota"] is None else f" {r['quota']:g}%")
            for r in ok
        ]
        ax.barh(range(len(ok)), [r["seconds"] * 1e3 for r in ok])
        ax.set_yticks(range(len(ok)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms for the page (median)")
        ax.set_title("page loads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"budget chart: {path}"
