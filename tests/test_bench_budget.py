"""`mptun bench`'s router CPU budget and page loads: what the cases compute, the quota itself,
and smoke runs (seconds long). Nothing here asserts a speed of the relays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mptun.bench import budget
from mptun.bench.cpuquota import CpuQuota, availability, find_controller, parse_percentages
from mptun.bench.pages import page_sizes
from mptun.lab.netns import have_mptcp, have_netns

D, P, S = budget.DEFAULT, budget.PLAIN, budget.SSLIBEV


def rows(points: dict[str, dict[float, float]], direction: str = "down") -> list[dict]:
    return [
        {"variant": v, "direction": direction, "quota": q, "mbps": m, "runs": 1, "errors": []}
        for v, curve in points.items()
        for q, m in curve.items()
    ]


# -- pure: the figures and the goals ---------------------------------------------------------
def test_quota_list_is_sorted_unique_and_bounded():
    assert parse_percentages("40, 10,15,10") == (10.0, 15.0, 40.0)
    bad_values = (
        ("5", "outside 10-100"), ("nan", "outside"), ("x", "not a number"),
        ("", "not a number"), ("10,,20", "not a number"), ("101", "outside"),
    )  # fmt: skip
    for bad, says in bad_values:
        with pytest.raises(ValueError, match=says):
            parse_percentages(bad)


def test_smallest_quota_reaching_the_bar():
    curve = {10.0: 700.0, 15.0: 905.0, 20.0: 930.0}
    assert budget.smallest_quota(curve, 900) == 15.0
    assert budget.smallest_quota(curve, 950) is None
    assert budget.smallest_quota({}, 1) is None


def test_link_sum_is_capped_by_the_home_link():
    assert budget.link_sum((500, 300, 200), 1000) == 1000
    assert budget.link_sum((500, 300, 200), 600) == 600
    assert budget.link_sum((100, 60, 40), 1000) == 200


def test_budget_goals_pass_and_fail():
    # the issue's first measurement: defaults 1.61x ss-libev where it is CPU-limited, plain at
    # 0.9 of the 1000 Mbit sum from 15%: both goals fail
    today = rows(
        {
            D: {10: 486, 15: 899, 20: 917, 30: 927, 40: 930},
            P: {10: 716, 15: 905, 20: 933, 30: 933, 40: 936},
            S: {10: 284, 15: 434, 20: 601, 30: 642, 40: 909},
        }
    )
    checks = {w: (ok, d) for w, ok, d in budget.budget_targets(today, 1000)}
    ok, detail = checks["budget down: mptun defaults vs ss-libev where ss-libev is CPU-limited"]
    assert ok is False and "10%: 1.71x" in detail and "40%" not in detail, detail
    ok, detail = checks["budget down: --bulk plain reaches 0.9 of the link sum"]
    assert ok is False and "at 15%" in detail
    goal = rows(
        {
            D: {10: 600, 15: 910, 20: 920},
            P: {10: 905, 15: 930, 20: 930},
            S: {10: 290, 15: 450, 20: 920},
        }
    )
    checks = {w: ok for w, ok, _ in budget.budget_targets(goal, 1000)}
    assert checks["budget down: mptun defaults vs ss-libev where ss-libev is CPU-limited"]
    assert checks["budget down: --bulk plain reaches 0.9 of the link sum"]
    # not measured up; ss-libev never CPU-limited: no verdict either way
    assert checks["budget up: --bulk plain reaches 0.9 of the link sum"] is None
    # 15%: 1.18x, but mptun is at the links (twice ss-libev's 791 would exceed them): held;
    # 10%: 1.78x below the links: not held
    capped = rows({D: {10: 937, 15: 934}, S: {10: 527, 15: 791}})
    got = {w: (ok, d) for w, ok, d in budget.budget_targets(capped, 1000)}
    ok, detail = got["budget down: mptun defaults vs ss-libev where ss-libev is CPU-limited"]
    assert ok is True and "15%: 1.18x (at the links)" in detail, detail
    below = rows({D: {10: 880, 15: 934}, S: {10: 527, 15: 791}})
    got = {w: ok for w, ok, _ in budget.budget_targets(below, 1000)}
    assert got["budget down: mptun defaults vs ss-libev where ss-libev is CPU-limited"] is False
    fast = rows({D: {10: 950}, S: {10: 950}})
    got = {w: (ok, d) for w, ok, d in budget.budget_targets(fast, 1000)}
    ok, detail = got["budget down: mptun defaults vs ss-libev where ss-libev is CPU-limited"]
    assert ok is None and "every quota" in detail


def test_budget_summary_medians_throttling_and_table():
    runs = [
        {"variant": P, "quota": 10.0, "direction": "up", "run": i, "mbps": m, "bytes": 10**9,
         "cpu": 0.5, "throttled": {"nr_periods": 100, "nr_throttled": t, "throttled_us": 0}}
        for i, (m, t) in enumerate(((600, 90), (700, 70), (650, 80)))
    ] + [{"variant": P, "quota": 20.0, "direction": "up", "run": 0, "error": "boom"}]  # fmt: skip
    out = budget.summarize_budget(runs)
    ten = next(r for r in out if r["quota"] == 10.0)
    assert (ten["mbps"], ten["mbps_min"], ten["mbps_max"]) == (650, 600, 700)
    assert ten["throttled_share"] == pytest.approx(0.8) and ten["cpu_s_per_gb"] == 0.5
    twenty = next(r for r in out if r["quota"] == 20.0)
    assert "mbps" not in twenty and twenty["errors"] == ["boom"]
    meta = {"uplinks_mbit": [500, 300, 200], "home_mbit": 1000, "link_sum_mbit": 1000,
            "period_us": 10000}  # fmt: skip
    text = budget.budget_table(out, meta)
    line = next(x for x in text.splitlines() if x.startswith("mptun --bulk plain"))
    assert "650 ( 80%)" in line and "failed" in line and line.rstrip().endswith("-")


def test_page_goals_and_summary():
    recs = [
        {"variant": D, "path": "socks", "quota": None, "loads": [{"seconds": 0.10}]},
        {"variant": D, "path": "socks", "quota": None, "loads": [{"seconds": 0.30}]},
        {"variant": S, "path": "socks", "quota": None, "loads": [{"seconds": 0.25}]},
        {"variant": D, "path": "socks", "quota": 10.0, "loads": [{"seconds": 0.5}]},
        {"variant": S, "path": "socks", "quota": 10.0, "loads": [{"seconds": 0.4}]},
        {"variant": D, "path": "redirect", "quota": 10.0, "error": "reset"},
        {"variant": S, "path": "redirect", "quota": 10.0, "loads": [{"seconds": 0.4}]},
        {"variant": budget.DIRECT, "path": "route", "quota": None, "loads": [{"seconds": 0.01}]},
    ]
    out = budget.summarize_pages(recs)
    first = next(r for r in out if (r["variant"], r["path"], r["quota"]) == (D, "socks", None))
    assert first["seconds"] == pytest.approx(0.2) and first["loads"] == 2
    checks = {w: ok for w, ok, _ in budget.page_targets(out)}
    assert checks == {
        "pages socks, no quota: mptun defaults vs ss-libev": True,
        "pages socks, 10% quota: mptun defaults vs ss-libev": False,
        "pages redirect, 10% quota: mptun defaults vs ss-libev": None,
    }
    text = budget.pages_table(out)
    assert "direct routing" in text and "failed" in text and "10% quota" in text


def test_page_set_is_the_issues():
    sizes = page_sizes()
    assert sizes[0] == 100 * 1024 and len(sizes) == 41
    assert all(5 * 1024 <= s <= 60 * 1024 for s in sizes[1:])


def test_chart_is_a_png(tmp_path: Path):
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (the `chart` extra)")
    b = budget.summarize_budget(
        [
            {"variant": v, "quota": q, "direction": d, "run": 0, "mbps": 100 * q, "bytes": 1}
            for v in (D, P, S)
            for q in (10.0, 20.0)
            for d in ("up", "down")
        ]
    )
    p = budget.summarize_pages([{"variant": D, "path": "socks", "quota": None,
                                 "loads": [{"seconds": 0.1}]}])  # fmt: skip
    out = tmp_path / "b.png"
    assert "budget chart" in budget.chart(b, p, {"link_sum_mbit": 1000}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the quota itself ------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.timing
def test_cpu_quota_holds_a_process_to_its_share_and_is_removed():
    """A process that needs 0.15 s of CPU gets at most 1 ms per 10 ms period at 10%: it cannot
    finish in under ~1.5 s of wall time, however idle the machine (a loaded one only slows it
    further); the cgroup is gone after close()."""
    why = availability()
    if why:
        pytest.skip(why)
    q = CpuQuota("test")
    try:
        q.set(10)
        spin = (
            "import time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.15:\n    pass\n"
        )
        p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()\n" + spin],
                             stdin=subprocess.PIPE)  # fmt: skip
        q.add(p.pid)
        assert q.pids() == [p.pid]
        t0 = time.monotonic()
        p.communicate(b"", timeout=60)
        wall = time.monotonic() - t0
        stat = q.stat()
    finally:
        q.close()
    # 0.15 s of CPU at 1 ms per 10 ms: at least 150 periods, minus the first period's quota
    assert wall >= 1.4, wall
    assert stat["nr_throttled"] >= 100 and stat["throttled_us"] > 0, stat
    assert not q.path.exists()


# -- smoke runs ------------------------------------------------------------------------------
def bench(
    tmp_path: Path, *args: str, timeout: float = 240
) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "mptun", "bench", "--quick", "--json", str(out),
         "--chart", str(tmp_path / "bench.png"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
    )  # fmt: skip
    return r, (json.loads(out.read_text()) if out.exists() else {})


def test_bad_quota_is_one_line(tmp_path: Path):
    r, _ = bench(tmp_path, "--mode", "loopback", "--cases", "budget", "--quotas", "5", timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "--quotas" in lines[0] and "outside 10-100" in lines[0]


def test_loopback_pages_smoke(tmp_path: Path):
    """On loopback: pages through SOCKS and by plain connection (no router to redirect in),
    with and without the quota where this process can set one; budget is skipped, saying why."""
    r, data = bench(tmp_path, "--mode", "loopback", "--cases", "pages,budget", "--quotas", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipping budget:" in r.stderr
    got = {(x["variant"], x["path"], x["quota"]) for x in data["pages"] if x.get("loads")}
    quotas = [None] + ([10.0] if availability() is None else [])
    want = {(budget.DIRECT, "route", None)} | {
        (v.id, "socks", q) for v in budget.VARIANTS for q in quotas if v.kind == "mptun"
    }
    assert want <= got, data["pages"]
    for rec in data["pages"]:
        for load in rec.get("loads", []):
            assert load["bytes"] == sum(page_sizes())
    assert "== page loads" in r.stdout and "pages socks, no quota" in r.stdout
    assert data["budget"] == []


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.slow
def test_netns_budget_and_pages_smoke(tmp_path: Path):
    """The namespace test bed, uplinks 500/300/200 and a 1 Gbit home: every relay moves bytes
    both ways at each quota, held by its cgroup; pages load through SOCKS and the redirect;
    the goals are checked; the cgroups and the shaping are gone afterwards."""
    for ok, why in (have_netns(), have_mptcp()):
        if not ok:
            pytest.skip(why)
    why = availability()
    if why:
        pytest.skip(why)
    cgroups = set(os.listdir(find_controller()[0]))
    r, data = bench(
        tmp_path, "--mode", "netns", "--cases", "budget,pages", "--quotas", "10,40", timeout=400
    )
    assert r.returncode == 0, r.stderr[-3000:]
    meta = data["budget_meta"]
    assert meta["uplinks_mbit"] == [500, 300, 200] and meta["link_sum_mbit"] == 1000
    runs = {(x["variant"], x["quota"], x["direction"]): x for x in data["budget"]}
    for v in meta["variants"]:
        for q in (10.0, 40.0):
            for d in ("up", "down"):
                run = runs[(v, q, d)]
                assert run.get("bytes", 0) > 0, run
                assert run["throttled"]["nr_periods"] > 0, run
    pages = {(x["variant"], x["path"], x["quota"]) for x in data["pages"] if x.get("loads")}
    for v in meta["variants"]:
        for path in ("socks", "redirect"):
            assert {(v, path, None), (v, path, 10.0)} <= pages, data["pages"]
    assert "== router CPU budget" in r.stdout and "budget down: --bulk plain" in r.stdout
    assert (tmp_path / "bench-budget.png").exists() or "chart skipped" in r.stdout
    leftover = set(os.listdir(find_controller()[0]))
    assert not {x for x in leftover - cgroups if x.startswith("mptun-bench-")}
