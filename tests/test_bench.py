"""`mptun bench` smoke runs: seconds long, so it cannot rot. Nothing here asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mptun.lab.netns import have_mptcp, have_netns


def bench(
    tmp_path: Path, *args: str, timeout: float = 240
) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mptun",
            "bench",
            "--quick",
            "--json",
            str(out),
            "--chart",
            str(tmp_path / "bench.png"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    data = json.loads(out.read_text()) if out.exists() else {}
    return r, data


def test_loopback_smoke(tmp_path: Path):
    r, data = bench(
        tmp_path,
        "--mode",
        "loopback",
        "--cases",
        "route,mptcp-kernel,splice-mptcp,copy-mptcp",
        "--idle-connections",
        "20",
        "--connrate-seconds",
        "0.5",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert data["meta"]["mode"] == "loopback"
    runs = {(x["case"], x["direction"]): x for x in data["runs"]}
    for case in ("route", "splice-mptcp", "copy-mptcp"):
        for d in ("up", "down"):
            assert runs[(case, d)]["bytes"] > 0, runs[(case, d)]
            assert runs[(case, d)]["rtt_ms"], "no RTT sample during the transfer"
    relayed = runs[("splice-mptcp", "down")]
    assert set(relayed["cpu"]) == {"client", "server", "machine"}
    assert {m["case"] for m in data["connrate"]} == {"route", "splice-mptcp", "copy-mptcp"}
    assert all(m["connections"] > 0 and m["errors"] == 0 for m in data["connrate"])
    idle = {m["case"]: m for m in data["idle"]}
    assert idle["splice-mptcp"]["connections"] == 20 and "per_connection" in idle["splice-mptcp"]
    assert "x route" in r.stdout and "== targets" in r.stdout
    assert "[" in r.stderr  # the progress display
    if have_mptcp()[0]:  # the no-relay reference: no relay CPU, and the context lines
        for d in ("up", "down"):
            assert runs[("mptcp-kernel", d)]["bytes"] > 0
            assert set(runs[("mptcp-kernel", d)]["cpu"]) == {"machine"}
        assert len(data["context"]) == 2 and "x kernel MPTCP" in data["context"][0]
        assert "== context" in r.stdout


def test_unknown_case_is_one_line(tmp_path: Path):
    r, _ = bench(tmp_path, "--mode", "loopback", "--cases", "route,warp-drive", timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2
    assert len(lines) == 1 and "unknown case 'warp-drive'" in lines[0], lines


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.slow
def test_netns_shaped_smoke(tmp_path: Path):
    """The namespace test bed with shaped uplinks: the MPTCP case joins extra subflows."""
    for ok, why in (have_netns(), have_mptcp()):
        if not ok:
            pytest.skip(why)
    r, data = bench(
        tmp_path,
        "--mode",
        "netns",
        "--links",
        "shaped",
        "--cases",
        "route,mptcp-kernel,splice-mptcp",
        "--idle-connections",
        "0",
        "--connrate-seconds",
        "0",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert data["meta"]["mode"] == "netns" and data["meta"]["shaped_mbit"] == [100, 60, 40]
    mp = [x for x in data["runs"] if x["case"] in ("splice-mptcp", "mptcp-kernel")]
    assert len(mp) == 4 and all(x["bytes"] > 0 for x in mp)
    # per-uplink routing and endpoints work: subflows joined over the other uplinks
    assert all(x.get("mp_joins", 0) >= 1 for x in mp), mp


def test_batched_delivery_is_not_undercounted():
    """A relay that delivers 1 MB every 0.1 s moves 10 MB/s; the receiver's deadline falls
    between two batches, and the read after it is neither counted nor timed."""
    from mptun.bench.traffic import Tally

    tally = Tally(seconds=1.55)
    t = 100.0
    while tally.add(t, 1_000_000):
        t += 0.1
    steady = tally.result(t)["steady_bps"] / 8
    assert abs(steady - 10_000_000) < 1, steady
