"""`mptun bench`'s UDP study: windows, percentiles, summary and goals (pure), the voice flow on
loopback, and a short run on the namespace test bed. Nothing here asserts a speed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mptun.bench import udp
from mptun.lab.netns import have_mptcp, have_netns
from mptun.lab.testbed import SERVER_V4, VPS_INET_V4


def test_percentile_is_nearest_rank():
    values = [float(x) for x in range(1, 101)]  # 1..100, shuffled order must not matter
    values.reverse()
    assert udp.percentile(values, 0.5) == 50.0
    assert udp.percentile(values, 0.99) == 99.0
    assert udp.percentile(values, 1.0) == 100.0
    assert udp.percentile([7.0], 0.99) == 7.0
    assert udp.percentile([1.0, 2.0, 3.0], 0.5) == 2.0
    assert udp.percentile([], 0.5) is None


def _iv(start: float, mbit: float, packets: int, lost: int) -> dict:
    return {
        "sum": {
            "start": start,
            "end": start + 1.0,
            "seconds": 1.0,
            "bytes": int(mbit * 1e6 / 8),
            "packets": packets,
            "lost_packets": lost,
        }
    }


def test_steady_windows_leave_out_the_warm_up_and_the_tail():
    duration = udp.WARM + 3 + udp.TAIL  # 6 s: windows 2-3, 3-4, 4-5 are steady
    ivs = [_iv(float(t), 100.0 + t, 1000, t) for t in range(int(duration))]
    got = udp.steady_windows(ivs, duration)
    assert [w["start"] for w in got] == [2.0, 3.0, 4.0]


def test_window_stats_rate_and_loss_of_what_was_offered():
    windows = [
        _iv(2, 150, 1000, 0)["sum"],
        _iv(3, 120, 1000, 200)["sum"],
        _iv(4, 90, 500, 100)["sum"],  # a starved sender offered less: loss of what it sent
    ]
    s = udp.window_stats(windows)
    assert s is not None
    assert s["windows"] == 3
    assert s["mbps"] == pytest.approx(120.0, rel=1e-6)
    assert s["mbps_median"] == pytest.approx(120.0, rel=1e-6)
    assert s["mbps_min"] == pytest.approx(90.0, rel=1e-6)
    assert s["loss"] == pytest.approx(300 / 2500)
    assert s["loss_median"] == pytest.approx(0.2)
    assert s["loss_max"] == pytest.approx(0.2)
    assert udp.window_stats([]) is None


def _rec(case: str, mbps: float, idle: list[float], loaded: list[float], **kw) -> dict:
    rec = {
        "case": case,
        "run": 0,
        "load": {"mbps": mbps, "loss": 0.1, "loss_max": 0.2},
        "bytes": int(2e9),
        "voice_idle": {"sent": len(idle), "rtt_ms": idle},
        "voice_loaded": {"sent": len(loaded) + 1, "rtt_ms": loaded},  # one lost
    }
    rec.update(kw)
    return rec


def _records(mptun_loaded: float) -> list[dict]:
    cpu = {"client": 3.0, "server": 1.0}
    return [
        _rec(udp.ROUTE, 97, [1.0] * 99, [60.0] * 99),
        _rec(udp.MPTUN, 150, [2.0] * 99, [mptun_loaded] * 99, cpu=cpu, cpu_s=4.0),
        _rec(udp.SSLIBEV, 95, [1.5] * 99, [30.0] * 99, cpu=cpu, cpu_s=4.0),
    ]


def test_summary_adds_latency_against_routings_idle_and_cpu_per_gb():
    rows = {r["case"]: r for r in udp.summarize_udp(_records(20.0))}
    assert list(rows) == [udp.ROUTE, udp.MPTUN, udp.SSLIBEV]
    mp = rows[udp.MPTUN]
    assert mp["mbps"] == 150 and mp["runs"] == 1
    assert mp["voice_loaded"]["p99"] == 20.0
    assert mp["voice_loaded"]["added_p99"] == pytest.approx(19.0)  # routing's idle p50 is 1 ms
    assert mp["voice_idle"]["added_p50"] == pytest.approx(1.0)
    assert mp["voice_loaded"]["loss"] == pytest.approx(1 / 100)
    assert mp["cpu_s_per_gb"] == pytest.approx(2.0)  # 4 s over 2 GB
    assert mp["cpu_client"] == pytest.approx(1.5) and mp["cpu_server"] == pytest.approx(0.5)
    assert rows[udp.ROUTE]["cpu_s_per_gb"] is None  # no relay


def test_goals_pass_and_fail():
    ok = dict(
        (w, (held, d))
        for w, held, d in udp.udp_targets(udp.summarize_udp(_records(20.0)), (100, 60, 40))
    )
    rate, latency = list(ok.values())
    assert rate[0] is True and "150.0 Mbit/s = 1.00" in rate[1] and "0.95 of one uplink" in rate[1]
    assert latency[0] is True and "-40.0 ms" in latency[1]
    # 50 ms above routing's p99 holds, one more fails; a rate below 0.85 of the offer fails
    rows = udp.summarize_udp(_records(110.0))
    assert udp.udp_targets(rows)[1][1] is True
    rows = udp.summarize_udp(_records(110.5))
    assert udp.udp_targets(rows)[1][1] is False
    recs = _records(20.0)
    recs[1]["load"]["mbps"] = 0.84 * 150
    assert udp.udp_targets(udp.summarize_udp(recs))[0][1] is False
    # more offered than the links carry: the link sum is the bar
    x = udp.udp_targets(udp.summarize_udp(_records(20.0)), (50, 50, 50), offered=200)[0]
    assert x[1] is True and "of 150 Mbit/s" in x[0]
    # a path missing: not measured, neither pass nor fail
    assert [c[1] for c in udp.udp_targets([])] == [None, None]


def test_table_prints_the_ratios_and_a_failed_path():
    recs = _records(20.0)
    recs[2] = {"case": udp.SSLIBEV, "run": 0, "error": "iperf3 -u: no result"}
    text = udp.udp_table(udp.summarize_udp(recs), {"uplinks_mbit": [100, 60, 40]})
    lines = text.splitlines()
    assert "x sum" in lines[2] and "x rt" in lines[2]
    mptun = next(x for x in lines if x.startswith(udp.LABELS[udp.MPTUN]))
    assert " 0.75 " in mptun and " 1.55 " in mptun  # 150 of 200, 150 over routing's 97
    failed = next(x for x in lines if x.startswith(udp.LABELS[udp.SSLIBEV]))
    assert "failed: iperf3 -u: no result" in failed
    assert udp.udp_table([], {}) == ""


@pytest.mark.timing
def test_voice_flow_through_a_real_echo():
    """The voice flow against an echo on loopback: the datagrams after the skipped start are
    counted, each echo matched to its own send time (sequence numbers)."""
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(0.2)
    stop = threading.Event()
    seen: list[int] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = echo.recvfrom(2048)
            except TimeoutError:
                continue
            seen.append(len(data))
            echo.sendto(data, addr)

    t = threading.Thread(target=serve)
    t.start()
    try:
        got = udp.voice(echo.getsockname(), seconds=1.0, skip=0.5)
    finally:
        stop.set()
        t.join()
        echo.close()
    assert set(seen) == {udp.VOICE_BYTES}
    # the pacing catches up after a late wake-up, so the sender sends ~50 in 1 s; 25 skipped
    assert 1 <= got["sent"] <= len(seen) - 20, (got["sent"], len(seen))
    assert len(got["rtt_ms"]) == got["sent"]  # loopback loses nothing
    assert all(0 <= x < 1000 * udp.VOICE_GRACE for x in got["rtt_ms"])


def test_peer_program_bad_arguments_are_a_usage_line():
    r = subprocess.run(
        [sys.executable, "-m", "mptun.bench.udp", "voice"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "--target" in r.stderr and "Traceback" not in r.stderr


def test_list_names_the_study_and_loopback_skips_it(tmp_path: Path):
    r = subprocess.run(
        [sys.executable, "-m", "mptun", "bench", "--list"], capture_output=True, text=True
    )
    assert r.returncode == 0 and any(x.startswith("udp ") for x in r.stdout.splitlines())
    r = subprocess.run(
        [
            sys.executable, "-m", "mptun", "bench", "--mode", "loopback", "--quick",
            "--cases", "route,udp", "--idle-connections", "0", "--connrate-seconds", "0",
            "--json", str(tmp_path / "b.json"), "--chart", str(tmp_path / "b.png"),
        ],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    why = udp.skip_reason(False)
    assert f"skipping udp: {why}" in r.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["udp_summary"] == [] and not data.get("udp")


@pytest.mark.root
@pytest.mark.netns
def test_one_uplink_skips_the_udp_case(tmp_path: Path):
    """The case needs the three shaped uplinks: with one it is skipped, saying why, and the
    bench still ends well (it used to fail at the end, shaping a single uplink)."""
    for ok, why in (have_netns(), have_mptcp()):
        if not ok:
            pytest.skip(why)
    if udp.skip_reason():
        pytest.skip(udp.skip_reason())
    assert "needs 3 uplinks" in (udp.skip_reason(True, 1) or "")
    r = subprocess.run(
        [
            sys.executable, "-m", "mptun", "bench", "--mode", "netns", "--quick",
            "--uplinks", "1", "--links", "raw", "--cases", "udp",
            "--json", str(tmp_path / "b.json"), "--chart", str(tmp_path / "b.png"),
        ],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipping udp: needs 3 uplinks" in r.stderr


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.slow
def test_netns_udp_smoke(tmp_path: Path):
    """One short round on the shaped test bed: every path moves datagrams and echoes the voice
    flow; the inet host sees the VPS through the relays and the router around them; the relays'
    CPU is measured and the goals are printed."""
    for ok, why in (have_netns(), have_mptcp()):
        if not ok:
            pytest.skip(why)
    why = udp.skip_reason()
    if why:
        pytest.skip(why)
    r = subprocess.run(
        [
            sys.executable, "-m", "mptun", "bench", "--mode", "netns", "--quick",
            "--cases", "udp", "--json", str(tmp_path / "b.json"),
            "--chart", str(tmp_path / "b.png"),
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "b.json").read_text())
    runs = {x["case"]: x for x in data["udp"]}
    want = {udp.ROUTE, udp.MPTUN} | ({udp.SSLIBEV} if shutil.which("ss-redir") else set())
    assert set(runs) == want
    for case, rec in runs.items():
        assert "error" not in rec, rec
        assert rec["bytes"] > 0 and rec["load"]["windows"] >= 1, rec
        assert rec["voice_idle"]["rtt_ms"] and rec["voice_loaded"]["rtt_ms"], case
        if case == udp.ROUTE:
            assert rec["remote"] not in (str(VPS_INET_V4), str(SERVER_V4)), rec["remote"]
            assert "cpu" not in rec
        else:
            assert rec["remote"] == str(VPS_INET_V4), (case, rec["remote"])
            assert set(rec["cpu"]) == {"client", "server"}
    assert "== UDP" in r.stdout and "udp: mptun delivers" in r.stdout
    assert "udp: mptun p99 under load" in r.stdout
