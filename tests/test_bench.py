"""`mptun bench` smoke runs: seconds long, so it cannot rot. Nothing here asserts a speed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
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


# -- the gateway cases and the reference relay -------------------------------------------------
GATEWAY_CASES = "gw-splice,gw-aead,gw-reference,gw-mptcp-kernel"


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.slow
def test_netns_gateway_smoke(tmp_path: Path):
    """iperf3 through the router's nft redirect into `--redir`, one path: the product's engines,
    the reference relay and iperf3 under mptcpize each move bytes both ways, and the table
    compares them with the reference and counts MPTCP-level retransmissions."""
    for ok, why in (have_netns(), have_mptcp()):
        if not ok:
            pytest.skip(why)
    for tool in ("iperf3", "nft", "mptcpize"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    r, data = bench(
        tmp_path,
        "--mode",
        "netns",
        "--uplinks",
        "1",
        "--links",
        "raw",
        "--cases",
        GATEWAY_CASES,
        "--idle-connections",
        "0",
        "--connrate-seconds",
        "0",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert data["meta"]["uplinks"] == 1
    runs = {(x["case"], x["direction"]): x for x in data["runs"]}
    for case in GATEWAY_CASES.split(","):
        for d in ("up", "down"):
            run = runs[(case, d)]
            assert run.get("bytes", 0) > 0, run
            assert run["loadavg"] and set(run["mptcp_retrans"]) == {"router", "vps"}, run
    # the relays' CPU is measured; the kernel case has no relay
    assert {"client", "server"} <= set(runs[("gw-reference", "down")]["cpu"])
    assert set(runs[("gw-mptcp-kernel", "up")]["cpu"]) == {"machine"}
    assert "== gateway" in r.stdout and "reference relay" in r.stdout
    assert "gateway: splice vs reference relay" in r.stdout


def test_one_uplink_has_no_shaped_links(tmp_path: Path):
    r, _ = bench(tmp_path, "--uplinks", "1", "--links", "shaped", timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "--links shaped needs --uplinks 3" in lines[0]


def test_gateway_cases_need_the_test_bed(tmp_path: Path):
    """On loopback there is no router to redirect in: the gateway cases are skipped, saying
    why, and the rest runs."""
    r, data = bench(
        tmp_path,
        "--mode",
        "loopback",
        "--cases",
        "route,gw-splice",
        "--idle-connections",
        "0",
        "--connrate-seconds",
        "0",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipping gw-splice: needs the namespace test bed" in r.stderr
    assert {x["case"] for x in data["runs"]} == {"route"}


def test_reference_relay_moves_both_ways_and_half_closes():
    """The reference engine over real sockets: each direction's bytes arrive whole, EOF on one
    leg becomes a FIN on the other, and its stats count both directions."""
    import asyncio
    import socket

    from mptun.bench.reference import ReferenceEngine

    up, down = os.urandom(3_000_000), os.urandom(2_000_000)

    async def main() -> tuple[bytes, bytes, object]:
        loop = asyncio.get_running_loop()
        app, inner = socket.socketpair()
        tunnel, far = socket.socketpair()
        relay = asyncio.ensure_future(ReferenceEngine().relay(loop, inner, tunnel))

        def peer(sock: socket.socket, data: bytes) -> bytes:
            sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(1)))
            sender.start()
            got = bytearray()
            while chunk := sock.recv(1 << 16):
                got += chunk
            sender.join()
            sock.close()
            return bytes(got)

        at_far = loop.run_in_executor(None, peer, far, down)
        at_app = loop.run_in_executor(None, peer, app, up)
        got_far, got_app = await asyncio.wait_for(asyncio.gather(at_far, at_app), 30)
        return got_far, got_app, await asyncio.wait_for(relay, 10)

    got_far, got_app, stats = asyncio.run(main())
    assert got_far == up and got_app == down
    assert (stats.to_tunnel, stats.from_tunnel, stats.clean) == (len(up), len(down), True)


def test_reference_relay_is_left_out_of_the_openwrt_package():
    makefile = (Path(__file__).parent.parent / "openwrt/net/mptun/Makefile").read_text()
    assert "-|$(PYTHON3_PKG_DIR)/mptun/bench\n" in makefile  # the whole bench, reference relay too


def test_gateway_ratios_stalls_and_retransmissions():
    """The gateway summary from raw runs: ratios against the reference relay, a run below half
    the median counted as a stall (for the splice case and the reference alike), and the
    MPTCP-level retransmissions of both ends added up per run."""
    from mptun.bench import report

    def run(case: str, mbps: float, retrans: int = 0) -> dict:
        return {
            "link": "raw",
            "case": case,
            "direction": "down",
            "mbps": mbps,
            "bytes": 10**9,
            "cpu": {"client": 0.2, "server": 0.3, "machine": 1.0},
            "rtt_ms": [],
            "mptcp_retrans": {"router": 0, "vps": retrans},
        }

    runs = [run("gw-splice", m, r) for m, r in ((9000, 1), (10000, 2), (4000, 20))]
    runs += [run("gw-reference", m) for m in (10000, 10000, 10000)]
    runs += [run("gw-aead", m) | {"cpu": {"client": 0.5, "server": 0.5}} for m in (8000,) * 3]
    rows = report.summarize({"runs": runs})
    sp = next(r for r in rows if r["case"] == "gw-splice")
    assert (sp["mbps"], sp["stalls"], sp["retrans"], sp["retrans_max"]) == (9000, 1, 2, 20)
    assert sp["x_reference"] == 0.9
    checks = {what: (ok, detail) for what, ok, detail in report.gateway_targets(rows)}
    assert checks["raw down gateway: splice vs reference relay"][0] is True
    ok, detail = checks["raw down gateway: splice's worst run vs its median"]
    assert ok is False and "0.44x" in detail and "reference relay 1.00x" in detail
    assert checks["raw down gateway: splice vs aead"][0] is True
    assert checks["raw down gateway: splice CPU/GB (both ends) vs aead"] == (
        True,
        "0.50 vs 1.00 s/GB",
    )
    assert "stalls" in report.gateway_table(rows, [])


def test_reference_relay_ends_both_directions_when_a_leg_is_reset():
    """A reset on the tunnel leg ends the relay, unclean, while the other direction waits in
    its blocking splice on a quiet leg: the failing thread shuts both legs down to wake it."""
    import asyncio
    import socket
    import struct

    from mptun.bench.reference import ReferenceEngine

    def tcp_pair() -> tuple[socket.socket, socket.socket]:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            a = socket.create_connection(srv.getsockname())
            b, _ = srv.accept()
        return a, b

    async def main():
        loop = asyncio.get_running_loop()
        app, inner = tcp_pair()
        tunnel, far = tcp_pair()
        relay = asyncio.ensure_future(ReferenceEngine().relay(loop, inner, tunnel))
        try:
            app.sendall(b"x" * 1000)  # then the app stays open and quiet
            # the bytes went through (read off the loop's thread: the relay runs on it)
            assert await asyncio.wait_for(loop.run_in_executor(None, far.recv, 65536), 20)
            far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            far.close()  # RST
            return await asyncio.wait_for(relay, 20)
        finally:
            app.close()

    stats = asyncio.run(main())
    assert stats.clean is False and stats.error, stats
