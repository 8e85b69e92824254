"""The coalescing policy (common/relay/batching.py) on a fake clock: no sockets, no sleeps.

Each test feeds a `Batcher` events with explicit times and checks the actions it answers; the same
decisions over real sockets are tests/test_relay_coalescing.py.
"""

from __future__ import annotations

import pytest

from mptun.common.relay.batching import (
    CANCEL_READ,
    SHRINK,
    TIMER_SLACK,
    ArmQuiet,
    ArmRead,
    Batcher,
    Coalescing,
    Read,
    SetMark,
    pair,
)

C = Coalescing()  # the defaults: delay 8 ms, low_water 1 MiB, enter_after 128 KiB, small 16 KiB
BIG = 64 * 1024  # a read too large to be a reply
RCVBUF = 8 * 1024 * 1024  # a grown receive buffer: the mark is low_water


class Buffer:
    """The source socket's SO_RCVBUF as the policy asks for it (None: getsockopt failed)."""

    def __init__(self, size: int | None = RCVBUF) -> None:
        self.size = size
        self.asked = 0

    def __call__(self) -> int | None:
        self.asked += 1
        return self.size


def directions(
    c: Coalescing = C, rcvbuf: int | None = RCVBUF, frees: bool = False
) -> tuple[Batcher, Batcher, Buffer]:
    buf = Buffer(rcvbuf)
    out, back = Batcher(c, buf, frees), Batcher(c, Buffer(), frees)
    pair(out, back)
    return out, back, buf


def stream(b: Batcher, t: float = 1.0, c: Coalescing = C) -> float:
    """Reads of BIG bytes 1 ms apart until `b` streams; the time of the last one."""
    while not b.streaming:
        b.read(BIG, t)
        t += 0.001
    return t - 0.001


def test_enter_after_back_to_back_reads():
    out, _, buf = directions()
    assert out.read(BIG, 1.000) == ()
    assert buf.asked == 0  # the receive buffer is asked for only when a mark is chosen
    # 128 KiB in wakeups less than `delay` apart: the mark goes up, the timer runs
    assert out.read(BIG, 1.001) == (ArmRead(1.001 + C.delay), SetMark(C.low_water))
    assert out.streaming and out.mark == C.low_water and out.since == 1.001
    assert buf.asked == 1


def test_reads_further_apart_than_delay_do_not_add_up():
    out, _, _ = directions()
    t = 1.0
    for _ in range(10):
        assert out.read(BIG, t) == ()
        t += C.delay  # not less than `delay` apart: every read starts the count again
    assert not out.streaming and out.burst == BIG


def test_a_small_read_after_the_other_direction_spoke_is_a_reply():
    out, back, _ = directions()
    out.read(BIG, 1.000)
    back.read(64, 1.0005)  # a request the other way
    assert out.read(C.small - 1, 1.001) == ()  # a reply: the count restarts from it
    assert out.burst == C.small - 1 and not out.streaming
    # a read of `small` or more is no reply, even right after the other direction spoke
    back.read(64, 1.0015)
    assert out.read(C.small, 1.002) == ()
    assert out.burst == 2 * C.small - 1
    assert out.read(C.enter_after, 1.003) == (ArmRead(1.003 + C.delay), SetMark(C.low_water))


def test_a_reply_ends_a_stream():
    out, back, _ = directions()
    t = stream(out)
    back.read(64, t + 0.0001)
    assert out.read(64, t + 0.0002) == (CANCEL_READ, SetMark(1))
    assert not out.streaming and out.mark == 1 and out.timer_at is None


def test_a_one_way_stream_waits_longer_as_it_ages():
    """`delay` while young, then `age_share` of the stream's age up to `max_delay`; bytes the
    other way make it young again."""
    out, back, _ = directions()
    out.since = 100.0
    assert out.delay(100.1) == C.delay
    assert out.delay(102.0) == pytest.approx(0.02)  # 2 s of one-way streaming: 1% of it
    assert out.delay(160.0) == C.max_delay == 4 * C.delay  # the cap
    back.last = 159.99  # the other direction just spoke: interactive again
    assert out.delay(160.0) == C.delay
    assert C.quiet_after >= C.max_delay  # a stream never ends between two timer reads


def test_an_aged_stream_arms_its_timer_later():
    out, back, _ = directions()
    t = stream(out)
    out.timer_fired(t + C.delay, reading=True)  # the timer read (no reads in between)
    late = t + 10.0
    assert out.read(BIG, late) == (ArmRead(late + C.max_delay),)
    out.timer_at = None
    back.read(BIG, late + 0.001)  # bytes the other way: young again
    assert out.read(BIG, late + 0.002) == (ArmRead(late + 0.002 + C.delay),)


def test_the_timer_reads_when_due_and_waits_for_a_later_read():
    out, _, _ = directions()
    t = stream(out)
    assert out.timer_at == t + C.delay
    # the kernel woke the pump since (a read at t + 5 ms): wait `delay` from that read
    out.read(BIG, t + 0.005)
    assert out.timer_fired(t + C.delay, reading=True) == (ArmRead(t + 0.005 + C.delay),)
    assert out.timer_fired(t + 0.005 + C.delay, reading=True) == (Read(t + 0.005 + C.delay),)


def test_timer_slack():
    """uvloop's 1 ms clock: a timer that fires a hair before its due time counts as due, one
    more than TIMER_SLACK early is re-armed."""
    out, _, _ = directions()
    t = stream(out)
    due = t + C.delay
    assert out.timer_fired(due - TIMER_SLACK / 2, reading=True) == (Read(due - TIMER_SLACK / 2),)
    out.timer_at = None
    assert out.timer_fired(due - 2 * TIMER_SLACK, reading=True) == (ArmRead(due),)


def test_a_stall_inside_a_stream_is_looked_at_again_in_delay():
    out, _, _ = directions()
    t = stream(out)
    at = t + 0.05  # nothing for 50 ms: MPTCP reordering, not the end of the stream
    assert out.timer_fired(at, reading=True) == (Read(at),)
    assert out.found_nothing(at) == (ArmRead(at + out.delay(at)),)
    assert out.streaming


def test_quiet_for_quiet_after_ends_the_stream():
    out, _, _ = directions()
    t = stream(out)
    at = t + C.quiet_after - TIMER_SLACK / 2  # within the slack counts
    assert out.timer_fired(at, reading=True) == (Read(at),)
    assert out.found_nothing(at) == (SetMark(1),)
    assert not out.streaming and out.mark == 1 and out.burst == 0
    assert out.timer_fired(at + 1, reading=True) == ()


def test_no_timer_read_while_paused_and_resuming_rearms():
    out, _, _ = directions()
    t = stream(out)
    assert out.timer_fired(t + C.delay, reading=False) == ()  # back-pressure: reading is off
    assert out.timer_at is None
    assert out.resumed(t + 0.02) == (ArmRead(t + C.delay),)  # `delay` after the last read
    assert out.resumed(t + 0.02) == ()  # armed already


def test_the_mark_follows_the_receive_buffer():
    small = 256 * 1024
    out, _, buf = directions(rcvbuf=small)
    t = stream(out)
    assert out.mark == small // 4  # a quarter of the buffer, not low_water
    asked = buf.asked
    out.read(small // 8, t + 0.001)  # below the mark: a timer-paced read, the mark is moot
    assert buf.asked == asked
    out.read(small // 4, t + 0.002)  # the mark woke us, buffer unchanged: no setsockopt
    assert buf.asked == asked + 1 and out.mark == small // 4
    buf.size = 2 * 1024 * 1024  # autotuning grew the buffer
    assert out.read(small // 4, t + 0.003) == (SetMark(512 * 1024),)
    buf.size = 64 * 1024 * 1024
    assert out.read(512 * 1024, t + 0.004) == (SetMark(C.low_water),)  # capped at low_water
    out.read(C.low_water, t + 0.005)
    assert buf.asked == asked + 3  # at low_water the buffer is not asked again


def test_a_refused_raise_keeps_the_mark():
    out, _, buf = directions(rcvbuf=256 * 1024)
    t = stream(out)
    buf.size = 4 * 1024 * 1024
    assert out.read(64 * 1024, t + 0.001) == (SetMark(C.low_water),)
    assert out.mark_refused() == ()
    assert out.mark == 64 * 1024 and out.streaming and out.enabled
    buf.size = None  # getsockopt fails: the mark stays
    assert out.read(64 * 1024, t + 0.002) == ()


def test_a_socket_that_refuses_the_mark_relays_without_batching():
    out, _, _ = directions()
    out.read(BIG, 1.0)
    assert out.read(BIG, 1.001) == (ArmRead(1.001 + C.delay), SetMark(C.low_water))
    assert out.mark_refused() == (CANCEL_READ,)
    assert not out.enabled and not out.streaming
    assert out.read(BIG, 1.002) == () and out.timer_fired(1.01, reading=True) == ()
    # an unreadable receive buffer counts as a refusal
    out2, _, _ = directions(rcvbuf=None)
    out2.read(BIG, 1.0)
    assert out2.read(BIG, 1.001) == ()
    assert not out2.enabled


def test_coalescing_off_decides_nothing():
    out, _, buf = directions(Coalescing(delay=0), frees=True)
    for i in range(100):
        assert out.read(BIG, 1.0 + i * 0.0001) == ()
    assert out.flushed(eof=False) == () and buf.asked == 0 and out.turns == 0


def test_the_quiet_timer_frees_buffers_only_for_pumps_that_free():
    keeps, _, _ = directions(frees=False)  # a splice pump keeps its pipe: no timer at all
    keeps.read(64, 1.0)
    assert keeps.flushed(eof=False) == ()
    out, _, _ = directions(frees=True)
    out.read(64, 1.0)
    assert out.flushed(eof=False) == (ArmQuiet(1.0 + C.quiet_after),)
    assert out.flushed(eof=False) == ()  # armed already
    # bytes came since: look again quiet_after after the last read
    out.read(64, 1.05)
    assert out.quiet_fired(1.0 + C.quiet_after, pending=False, ended=False) == (
        ArmQuiet(1.05 + C.quiet_after),
    )
    # bytes still waiting to be sent: not before `delay` from now
    late = 1.05 + C.quiet_after
    assert out.quiet_fired(late, pending=True, ended=False) == (ArmQuiet(late + C.delay),)
    assert out.quiet_fired(late + C.delay, pending=False, ended=False) == (SHRINK,)
    assert out.quiet_at is None and out.flushed(eof=True) == ()
    assert out.quiet_fired(9.0, pending=False, ended=True) == ()


def test_a_streaming_pump_keeps_its_buffers():
    out, _, _ = directions(frees=True)
    t = stream(out)
    now = t + C.quiet_after
    assert out.quiet_fired(now, pending=False, ended=False) == (ArmQuiet(now + C.delay),)
