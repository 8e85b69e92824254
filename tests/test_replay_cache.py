"""The replay cache under load: a share per source, the "server full" answer, bounded memory,
and the high-water mark that closes the replay window after a crash (common/replay.py)."""

from __future__ import annotations

import os
import signal
import socket
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.common.address import Address
from mptun.common.errors import ProtocolError, Status
from mptun.common.handshake import ConnectStatus, Response
from mptun.common.replay import RESERVE, HighWater, ReplayGuard, fingerprint
from tests.helpers import ClientProcess, ServerProcess, wait_until
from tests.peers import closing_target, flight, socks_open

W = 60.0


def outcome(guard: ReplayGuard, salt: bytes, now: float, source: str) -> str:
    try:
        guard.accept(salt, now, now, source)
    except ProtocolError as e:
        return e.status.value
    return "accepted"


def test_one_source_at_full_rate_cannot_deny_the_others() -> None:
    """Capacity 4,000: a source flooding 10,000 flights gets its share (a quarter), the last
    1/16 of it answered "full", then silence; three other sources still get theirs."""
    g = ReplayGuard(W, capacity=4000)
    share = 1000
    reserve = share // RESERVE
    hog = Counter(outcome(g, os.urandom(32), 1000 + i / 1e4, "192.0.2.1") for i in range(10_000))
    assert hog == {"accepted": share - reserve, "busy": reserve, "replay-full": 10_000 - share}
    for other in ("192.0.2.2", "198.51.100.7", "2001:db8::/64"):
        got = Counter(outcome(g, os.urandom(32), 1002, other) for _ in range(500))
        assert got == {"accepted": 500}, other
    assert len(g) == share + 3 * 500 <= g.capacity
    assert g.sources() == 4


def test_near_the_capacity_everyone_is_answered_full_and_nothing_is_forgotten() -> None:
    g = ReplayGuard(W, capacity=1600)  # share 400; the last 100 of the capacity answer "full"
    salts: dict[str, list[bytes]] = {}
    results: Counter[str] = Counter()
    for i in range(2000):
        salt = os.urandom(32)
        result = outcome(g, salt, 1000, f"203.0.113.{i % 8}")
        results[result] += 1
        salts.setdefault(result, []).append(salt)
    assert results["accepted"] == 1600 - 100
    assert results["busy"] == 100
    assert len(g) == 1600
    # Every salt accepted or answered "full" stays remembered: a replay from anywhere is refused.
    for salt in salts["accepted"][:50] + salts["busy"]:
        assert outcome(g, salt, 1001, "192.0.2.99") == "replay"
    # 2 x window after acceptance they expire, and each source's share is free again.
    assert outcome(g, os.urandom(32), 1000 + 2 * W + 1, "203.0.113.0") == "accepted"
    assert len(g) == 1 and g.sources() == 1


def test_salts_differ_in_their_random_tail_not_in_a_prefix() -> None:
    """A client's --prefix makes the first bytes of every salt equal: the cache keys on the rest."""
    g = ReplayGuard(W, capacity=1000)
    prefix = b"GET / HTTP/1.1\r\n"
    salts = [prefix + os.urandom(16) for _ in range(50)]
    assert {outcome(g, s, 1000, "a") for s in salts} == {"accepted"}
    assert len({fingerprint(s) for s in salts}) == 50
    assert outcome(g, salts[7], 1000, "b") == "replay"


def test_memory_per_salt_at_scale() -> None:
    """The documented ~90 bytes per entry, at a size where the per-bucket overhead is spread."""
    n = 200_000
    g = ReplayGuard(W, capacity=n)
    salts = [os.urandom(32) for _ in range(n)]
    sources = [f"10.0.{i}.1" for i in range(50)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i, salt in enumerate(salts):
            g.accept(salt, 1000 + i / 2000, 1000 + i / 2000)  # 2,000 a second for 100 s
            g._per_source[sources[i % 50]] += 0  # the per-source counters exist too
        per = (tracemalloc.get_traced_memory()[0] - base) / n
    finally:
        tracemalloc.stop()
    print(f"replay cache: {per:.0f} bytes per salt")
    assert per < 110


def test_the_start_bound_lifts_after_it_has_done_its_work() -> None:
    g = ReplayGuard(W, capacity=10, not_before=1000)
    assert outcome(g, os.urandom(32), 1001, "a") == "accepted"
    with pytest.raises(ProtocolError) as e:
        g.check_timestamp(999, 1001)
    assert e.value.status is Status.CLOCK
    g.check_timestamp(1000 + 2 * W + 1 - W, 1000 + 2 * W + 1)  # past 2 x window: lifted
    assert g.not_before is None


def test_high_water_mark_is_written_ahead_and_read_back(tmp_path: Path) -> None:
    hwm = HighWater(tmp_path / "hwm", lease=10)
    assert hwm.load() is None
    hwm.cover(1000)
    assert hwm.load() == 1010
    stamp = (tmp_path / "hwm").stat().st_mtime_ns
    hwm.cover(1009)  # under the mark: no write
    assert (tmp_path / "hwm").stat().st_mtime_ns == stamp
    hwm.cover(1011)
    assert hwm.load() == 1021
    (tmp_path / "hwm").write_bytes(b"garbage")
    with pytest.raises(ValueError):
        hwm.load()


# -- the server process --------------------------------------------------------------------------


@pytest.fixture
def target() -> Iterator[Address]:
    with closing_target() as port:
        yield Address.parse(f"127.0.0.1:{port}")


def answer(port: int, data: bytes, hs, source: str = "127.0.0.1") -> ConnectStatus | None:
    """Send a first flight from `source` and FIN; the server's status, None if it said nothing."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # a silent refusal then ends at once
        while not isinstance(event := hs.next_event(), Response):
            chunk = s.recv(hs.bytes_needed())
            if not chunk:
                return None
            hs.receive_data(chunk)
    return event.status


def silent(port: int, data: bytes) -> bool:
    """Send a first flight and FIN: True if the server closed without a byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return s.recv(65536) == b""


def test_a_full_source_is_answered_full_and_others_are_served(
    tmp_path: Path, key_file: Path, target: Address
) -> None:
    """--replay-capacity 64: a source's share is 16, its last one answered "server full"."""
    with ServerProcess(tmp_path, key_file, "--allow-private", "--replay-capacity", "64") as srv:
        got: Counter[ConnectStatus | None] = Counter()
        for _ in range(20):
            hs = flight(srv.psk, target)
            got[answer(srv.port, hs.first_flight(), hs, "127.0.3.1")] += 1
        assert got == {ConnectStatus.SUCCEEDED: 15, ConnectStatus.SERVER_FULL: 1, None: 4}
        hs = flight(srv.psk, target)
        assert answer(srv.port, hs.first_flight(), hs, "127.0.3.2") is ConnectStatus.SUCCEEDED
        stats = srv.stats()
        assert stats["counters"]["busy"] == 1 and stats["counters"]["replay-full"] == 4
        assert stats["replay"]["sources"] == 2 and stats["replay"]["share"] == 16


def test_the_client_names_a_full_server(tmp_path: Path, key_file: Path, target: Address) -> None:
    """The client's log says the server is full, not "check key, cipher and clock"."""
    srv = ServerProcess(tmp_path, key_file, "--allow-private", "--replay-capacity", "8")
    try:
        with ClientProcess(tmp_path, key_file, srv.port, "--reply", "verified") as cli:
            replies: list[int] = []
            while 1 not in replies and len(replies) < 4:  # share 2 (the client's own start-up
                s, reply = socks_open(cli.socks_port, target)  # check may take a place)
                s.close()
                replies.append(reply)
            assert replies[-1] == 1 and set(replies[:-1]) <= {0}  # served, then general failure
            wait_until(lambda: "the server is full" in cli.log(), 10, "the client's message")
            assert "clock" not in cli.log().split("the server is full")[1].split("\n")[0]
    finally:
        srv.stop()


def test_a_replay_after_a_crash_is_refused_by_the_high_water_mark(
    tmp_path: Path, key_file: Path, target: Address
) -> None:
    """A flight from a client whose clock runs 20 s ahead, accepted just before a crash (no
    clean stop, so no saved cache), replayed into the restarted server: refused, because the
    crashed process had persisted a high-water mark above its timestamp. Without the mark the
    start bound alone let it through (its stamp is after the restart)."""
    cache = tmp_path / "replay"
    ahead = lambda: time.time() + 20  # noqa: E731
    first = ServerProcess(tmp_path, key_file, "--allow-private", "--replay-file", str(cache))
    hs = flight(first.psk, target, clock=ahead)
    recorded = hs.first_flight()
    assert answer(first.port, recorded, hs) is ConnectStatus.SUCCEEDED
    first.stop(signal.SIGKILL)  # a crash: the cache is lost
    assert not cache.exists() and cache.with_name("replay.hwm").exists()
    with ServerProcess(
        tmp_path, key_file, "--allow-private", "--replay-file", str(cache)
    ) as second:
        assert silent(second.port, recorded)
        assert second.counters()["clock"] == 1
        # A client further ahead than the mark is served: the bound is the mark, not a blanket.
        later = flight(second.psk, target, clock=lambda: time.time() + 45)
        assert answer(second.port, later.first_flight(), later) is ConnectStatus.SUCCEEDED
    assert "refusing flights stamped up to" in second.log()
