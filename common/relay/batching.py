"""When a direction's reads are batched: the coalescing policy, sans-I/O (docs/design/batching.md).

At WiFi rates a wakeup can find one ~1.4 KiB packet and costs more than the bytes it moves, so
once a direction *streams* its source socket gets a raised SO_RCVLOWAT (the kernel wakes the relay
only when that much waits, at EOF or on an error) and a timer reads what sits below the mark.

`Batcher` makes every decision and does no I/O. The pump (common/relay/base.py) tells it what
happened (events, with the loop's time) and carries out what it answers (actions):

| event | when |
|---|---|
| `read(n, now)` | a fill moved n > 0 bytes |
| `resumed(now)` | the pump starts reading again after back-pressure |
| `timer_fired(now, reading)` | the read timer fired; `reading`: the pump may read now |
| `found_nothing(at)` | the read a `Read(at)` asked for moved nothing |
| `mark_refused()` | the socket refused the last `SetMark` |
| `flushed(eof)` | the stage was flushed |
| `quiet_fired(now, pending, ended)` | the quiet timer fired |
| `stopped()` | the relay ended: every timer is cancelled |

| action | the pump |
|---|---|
| `SetMark(mark)` | sets SO_RCVLOWAT (last in an answer); on OSError reports `mark_refused()` |
| `ArmRead(at)` / `CANCEL_READ` | arms the read timer at loop time `at` / cancels it |
| `Read(at)` | fills now; if nothing moved (and the relay goes on), reports `found_nothing(at)` |
| `ArmQuiet(at)` | arms the quiet timer |
| `SHRINK` | frees its stage's buffers (`Pump.shrink`) |

The socket's receive buffer is asked for (the `rcvbuf` callable) only when a mark is chosen:
reading it is a syscall, so it is no argument of every read.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

# Seconds: a timer this close to its due time counts as due. uvloop's clock and timers have 1 ms
# resolution, so a due time computed in floats can sit a hair after the clock when the timer
# fires; re-arming for that hair spins the loop until the next millisecond (docs/design/
# batching.md, "Timers").
TIMER_SLACK = 0.001


@dataclass(frozen=True, slots=True)
class Coalescing:
    """How a streaming direction batches its reads; `delay` 0 turns batching off.

    The defaults and the figures behind them: docs/design/batching.md ("Why these defaults").
    """

    delay: float = 0.008  # longest a byte waits below the mark in a young or two-way stream
    age_share: float = 0.01  # a one-way stream's delay: this share of its age...
    max_factor: int = 4  # ...up to this many times `delay`
    low_water: int = 1024 * 1024  # SO_RCVLOWAT while streaming (at most a quarter of SO_RCVBUF)
    enter_after: int = 128 * 1024  # bytes read in wakeups < `delay` apart that make a stream
    # A stream ends after this long without bytes (at least `max_delay`), not at the first empty
    # timer read: MPTCP's reordering stalls in-sequence data for tens of ms, and flipping the mark
    # at each stall cost more than no batching (docs/design/batching.md, "End of a stream").
    quiet: float = 0.1
    # A read this small right after the other direction moved bytes is a reply, not a stream.
    small: int = 16 * 1024

    @property
    def max_delay(self) -> float:
        return self.max_factor * self.delay

    @property
    def quiet_after(self) -> float:
        return max(self.quiet, self.max_delay)

    @property
    def enabled(self) -> bool:
        return self.delay > 0 and self.low_water > 1


NO_COALESCING = Coalescing(delay=0.0)


# -- actions ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SetMark:
    """Set the source socket's SO_RCVLOWAT to `mark` (always the last action of an answer)."""

    mark: int


@dataclass(frozen=True, slots=True)
class _Timed:
    at: float  # loop time


class ArmRead(_Timed):
    """Arm the read timer at `at` (none is armed)."""

    __slots__ = ()


class Read(_Timed):
    """Fill now (the read timer at `at` found the stream due)."""

    __slots__ = ()


class ArmQuiet(_Timed):
    """Arm the quiet timer at `at` (none is armed)."""

    __slots__ = ()


class Signal(enum.Enum):
    CANCEL_READ = "cancel the read timer"
    SHRINK = "free the stage's buffers until the next fill"


CANCEL_READ: Final = Signal.CANCEL_READ
SHRINK: Final = Signal.SHRINK

Action = SetMark | ArmRead | Read | ArmQuiet | Signal
Actions = tuple[Action, ...]
NOTHING: Actions = ()


class Batcher:
    """The coalescing decisions of one direction (see the module docstring for the protocol).

    prompt (SO_RCVLOWAT 1, every wakeup reads) -> streaming once `enter_after` bytes were read in
    wakeups less than `delay` apart -> prompt again after `quiet_after` without bytes, or at a
    reply. A socket that refuses a mark to enter or leave a stream turns batching off for this
    direction for good (`enabled` false): the relay goes on without it.
    """

    def __init__(
        self,
        settings: Coalescing,
        rcvbuf: Callable[[], int | None],
        frees_when_quiet: bool = False,
    ) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self._rcvbuf = rcvbuf  # SO_RCVBUF of the source socket, None if it cannot be read
        self.frees_when_quiet = frees_when_quiet  # arm the quiet timer that frees buffers
        self.other: Batcher | None = None  # the opposite direction's (see `pair`)
        self.streaming = False
        self.mark = 1  # SO_RCVLOWAT now
        self.since = 0.0  # when the stream began
        self.last = 0.0  # when a read last moved bytes
        self.burst = 0  # bytes read in wakeups less than `delay` apart
        self.turns = 0  # reads that moved bytes: the other direction's tell a conversation
        self._other_turns = 0  # the other direction's `turns` at this one's last read
        self.timer_at: float | None = None  # the read timer, when armed
        self.quiet_at: float | None = None  # the quiet timer, when armed
        self._raised_from = 0  # > 0: the pending SetMark raises the mark from this one

    # -- events -----------------------------------------------------------------------------
    def read(self, n: int, now: float) -> Actions:
        """A fill moved n > 0 bytes. `enter_after` bytes back to back make a stream.

        A conversation is not a stream, however fast: when the other direction moved bytes since
        this one last read and this read is small, the bytes are a reply (request/response,
        keystrokes after a download). That resets the count and ends a stream, so a fast exchange
        of small messages is never held for `delay`.
        """
        if not self.enabled:
            return NOTHING
        c = self.settings
        self.turns += 1
        other = self.other.turns if self.other is not None else 0
        reply = other != self._other_turns and n < c.small
        self._other_turns = other
        mark: Actions = NOTHING
        if self.streaming:
            if reply:
                mark = self._leave()
            elif n >= self.mark < c.low_water:
                # The mark woke us (a timer-paced read leaves it moot) and is below `low_water`:
                # the buffer may have grown since, let the mark follow.
                mark = self._raise()
        elif reply:
            self.burst = n
        else:
            self.burst = self.burst + n if now - self.last < c.delay else n
            if self.burst >= c.enter_after:
                mark = self._enter(now)
        self.last = now
        if self.streaming and self.timer_at is None:
            return self._arm(self.last + self.delay(now)) + mark
        return mark

    def resumed(self, now: float) -> Actions:
        """Reading resumes after back-pressure: a stream's timer runs again."""
        if self.enabled and self.streaming and self.timer_at is None:
            return self._arm(self.last + self.delay(now))
        return NOTHING

    def timer_fired(self, now: float, reading: bool) -> Actions:
        """`delay` after the last read: read what waits below the mark.

        Not while the pump is paused for back-pressure or has ended (`reading` false): reading
        resumes, and re-arms, once the drain has made room.
        """
        self.timer_at = None
        if not self.enabled or not self.streaming or not reading:
            return NOTHING
        due = self.last + self.delay(now)
        if due - now > TIMER_SLACK:  # a read since the timer was set: `delay` from that one
            return self._arm(due)
        return (Read(now),)

    def found_nothing(self, at: float) -> Actions:
        """The timer's read at `at` moved nothing: quiet for `quiet_after` ends the stream,
        a shorter stall inside it is looked at again in `delay`."""
        if at - self.last >= self.settings.quiet_after - TIMER_SLACK:
            return self._leave()
        return self._arm(at + self.delay(at))

    def mark_refused(self) -> Actions:
        """The socket refused the last `SetMark`: a raised mark stays where it was; a socket
        that refuses the mark to enter or leave a stream relays without batching."""
        if self._raised_from:
            self.mark, self._raised_from = self._raised_from, 0
            return NOTHING
        self.enabled = False
        self.streaming = False
        return self._cancel()

    def flushed(self, eof: bool) -> Actions:
        """The stage is empty: a pump that frees buffers looks again `quiet_after` after the
        last read."""
        if self.frees_when_quiet and self.quiet_at is None and self.enabled and not eof:
            self.quiet_at = self.last + self.settings.quiet_after
            return (ArmQuiet(self.quiet_at),)
        return NOTHING

    def quiet_fired(self, now: float, pending: bool, ended: bool) -> Actions:
        """Free the stage once the direction has been quiet for `quiet_after`, not after every
        message: reallocating per message made a 64-byte round trip through the aead engine
        cost ~3x one through splice (docs/design/batching.md, "Freeing idle buffers")."""
        self.quiet_at = None
        if not self.enabled or ended:
            return NOTHING
        c = self.settings
        due = self.last + c.quiet_after
        if self.streaming or pending or due - now > TIMER_SLACK:
            self.quiet_at = max(due, now + c.delay)
            return (ArmQuiet(self.quiet_at),)
        return (SHRINK,)

    def stopped(self) -> None:
        """The relay ended and the pump cancelled its timers."""
        self.timer_at = self.quiet_at = None

    # -- decisions ----------------------------------------------------------------------------
    def delay(self, now: float) -> float:
        """How long a byte may wait below the mark now: `delay`, growing with the age of a
        one-way stream (counted from its start or the other direction's last bytes) to
        `age_share` of it, up to `max_delay`."""
        c = self.settings
        since = self.since
        if self.other is not None and self.other.last > since:
            since = self.other.last
        return min(c.max_delay, max(c.delay, (now - since) * c.age_share))

    def fitting_mark(self, rcvbuf: int) -> int:
        """`low_water`, or less while the receive buffer is small: at most a quarter of it.

        A mark the buffer cannot hold twice over makes the kernel grow the buffer *and clamp
        the window to the mark* (net/ipv4/tcp.c tcp_set_rcvlowat; net/mptcp/sockopt.c
        mptcp_set_rcvlowat sets every subflow's window_clamp, upstream 5684ab1a0eff "mptcp:
        give rcvlowat some love"): the transfer then waits for the timer at every read
        (docs/design/batching.md, "The mark follows the buffer"). A quarter of sk_rcvbuf is
        below the window the buffer already allows; as autotuning grows the buffer, `read`
        raises the mark with it.
        """
        return max(1, min(self.settings.low_water, rcvbuf // 4))

    def _enter(self, now: float) -> Actions:
        rcvbuf = self._rcvbuf()
        if rcvbuf is None:  # as a refused mark
            self._raised_from = 0
            return self.mark_refused()
        self.streaming, self.since, self.burst = True, now, 0
        return self._set(self.fitting_mark(rcvbuf), raise_from=0)

    def _leave(self) -> Actions:
        self.streaming, self.burst = False, 0
        return self._cancel() + self._set(1, raise_from=0)

    def _raise(self) -> Actions:
        rcvbuf = self._rcvbuf()
        if rcvbuf is None:
            return NOTHING  # the mark set when the stream began stays
        mark = self.fitting_mark(rcvbuf)
        return self._set(mark, raise_from=self.mark) if mark > self.mark else NOTHING

    def _set(self, mark: int, raise_from: int) -> Actions:
        self.mark, self._raised_from = mark, raise_from
        return (SetMark(mark),)

    def _arm(self, at: float) -> Actions:
        self.timer_at = at
        return (ArmRead(at),)

    def _cancel(self) -> Actions:
        if self.timer_at is None:
            return NOTHING
        self.timer_at = None
        return (CANCEL_READ,)


def pair(out: Batcher, back: Batcher) -> None:
    """Each direction's decisions read the other's: its reads tell a reply, its last bytes make
    a one-way stream young again."""
    out.other, back.other = back, out
