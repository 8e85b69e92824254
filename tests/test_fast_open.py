"""`--fast-open`: the first flight in the SYN once a cookie is cached, proved by the kernel's
counters in a namespace of the test's own; the fallbacks when the server or the path refuses
it; a replayed SYN payload refused like any replay (client/fastopen.py, common/fastopen.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mptun.client.fastopen import HOLD, FastOpenPaths
from tests.fastopen_bed import Bed, need_bed, nstat
from tests.helpers import ROOT, wait_until


def test_paths_held_longer_each_loss_and_freed_by_success() -> None:
    """A path whose SYN with data was lost goes without Fast Open for HOLD s, twice as long
    after a second loss in a row; one that worked again is free at once."""
    now = [0.0]
    paths = FastOpenPaths(clock=lambda: now[0])
    path = ("198.51.100.1", "192.0.2.2")
    other = ("198.51.100.1", "203.0.113.2")  # the same server through another uplink
    assert paths.allowed(path)
    assert paths.lost(path) == HOLD
    assert not paths.allowed(path) and paths.allowed(other)
    now[0] = HOLD
    assert paths.allowed(path)
    assert paths.lost(path) == 2 * HOLD
    now[0] = HOLD + 2 * HOLD - 0.001
    assert not paths.allowed(path)
    paths.worked(path)
    assert paths.allowed(path)
    assert paths.lost(path) == HOLD  # the count starts again


@pytest.mark.root
@pytest.mark.netns
def test_first_flight_rides_the_syn(tmp_path: Path, key_file: Path) -> None:
    """The first tunnel asks for a cookie; each later one carries its first flight in the SYN:
    the server's kernel takes it (TcpExtTCPFastOpenPassive) and the client counts it."""
    need_bed()
    with Bed(tmp_path, key_file) as bed:
        server = bed.start_server()
        assert "TCP Fast Open not offered" not in bed.log_of(server)
        bed.start_client("--fast-open")
        before = nstat(bed.ns)
        for _ in range(4):
            assert bed.fetch()[1] == 200
        after = nstat(bed.ns)
        passive = after["TcpExtTCPFastOpenPassive"] - before.get("TcpExtTCPFastOpenPassive", 0)
        # the first tunnel fetched the cookie (the client's health checks may have done it
        # already, without Fast Open data of their own)
        assert passive >= 3, (before, after)
        counters = bed.wait_client("relayed", 4)  # each relay counts as it ends
        assert counters["fast-open"] >= 3, counters
        assert counters.get("fast-open-lost", 0) == 0, counters
        assert counters["relayed"] == 4, counters


@pytest.mark.root
@pytest.mark.netns
def test_server_without_fast_open(tmp_path: Path, key_file: Path) -> None:
    """A namespace whose sysctl lacks the server bit: the server says so in one line and
    starts; the client's tunnels work, none with data in the SYN. Once the client holds a
    cookie and the server stops taking Fast Open, its SYN data is refused and sent again after
    the handshake: the tunnel still works (counted `fast-open-refused`)."""
    need_bed()
    with Bed(tmp_path, key_file, tfo_sysctl=1) as bed:
        server = bed.start_server()
        lines = [ln for ln in bed.log_of(server).splitlines() if "Fast Open not offered" in ln]
        assert len(lines) == 1 and "net.ipv4.tcp_fastopen is 1" in lines[0], lines
        bed.start_client("--fast-open")
        for _ in range(2):
            assert bed.fetch()[1] == 200
        assert nstat(bed.ns).get("TcpExtTCPFastOpenPassive", 0) == 0
        counters = bed.client_counters()
        assert "fast-open" not in counters, counters
        # a cookie, then the server's kernel stops taking data in SYNs
        bed.ns.sysctl("net.ipv4.tcp_fastopen", 3)
        assert bed.fetch()[1] == 200  # asks for the cookie
        bed.ns.sysctl("net.ipv4.tcp_fastopen", 1)
        before = nstat(bed.ns)
        assert bed.fetch()[1] == 200
        assert bed.fetch()[1] == 200
        after = nstat(bed.ns)
        assert after.get("TcpExtTCPFastOpenPassive", 0) == before.get("TcpExtTCPFastOpenPassive", 0)
        counters = bed.wait_client("relayed", 5)
        assert counters["fast-open-refused"] >= 2, counters
        assert counters["relayed"] == 5, counters


@pytest.mark.root
@pytest.mark.netns
def test_path_dropping_syn_with_data(tmp_path: Path, key_file: Path) -> None:
    """A path whose middlebox drops SYNs carrying data (an nftables rule here): the tunnel
    gets through with the retransmitted SYN, the client holds the path, and the next tunnel
    sends no SYN with data (the rule's counter stays)."""
    need_bed()
    with Bed(tmp_path, key_file) as bed:
        bed.start_server()
        bed.start_client("--fast-open")
        assert bed.fetch()[1] == 200  # the cookie
        # A SYN without data is at most 80 bytes (IP 20 + TCP 20 + options 40)
        bed.ns.exec("nft", "-f", "-", input=(
            "table inet tfo_drop {\n chain inp {\n  type filter hook input priority 0;\n"
            "  tcp dport 8443 tcp flags & (syn | ack) == syn ip length > 100 counter drop\n"
            " }\n}\n"
        ))  # fmt: skip
        seconds, code = bed.fetch()
        assert code == 200
        assert seconds >= 0.9, seconds  # the SYN was sent again after the kernel's 1 s timeout
        assert _dropped(bed) == 1
        counters = bed.client_counters()
        assert counters["fast-open-lost"] == 1, counters
        log = bed.log_of(bed.client)  # type: ignore[arg-type]
        assert "this path connects without Fast Open for 60 s" in log, log[-2000:]
        for _ in range(2):
            assert bed.fetch()[1] == 200
        assert _dropped(bed) == 1  # no SYN with data tried on the held path
        assert bed.client_counters()["fast-open-lost"] == 1
        # Linux 6.18 ran the tunnel whose SYN data was lost as plain TCP (MPTCP fell back with
        # the retransmitted SYN); the held path's tunnels are MPTCP again
        log = bed.log_of(bed.client)  # type: ignore[arg-type]
        assert log.count("tcp-fallback -> ") <= 1, log[-3000:]
        assert log.count("mptcp -> ") >= 3, log[-3000:]


def _dropped(bed: Bed) -> int:
    """Packets the test's drop rule dropped."""
    out = bed.ns.exec("nft", "--json", "list", "table", "inet", "tfo_drop").stdout
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return expr["counter"]["packets"]
    raise AssertionError(out)


@pytest.mark.root
@pytest.mark.netns
def test_replayed_syn_payload_is_a_replay(tmp_path: Path, key_file: Path) -> None:
    """A first flight sent in a Fast Open SYN is served; the same bytes in another SYN are
    taken by the kernel (the cookie is valid) but refused by the replay cache: no byte back,
    counted `replay`, nothing dialled."""
    need_bed()
    with Bed(tmp_path, key_file) as bed:
        bed.start_server()
        before = bed.server_counters()
        r = bed.ns.exec(
            sys.executable, "-m", "tests.tools.tfo_replay", "--key-file", str(key_file),
            cwd=ROOT,
        )  # fmt: skip
        result = json.loads(r.stdout)
        assert result["first"] == {"syn_data": True, "status": 0}, result
        assert result["replay"]["syn_data"] is True, result
        assert result["replay"]["bytes"] == 0 and result["replay"]["how"] == "silence", result

        def replayed() -> dict[str, int] | None:
            c = bed.server_counters()
            return c if c.get("replay", 0) > before.get("replay", 0) else None

        after = wait_until(replayed, 10.0, "the replay counted")
        assert after.get("relayed", 0) - before.get("relayed", 0) == 1, (before, after)


def test_option_needs_no_server_setting() -> None:
    """`--fast-open` and `--pool` are client options with their env vars (docs/CLI.md)."""
    out = subprocess.run(
        [sys.executable, "-m", "mptun", "client", "--help"], capture_output=True, text=True,
        cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    assert "--fast-open" in out and "--pool" in out


@pytest.mark.root
@pytest.mark.netns
def test_unanswered_fast_open_tunnel_holds_the_path(tmp_path: Path, key_file: Path) -> None:
    """A server whose kernel takes the flight from the SYN but whose answer never arrives (a
    Linux 6.12 pair did so): the tunnel times out, the client counts `fast-open-unanswered`
    and the next tunnel on that path sends no data in its SYN."""
    need_bed()
    with Bed(tmp_path, key_file) as bed:
        r = bed.ns.exec(sys.executable, "-m", "tests.tools.tfo_silent", cwd=ROOT)
        cookie, carried, held = json.loads(r.stdout)
        assert "fast-open" not in cookie["counters"], cookie  # the SYN asked for a cookie
        assert "fast-open-unanswered" not in cookie["counters"], cookie
        assert carried["counters"]["fast-open"] == 1, carried
        assert carried["counters"]["fast-open-unanswered"] == 1, carried
        assert carried["passive"] == cookie["passive"] + 1, (cookie, carried)
        assert held["passive"] == carried["passive"], held  # no data in the third SYN
        assert held["counters"]["fast-open-unanswered"] == 1, held
