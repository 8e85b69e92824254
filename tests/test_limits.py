"""Idle timeout: a silent relayed connection is reset at the limit; a busy one is not cut."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import ClientProcess, ServerProcess
from tests.peers import StreamTarget, read_until_end, socks_open

IDLE = 1.0


@pytest.mark.timing
def test_idle_timeout_resets_silent_connections_only(tmp_path: Path, key_file: Path):
    srv = ServerProcess(tmp_path, key_file, "--allow-private", "--idle-timeout", str(IDLE))
    cli = ClientProcess(tmp_path, key_file, srv.port)
    silent = StreamTarget(interval=3600)  # one chunk, then nothing
    busy = StreamTarget(interval=0.05, total=60 * 16384)  # ~3 s of steady traffic, then EOF
    try:
        a, ra = socks_open(cli.socks_port, silent.address)
        b, rb = socks_open(cli.socks_port, busy.address)
        assert ra == rb == 0
        t0 = time.monotonic()
        got_a, end_a = read_until_end(a, 15)
        took = time.monotonic() - t0
        got_b, end_b = read_until_end(b, 15)
        assert end_a == "reset" and got_a == 16384
        # The idle check runs every IDLE seconds: a silent leg ends within (IDLE, 2 * IDLE].
        assert IDLE * 0.9 < took < 2 * IDLE + 2, took
        assert (end_b, got_b) == ("eof", 60 * 16384)  # longer than IDLE, never cut
        assert srv.wait_counter("relay", 1).get("relay", 0) >= 1
    finally:
        silent.close()
        busy.close()
        cli.stop()
        srv.stop()
