"""Refused requests are logged once per burst with a count, as probes are: an authenticated
client asking for refused targets by the thousand must not write a line each."""

from __future__ import annotations

from pathlib import Path

from mptun.common.address import Address
from mptun.common.handshake import ConnectStatus
from tests.helpers import ServerProcess
from tests.peers import connect_status

BURST = 30


def test_policy_refusals_log_one_line_per_burst(tmp_path: Path, key_file: Path) -> None:
    with ServerProcess(tmp_path, key_file) as srv:  # the default policy refuses loopback
        target = Address.parse("127.0.0.1:9")
        for _ in range(BURST):
            assert connect_status(srv.port, srv.psk, target) is ConnectStatus.NOT_ALLOWED
        assert srv.counters()["policy"] == BURST
        lines = [line for line in srv.log().splitlines() if "-> 127.0.0.1:9: not allowed" in line]
    assert len(lines) == 1, lines
