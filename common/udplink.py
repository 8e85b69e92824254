"""One UDP association's tunnel connection: datagrams framed both ways, latency before buffers.

Both ends run a `DatagramLink` over the tunnel socket once the handshake is done: frames
(common/datagram.py) sealed as bulk data (TLS 1.3 records in encrypted mode, as they are in
plain mode). UDP senders do not slow down for a tunnel, so a datagram that cannot leave soon is
worth less than the next one:
- a datagram waits at most `max_delay` seconds (`DEFAULT_MAX_DELAY`, 50 ms) in the link's queue;
  an older one is dropped (counted `udp-stale`), as is one that finds `max_queue` bytes queued
  (`udp-queue-full`);
- the kernel's queue is kept short too: the link writes only while the bytes the kernel holds
  but has not sent yet (SIOCOUTQNSD, which MPTCP sockets answer too: net/mptcp/protocol.c
  `mptcp_ioctl`) are under about `UNSENT_TIME` (10 ms) of what the socket has been sending, at
  least `UNSENT_LIMIT` bytes. TCP_NOTSENT_LOWAT would do this in the kernel, but MPTCP honours
  it only from Linux 6.9. The send buffer itself stays autotuned: it holds the bytes in flight
  too, and a small one caps the rate at SO_SNDBUF per round trip (128 KiB at 50 ms is 21
  Mbit/s). Only where the kernel does not answer SIOCOUTQNSD is SO_SNDBUF made small
  (`SNDBUF`), the one bound left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable

from mptun.common.address import Address
from mptun.common.datagram import Datagram, Decoder, Dropped, Oversize, encode
from mptun.common.errors import ProtocolError, Status
from mptun.common.handshake import WireMode
from mptun.common.records import MAX_PLAINTEXT, Opener, Sealer
from mptun.common.relay.session import Session

log = logging.getLogger("mptun.udp")

SIOCOUTQNSD = 0x894B  # include/uapi/linux/sockios.h: bytes queued but not sent yet
DEFAULT_MAX_DELAY = 0.050  # seconds a datagram may wait in the link's queue
DEFAULT_MAX_QUEUE = 1 << 20  # bytes of frames queued at most, whatever their age
SNDBUF = 64 * 1024  # the tunnel socket's send buffer (the kernel doubles it: socket(7))
UNSENT_LIMIT = 32 * 1024  # unsent bytes the kernel may hold at any rate
UNSENT_TIME = 0.010  # ... or this many seconds of the socket's measured sending rate
MAX_UNSENT = 1 << 20  # and never more
POLL_MIN, POLL_MAX = 0.0005, 0.005  # seconds between two looks at a full kernel queue
RATE_WINDOW = 0.05  # seconds over which the sending rate is measured
BATCH = MAX_PLAINTEXT  # frames joined into one write (one record in encrypted mode)


def unsent_bytes(sock: socket.socket) -> int | None:
    """Bytes the kernel holds for `sock` but has not sent; None where it does not say."""
    try:
        raw = fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0")
    except OSError:
        return None
    return struct.unpack("i", raw)[0]


def shrink_send_buffer(sock: socket.socket) -> None:
    """A small SO_SNDBUF: stale datagrams must not pile up in the kernel (module docstring)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)


class DatagramLink:
    """Frames over one tunnel socket: `send` queues a datagram, `on_datagram` gets each one in.

    `on_close(error)` is called once when the link ends: None for a clean end (the peer's
    close_notify and FIN, or `close()`), else the `ProtocolError`/`OSError` that ended it.
    `counters` receives the drop counts (`udp-stale`, `udp-queue-full`, `udp-oversize`,
    `udp-bad-name`).
    """

    def __init__(
        self,
        sock: socket.socket,
        session: Session,
        on_datagram: Callable[[Address, bytes], None],
        on_close: Callable[[BaseException | None], None],
        counters: Counter[str],
        max_delay: float = DEFAULT_MAX_DELAY,
        max_queue: int = DEFAULT_MAX_QUEUE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sock = sock
        self.on_datagram, self.on_close = on_datagram, on_close
        self.counters = counters
        self.max_delay, self.max_queue, self.clock = max_delay, max_queue, clock
        self._encrypted = session.mode is WireMode.ENCRYPTED
        self._sealer: Sealer | None = session.sealer() if self._encrypted else None
        self._opener: Opener | None = session.opener() if self._encrypted else None
        self._decoder = Decoder()
        self._queue: deque[tuple[float, bytes]] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.closed = False
        self.sent = self.received = 0  # datagrams
        self.bytes_out = self.bytes_in = 0  # payload bytes
        self.dropped = 0  # datagrams this link dropped (stale, queue full, oversize)
        self._written = 0  # bytes handed to the kernel
        self._rate = 0.0  # bytes a second the kernel has been sending from the socket
        self._sample = (clock(), 0)  # (when, bytes sent by then) at the last rate sample

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if unsent_bytes(self.sock) is None:  # no SIOCOUTQNSD: a small buffer is the bound
            shrink_send_buffer(self.sock)
        self._tasks = [loop.create_task(self._reader(loop)), loop.create_task(self._writer(loop))]

    def send(self, address: Address, payload: bytes) -> bool:
        """Queue one datagram; False when it was dropped (counted) instead."""
        if self.closed:
            return False
        try:
            frame = encode(address, payload)
        except Oversize:
            self._drop("udp-oversize")
            return False
        if self._queued + len(frame) > self.max_queue:
            self._drop("udp-queue-full")
            return False
        self._queue.append((self.clock(), frame))
        self._queued += len(frame)
        self.sent += 1
        self.bytes_out += len(payload)
        self._wake.set()
        return True

    def send_frames(self, frames: bytes) -> None:
        """Queue frames already encoded (what did not fit a first flight)."""
        if frames:
            self._queue.append((self.clock(), frames))
            self._queued += len(frames)
            self._wake.set()

    def _drop(self, what: str) -> None:
        self.counters[what] += 1
        self.dropped += 1

    def _fresh_batch(self) -> bytes:
        """Frames to write now, up to `BATCH` bytes (one at least); stale ones dropped."""
        out: list[bytes] = []
        size = 0
        oldest = self.clock() - self.max_delay
        while self._queue:
            when, frame = self._queue[0]
            if when < oldest:
                self._queue.popleft()
                self._queued -= len(frame)
                self._drop("udp-stale")
                continue
            if out and size + len(frame) > BATCH:
                break
            self._queue.popleft()
            self._queued -= len(frame)
            out.append(frame)
            size += len(frame)
        return b"".join(out)

    def _backlog(self, unsent: int) -> float:
        """Seconds to wait before writing, 0 to write now: the kernel's unsent bytes against
        about UNSENT_TIME of the rate it has been sending at (measured here as it goes)."""
        now = self.clock()
        when, sent_then = self._sample
        sent = self._written - unsent
        if now - when >= RATE_WINDOW:
            rate = (sent - sent_then) / (now - when)
            self._rate = rate if rate > self._rate else (self._rate + rate) / 2
            self._sample = (now, sent)
        limit = min(MAX_UNSENT, max(UNSENT_LIMIT, self._rate * UNSENT_TIME))
        if unsent < limit:
            return 0.0
        if self._rate <= 0:
            return POLL_MAX
        return min(POLL_MAX, max(POLL_MIN, (unsent - limit / 2) / self._rate))

    def _seal(self, data: bytes) -> bytes:
        if self._sealer is None:
            return data
        seal = self._sealer.seal
        return b"".join(
            seal(data[i : i + MAX_PLAINTEXT]) for i in range(0, len(data), MAX_PLAINTEXT)
        )

    async def _writer(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                unsent = unsent_bytes(self.sock)
                if unsent is not None:
                    wait = self._backlog(unsent)
                    if wait:
                        await asyncio.sleep(wait)  # the kernel is behind: let the queue age
                        continue
                data = self._fresh_batch()
                if data:
                    wire = self._seal(data)
                    await loop.sock_sendall(self.sock, wire)
                    self._written += len(wire)
        except asyncio.CancelledError:
            raise
        except (OSError, ProtocolError) as e:
            self._end(e)

    async def _reader(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    if self._opener is not None:
                        self._opener.end_of_stream()
                    self._decoder.end_of_stream()
                    self._end(None)
                    return
                if self._opener is not None:
                    chunks = self._opener.feed(data)
                    data = chunks[0] if chunks else b""
                    if self._opener.closed:  # close_notify: the peer ended its side cleanly
                        self.feed_frames(data)
                        self._decoder.end_of_stream()
                        self._end(None)
                        return
                if data:
                    self.feed_frames(data)
        except asyncio.CancelledError:
            raise
        except (OSError, ProtocolError) as e:
            self._end(e)

    def feed_frames(self, data: bytes) -> None:
        """Hand the datagrams of frame bytes to `on_datagram` (also a first flight's frames)."""
        for event in self._decoder.feed(data):
            if isinstance(event, Dropped):
                self._drop("udp-bad-name")
                continue
            assert isinstance(event, Datagram)
            self.received += 1
            self.bytes_in += len(event.payload)
            self.on_datagram(event.address, event.payload)

    def _end(self, error: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()
        if error is None:
            self._say_goodbye()
        self.sock.close()
        self.on_close(error)

    def _say_goodbye(self) -> None:
        """A clean end: close_notify (encrypted) and FIN, best effort, never blocking."""
        try:
            if self._sealer is not None:
                self.sock.send(self._sealer.close_notify())
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """End the link cleanly (queued datagrams are dropped); `on_close(None)` follows."""
        self._end(None)


def status_of(error: BaseException | None) -> Status | None:
    """The counter a link's end adds to: None for a clean one."""
    if error is None:
        return None
    if isinstance(error, ProtocolError):
        return error.status
    return Status.RELAY
