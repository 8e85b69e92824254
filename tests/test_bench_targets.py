"""`mptun bench`'s target lines for issues 17 and 18, from hand-made result rows: a row that
holds a target, one that misses it, and a missing case that makes the line n/a."""

from __future__ import annotations

from mptun.bench import report
from mptun.bench.runner import Runner, Settings


def row(case: str, mbps: float, link: str = "raw", direction: str = "up", **extra) -> dict:
    """A summary row as `report.summarize` makes it."""
    r = {
        "link": link,
        "case": case,
        "direction": direction,
        "runs": 3,
        "mbps": mbps,
        "mbps_min": mbps,
        "mbps_max": mbps,
    }
    return r | extra


def checks(found: list[report.Check]) -> dict[str, tuple[bool | None, str]]:
    return {what: (ok, detail) for what, ok, detail in found}


def test_issue17_raw_thresholds_pass_and_fail():
    """aead >= 3x ss-libev at <= 0.4x its CPU per GB (issue 17's, not issue 5's 2x/0.5x),
    splice/TCP >= 0.9x route (not 0.85), splice >= aead with less CPU per GB over SOCKS."""
    cpu = {"cpu_client": 1.0, "cpu_server": 1.0}
    rows = [
        row(report.ROUTE, 10000),
        row("splice-tcp", 8700),  # 0.87x route: issue 8's 0.85 held it, issue 17's 0.9 not
        row("aead-mptcp", 2500, cpu_client=0.4, cpu_server=0.4),  # 2.5x ss, 0.4x its CPU
        row(report.INCUMBENT, 1000, **cpu),
        row("splice-mptcp", 3000, cpu_client=0.2, cpu_server=0.3),
    ]
    got = checks(report.targets(rows, {}))
    assert got["#17 raw up: splice/TCP vs route/NAT"] == (False, "0.87x (need >= 0.9)")
    assert got["#17 raw up: aead/MPTCP vs ss-libev"] == (False, "2.50x (need >= 3)")
    assert got["#17 raw up: aead/MPTCP CPU/GB of both ends vs ss-libev"] == (
        True,
        "0.80 vs 2.00 s/GB = 0.40x (need <= 0.4)",
    )
    assert got["#17 raw up: splice/MPTCP vs aead/MPTCP"] == (True, "1.20x (need >= 1)")
    assert got["#17 raw up: splice/MPTCP CPU/GB (both ends) vs aead"][0] is True
    # issue 5's lines are gone; issue 8's own targets stay, labelled
    assert not any("need >= 2)" in d for _, d in got.values())
    assert got["#8 raw up: splice/MPTCP vs ss-libev"] == (False, "3.00x (need >= 5)")
    # a faster aead at less than 0.4x the CPU holds both, and splice then loses to it
    rows[2] = row("aead-mptcp", 3200, cpu_client=0.3, cpu_server=0.4)
    got = checks(report.targets(rows, {}))
    assert got["#17 raw up: aead/MPTCP vs ss-libev"][0] is True
    assert got["#17 raw up: aead/MPTCP CPU/GB of both ends vs ss-libev"][0] is True
    assert got["#17 raw up: splice/MPTCP vs aead/MPTCP"][0] is False
    assert got["#17 raw up: splice/MPTCP CPU/GB (both ends) vs aead"][0] is True


def test_missing_cases_are_na_not_dropped():
    """Nothing measured: every target of issues 17 and 18 the bench's cases cover still has
    its line, n/a, naming what was missing."""
    got = checks(report.targets([], {}))
    for d in ("up", "down"):
        for what in (
            f"#17 raw {d}: splice/TCP vs route/NAT",
            f"#17 raw {d}: aead/MPTCP vs ss-libev",
            f"#17 raw {d}: splice/MPTCP vs aead/MPTCP",
            f"#17/#8 shaped {d}: splice/MPTCP aggregate vs the link sum",
            f"#17/#8 shaped {d}: gateway splice aggregate vs the link sum",
            f"#17/#8 shaped {d}: receiving relay's CPU/GB vs ss-libev",
        ):
            assert got[what][0] is None and "not measured" in got[what][1], what
    assert got["#17 raw gateway: splice vs reference relay"] == (None, "not measured (gw-splice)")
    assert got["#18 connections/s: mptun defaults (aead/MPTCP) vs ss-libev"][0] is None
    text = report.format_targets(report.targets([], {}))
    assert "-- issue 17: splice in gateway mode" in text and "n/a   #17 raw up" in text


def test_no_reference_relay_on_the_socks_path_is_said_with_kernel_context():
    """The reference relay runs in the gateway cases only: the SOCKS path's line says so and
    shows splice against the kernel's MPTCP; its worst run is checked against its median."""
    rows = [
        row("splice-mptcp", 6000, mbps_min=2000),
        row(report.KERNEL_MPTCP, 10000),
    ]
    got = checks(report.targets(rows, {}))
    ok, detail = got["#17 raw up: splice/MPTCP vs the reference relay through SOCKS"]
    assert ok is None and "gw-reference" in detail and "0.60x mptcp-kernel" in detail
    assert got["#17 raw up: splice/MPTCP's worst run vs its median"] == (
        False,
        "0.33x over 3 runs (need >= 0.5)",
    )


def test_gateway_line_carries_both_against_the_kernel():
    rows = [
        row(report.GW_SPLICE, 9000, mbps_min=6000),
        row(report.GW_REFERENCE, 10000),
        row(report.GW_KERNEL, 30000),
    ]
    ok, detail = checks(report.targets(rows, {}))["#17 raw up gateway: splice vs reference relay"]
    assert ok is True
    assert detail == "0.90x (need >= 0.9); context: splice 0.30x, reference 0.33x mptcp-kernel"
    rows[0] = row(report.GW_SPLICE, 8900)
    assert checks(report.targets(rows, {}))["#17 raw up gateway: splice vs reference relay"][0] is (
        False
    )


def test_shaped_targets_use_the_runs_link_sum():
    """The aggregate is read against the shaped links this run had (their sum), and the
    receiving relay's CPU per GB against ss-libev's."""
    rows = [
        row("splice-mptcp", 187, "shaped", cpu_receiving=1.3, rtt_median=1.0),
        row(report.INCUMBENT, 187, "shaped", cpu_receiving=2.7, rtt_median=0.5),
        row(report.GW_SPLICE, 180, "shaped"),
    ]
    got = checks(report.targets(rows, {}, shaped_sum=200))
    assert got["#17/#8 shaped up: splice/MPTCP aggregate vs the link sum"] == (
        True,
        "0.935 of 200 Mbit (need >= 0.93)",
    )
    assert got["#17/#8 shaped up: gateway splice aggregate vs the link sum"][0] is False
    assert got["#17/#8 shaped up: receiving relay's CPU/GB vs ss-libev"][0] is True
    assert got["#8 shaped up: RTT under load vs ss-libev"][0] is True
    got = checks(report.targets(rows, {}, shaped_sum=190))
    assert got["#17/#8 shaped up: gateway splice aggregate vs the link sum"][0] is True
    rows[0]["cpu_receiving"] = 1.4  # 0.52x
    got = checks(report.targets(rows, {}))
    assert got["#17/#8 shaped up: receiving relay's CPU/GB vs ss-libev"][0] is False


def conn(case: str, per_s: float, client_s: float, server_s: float, n: int = 1000) -> dict:
    """A connection-rate measurement as the runner records it (CPU seconds over n)."""
    cpu = {"client": client_s, "server": server_s, "machine": 9.9}
    return {"case": case, "per_s": per_s, "connections": n, "errors": 0, "cpu": cpu}


def test_issue18_connection_rate_and_cpu_per_end():
    """At least 0.8x ss-libev's connections per second, at most 2x its CPU per connection,
    client and server each on their own."""
    results = {
        "connrate": [
            conn(report.INCUMBENT, 1000, 0.15, 0.50),
            conn("aead-mptcp", 724, 0.89, 0.80),  # 0.72x; client 5.9x, server 1.6x
            conn("splice-mptcp", 800, 0.30, 1.01),  # 0.8x; client 2x, server 2.02x
        ]
    }
    got = checks(report.targets([], results))
    d = "mptun defaults (aead/MPTCP)"
    p = "mptun --bulk plain (splice/MPTCP)"
    assert got[f"#18 connections/s: {d} vs ss-libev"] == (
        False,
        "724 vs 1000/s = 0.72x (need >= 0.8)",
    )
    assert got[f"#18 CPU per connection, client: {d} vs ss-libev"] == (
        False,
        "0.89 vs 0.15 ms = 5.93x (need <= 2)",
    )
    assert got[f"#18 CPU per connection, server: {d} vs ss-libev"][0] is True
    assert got[f"#18 connections/s: {p} vs ss-libev"][0] is True
    assert got[f"#18 CPU per connection, client: {p} vs ss-libev"][0] is True
    assert got[f"#18 CPU per connection, server: {p} vs ss-libev"][0] is False
    # ss-libev's measurement failed: n/a, not a division by zero
    results["connrate"][0] = {"case": report.INCUMBENT, "error": "refused", "cpu": {}}
    got = checks(report.targets([], results))
    assert got[f"#18 connections/s: {d} vs ss-libev"][0] is None


def test_studies_are_tagged_and_a_skipped_one_says_why():
    """The budget and pages goals join the list under issue 18; a study that could not run
    here is an n/a line with the reason, not a missing line."""
    from mptun.bench import budget

    budget_rows = budget.summarize_budget([])
    lines = report.tag(report.ROUTER, budget.budget_targets(budget_rows, 1000))
    lines += report.skipped_targets({"pages": "no CPU quota: no cgroup"})
    got = checks(lines)
    assert got["#18 budget down: --bulk plain reaches 0.9 of the link sum"][0] is None
    assert got["#18 pages"] == (None, "not measured: no CPU quota: no cgroup")
    text = report.format_targets(lines + report.targets([], {}))
    # issue 17 first, then 18, each under its own heading
    assert text.index("-- issue 17") < text.index("-- issue 18") < text.index("#18 pages")


def test_gateway_runs_apply_to_the_gateway_cases_on_the_raw_links_only():
    """`--gateway-runs`: ten runs of the gateway cases on the raw links, `--runs` elsewhere,
    and the progress total counts them."""
    from mptun.bench.cases import Case

    gw = Case("gw-splice", "gw", "mptun", generator="iperf3", connrate=False)
    socks = Case("splice-mptcp", "splice", "mptun", connrate=False)
    runner = Runner.__new__(Runner)  # the counting needs no environment
    runner.cases = [gw, socks]
    runner.settings = Settings(runs=3, gateway_runs=10, links=("raw", "shaped"))
    runner._do_connrate = runner._do_idle = False
    assert runner.runs("raw", gw) == 10 and runner.runs("shaped", gw) == 3
    assert runner.runs("raw", socks) == 3
    # per link and case one idle-RTT step, then 2 directions x runs
    assert runner.steps() == (1 + 20) + (1 + 6) + (1 + 6) + (1 + 6)
    runner.settings = Settings(runs=3, links=("raw",))
    assert runner.runs("raw", gw) == 3
