"""Replay defence: the salt cache's bounds and window edges, and its life across reload/restart."""

from __future__ import annotations

import os
import signal
import socket
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.common.address import Address
from mptun.common.errors import ProtocolError, Status
from mptun.common.handshake import ConnectStatus, Response
from mptun.common.replay import ReplayGuard, load_file, save_file
from tests.helpers import ServerProcess
from tests.peers import closing_target, connect_status, delta, exchange, flight

W = 60.0


def status_of(guard: ReplayGuard, salt: bytes, ts: float, now: float) -> Status | None:
    try:
        guard.accept(salt, ts, now)
    except ProtocolError as e:
        return e.status
    return None


def test_burst_fills_the_cache_then_refuses_instead_of_forgetting() -> None:
    g = ReplayGuard(W, capacity=1000)
    salts = [os.urandom(32) for _ in range(1001)]
    for i, s in enumerate(salts[:1000]):
        assert status_of(g, s, 1000, 1000 + i / 1000) is None
    assert len(g) == 1000
    assert status_of(g, salts[1000], 1000, 1001) is Status.REPLAY_FULL
    assert status_of(g, salts[0], 1000, 1001) is Status.REPLAY  # nothing was forgotten
    # Once the first salts expire (2 * window after acceptance), new flights fit again.
    assert status_of(g, salts[1000], 1000 + 2 * W, 1000 + 2 * W + 0.5) is None
    assert len(g) <= 1000


def test_memory_per_salt_is_bounded() -> None:
    """The documented ~200 bytes per entry (common/replay.py), measured with the salt objects."""
    n = 20_000
    g = ReplayGuard(W, capacity=n)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            g.accept(os.urandom(32), 1000, 1000 + i / n)
        per = (tracemalloc.get_traced_memory()[0] - base) / n
    finally:
        tracemalloc.stop()
    print(f"replay cache: {per:.0f} bytes per salt")
    assert per < 300


@pytest.mark.parametrize("skew", [-W, 0.0, W])
def test_replay_caught_across_the_window_boundary(skew: float) -> None:
    """While a timestamp can pass the window check, its salt is remembered: up to the edges.

    `skew` is how far the server's clock was past the timestamp at the first acceptance (the
    window's two edges and its middle); replays come at every edge, also after the server's
    clock stepped back.
    """
    ts = 1000
    for now in (ts - W, ts, ts + W):
        g = ReplayGuard(W, capacity=10)
        salt = os.urandom(32)
        assert status_of(g, salt, ts, ts + skew) is None
        assert status_of(g, salt, ts, now) is Status.REPLAY, (skew, now)
    g = ReplayGuard(W, capacity=10)
    salt = os.urandom(32)
    assert status_of(g, salt, ts, ts + skew) is None
    assert status_of(g, salt, ts, ts + W + 0.001) is Status.CLOCK
    assert status_of(g, salt, ts, ts - W - 0.001) is Status.CLOCK


def test_growing_the_window_keeps_salts_long_enough() -> None:
    g = ReplayGuard(10, capacity=10)
    salt = os.urandom(32)
    g.accept(salt, 1000, 1000)
    g.set_window(100)
    assert status_of(g, salt, 1000, 1000 + 99) is Status.REPLAY  # would have expired at 1020
    g.set_window(5)  # shrinking keeps the longer expiry
    assert status_of(g, salt, 1090, 1090) is Status.REPLAY


def test_timestamps_from_before_the_start_are_refused() -> None:
    g = ReplayGuard(W, capacity=10, not_before=1000)
    assert status_of(g, os.urandom(32), 999, 1001) is Status.CLOCK
    assert status_of(g, os.urandom(32), 1000, 1001) is None


def test_cache_file_round_trip(tmp_path: Path) -> None:
    g = ReplayGuard(W, capacity=10)
    live, dead = os.urandom(32), os.urandom(32)
    g.accept(dead, 1000, 1000)
    g.accept(live, 1100, 1100)
    path = tmp_path / "replay"
    assert save_file(g, path, 1110) == 2
    assert (path.stat().st_mode & 0o777) == 0o600
    h = ReplayGuard(W, capacity=10)
    assert load_file(h, path, 1200) == 1  # `dead` expired at 1120, `live` lives until 1220
    assert status_of(h, live, 1150, 1200) is Status.REPLAY
    assert not path.exists()  # consumed: a later crash cannot restore a stale copy
    assert load_file(h, path, 1200) is None
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError):
        load_file(h, path, 1200)


# -- the server process ------------------------------------------------------------------------


def test_sighup_keeps_the_cache(tmp_path: Path, key_file: Path, target: Address) -> None:
    with ServerProcess(tmp_path, key_file, "--allow-private") as srv:
        hs = flight(srv.psk, target)
        good = hs.first_flight()
        exchange(srv.port, good, hs)
        os.kill(srv.pid, signal.SIGHUP)
        before = srv.wait_counter("reload", 1)
        assert before["reload"] == 1
        srv_replay(srv.port, good)
        after = srv.wait_counter("replay", before.get("replay", 0) + 1)
        assert delta(after, before) == {"replay": 1}
        assert srv.stats()["replay"]["size"] == 1


def srv_replay(port: int, data: bytes) -> None:
    """Send a flight and close at once (the server absorbs it and counts the status)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""


def refused(srv: ServerProcess, data: bytes, status: str) -> dict[str, int]:
    """`srv_replay` a flight, wait until `status` has counted once: how the counters moved."""
    before = srv.counters()
    srv_replay(srv.port, data)
    after = srv.wait_counter(status, 1)
    return delta(after, before)


@pytest.fixture
def target() -> Iterator[Address]:
    """A loopback target that accepts and closes at once."""
    with closing_target() as port:
        yield Address.parse(f"127.0.0.1:{port}")


def test_restart_with_replay_file_still_refuses_the_replay(
    tmp_path: Path, key_file: Path, target: Address
) -> None:
    cache = tmp_path / "replay"
    first = ServerProcess(tmp_path, key_file, "--allow-private", "--replay-file", str(cache))
    hs = flight(first.psk, target)
    good = hs.first_flight()
    exchange(first.port, good, hs)
    assert first.stop() == 0
    assert cache.exists()
    with ServerProcess(
        tmp_path, key_file, "--allow-private", "--replay-file", str(cache)
    ) as second:
        assert second.stats()["replay"]["size"] == 1
        assert refused(second, good, "replay") == {"replay": 1}


def test_restart_without_file_refuses_flights_stamped_before_start(
    tmp_path: Path, key_file: Path, target: Address
) -> None:
    """A flight made (and maybe accepted) before this process started is refused as CLOCK."""
    made_at = time.time() - 2  # well inside the 60 s window, but before the start
    with ServerProcess(tmp_path, key_file, "--allow-private") as srv:
        stale = flight(srv.psk, target, clock=lambda: made_at).first_flight()
        assert refused(srv, stale, "clock") == {"clock": 1}


def test_full_cache_answers_full_then_refuses_silently(
    tmp_path: Path, key_file: Path, target: Address
) -> None:
    """Capacity 8: one source's share is 2, the last of it answered "server full" (the salt
    remembered), then nothing more can be remembered and the flight is absorbed silently."""
    with ServerProcess(tmp_path, key_file, "--allow-private", "--replay-capacity", "8") as srv:
        assert connect_status(srv.port, srv.psk, target) is ConnectStatus.SUCCEEDED
        hs = flight(srv.psk, target)
        full = hs.first_flight()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(full)
            while not isinstance(event := hs.next_event(), Response):
                chunk = s.recv(hs.bytes_needed())
                assert chunk, "server closed before its response"
                hs.receive_data(chunk)
        assert event.status is ConnectStatus.SERVER_FULL
        assert srv.counters()["busy"] == 1
        assert refused(srv, full, "replay") == {"replay": 1}  # its salt stays remembered
        fresh = flight(srv.psk, target).first_flight()
        assert refused(srv, fresh, "replay-full") == {"replay-full": 1}


def test_replay_window_option(tmp_path: Path, key_file: Path, target: Address) -> None:
    """--replay-window sets the accepted clock difference (here 5 s: 3 s ahead passes, 10 not)."""
    with ServerProcess(tmp_path, key_file, "--allow-private", "--replay-window", "5") as srv:
        ahead = flight(srv.psk, target, clock=lambda: time.time() + 3)
        exchange(srv.port, ahead.first_flight(), ahead)  # answered: inside the window
        far = flight(srv.psk, target, clock=lambda: time.time() + 10).first_flight()
        assert refused(srv, far, "clock") == {"clock": 1}
        assert srv.stats()["replay"]["window"] == 5
