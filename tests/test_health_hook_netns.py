"""`--uplink-hook` driven by a real health change on the multipath test bed.

The client probes three uplinks; a recording hook (a shell script appending its arguments to a
file) is told each change. One uplink is blackholed on the VPS side (nftables drops what it
carries both ways, the link stays up), then the drop goes: the hook hears `dead`, then `up`.
With a hook the health file names no uplink to withdraw (the hook owns the endpoints), so
`mptun uplinks` reading it withdraws nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.rig import Rig
from mptun.lab.testbed import Testbed
from mptun.lab.wait import wait_until

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.usefixtures("needs_mptcp_testbed")]

UPLINKS = ("wan1", "wan2", "wan3")


@pytest.fixture
def bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Testbed, Rig, Path]]:
    calls = tmp_path / "hook-calls"
    hook = tmp_path / "hook"
    # the client's environment holds MPTUN_* variables: the hook must get only its arguments
    hook.write_text(f'#!/bin/sh\necho "$*" >>"{calls}"\n')
    hook.chmod(0o755)
    monkeypatch.setenv("MPTUN_HEALTH_FILE", str(tmp_path / "health.json"))
    args = [a for name in UPLINKS for a in ("--uplink", name)]
    args += ["--uplink-hook", f"{hook} --from-test"]
    tb = Testbed(rates_mbit=(None, None, None), ipv6=False)
    tb.__enter__()
    r = Rig(tb, tmp_path, uplinks=UPLINKS, client_args=args)
    try:
        r.start()
        wait_until(lambda: _states(r) == dict.fromkeys(UPLINKS, "up"), 20, "all uplinks up")
        yield tb, r, calls
    finally:
        tb.destroy()
        r.close()
        print(r.dump_logs())


def _states(r: Rig) -> dict[str, str]:
    (client,) = r.status()["clients"]
    return {u["name"]: u["state"] for u in client.get("uplink_health") or []}


def _calls(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def _blackhole(tb: Testbed, uplink: str, on: bool) -> None:
    assert tb.vps is not None
    if not on:
        tb.vps.exec("nft", "delete", "table", "inet", "mptun_hook_test")
        return
    vps_if = tb.uplink(uplink).vps_if
    tb.vps.exec(
        "nft",
        "-f",
        "-",
        input="table inet mptun_hook_test {\n"
        f"  chain input {{ type filter hook input priority 0; iifname {vps_if} drop; }}\n"
        f"  chain output {{ type filter hook output priority 0; oifname {vps_if} drop; }}\n"
        "}\n",
    )


def test_the_hook_hears_dead_then_up_and_owns_the_endpoints(bed, tmp_path: Path) -> None:
    tb, r, calls = bed
    # each uplink's first change (unknown -> up) reached the hook, with the words given first
    wait_until(lambda: len(_calls(calls)) >= 3, 10, "the hook told of the three uplinks")
    assert sorted(_calls(calls)) == [f"--from-test {u} up" for u in UPLINKS]

    _blackhole(tb, "wan2", True)
    wait_until(lambda: "--from-test wan2 dead" in _calls(calls), 15, "the hook told wan2 died")
    assert _states(r)["wan2"] == "dead"
    # the hook owns the endpoints: the health file asks `mptun uplinks` to withdraw nothing
    doc = json.loads((tmp_path / "health.json").read_text())
    assert doc["uplinks"]["wan2"]["state"] == "dead" and doc["withdrawn"] == []

    _blackhole(tb, "wan2", False)
    wait_until(
        lambda: _calls(calls)[-1] in ("--from-test wan2 up", "--from-test wan2 degraded"),
        15,
        "the hook told wan2 is back",
    )
    wan2 = [c for c in _calls(calls) if " wan2 " in c]
    assert wan2[:2] == ["--from-test wan2 up", "--from-test wan2 dead"], wan2
    assert not any("hook" in line and "failed" in line for line in _log(r))


def _log(r: Rig) -> list[str]:
    return r.logs["client"].read_text().splitlines()
