"""The tunnel handshake as a sans-I/O state machine (bytes in, events and bytes out; no sockets).

`docs/PROTOCOL.md` is the byte-level specification; this module is its implementation. Both sides
are written in the style of h11: feed received bytes with `receive_data()`, pull `next_event()`
until it returns `NEED_DATA`, and read no more than `bytes_needed()` from the socket so that the
bytes after the handshake stay in the kernel (for splice now, for kTLS later).

Errors are `ProtocolError`s carrying a `Status`; once one is raised the machine is dead and raises
it again on every call.
"""

from __future__ import annotations

import enum
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from mptun.common import address as addr_codec
from mptun.common.address import Address, InvalidName
from mptun.common.crypto import (
    KEY_LEN,
    NONCE_LEN,
    TAG_LEN,
    CipherSpec,
    hkdf,
    hkdf_expand,
    hkdf_extract,
    nonce,
)
from mptun.common.errors import ConfigError, ProtocolError, Status, UsageError
from mptun.common.replay import ReplayGuard

SALT_LEN = 32
TYPE_REQUEST = 0x01  # connect to a target (docs/PROTOCOL.md, "The request")
TYPE_RESPONSE = 0x02
TYPE_CHECK = 0x03  # health check: answered at once, nothing dialled (docs/PROTOCOL.md, "Checks")
TYPE_UDP = 0x04  # a UDP association: datagrams framed in the bulk stream (common/datagram.py)
REQUEST_FIXED_LEN = 1 + 8 + 2  # type, timestamp, length of the variable part
RESPONSE_FIXED_LEN = 1 + 1 + 2  # type, status, length of the variable part
MAX_VARIABLE_LEN = 0xFFFF
# The target older `mptun client --check` asked for in a connect request (docs/PROTOCOL.md,
# "Checks"): the server still answers it NOT_ALLOWED without dialing, and logs it as a check.
CHECK_TARGET = Address(addr_codec.ip_or_name("0.0.0.0"), 0)
# Early data the client may put into its first flight (the variable part also holds address and
# padding, and must fit a u16).
MAX_EARLY_DATA = 16 * 1024
# The client may replace the first bytes of salt_c with a fixed prefix (`--prefix`, so the first
# flight starts with bytes a classifier takes for a known protocol; docs/PROTOCOL.md "Prefix").
# At least 16 bytes stay random: salt_c keys the request (K_req) and a repeated salt repeats
# K_req with the same two nonces, which under AES-GCM reveals the XOR of both plaintexts and
# the authentication key. 128 random bits make a repeat after 2^32 flights about 2^-65 likely
# (birthday bound); the replay cache keys on the whole salt, prefix included.
MAX_PREFIX_LEN = 16

LABEL_REQUEST = b"mptun v1 request"
LABEL_RESPONSE = b"mptun v1 response"
LABEL_BULK_C2S = b"mptun v1 bulk client-to-server"
LABEL_BULK_S2C = b"mptun v1 bulk server-to-client"


class WireMode(enum.IntEnum):
    """How bytes flow after the handshake."""

    PLAIN = 0  # unmodified: both ends can splice them (reveals the user's bytes to observers)
    ENCRYPTED = 1  # TLS 1.3 records (see docs/PROTOCOL.md, "Bulk data")


class ConnectStatus(enum.IntEnum):
    """The server's answer about the target. Values 0-6 equal the SOCKS5 reply codes."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TIMED_OUT = 6
    DNS_FAILURE = 7
    MODE_REFUSED = 8
    SERVER_FULL = 9  # the replay cache is (nearly) full for this source: try later
    UNSUPPORTED = 10  # authenticated, but of a request type this server does not know: too old


@dataclass(frozen=True, slots=True)
class NeedData:
    """More bytes are needed before the next event; `bytes_needed()` says how many."""


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class Request:
    """A client's authenticated first flight, as the server sees it."""

    target: Address
    mode: WireMode
    timestamp: int
    early_data: bytes


@dataclass(frozen=True, slots=True)
class BadTarget:
    """An authenticated first flight whose target name no resolver takes (`a..b`, a label of
    64 characters): the server answers it (host unreachable) instead of dialling."""

    target: str  # NAME:PORT as received, printable (other bytes as \xHH)
    why: str
    mode: WireMode
    timestamp: int


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """An authenticated health check (type 0x03): answered at once, nothing dialled."""

    timestamp: int


@dataclass(frozen=True, slots=True)
class Unsupported:
    """An authenticated first flight of a type this version does not know: answered with
    UNSUPPORTED rather than the silence that means "wrong key" (docs/PROTOCOL.md, "Versioning")."""

    type: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class UdpRequest:
    """An authenticated UDP association (type 0x04): `early_data` holds whole datagram frames
    (common/datagram.py); every datagram names its own target."""

    mode: WireMode
    timestamp: int
    early_data: bytes


# Everything the server's machine hands out once a first flight has authenticated.
ServerEvent = Request | BadTarget | CheckRequest | Unsupported | UdpRequest


@dataclass(frozen=True, slots=True)
class Response:
    """The server's authenticated answer, as the client sees it."""

    status: ConnectStatus


@dataclass(frozen=True, slots=True, repr=False)  # no repr: keys never reach a log line
class BulkKeys:
    """Per-direction key and IV for the encrypted wire mode (derived from both salts)."""

    c2s_key: bytes
    c2s_iv: bytes
    s2c_key: bytes
    s2c_iv: bytes


def derive_bulk_keys(psk: bytes, cipher: CipherSpec, salt_c: bytes, salt_s: bytes) -> BulkKeys:
    salt = salt_c + salt_s
    n = cipher.key_len + NONCE_LEN
    prk = hkdf_extract(salt, psk)  # one extract for both directions' expands
    c2s = hkdf_expand(prk, LABEL_BULK_C2S, n)
    s2c = hkdf_expand(prk, LABEL_BULK_S2C, n)
    k = cipher.key_len
    return BulkKeys(c2s[:k], c2s[k:], s2c[:k], s2c[k:])


def _request_key(psk: bytes, salt_c: bytes) -> bytes:
    return hkdf(psk, salt_c, LABEL_REQUEST, KEY_LEN)


def _response_key(psk: bytes, salt_c: bytes, salt_s: bytes) -> bytes:
    # The request salt is part of the label: a response only opens for the request it answers.
    return hkdf(psk, salt_s, LABEL_RESPONSE + salt_c, KEY_LEN)


def default_request_padding(early_data_len: int) -> int:
    """Random padding so first-flight lengths carry no fingerprint (more when nothing else)."""
    if early_data_len == 0:
        return random.randint(16, 512)
    return random.randint(0, 128)


def default_response_padding() -> int:
    return random.randint(0, 256)


def _check_psk(psk: bytes) -> None:
    if len(psk) != KEY_LEN:
        raise UsageError(f"key must be {KEY_LEN} bytes")


_ESCAPES = {"\\": 0x5C, "n": 0x0A, "r": 0x0D, "t": 0x09}


def parse_prefix(text: str) -> bytes:
    """The bytes of a `--prefix` value: printable ASCII as it is, `\\xHH` for any byte, and
    `\\r`, `\\n`, `\\t`, `\\\\`; at most `MAX_PREFIX_LEN` bytes. ConfigError says what is wrong."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            code = text[i + 1 : i + 2]
            if code == "x":
                digits = text[i + 2 : i + 4]
                if len(digits) != 2 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    raise ConfigError(f"'{text[i : i + 4]}': \\x takes two hex digits, e.g. \\x16")
                out.append(int(digits, 16))
                i += 4
                continue
            if not code:
                raise ConfigError("ends in a lone '\\' (write \\\\ for a backslash)")
            if code not in _ESCAPES:
                raise ConfigError(
                    f"unknown escape '{text[i : i + 2]}' (\\xHH, \\r, \\n, \\t and \\\\ are known)"
                )
            out.append(_ESCAPES[code])
            i += 2
            continue
        if not " " <= c <= "~":
            raise ConfigError(f"{c!r}: write bytes other than printable ASCII as \\xHH")
        out.append(ord(c))
        i += 1
    check_prefix(bytes(out))
    return bytes(out)


def check_prefix(prefix: bytes) -> None:
    """Refuse a prefix that leaves fewer than SALT_LEN - MAX_PREFIX_LEN random salt bytes."""
    if len(prefix) > MAX_PREFIX_LEN:
        raise ConfigError(
            f"{len(prefix)} bytes; at most {MAX_PREFIX_LEN}, so that {SALT_LEN - MAX_PREFIX_LEN} "
            f"of the {SALT_LEN} salt bytes stay random"
        )


class _Machine:
    """Shared plumbing: an input buffer, a sticky error and exact-length reads."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self._want = 0  # bytes the current step needs in total
        self.received = 0  # bytes the peer sent so far: any at all tell "answered" from "silent"

    def receive_data(self, data: bytes) -> None:
        self.received += len(data)
        self._buf += data

    def bytes_needed(self) -> int:
        """How many more bytes complete the current step (0 when the handshake is done)."""
        return max(0, self._want - len(self._buf))

    @property
    def trailing_data(self) -> bytes:
        """Bytes received beyond the handshake (only if the caller read more than needed)."""
        return bytes(self._buf)

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _fail(self, err: ProtocolError) -> ProtocolError:
        self._error = err
        self._want = 0
        return err

    def _open(self, aead, counter: int, sealed: bytes, what: str):
        try:
            return aead.decrypt(nonce(counter), sealed, None)
        except InvalidTag:
            raise self._fail(ProtocolError(f"{what} did not authenticate", Status.AUTH)) from None


class ServerHandshake(_Machine):
    """The server's side: parse and authenticate one first flight, then build the response."""

    def __init__(
        self,
        psk: bytes,
        cipher: CipherSpec,
        replay: ReplayGuard,
        clock: Callable[[], float] = time.time,
        padding: Callable[[], int] = default_response_padding,
        urandom: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__()
        _check_psk(psk)
        self._psk, self._cipher, self._replay = psk, cipher, replay
        self._clock, self._padding, self._urandom = clock, padding, urandom
        self._state = "salt"
        self._want = SALT_LEN
        self._aead = None
        self._salt_c = b""
        self._salt_s = b""
        self._timestamp = 0
        self._type = TYPE_REQUEST
        self._request: ServerEvent | None = None

    def next_event(self) -> NeedData | ServerEvent:
        if self._error:
            raise self._error
        if self._state == "salt":
            salt = self._take(SALT_LEN)
            if salt is None:
                return NEED_DATA
            self._salt_c = salt
            self._aead = self._cipher.new(_request_key(self._psk, salt))
            self._state, self._want = "fixed", REQUEST_FIXED_LEN + TAG_LEN
        if self._state == "fixed":
            sealed = self._take(REQUEST_FIXED_LEN + TAG_LEN)
            if sealed is None:
                return NEED_DATA
            fixed = self._open(self._aead, 0, sealed, "request header")
            # Any type authenticates the same way; an unknown one is answered UNSUPPORTED once
            # the whole flight has authenticated and passed the replay checks (below).
            self._type = fixed[0]
            self._timestamp = int.from_bytes(fixed[1:9], "big")
            var_len = int.from_bytes(fixed[9:11], "big")
            self._state, self._want = "variable", var_len + TAG_LEN
        if self._state == "variable":
            sealed = self._take(self._want)
            if sealed is None:
                return NEED_DATA
            var = self._open(self._aead, 1, sealed, "request body")
            request: ServerEvent
            if self._type == TYPE_REQUEST:
                request = self._parse_variable(var)
            elif self._type == TYPE_CHECK:
                request = CheckRequest(self._timestamp)  # its variable part is padding only
            elif self._type == TYPE_UDP:
                request = self._parse_udp(var)
            else:
                request = Unsupported(self._type, self._timestamp)
            try:
                self._replay.accept(self._salt_c, self._timestamp, self._clock())
            except ProtocolError as e:
                raise self._fail(e) from None
            self._request = request
            self._state, self._want = "received", 0
            return request
        return NEED_DATA

    def _parse_variable(self, var: bytes) -> Request | BadTarget:
        try:
            mode = WireMode(var[0]) if var else None
        except ValueError:
            mode = None
        if mode is None:
            raise self._fail(ProtocolError("unknown wire mode"))
        try:
            decoded = addr_codec.decode(var, 1)
        except InvalidName as e:  # authenticated and framed: answer it (after the replay check)
            return BadTarget(f"{e.name}:{e.port}", e.why, mode, self._timestamp)
        except ProtocolError as e:
            raise self._fail(e) from None
        except UsageError:
            decoded = None
        if decoded is None:
            raise self._fail(ProtocolError("truncated target address", Status.ADDRESS))
        target, pos = decoded
        if pos + 2 > len(var):
            raise self._fail(ProtocolError("truncated padding length"))
        pad = int.from_bytes(var[pos : pos + 2], "big")
        pos += 2 + pad
        if pos > len(var):
            raise self._fail(ProtocolError("padding longer than the request"))
        return Request(target, mode, self._timestamp, var[pos:])

    def _parse_udp(self, var: bytes) -> UdpRequest:
        """A UDP association's variable part: mode, padding length, padding, datagram frames."""
        try:
            mode = WireMode(var[0]) if var else None
        except ValueError:
            mode = None
        if mode is None:
            raise self._fail(ProtocolError("unknown wire mode"))
        if len(var) < 3:
            raise self._fail(ProtocolError("truncated padding length"))
        pos = 3 + int.from_bytes(var[1:3], "big")
        if pos > len(var):
            raise self._fail(ProtocolError("padding longer than the request"))
        return UdpRequest(mode, self._timestamp, var[pos:])

    def respond(self, status: ConnectStatus) -> bytes:
        """The response to the received request: salt, sealed fixed part, sealed padding."""
        if self._error:
            raise self._error
        if self._state != "received":
            raise UsageError("respond() before a request was received, or twice")
        self._salt_s = self._urandom(SALT_LEN)
        aead = self._cipher.new(_response_key(self._psk, self._salt_c, self._salt_s))
        pad = self._padding()
        fixed = bytes([TYPE_RESPONSE, int(status)]) + pad.to_bytes(2, "big")
        self._state = "responded"
        return (
            self._salt_s
            + aead.encrypt(nonce(0), fixed, None)
            + aead.encrypt(nonce(1), self._urandom(pad), None)
        )

    def bulk_keys(self) -> BulkKeys:
        if self._state != "responded" or self._type not in (TYPE_REQUEST, TYPE_UDP):
            raise UsageError("bulk keys exist only after the response")
        return derive_bulk_keys(self._psk, self._cipher, self._salt_c, self._salt_s)


class ClientHandshake(_Machine):
    """The client's side: build the first flight, then parse and authenticate the response."""

    def __init__(
        self,
        psk: bytes,
        cipher: CipherSpec,
        target: Address,
        mode: WireMode = WireMode.PLAIN,
        clock: Callable[[], float] = time.time,
        padding: Callable[[int], int] = default_request_padding,
        urandom: Callable[[int], bytes] = os.urandom,
        prefix: bytes = b"",
        kind: int = TYPE_REQUEST,
    ) -> None:
        super().__init__()
        _check_psk(psk)
        check_prefix(prefix)
        if not 0 <= kind <= 0xFF or kind == TYPE_RESPONSE:
            raise UsageError(f"{kind:#x} is no request type")
        # TYPE_REQUEST, TYPE_UDP (target unused), TYPE_CHECK (target and mode unused), or newer
        self._kind = kind
        self._psk, self._cipher, self._target, self._mode = psk, cipher, target, mode
        self._clock, self._padding, self._urandom = clock, padding, urandom
        self._prefix = prefix  # the first bytes of salt_c (docs/PROTOCOL.md, "Prefix")
        self._state = "idle"
        self._salt_c = b""
        self._salt_s = b""
        self._aead = None
        self._status: ConnectStatus | None = None

    @property
    def salt(self) -> bytes:
        return self._salt_c

    def first_flight(self, early_data: bytes = b"") -> bytes:
        """The request: salt, sealed fixed part, sealed variable part (target, padding, data)."""
        if self._state != "idle":
            raise UsageError("first_flight() called twice")
        if len(early_data) > MAX_EARLY_DATA:
            raise UsageError(f"early data is limited to {MAX_EARLY_DATA} bytes")
        self._salt_c = self._prefix + self._urandom(SALT_LEN - len(self._prefix))
        aead = self._cipher.new(_request_key(self._psk, self._salt_c))
        pad = self._padding(len(early_data))
        if self._kind == TYPE_REQUEST:
            var = (
                bytes([int(self._mode)])
                + self._target.encode()
                + pad.to_bytes(2, "big")
                + self._urandom(pad)
                + early_data
            )
        elif self._kind == TYPE_UDP:  # targets travel in the frames (common/datagram.py)
            var = (
                bytes([int(self._mode)]) + pad.to_bytes(2, "big") + self._urandom(pad) + early_data
            )
        else:  # a check: padding only (docs/PROTOCOL.md, "Checks")
            var = pad.to_bytes(2, "big") + self._urandom(pad) + early_data
        fixed = (
            bytes([self._kind])
            + int(self._clock()).to_bytes(8, "big")
            + len(var).to_bytes(2, "big")
        )
        self._state, self._want = "salt", SALT_LEN
        return (
            self._salt_c + aead.encrypt(nonce(0), fixed, None) + aead.encrypt(nonce(1), var, None)
        )

    def next_event(self) -> NeedData | Response:
        if self._error:
            raise self._error
        if self._state == "idle":
            raise UsageError("next_event() before first_flight()")
        if self._state == "salt":
            salt = self._take(SALT_LEN)
            if salt is None:
                return NEED_DATA
            self._salt_s = salt
            self._aead = self._cipher.new(_response_key(self._psk, self._salt_c, salt))
            self._state, self._want = "fixed", RESPONSE_FIXED_LEN + TAG_LEN
        if self._state == "fixed":
            sealed = self._take(RESPONSE_FIXED_LEN + TAG_LEN)
            if sealed is None:
                return NEED_DATA
            fixed = self._open(self._aead, 0, sealed, "response header")
            if fixed[0] != TYPE_RESPONSE:
                raise self._fail(ProtocolError(f"not a response (type {fixed[0]:#x})"))
            try:
                self._status = ConnectStatus(fixed[1])
            except ValueError:
                self._status = ConnectStatus.GENERAL_FAILURE
            self._state, self._want = "variable", int.from_bytes(fixed[2:4], "big") + TAG_LEN
        if self._state == "variable":
            sealed = self._take(self._want)
            if sealed is None:
                return NEED_DATA
            self._open(self._aead, 1, sealed, "response padding")
            self._state, self._want = "done", 0
            assert self._status is not None
            return Response(self._status)
        return NEED_DATA

    def bulk_keys(self) -> BulkKeys:
        if self._state != "done":
            raise UsageError("bulk keys exist only after the response")
        return derive_bulk_keys(self._psk, self._cipher, self._salt_c, self._salt_s)
