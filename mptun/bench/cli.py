"""`mptun bench`: kernel routing, mptun and shadowsocks-libev side by side, in one run."""

from __future__ import annotations

import json
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import click

from mptun.bench import budget, report, udp
from mptun.bench.cases import all_cases
from mptun.bench.cpuquota import parse_percentages
from mptun.bench.env import BenchError, open_environment
from mptun.bench.runner import Progress, Runner, Settings, loadavg
from mptun.commands.options import Number, OutputFile, option
from mptun.common.errors import ConfigError, MptunError

STUDY_LABELS = {
    "budget": "router CPU budget: Mbit/s per CPU quota of the router-side relay",
    "pages": "page loads: 41 objects over fresh connections, SOCKS/redirect/routing",
    udp.STUDY: udp.LABEL,
}


class Quotas(click.ParamType):
    """Comma-separated CPU quotas in % of one core (10-100: a 10 ms period)."""

    name = "quotas"

    def convert(self, value, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_percentages(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.command()
@option(
    "mode",
    type=click.Choice(["auto", "netns", "loopback"]),
    default="auto",
    help="netns: the 3-uplink namespace test bed (root); loopback: everything on 127.0.0.1, "
    "raw links only; auto: netns when possible.",
)
@option(
    "seconds",
    type=Number(0.5, 600),
    default=5.0,
    help="Length of each bulk transfer.",
)
@option(
    "runs",
    type=click.IntRange(min=1, max=50),
    default=3,
    help="Transfers per case, link and direction (the table shows median and spread).",
)
@option(
    "gateway-runs",
    type=click.IntRange(min=1, max=50),
    default=None,
    help="Transfers per direction of the gateway cases (gw-*) on the raw links, where the "
    "stall target counts runs below half the median (default: --runs).",
)
@option(
    "cases",
    "--cases",
    "case_ids",
    help="Comma-separated case ids to run (default: all available). See --list.",
)
@option(
    "links",
    type=click.Choice(["both", "raw", "shaped"]),
    default="both",
    help="Unshaped links, the 100/60/40 Mbit shaped uplinks, or both.",
)
@option(
    "idle-connections",
    type=click.IntRange(min=0, max=5000),
    default=1000,
    help="Idle tunneled connections for the RSS measurement (0: skip it).",
)
@option(
    "connrate-seconds",
    type=Number(0, 600),
    default=3.0,
    help="Length of the connection-rate measurement (0: skip it).",
)
@option(
    "quick",
    is_flag=True,
    help="A smoke run: 1 run of 1 s, 50 idle connections, 1 s of connection rate.",
)
@option(
    "json",
    "--json",
    "json_path",
    type=OutputFile(),
    default="bench.json",
    help="Write every measurement here.",
)
@option(
    "chart",
    "--chart",
    "chart_path",
    type=OutputFile(),
    default="bench.png",
    help="Write a PNG chart here (needs the `chart` extra: matplotlib).",
)
@option(
    "uplinks",
    type=click.IntRange(min=1, max=3),
    default=3,
    help="Uplinks of the namespace test bed (MPTCP joins a subflow on each); 1: a single path. "
    "Shaped links need all 3.",
)
@option(
    "quotas",
    type=Quotas(),
    default="10,15,20,30,40",
    help="CPU quotas (% of one core, 10 ms period) of the router-side relay for the `budget` "
    "case; `pages` runs without a quota and at the smallest.",
)
@option("list", "--list", "list_cases", is_flag=True, help="List the cases and exit.")
def bench(
    mode,
    seconds,
    runs,
    gateway_runs,
    case_ids,
    links,
    uplinks,
    idle_connections,
    connrate_seconds,
    quick,
    json_path,
    chart_path,
    quotas,
    list_cases,
) -> None:
    """Measure mptun against kernel routing and shadowsocks-libev (takes minutes)."""
    cases = all_cases()
    if list_cases:
        for c in cases:
            click.echo(f"{c.id:22} {c.label}" + (f"  (skipped: {c.skip})" if c.skip else ""))
        for sid, label in STUDY_LABELS.items():
            why = udp.skip_reason() if sid == udp.STUDY else budget.skip_reason(sid)
            click.echo(f"{sid:22} {label}" + (f"  (skipped: {why})" if why else ""))
        return
    studies = [*budget.STUDIES, udp.STUDY]
    if case_ids:
        wanted = [x.strip() for x in case_ids.split(",") if x.strip()]
        known = {c.id for c in cases} | set(studies)
        bad = [x for x in wanted if x not in known]
        if bad:
            raise ConfigError(f"unknown case {bad[0]!r} (known: {', '.join(sorted(known))})")
        cases = [c for c in cases if c.id in wanted]
        studies = [x for x in studies if x in wanted]
    if quick:
        seconds, runs, gateway_runs = 1.0, 1, None
        idle_connections = min(idle_connections, 50)
        connrate_seconds = min(connrate_seconds, 1.0)
    settings = Settings(
        seconds=seconds,
        runs=runs,
        gateway_runs=gateway_runs or runs,
        links=("raw", "shaped") if links == "both" else (links,),
        connrate_seconds=connrate_seconds,
        idle_connections=idle_connections,
    )
    if uplinks != 3 and "shaped" in settings.links:
        if links == "shaped":
            raise ConfigError("--links shaped needs --uplinks 3 (one shaped link each)")
        settings.links = ("raw",)
    for c in cases:
        if c.skip:
            click.echo(f"skipping {c.id}: {c.skip}", err=True)
    try:
        environment = open_environment(mode, uplinks)
    except BenchError as e:
        raise MptunError(str(e)) from None
    skipped: dict[str, str] = {}  # a study asked for that cannot run here: why
    for sid in list(studies):
        gw = environment.gateway
        why = (
            udp.skip_reason(gw, uplinks)
            if sid == udp.STUDY
            else budget.skip_reason(sid, gw, uplinks)
        )
        if why:
            click.echo(f"skipping {sid}: {why}", err=True)
            studies.remove(sid)
            skipped[sid] = why
    if not environment.gateway:
        for c in cases:
            if c.generator == "iperf3" and not c.skip:
                c.skip = "needs the namespace test bed (an nft redirect in the router)"
                click.echo(f"skipping {c.id}: {c.skip}", err=True)
    if environment.shaped_rates is None and "shaped" in settings.links:
        click.echo("loopback mode: no shaped links, raw only", err=True)
        settings.links = tuple(x for x in settings.links if x != "shaped")
        if not settings.links:
            environment.close()
            raise ConfigError("--links shaped needs the namespace test bed (--mode netns, root)")
    started = time.time()
    # `kill PID` must tear the test bed down like Ctrl-C does (finally blocks below and in the
    # runner): by default SIGTERM ends Python at once and left namespaces and relays behind.
    signal.signal(signal.SIGTERM, _interrupted)
    with tempfile.TemporaryDirectory(prefix="mptun-bench-") as tmp:
        try:
            runner = Runner(environment, cases, settings, Path(tmp))
            if connrate_seconds <= 0 or idle_connections <= 0:
                runner.skip_extras(connrate=connrate_seconds <= 0, idle=idle_connections <= 0)
            click.echo(f"mptun bench: {environment.describe()}", err=True)
            if runner.cases or not studies:
                results = runner.run(Progress(runner.steps()))
            else:
                results = runner.results
            own = tuple(x for x in studies if x in budget.STUDIES)
            if own:
                study = budget.Study(
                    environment,
                    budget.StudySettings(own, quotas, seconds, runs, 1 if quick else 3),
                    Path(tmp),
                )
                results.update(study.run(Progress(study.steps())))
            if udp.STUDY in studies:
                u = udp.UdpStudy(environment, udp.UdpSettings(seconds, runs), Path(tmp))
                results.update(u.run(Progress(u.steps())))
        except BenchError as e:
            raise MptunError(f"bench: {e} (relay logs were in {tmp})") from None
        finally:
            environment.close()
    rows = report.summarize(results)
    meta = {
        "command": " ".join(["mptun", *sys.argv[1:]]) if sys.argv else "mptun bench",
        "mode": environment.name,
        "kernel": platform.release(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": seconds,
        "runs": runs,
        "gateway_runs": settings.gateway_runs,
        "links": list(settings.links),
        "uplinks": uplinks if environment.gateway else None,
        "loadavg": loadavg(),
        "shaped_mbit": list(environment.shaped_rates or []),
        "cases": [{"id": c.id, "label": c.label, "skip": c.skip} for c in all_cases()],
    }
    budget_rows = budget.summarize_budget(results.get("budget", []))
    page_rows = budget.summarize_pages(results.get("pages", []))
    udp_rows = udp.summarize_udp(results.get("udp", []))
    checks = []
    if rows or not studies:
        shaped_sum = sum(environment.shaped_rates or []) or None
        checks = report.targets(rows, results, shaped_sum)
    if "budget" in studies:
        checks += report.tag(report.ROUTER, budget.budget_targets(budget_rows, budget.link_sum()))
    if "pages" in studies:
        checks += report.tag(report.ROUTER, budget.page_targets(page_rows))
    if udp.STUDY in studies:
        checks += report.tag(report.UDP, udp.udp_targets(udp_rows))
    checks += report.skipped_targets(skipped)
    meta["quotas"] = list(quotas)
    if rows or not studies:
        click.echo(report.table(rows, cases, results, meta))
    gateway = report.gateway_table(rows, cases)
    if gateway:
        click.echo(gateway)
    for text in (
        budget.budget_table(budget_rows, results.get("budget_meta", {})),
        budget.pages_table(page_rows),
        udp.udp_table(udp_rows, results.get("udp_meta", {})),
    ):
        if text:
            click.echo(text)
    click.echo(report.format_targets(checks))
    ctx = report.context(rows)
    if ctx:
        click.echo(report.format_context(ctx))
    Path(json_path).write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": rows,
                "budget_summary": budget_rows,
                "pages_summary": page_rows,
                "udp_summary": udp_rows,
                "targets": [{"what": w, "held": ok, "detail": d} for w, ok, d in checks],
                "context": ctx,
                **results,
            },
            indent=1,
        )
    )
    click.echo(f"\njson: {json_path}")
    if rows or not studies:
        click.echo(report.chart(rows, cases, Path(chart_path)))
    if budget_rows or page_rows:
        out = Path(chart_path)
        out = out.with_name(f"{out.stem}-budget{out.suffix or '.png'}")
        click.echo(budget.chart(budget_rows, page_rows, results.get("budget_meta", {}), out))


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
