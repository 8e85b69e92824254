"""The relay's skeleton: two one-way pumps driven by the event loop's readiness callbacks.

A pump moves bytes src -> dst through an intermediate stage (a pipe for splice, a buffer for copy)
with two primitives: `fill()` (src -> stage) and `drain()` (stage -> dst). The skeleton owns the
rest: back-pressure (stop reading while the stage is full, wait for the writer), half-close (EOF on
src becomes shutdown(SHUT_WR) on dst once the stage is empty), and abnormal ends (any socket error
resets both legs so the peer never mistakes a truncated stream for a complete one).

No coroutine runs per chunk: after setup the relay is a pair of callbacks per socket. When a
streaming direction's reads are batched is decided by its `Batcher` (common/relay/batching.py,
docs/design/batching.md); the pump only carries out its answers: SO_RCVLOWAT, timers, a read.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from dataclasses import dataclass, field

from mptun.common.errors import MptunError, Status
from mptun.common.mptcpinfo import live_subflows
from mptun.common.relay.batching import (
    NO_COALESCING,
    Actions,
    ArmQuiet,
    ArmRead,
    Batcher,
    Coalescing,
    Read,
    SetMark,
    Signal,
    pair,
)
from mptun.common.sockets import IPPROTO_MPTCP, arm_reset, reset

# An MPTCP tunnel whose subflows are all closed is dead, but the kernel does not always say so:
# a subflow reset without MP_FASTCLOSE is not an error of the MPTCP socket (more subflows may
# join), and before upstream's fix "mptcp: ... SO_LINGER 0 ... fastclose" (7.1, backported to
# stable) a peer closing with SO_LINGER 0 and no unread data sent no MP_FASTCLOSE. Seen here
# (6.18): a server stopped mid-transfer left a client connection with one closed subflow and no
# error, forever. So while the tunnel is quiet, look every LIVENESS_INTERVAL and end the relay
# when two looks LIVENESS_RECHECK apart find no live subflow. (A link that is down does not
# close its subflow: TCP keeps retransmitting until the user timeout, so outages are not cut.)
LIVENESS_INTERVAL = 3.0
LIVENESS_RECHECK = 1.0


@dataclass(slots=True)
class RelayStats:
    """What a relay did: bytes each way, how it ended, and why if abnormally."""

    engine: str
    to_tunnel: int = 0  # inner -> tunnel
    from_tunnel: int = 0  # tunnel -> inner
    reads: int = 0  # fills attempted, both directions (coalescing makes this small)
    clean: bool = True  # both directions ended with EOF and were flushed
    error: str | None = None  # e.g. "tunnel: connection reset", "idle timeout"
    status: Status | None = None  # for an error the peer's bytes caused (RECORD, TRUNCATED...)
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


class Pump:
    """One direction. Subclasses implement `fill`, `drain`, `pending`, `space`, `release`."""

    # True for a pump whose `shrink` frees something: only those arm the quiet timer (a splice
    # pump keeps its pipe; docs/design/batching.md, "Freeing idle buffers").
    frees_when_quiet = False

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, name: str) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.name = name  # which leg src is, for error messages: "inner" or "tunnel"
        self.peer = "tunnel" if name == "inner" else "inner"
        self.moved = 0
        self.eof = False
        self.done = False
        self._reading = False
        self._writing = False
        self.batcher = Batcher(relay.coalescing, self._rcvbuf, self.frees_when_quiet)
        self.wakeups = 0  # fills attempted (readable callbacks and timer reads)
        self._timer: asyncio.TimerHandle | None = None  # reads below the mark (`Batcher`)
        self._quiet_timer: asyncio.TimerHandle | None = None  # frees buffers when quiet

    # -- what an engine implements ------------------------------------------------------------
    def fill(self) -> int:
        """Move bytes src -> stage; 0 at EOF; BlockingIOError when nothing can move now."""
        raise NotImplementedError

    def drain(self) -> int:
        """Move bytes stage -> dst (count them in `moved`); BlockingIOError when dst is full."""
        raise NotImplementedError

    @property
    def pending(self) -> int:
        raise NotImplementedError

    @property
    def space(self) -> int:
        raise NotImplementedError

    def release(self) -> None:
        """Free the stage (close pipes). Called exactly once."""

    def shrink(self) -> None:
        """The stage is empty and the direction is not streaming: free buffers until the next
        fill (an idle connection then holds no user-space buffer). Only with coalescing on,
        which is what tells a stream (keep them) from interactive traffic."""

    def finish(self) -> None:
        """Src ended cleanly and everything is flushed: tell dst (an engine may send more first)."""
        self.dst.shutdown(socket.SHUT_WR)

    # -- the skeleton ---------------------------------------------------------------------------
    def start(self) -> None:
        self._resume_reading()

    def stop(self) -> None:
        self._pause_reading()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
            self._quiet_timer = None
        self.batcher.stopped()
        if self._writing:
            self.loop.remove_writer(self.dst_fd)
            self._writing = False

    def _resume_reading(self) -> None:
        if not self._reading and not self.eof and not self.done and self.space > 0:
            self.loop.add_reader(self.src_fd, self._on_readable)
            self._reading = True
            if self.batcher.streaming:
                self._do(self.batcher.resumed(self.loop.time()))

    def _pause_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.src_fd)
            self._reading = False

    def _on_readable(self) -> None:
        self._read()

    def _read(self) -> int:
        """One fill, then flush; the bytes moved, or -1 when nothing moved (or the relay ended)."""
        self.wakeups += 1
        try:
            n = self.fill()
        except BlockingIOError:
            # Readable but nothing moved: the stage is full in a way `space` cannot see
            # (a pipe's slots filled with partial pages). Wait for the drain to make room.
            if self.pending:
                self._pause_reading()
                self._flush()
            return -1
        except (OSError, MptunError) as e:
            self.relay.abort(self.name, e)
            return -1
        self.relay.active = True
        if n == 0:
            self.eof = True
            self._pause_reading()
        elif self.batcher.enabled:
            self._do(self.batcher.read(n, self.loop.time()))
        self._flush()
        return n

    # -- batching: the pump carries out what its `batcher` decides ------------------------------
    def _do(self, actions: Actions) -> None:
        for action in actions:
            match action:
                case ArmRead(at):
                    self._timer = self.loop.call_at(at, self._on_timer)
                case SetMark(mark):
                    try:
                        # poll reports EPOLLIN below the mark only at EOF or on an error
                        # (net/ipv4/tcp.c tcp_poll, net/mptcp/protocol.h mptcp_epollin_ready)
                        self.src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
                    except OSError:  # a socket type that refuses it
                        self._do(self.batcher.mark_refused())
                case Read(at):
                    if self._read() < 0 and not self.relay.closed and not self.pending:
                        self._do(self.batcher.found_nothing(at))
                case ArmQuiet(at):
                    self._quiet_timer = self.loop.call_at(at, self._on_quiet)
                case Signal.CANCEL_READ:
                    if self._timer is not None:
                        self._timer.cancel()
                        self._timer = None
                case Signal.SHRINK:
                    self.shrink()

    def _rcvbuf(self) -> int | None:
        try:
            return self.src.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError:
            return None

    def _on_timer(self) -> None:
        self._timer = None
        reading = self._reading and not self.eof and not self.done
        self._do(self.batcher.timer_fired(self.loop.time(), reading))

    def _on_quiet(self) -> None:
        self._quiet_timer = None
        ended = self.eof or self.done or self.relay.closed
        self._do(self.batcher.quiet_fired(self.loop.time(), self.pending > 0, ended))

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        while self.pending:
            try:
                self.drain()
            except BlockingIOError:
                if not self._writing:
                    self.loop.add_writer(self.dst_fd, self._on_writable)
                    self._writing = True
                if self.space <= 0:
                    self._pause_reading()
                return
            except (OSError, MptunError) as e:
                self.relay.abort(self.peer, e)
                return
        if self._writing:
            self.loop.remove_writer(self.dst_fd)
            self._writing = False
        self._do(self.batcher.flushed(self.eof))
        if self.eof:
            if not self.done:
                try:
                    self.finish()
                except BlockingIOError:  # the closing message did not fit: retry when writable
                    if not self._writing:
                        self.loop.add_writer(self.dst_fd, self._on_writable)
                        self._writing = True
                    return
                except (OSError, MptunError) as e:
                    self.relay.abort(self.peer, e)
                    return
                self.done = True
                self.relay.pump_done()
        else:
            self._resume_reading()


class Relay:
    """Runs two pumps over (inner, tunnel) to completion; owns and closes both sockets."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        inner: socket.socket,
        tunnel: socket.socket,
        engine: str,
        idle_timeout: float | None = None,
        coalescing: Coalescing | None = None,
    ) -> None:
        self.loop = loop
        self.coalescing = coalescing or NO_COALESCING
        self.inner, self.tunnel = inner, tunnel
        self.stats = RelayStats(engine)
        self.idle_timeout = idle_timeout
        self.active = False
        self.pumps: list[Pump] = []
        self._done = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._liveness: asyncio.TimerHandle | None = None
        self._quiet_since_look = 0  # tunnel-side wakeups at the last look
        self.closed = False

    def add_pumps(self, out: Pump, back: Pump) -> None:
        """`out` moves inner -> tunnel, `back` tunnel -> inner."""
        self.pumps = [out, back]
        pair(out.batcher, back.batcher)

    async def run(self) -> RelayStats:
        for leg in (self.inner, self.tunnel):
            arm_reset(leg)  # until a clean end, a dying process resets both far ends
        try:
            for p in self.pumps:
                p.start()
            if self.idle_timeout:
                self._timer = self.loop.call_later(self.idle_timeout, self._check_idle)
            if self.tunnel.proto == IPPROTO_MPTCP:
                self._liveness = self.loop.call_later(LIVENESS_INTERVAL, self._check_live, False)
            await self._done
        except asyncio.CancelledError:
            self.abort("relay", None, "cancelled")
            raise
        finally:
            if not self.closed:
                self.abort("relay", None, "stopped")
        return self.stats

    def _check_idle(self) -> None:
        if self.closed:
            return
        if not self.active:
            self.abort("relay", None, "idle timeout")
            return
        self.active = False
        self._timer = self.loop.call_later(self.idle_timeout, self._check_idle)  # type: ignore[arg-type]

    def _check_live(self, suspect: bool) -> None:
        """The watchdog of the module's LIVENESS_* comment."""
        self._liveness = None
        if self.closed:
            return
        back = self.pumps[1]
        if back.wakeups != self._quiet_since_look or back.eof:
            self._quiet_since_look = back.wakeups  # the tunnel spoke: it is alive
            suspect = False
        else:
            live = live_subflows(self.tunnel)
            if live == 0 and suspect:
                self.abort("tunnel", None, "tunnel: every MPTCP subflow is closed")
                return
            suspect = live == 0
        delay = LIVENESS_RECHECK if suspect else LIVENESS_INTERVAL
        self._liveness = self.loop.call_later(delay, self._check_live, suspect)

    def pump_done(self) -> None:
        if all(p.done for p in self.pumps):
            self._close(clean=True)

    def abort(self, leg: str, exc: Exception | None, reason: str | None = None) -> None:
        """End abnormally: reset both legs."""
        if self.closed:
            return
        if reason is None:
            assert exc is not None
            reason = f"{leg}: {_describe(exc)}"
        if isinstance(exc, MptunError):
            self.stats.status = exc.status
        self.stats.error = reason
        self._close(clean=False)

    def _close(self, clean: bool) -> None:
        self.closed = True
        if self._timer:
            self._timer.cancel()
        if self._liveness:
            self._liveness.cancel()
        for p in self.pumps:
            p.stop()
        out, back = self.pumps
        self.stats.to_tunnel, self.stats.from_tunnel = out.moved, back.moved
        self.stats.reads = out.wakeups + back.wakeups
        self.stats.clean = clean
        self.stats.ended = time.monotonic()
        for p in self.pumps:
            p.release()
        for s in (self.inner, self.tunnel):
            if clean:
                arm_reset(s, False)
                s.close()
            else:
                reset(s)
        if not self._done.done():
            self._done.set_result(None)


def _describe(e: Exception) -> str:
    if isinstance(e, MptunError):
        return f"{e} ({e.status.value})"
    if isinstance(e, OSError) and e.errno is not None:
        return os.strerror(e.errno).lower() + f" ({errno.errorcode.get(e.errno, e.errno)})"
    return str(e)
