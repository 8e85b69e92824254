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
            raise self._fail(
                ProtocolError(
                    f"record {self.seq} did not authenticate (tampered, reordered, replayed or "
                    "wrong key)",
                    Status.RECORD,
                )
            ) from e
        self.seq += 1
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

    def feed(self, data: bytes) -> list[bytes]:
        """Buffer received bytes; return the application data of every complete record."""
        if self._error:
            raise self._error
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= HEADER_LEN:
            try:
                n = sealed_length(self._buf)
            except ProtocolError as e:
                raise self._fail(e) from None
            if len(self._buf) < HEADER_LEN + n:
                break
            record = memoryview(bytes(self._buf[: HEADER_LEN + n]))
            del self._buf[: HEADER_LEN + n]
            plain = bytearray(n - TAG_LEN)
            k = self.open_into(record, memoryview(plain))
            if self.closed:
                if self._buf:
                    raise self._fail(ProtocolError("bytes after close_notify", Status.RECORD))
                break
            out.append(bytes(plain[:k]))
        return out

    def end_of_stream(self) -> None:
        """The transport ended: fine after close_notify, a truncation otherwise."""
        if self._error:
            raise self._error
        if not self.closed:
            what = "inside a record" if self._buf else "without close_notify"
            raise self._fail(ProtocolError(f"stream truncated {what}", Status.TRUNCATED))
