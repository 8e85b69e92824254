"""TLS 1.3 record protection (RFC 8446 section 5.2) for encrypted bulk data, sans-I/O.

The wire format is exactly TLS 1.3's protected record, so a Linux kTLS socket (`TLS_TX`/`TLS_RX`)
and this module interoperate byte for byte:

    record  = header || AEAD-Seal(key, nonce, inner, aad=header)
    header  = 0x17 0x03 0x03 || u16 length of the sealed part (inner + 16-byte tag)
    inner   = content || content type (1 byte) || zero padding (never sent by mptun)
    nonce   = iv XOR (64-bit big-endian sequence number, left-padded to 12 bytes)

Each direction has its own key, IV and sequence number (starting at 0, one per record). Content
types: 23 application data, 21 alert; the only alert is close_notify (level 1, description 0),
which ends a direction cleanly, so a stream cut by an attacker is told apart from a complete one.
A record that fails authentication, arrives out of order or twice, or is malformed, raises
`ProtocolError` with `Status.RECORD`; an end of stream without close_notify raises it with
`Status.TRUNCATED`. Once an error is raised the object is dead.

The `Sealer`/`Opener` fast paths (`seal_into`, `open_into`) work on caller-owned buffers so a
relay can seal and open 16 KiB records with no allocation; `seal`/`Opener.feed` are the simple
versions for tests and small messages.
"""

from __future__ import annotations

import struct
from typing import Any

from mptun.common.crypto import NONCE_LEN, TAG_LEN, CipherSpec
from mptun.common.errors import ProtocolError, Status, UsageError

HEADER_LEN = 5
MAX_PLAINTEXT = 1 << 14  # RFC 8446 5.1: 2^14 bytes of content per record
MAX_SEALED = MAX_PLAINTEXT + 256  # RFC 8446 5.2: the length field never exceeds 2^14 + 256
MAX_RECORD = HEADER_LEN + MAX_SEALED
# One full record as mptun writes it: header, 16 KiB, content type, tag.
FULL_RECORD = HEADER_LEN + MAX_PLAINTEXT + 1 + TAG_LEN
OVERHEAD = HEADER_LEN + 1 + TAG_LEN  # bytes a record adds to its content

CONTENT_ALERT = 21
CONTENT_APPLICATION_DATA = 23
OPAQUE_TYPE = 0x17  # outer type of every protected record
LEGACY_VERSION = b"\x03\x03"
ALERT_WARNING = 1
ALERT_CLOSE_NOTIFY = 0
CLOSE_NOTIFY = bytes([ALERT_WARNING, ALERT_CLOSE_NOTIFY])

SEQ_SPACE = 1 << 64
# RFC 8446 5.5: AES-GCM may protect at most 2^24.5 full-size records per key (the confidentiality
# bound of [AEAD-LIMITS]); ChaCha20-Poly1305 reaches the sequence number's end (2^64) first.
AES_GCM_RECORD_LIMIT = int(2**24.5)  # 23,726,566 records, about 388 GB of 16 KiB records
RECORD_LIMITS = {"aes-256-gcm": AES_GCM_RECORD_LIMIT, "aes-128-gcm": AES_GCM_RECORD_LIMIT}


def record_limit(cipher: CipherSpec) -> int:
    """How many records one key may seal before the connection must end (RFC 8446 5.5)."""
    return RECORD_LIMITS.get(cipher.name, SEQ_SPACE)


_HEADER = struct.Struct(">BHH")
# The header of every full record mptun seals (16 KiB of content + type + tag): constant, so a
# relay writes it once per buffer slot instead of once per record.
FULL_HEADER = _HEADER.pack(OPAQUE_TYPE, 0x0303, MAX_PLAINTEXT + 1 + TAG_LEN)


def record_nonce(iv: bytes, seq: int) -> bytes:
    """RFC 8446 5.3: the per-record nonce, the 12-byte IV XOR the padded sequence number."""
    return (int.from_bytes(iv, "big") ^ seq).to_bytes(NONCE_LEN, "big")


def record_header(sealed_len: int) -> bytes:
    """The 5 clear bytes before every protected record (also its additional data)."""
    return bytes((OPAQUE_TYPE, 3, 3, sealed_len >> 8, sealed_len & 0xFF))


def sealed_length(header: bytes | bytearray | memoryview) -> int:
    """Check a record header and return the length of the sealed part that follows it."""
    h = memoryview(header)
    if h[0] != OPAQUE_TYPE or h[1] != 3 or h[2] != 3:
        raise ProtocolError(f"not a protected record (header {bytes(h[:5]).hex()})", Status.RECORD)
    n = (h[3] << 8) | h[4]
    if n <= TAG_LEN or n > MAX_SEALED:
        raise ProtocolError(f"record length {n} out of range", Status.RECORD)
    return n


def _not_authentic(seq: int) -> ProtocolError:
    return ProtocolError(
        f"record {seq} did not authenticate (tampered, reordered, replayed or wrong key)",
        Status.RECORD,
    )


class RecordLimitReached(ProtocolError):
    """This direction sealed as many records as its cipher allows under one key."""

    status = Status.RECORD_LIMIT


class _Direction:
    """A key, an IV and the next sequence number: the state of one direction."""

    def __init__(self, cipher: CipherSpec, key: bytes, iv: bytes, seq: int = 0) -> None:
        if len(key) != cipher.key_len or len(iv) != NONCE_LEN:
            raise UsageError(f"{cipher.name} needs a {cipher.key_len}-byte key and 12-byte IV")
        self.cipher = cipher
        self.aead: Any = cipher.new(key)
        self.iv_int = int.from_bytes(iv, "big")
        self.seq = seq
        # cryptography >= 47 seals into caller buffers; older versions allocate (and we copy).
        self._into = hasattr(self.aead, "encrypt_into")

    def _nonce(self) -> bytes:
        return (self.iv_int ^ self.seq).to_bytes(NONCE_LEN, "big")


class Sealer(_Direction):
    """Seals the records of one direction."""

    def __init__(
        self, cipher: CipherSpec, key: bytes, iv: bytes, seq: int = 0, limit: int | None = None
    ) -> None:
        super().__init__(cipher, key, iv, seq)
        self.limit = record_limit(cipher) if limit is None else limit

    def seal_into(self, inner: memoryview, out: memoryview) -> int:
        """Seal `inner` (content followed by its content-type byte) into `out`; return its size.

        `out` must hold at least len(inner) + 21 bytes; the record starts at out[0]. This is the
        relay's hot path (once per 16 KiB): keep it to a few operations.
        """
        seq = self.seq
        if seq >= self.limit:
            raise RecordLimitReached(
                f"{seq} records sealed under one key: the {self.cipher.name} limit"
            )
        n = len(inner) + TAG_LEN
        header = _HEADER.pack(OPAQUE_TYPE, 0x0303, n)
        out[:HEADER_LEN] = header
        nonce = (self.iv_int ^ seq).to_bytes(NONCE_LEN, "big")
        if self._into:
            self.aead.encrypt_into(nonce, inner, header, out[HEADER_LEN : HEADER_LEN + n])
        else:
            out[HEADER_LEN : HEADER_LEN + n] = self.aead.encrypt(nonce, bytes(inner), header)
        self.seq = seq + 1
        return HEADER_LEN + n

    def seal_full(
        self, inners: list[memoryview], records: list[memoryview], sealed: list[memoryview], n: int
    ) -> None:
        """Seal inners[:n] (16 KiB of content and its type byte each) as full records.

        records[i] is the whole output record, sealed[i] its part after the header; the caller
        wrote FULL_HEADER into every record once. The relay's hot path: one nonce and one
        `encrypt_into` per record. Near the record limit it goes record by record (`seal_into`
        raises at the one that reaches it).
        """
        seq = self.seq
        if not self._into or seq + n > self.limit:
            for i in range(n):
                self.seal_into(inners[i], records[i])
            return
        encrypt, iv, header = self.aead.encrypt_into, self.iv_int, FULL_HEADER
        for i in range(n):
            encrypt((iv ^ (seq + i)).to_bytes(NONCE_LEN, "big"), inners[i], header, sealed[i])
        self.seq = seq + n

    def seal(self, content: bytes, content_type: int = CONTENT_APPLICATION_DATA) -> bytes:
        """One whole record carrying `content` (at most 16 KiB)."""
        if len(content) > MAX_PLAINTEXT:
            raise UsageError(f"a record holds at most {MAX_PLAINTEXT} bytes")
        out = bytearray(len(content) + OVERHEAD)
        n = self.seal_into(memoryview(bytes(content) + bytes([content_type])), memoryview(out))
        return bytes(out[:n])

    def close_notify(self) -> bytes:
        """The closing record: a sealed close_notify alert, sent before FIN."""
        return self.seal(CLOSE_NOTIFY, CONTENT_ALERT)


class Opener(_Direction):
    """Authenticates and opens the records of one direction, in order."""

    def __init__(self, cipher: CipherSpec, key: bytes, iv: bytes, seq: int = 0) -> None:
        super().__init__(cipher, key, iv, seq)
        self.closed = False  # close_notify received: the peer's direction ended cleanly
        self._error: ProtocolError | None = None
        self._buf = bytearray()

    def _fail(self, err: ProtocolError) -> ProtocolError:
        self._error = err
        return err

    def open_into(self, record: memoryview, out: memoryview) -> int:
        """Open one whole record (header included) into `out`; return the content length.

        `out` must hold len(record) - 21 bytes. Application data is left in out[:n]; a
        close_notify sets `closed` and returns 0. Anything else raises ProtocolError.
        """
        if self._error:
            raise self._error
        if self.closed:
            raise self._fail(ProtocolError("record after close_notify", Status.RECORD))
        if self.seq >= SEQ_SPACE:
            raise self._fail(ProtocolError("record sequence number exhausted", Status.RECORD))
        try:
            n = sealed_length(record)
        except ProtocolError as e:
            raise self._fail(e) from None
        if len(record) != HEADER_LEN + n:
            raise UsageError("open_into() needs exactly one whole record")
        inner = out if len(out) == n - TAG_LEN else out[: n - TAG_LEN]
        header, sealed = bytes(record[:HEADER_LEN]), record[HEADER_LEN:]
        try:
            if self._into:
                self.aead.decrypt_into(self._nonce(), sealed, header, inner)
            else:
                inner[:] = self.aead.decrypt(self._nonce(), bytes(sealed), bytes(header))
        except Exception as e:  # InvalidTag; the message of a failed AEAD says nothing more
            raise self._fail(_not_authentic(self.seq)) from e
        self.seq += 1
        return self._content(inner)

    def _content(self, inner: memoryview) -> int:
        """Act on an opened record's content type: the content length, 0 for close_notify."""
        last = len(inner) - 1
        ctype = inner[last]
        if ctype == 0:  # padded (RFC 8446 5.4): the type is the last non-zero byte
            stripped = bytes(inner).rstrip(b"\0")
            if not stripped:
                raise self._fail(ProtocolError("record with no content type", Status.RECORD))
            last = len(stripped) - 1
            ctype = stripped[last]
        if ctype == CONTENT_APPLICATION_DATA:
            return last
        if ctype == CONTENT_ALERT and bytes(inner[:last]) == CLOSE_NOTIFY:
            self.closed = True
            return 0
        if ctype == CONTENT_ALERT:
            raise self._fail(
                ProtocolError(f"peer sent alert {bytes(inner[:last]).hex()}", Status.RECORD)
            )
        raise self._fail(ProtocolError(f"unexpected record content type {ctype}", Status.RECORD))

    def open_records(self, view: memoryview, have: int, out: memoryview) -> tuple[int, int]:
        """Open every whole record in view[:have] into `out`, back to back.

        Returns (bytes consumed, plaintext bytes written). Stops after close_notify (bytes
        after it raise) and before a partial record, whose header is checked at once. `out`
        must hold `have` bytes. The relay's hot path: an application-data record with a
        well-formed header costs one nonce and one `decrypt_into`; anything else (alerts,
        padding, bad headers, old `cryptography`) goes through `open_into`.
        """
        if self._error or self.closed or not self._into or self.seq + have >= SEQ_SPACE:
            return self._open_each(view, have, out)
        decrypt, iv, seq = self.aead.decrypt_into, self.iv_int, self.seq
        pos = o = 0
        while have - pos >= HEADER_LEN:
            n = (view[pos + 3] << 8) | view[pos + 4]
            end = pos + HEADER_LEN + n
            if (
                end > have
                or view[pos] != OPAQUE_TYPE
                or view[pos + 1] != 3
                or view[pos + 2] != 3
                or n <= TAG_LEN
                or n > MAX_SEALED
            ):
                break
            size = n - TAG_LEN
            inner = out[o : o + size]
            nonce = (iv ^ seq).to_bytes(NONCE_LEN, "big")
            try:
                decrypt(nonce, view[pos + HEADER_LEN : end], view[pos : pos + HEADER_LEN], inner)
            except Exception as e:  # InvalidTag
                self.seq = seq
                raise self._fail(_not_authentic(seq)) from e
            seq += 1
            pos = end
            if inner[size - 1] == CONTENT_APPLICATION_DATA:
                o += size - 1
                continue
            self.seq = seq
            o += self._content(inner)
            if self.closed:
                if pos != have:
                    raise self._fail(ProtocolError("bytes after close_notify", Status.RECORD))
                return pos, o
        self.seq = seq
        if have - pos >= HEADER_LEN:  # a partial record, or one the fast path leaves alone
            p, k = self._open_each(view[pos:have], have - pos, out[o:])
            return pos + p, o + k
        return pos, o

    def _open_each(self, view: memoryview, have: int, out: memoryview) -> tuple[int, int]:
        """`open_records` one record at a time through `open_into`."""
        pos = o = 0
        while have - pos >= HEADER_LEN:
            size = HEADER_LEN + ((view[pos + 3] << 8) | view[pos + 4])
            if have - pos < size:
                try:
                    sealed_length(view[pos : pos + HEADER_LEN])  # a bad header fails at once
                except ProtocolError as e:
                    raise self._fail(e) from None
                break
            o += self.open_into(view[pos : pos + size], out[o : o + size - HEADER_LEN - TAG_LEN])
            pos += size
            if self.closed:
                if pos != have:
                    raise self._fail(ProtocolError("bytes after close_notify", Status.RECORD))
                break
        return pos, o

    def feed(self, data: bytes) -> list[bytes]:
        """Buffer received bytes; return the application data of the complete records so far.

        At most one chunk per call (the records' contents joined), through the same
        `open_records` path the relay uses.
        """
        if self._error:
            raise self._error
        self._buf += data
        have = len(self._buf)
        out = bytearray(have)
        with memoryview(self._buf) as view, memoryview(out) as o:
            pos, k = self.open_records(view, have, o)
        del self._buf[:pos]
        return [bytes(out[:k])] if k else []

    def end_of_stream(self) -> None:
        """The transport ended: fine after close_notify, a truncation otherwise."""
        if self._error:
            raise self._error
        if not self.closed:
            what = "inside a record" if self._buf else "without close_notify"
            raise self._fail(ProtocolError(f"stream truncated {what}", Status.TRUNCATED))
