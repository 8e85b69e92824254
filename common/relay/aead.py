"""The `aead` engine: TLS 1.3 records sealed and opened in user space (`cryptography`).

Where the bytes go, per read:
- inner -> tunnel: one `recvmsg_into` scatters up to `slots` x 16 KiB of plaintext into slots
  that keep a spare byte after each 16 KiB, pre-set to the content type, so every record's inner
  plaintext (content || 0x17) is already contiguous; each slot is sealed straight into the
  output buffer (`encrypt_into`), which one `send` writes.
- tunnel -> inner: one `recv_into` reads as many records as fit; each whole record is opened
  into the output buffer (`decrypt_into`); a trailing partial record is moved to the front.
Python does a handful of operations per 16 KiB record and none per byte. Buffers are allocated
once per connection.

An end of the inner leg becomes a sealed close_notify, then FIN; a tunnel that ends without one,
or any record that fails, aborts the relay, which resets both legs.
"""

from __future__ import annotations

import asyncio
import socket

from mptun.common.crypto import TAG_LEN
from mptun.common.errors import ProtocolError, Status
from mptun.common.records import (
    CONTENT_APPLICATION_DATA,
    FULL_RECORD,
    HEADER_LEN,
    MAX_PLAINTEXT,
    MAX_RECORD,
    Opener,
    Sealer,
    sealed_length,
)
from mptun.common.relay.base import (
    PLAIN,
    Coalescing,
    Pump,
    Relay,
    RelayStats,
    Session,
    free_buffers,
)

DEFAULT_SLOTS = 16  # records per read: 256 KiB


class SealPump(Pump):
    """Plaintext from src, records to dst."""

    def __init__(self, relay: Relay, src, dst, name: str, sealer: Sealer, slots: int) -> None:
        super().__init__(relay, src, dst, name)
        self.sealer = sealer
        self.slot = MAX_PLAINTEXT + 1
        self.slots = slots
        self.allocated = False  # buffers exist only while bytes move (see `shrink`)
        self.head = self.end = 0
        self.batch = 0  # plaintext bytes in the records now in the output buffer

    def _alloc(self) -> None:
        slots = self.slots
        self.inbuf = bytearray(self.slot * slots)
        self.inview = memoryview(self.inbuf)
        for i in range(slots):
            self.inbuf[i * self.slot + MAX_PLAINTEXT] = CONTENT_APPLICATION_DATA
        starts = range(0, self.slot * slots, self.slot)
        self.iov = [self.inview[b : b + MAX_PLAINTEXT] for b in starts]
        self.outbuf = bytearray(FULL_RECORD * slots)
        self.outview = memoryview(self.outbuf)
        self.allocated = True

    @property
    def pending(self) -> int:
        return self.end - self.head

    @property
    def space(self) -> int:
        return 0 if self.end else self.slot * self.slots

    def fill(self) -> int:
        if not self.allocated:
            self._alloc()
        n = self.src.recvmsg_into(self.iov)[0]
        if n == 0:
            record = self.sealer.close_notify()
            self.outview[: len(record)] = record
            self.head, self.end = 0, len(record)
            return 0
        full, rest = divmod(n, MAX_PLAINTEXT)
        seal, inview, outview, slot = self.sealer.seal_into, self.inview, self.outview, self.slot
        o = 0
        for i in range(full):
            o += seal(inview[i * slot : (i + 1) * slot], outview[o:])
        if rest:
            base = full * slot
            self.inbuf[base + rest] = CONTENT_APPLICATION_DATA
            o += seal(inview[base : base + rest + 1], outview[o:])
        self.head, self.end, self.batch = 0, o, n
        return n

    def drain(self) -> int:
        n = self.dst.send(self.outview[self.head : self.end])
        self.head += n
        if self.head == self.end:
            self.head = self.end = 0
            self.moved += self.batch
            self.batch = 0
        return n

    def shrink(self) -> None:
        if self.allocated and not self.end:
            self.release()

    def release(self) -> None:
        if not self.allocated:
            return
        self.allocated = False
        self.iov.clear()
        self.inview.release()
        self.outview.release()
        free_buffers(self.inbuf, self.outbuf)


class OpenPump(Pump):
    """Records from src, plaintext to dst."""

    def __init__(self, relay: Relay, src, dst, name: str, opener: Opener, size: int) -> None:
        super().__init__(relay, src, dst, name)
        self.opener = opener
        self.size = size + MAX_RECORD  # a carried partial record + one read
        self.allocated = False  # buffers exist only while bytes move (see `shrink`)
        self.have = 0  # bytes of a partial record at the front of inbuf
        self.head = self.end = 0

    def _alloc(self) -> None:
        self.inbuf = bytearray(self.size)
        self.inview = memoryview(self.inbuf)
        self.outbuf = bytearray(self.size)  # plaintext is always shorter than its records
        self.outview = memoryview(self.outbuf)
        self.allocated = True

    @property
    def pending(self) -> int:
        return self.end - self.head

    @property
    def space(self) -> int:
        return 0 if self.end else self.size - self.have

    def fill(self) -> int:
        if not self.allocated:
            self._alloc()
        inview, outview, open_into = self.inview, self.outview, self.opener.open_into
        n = self.src.recv_into(inview[self.have :])
        if n == 0:
            what = "inside a record" if self.have else "without the closing record"
            raise ProtocolError(f"stream truncated {what}", Status.TRUNCATED)
        have = self.have + n
        pos = o = 0
        buf = self.inbuf
        while have - pos >= HEADER_LEN:
            n = (buf[pos + 3] << 8) | buf[pos + 4]  # checked by open_into (sealed_length)
            size = HEADER_LEN + n
            if have - pos < size:
                sealed_length(inview[pos : pos + HEADER_LEN])  # a bad header fails at once
                break
            o += open_into(inview[pos : pos + size], outview[o : o + n - TAG_LEN])
            pos += size
            if self.opener.closed:
                if pos != have:
                    raise ProtocolError("bytes after the closing record", Status.RECORD)
                break
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

    def release(self) -> None:
        if not self.allocated:
            return
        self.allocated = False
        self.inview.release()
        self.outview.release()
        free_buffers(self.inbuf, self.outbuf)


class AeadEngine:
    """Encrypted bulk data in user space: the portable encrypted engine."""

    name = "aead"

    def __init__(
        self,
        slots: int = DEFAULT_SLOTS,
        record_limit: int | None = None,
        coalescing: Coalescing | None = None,
    ) -> None:
        self.slots = slots
        self.record_limit = record_limit  # None: the cipher's limit (tests lower it)
        self.coalescing = coalescing if coalescing is not None else Coalescing()

    async def relay(
        self,
        loop: asyncio.AbstractEventLoop,
        inner: socket.socket,
        tunnel: socket.socket,
        idle_timeout: float | None = None,
        session: Session = PLAIN,
    ) -> RelayStats:
        sealer, opener = session.sealer(self.record_limit), session.opener()
        r = Relay(loop, inner, tunnel, self.name, idle_timeout, self.coalescing)
        r.add_pumps(
            SealPump(r, inner, tunnel, "inner", sealer, self.slots),
            OpenPump(r, tunnel, inner, "tunnel", opener, self.slots * MAX_PLAINTEXT),
        )
        return await r.run()
