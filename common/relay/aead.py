"""The `aead` engine: TLS 1.3 records sealed and opened in user space (`cryptography`).

Where the bytes go, per read:
- inner -> tunnel: one `recvmsg_into` scatters up to `slots` x 16 KiB of plaintext into slots
  that keep a spare byte after each 16 KiB, pre-set to the content type, so every record's inner
  plaintext (content || 0x17) is already contiguous; each slot is sealed straight into its place
  in the output buffer (`encrypt_into`), which one `send` writes. Full records sit at fixed
  offsets with a constant header, written once: per full record Python computes a nonce and
  makes one call (`Sealer.seal_full`), with every view made at allocation.
- tunnel -> inner: one `recv_into` reads as many records as fit; `Opener.open_records` opens
  every whole record into the output buffer (`decrypt_into`); a trailing partial record is
  moved to the front.
Python does a handful of operations per 16 KiB record and none per byte. Buffers are taken
when a direction starts moving bytes and given back when it goes idle, to the engine's
`BufferPool`, which keeps a few for the next connection (common/relay/buffers.py).

An end of the inner leg becomes a sealed close_notify, then FIN; a tunnel that ends without one,
or any record that fails, aborts the relay, which resets both legs.
"""

from __future__ import annotations

import socket

from mptun.common.errors import ProtocolError, Status
from mptun.common.records import (
    CONTENT_APPLICATION_DATA,
    FULL_HEADER,
    FULL_RECORD,
    HEADER_LEN,
    MAX_PLAINTEXT,
    MAX_RECORD,
    Opener,
    Sealer,
)
from mptun.common.relay.base import Pump, Relay
from mptun.common.relay.batching import Coalescing
from mptun.common.relay.buffers import BufferPool
from mptun.common.relay.engine import PumpEngine
from mptun.common.relay.session import Session

DEFAULT_SLOTS = 64  # most records per read: 1 MiB
# A direction starts with buffers for START_SLOTS records and grows them 4x (up to `slots`) each
# time a read fills them: interactive traffic allocates little, a stream reads 1 MiB at a time
# (measured with `mptun bench`: 64 records per read cost both ends ~15% less CPU per GB than 16).
START_SLOTS = 4


class BufferPump(Pump):
    """A pump whose stage is a pair of buffers, allocated while bytes move; dst is sent
    outbuf[head:end]."""

    frees_when_quiet = True  # `shrink` unmaps its buffers
    head: int
    end: int

    @property
    def pending(self) -> int:
        return self.end - self.head


class SealPump(BufferPump):
    """Plaintext from src, records to dst."""

    def __init__(
        self, relay: Relay, src, dst, name: str, sealer: Sealer, slots: int, pool: BufferPool
    ) -> None:
        super().__init__(relay, src, dst, name)
        self.sealer, self.pool = sealer, pool
        self.slot = MAX_PLAINTEXT + 1
        self.max_slots = slots
        self.slots = min(START_SLOTS, slots)  # the buffers' size now, in records
        self.grow = False  # the last read filled the buffers: make them bigger
        self.allocated = False  # buffers exist only while bytes move (see `shrink`)
        self.head = self.end = 0
        self.batch = 0  # plaintext bytes in the records now in the output buffer
        self.short: int | None = None  # the slot whose header a short record overwrote

    def _alloc(self) -> None:
        slots = self.slots
        self.inbuf = self.pool.take(self.slot * slots)
        self.inview = memoryview(self.inbuf)
        for i in range(slots):
            self.inbuf[i * self.slot + MAX_PLAINTEXT] = CONTENT_APPLICATION_DATA
        starts = range(0, self.slot * slots, self.slot)
        self.iov = [self.inview[b : b + MAX_PLAINTEXT] for b in starts]
        self.inners = [self.inview[b : b + self.slot] for b in starts]
        self.outbuf = self.pool.take(FULL_RECORD * slots)
        self.outview = memoryview(self.outbuf)
        records = range(0, FULL_RECORD * slots, FULL_RECORD)
        for r in records:
            self.outbuf[r : r + HEADER_LEN] = FULL_HEADER
        self.records = [self.outview[r : r + FULL_RECORD] for r in records]
        self.sealed = [self.outview[r + HEADER_LEN : r + FULL_RECORD] for r in records]
        self.short = None
        self.allocated = True

    @property
    def space(self) -> int:
        return 0 if self.end else self.slot * self.slots

    def fill(self) -> int:
        if self.grow:  # the stage is empty (fill runs only then): reallocate it bigger
            self.release()
            self.slots, self.grow = min(4 * self.slots, self.max_slots), False
        if not self.allocated:
            self._alloc()
        n = self.src.recvmsg_into(self.iov)[0]
        self.grow = n == self.slots * MAX_PLAINTEXT and self.slots < self.max_slots
        if n == 0:
            record = self.sealer.close_notify()
            self.outview[: len(record)] = record
            self.head, self.end, self.short = 0, len(record), 0
            return 0
        full, rest = divmod(n, MAX_PLAINTEXT)
        self.sealer.seal_full(self.inners, self.records, self.sealed, full)
        o = full * FULL_RECORD
        if rest:
            base = full * self.slot
            self.inbuf[base + rest] = CONTENT_APPLICATION_DATA  # overwritten by later reads
            o += self.sealer.seal_into(self.inview[base : base + rest + 1], self.outview[o:])
            self.short = full
        self.head, self.end, self.batch = 0, o, n
        return n

    def drain(self) -> int:
        n = self.dst.send(self.outview[self.head : self.end])
        self.head += n
        if self.head == self.end:
            self.head = self.end = 0
            self.moved += self.batch
            self.batch = 0
            if self.short is not None:  # sent: give the slot its full record's header back
                r = self.short * FULL_RECORD
                self.outbuf[r : r + HEADER_LEN] = FULL_HEADER
                self.short = None
        return n

    def shrink(self) -> None:
        if self.allocated and not self.end:
            self.release()
            self.slots, self.grow = min(START_SLOTS, self.max_slots), False

    def release(self) -> None:
        if not self.allocated:
            return
        self.allocated = False
        for views in (self.iov, self.inners, self.records, self.sealed):
            for v in views:
                v.release()
            views.clear()
        self.inview.release()
        self.outview.release()
        self.pool.give(self.inbuf, self.outbuf)


class OpenPump(BufferPump):
    """Records from src, plaintext to dst."""

    def __init__(
        self, relay: Relay, src, dst, name: str, opener: Opener, size: int, pool: BufferPool
    ) -> None:
        super().__init__(relay, src, dst, name)
        self.opener, self.pool = opener, pool
        self.max_size = size + MAX_RECORD  # a carried partial record + one read
        self.start_size = min(START_SLOTS * MAX_PLAINTEXT, size) + MAX_RECORD
        self.size = self.start_size  # the buffers' size now
        self.grow = False  # the last read filled the buffer: make it bigger
        self.allocated = False  # buffers exist only while bytes move (see `shrink`)
        self.have = 0  # bytes of a partial record at the front of inbuf
        self.head = self.end = 0

    def _alloc(self) -> None:
        self.inbuf = self.pool.take(self.size)
        self.inview = memoryview(self.inbuf)
        self.outbuf = self.pool.take(self.size)  # plaintext is always shorter than its records
        self.outview = memoryview(self.outbuf)
        self.allocated = True

    @property
    def space(self) -> int:
        return 0 if self.end else self.size - self.have

    def fill(self) -> int:
        if self.grow:  # nothing waits to be sent (fill runs only then): keep the partial record
            carried = bytes(self.inview[: self.have])
            self.release()
            self.size, self.grow = min(4 * self.size - 3 * MAX_RECORD, self.max_size), False
            self._alloc()
            self.inview[: len(carried)] = carried
        elif not self.allocated:
            self._alloc()
        inview = self.inview
        n = self.src.recv_into(inview[self.have :])
        if n == 0:
            what = "inside a record" if self.have else "without the closing record"
            raise ProtocolError(f"stream truncated {what}", Status.TRUNCATED)
        have = self.have + n
        self.grow = have == self.size and self.size < self.max_size
        pos, o = self.opener.open_records(inview, have, self.outview)
        rest = have - pos
        if rest and pos:
            inview[:rest] = inview[pos:have]
        self.have = rest
        self.head, self.end = 0, o
        return 0 if self.opener.closed else n

    def drain(self) -> int:
        n = self.dst.send(self.outview[self.head : self.end])
        self.head += n
        self.moved += n
        if self.head == self.end:
            self.head = self.end = 0
        return n

    def shrink(self) -> None:
        if self.allocated and not self.end and not self.have:  # no partial record to keep
            self.release()
            self.size, self.grow = self.start_size, False

    def release(self) -> None:
        if not self.allocated:
            return
        self.allocated = False
        self.inview.release()
        self.outview.release()
        self.pool.give(self.inbuf, self.outbuf)


class AeadEngine(PumpEngine):
    """Encrypted bulk data in user space: the portable encrypted engine."""

    name = "aead"

    def __init__(
        self,
        slots: int = DEFAULT_SLOTS,
        record_limit: int | None = None,
        coalescing: Coalescing | None = None,
    ) -> None:
        super().__init__(coalescing)
        self.slots = slots
        self.record_limit = record_limit  # None: the cipher's limit (tests lower it)
        self.buffers = BufferPool()  # every relay's stage buffers, a few kept for the next

    def make_pumps(
        self, relay: Relay, inner: socket.socket, tunnel: socket.socket, session: Session
    ) -> tuple[Pump, Pump]:
        sealer, opener = session.sealer(self.record_limit), session.opener()  # or UsageError
        return (
            SealPump(relay, inner, tunnel, "inner", sealer, self.slots, self.buffers),
            OpenPump(
                relay, tunnel, inner, "tunnel", opener, self.slots * MAX_PLAINTEXT, self.buffers
            ),
        )
