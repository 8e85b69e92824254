"""SOCKS5 server side (RFC 1928) with username/password auth (RFC 1929), sans-I/O.

The client's SOCKS listener feeds received bytes in and gets back bytes to send and, finally, the
CONNECT target (or a UDP ASSOCIATE request, whose datagrams' headers `parse_udp_request` reads).
Clients may pipeline (send the request before our method reply): whatever follows the request
stays in `trailing_data` and becomes early data of the tunnel's first flight.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from mptun.common import address as addr_codec
from mptun.common.address import Address
from mptun.common.errors import ProtocolError, Status

VERSION = 0x05
AUTH_VERSION = 0x01
METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03


class Reply(enum.IntEnum):
    """REP field of a SOCKS5 reply (RFC 1928 section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


# BND.ADDR and BND.PORT when the bound address is not told: 0.0.0.0:0
_UNBOUND = Address(addr_codec.ip_or_name("0.0.0.0"), 0).encode()


def reply(code: Reply, bound: Address | None = None) -> bytes:
    """A reply: VER REP RSV BND.ADDR BND.PORT (0.0.0.0:0 when the bound address is not told)."""
    return bytes((VERSION, code, 0x00)) + (_UNBOUND if bound is None else bound.encode())


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to send to the SOCKS client now."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Connect:
    """The client asked to CONNECT to `target`; answer with `reply()` (now or after dialing)."""

    target: Address


@dataclass(frozen=True, slots=True)
class UdpAssociate:
    """The client asked for UDP ASSOCIATE (RFC 1928 section 7); `source` is the DST.ADDR and
    DST.PORT it announced: where its datagrams will come from (zeros when it does not know)."""

    source: Address


@dataclass(frozen=True, slots=True)
class UdpRequest:
    """One datagram of a UDP ASSOCIATE client: its FRAG byte, target and data."""

    frag: int
    target: Address
    data: bytes


def parse_udp_request(datagram: bytes) -> UdpRequest:
    """The RFC 1928 section 7 header of a client's datagram; SocksError when malformed."""
    # RSV (2 zero bytes), FRAG (1), the target (ATYP form), then the data
    if len(datagram) < 4 or datagram[0:2] != b"\0\0":
        raise SocksError("malformed UDP request header")
    try:
        decoded = addr_codec.decode(datagram, 3)
    except addr_codec.InvalidName as e:
        raise SocksError(str(e)) from None
    except ProtocolError:
        raise SocksError("unsupported address type in a UDP request") from None
    if decoded is None:
        raise SocksError("truncated UDP request header")
    target, end = decoded
    return UdpRequest(datagram[2], target, datagram[end:])


def udp_reply(source: Address, data: bytes) -> bytes:
    """A datagram to the client: RSV, FRAG 0, the address it came from, the data."""
    return b"\0\0\0" + source.encode() + data


class NeedData:
    pass


NEED_DATA = NeedData()


class SocksError(ProtocolError):
    """The SOCKS client sent something we refuse; `response` (maybe empty) precedes the close."""

    status = Status.SOCKS

    def __init__(self, message: str, response: bytes = b"") -> None:
        super().__init__(message)
        self.response = response


class AuthFailed(SocksError):
    """Wrong RFC 1929 credentials (`checked`), or an attempt refused unchecked (throttled)."""

    def __init__(self, message: str, response: bytes, checked: bool) -> None:
        super().__init__(message, response)
        self.checked = checked


class Socks5Handshake:
    """One SOCKS5 server-side handshake. `credentials` (user, password) turns on RFC 1929;
    `may_try()` is asked when they arrive: False refuses them without comparing (throttled)."""

    def __init__(
        self,
        credentials: tuple[str, str] | None = None,
        may_try: Callable[[], bool] | None = None,
        udp: bool = False,
    ) -> None:
        self.udp = udp  # UDP ASSOCIATE is served (else refused as not supported)
        self._creds = (
            (credentials[0].encode(), credentials[1].encode()) if credentials is not None else None
        )
        self._may_try = may_try
        self._buf = bytearray()
        self._state = "greeting"
        self._error: SocksError | None = None

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def trailing_data(self) -> bytes:
        return bytes(self._buf)

    @property
    def done(self) -> bool:
        return self._state == "request-received"

    def _fail(self, message: str, response: bytes = b"") -> SocksError:
        self._error = SocksError(message, response)
        self._state = "error"
        return self._error

    def _auth_failed(self, message: str, checked: bool) -> SocksError:
        self._error = AuthFailed(message, bytes([AUTH_VERSION, 0x01]), checked)
        self._state = "error"
        return self._error

    def next_event(self) -> NeedData | Send | Connect | UdpAssociate:
        if self._error:
            raise self._error
        buf = self._buf
        if self._state == "greeting":
            if len(buf) < 2:
                return NEED_DATA
            if buf[0] != VERSION:
                raise self._fail(f"not SOCKS5 (first byte {buf[0]:#04x})")
            n = buf[1]
            if n == 0:
                raise self._fail("greeting offers no methods", bytes([VERSION, 0xFF]))
            if len(buf) < 2 + n:
                return NEED_DATA
            methods = set(buf[2 : 2 + n])
            del buf[: 2 + n]
            want = METHOD_USERPASS if self._creds else METHOD_NO_AUTH
            if want not in methods:
                raise self._fail(
                    "no acceptable authentication method offered",
                    bytes([VERSION, METHOD_NONE_ACCEPTABLE]),
                )
            self._state = "auth" if self._creds else "request"
            return Send(bytes([VERSION, want]))
        if self._state == "auth":
            if len(buf) < 2:
                return NEED_DATA
            if buf[0] != AUTH_VERSION:
                raise self._fail("bad username/password version", bytes([AUTH_VERSION, 0x01]))
            ulen = buf[1]
            if len(buf) < 2 + ulen + 1:
                return NEED_DATA
            plen = buf[2 + ulen]
            end = 3 + ulen + plen
            if len(buf) < end:
                return NEED_DATA
            user, password = bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : end])
            del buf[:end]
            assert self._creds is not None
            if self._may_try is not None and not self._may_try():
                raise self._auth_failed(
                    "too many wrong passwords from this address: refused without checking",
                    checked=False,
                )
            # Here: hmac imports hashlib and OpenSSL's libcrypto (~0.7 MB), needed only with auth.
            import hmac

            ok = hmac.compare_digest(user, self._creds[0]) & hmac.compare_digest(
                password, self._creds[1]
            )
            if not ok:
                raise self._auth_failed("wrong username or password", checked=True)
            self._state = "request"
            return Send(bytes([AUTH_VERSION, 0x00]))
        if self._state == "request":
            if len(buf) < 4:
                return NEED_DATA
            if buf[0] != VERSION:
                raise self._fail("bad version in request", reply(Reply.GENERAL_FAILURE))
            cmd = buf[1]
            try:
                decoded = addr_codec.decode(buf, 3)
            except addr_codec.InvalidName as e:  # refused here, never sent to the server
                raise self._fail(str(e), reply(Reply.HOST_UNREACHABLE)) from None
            except ProtocolError:
                raise self._fail(
                    "unsupported address type", reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED)
                ) from None
            if decoded is None:
                return NEED_DATA
            target, end = decoded
            del buf[:end]
            if cmd == CMD_UDP_ASSOCIATE and self.udp:
                self._state = "request-received"
                return UdpAssociate(target)
            if cmd != CMD_CONNECT:
                name = {CMD_BIND: "BIND", CMD_UDP_ASSOCIATE: "UDP ASSOCIATE"}.get(cmd, hex(cmd))
                raise self._fail(
                    f"command {name} not supported", reply(Reply.COMMAND_NOT_SUPPORTED)
                )
            self._state = "request-received"
            return Connect(target)
        return NEED_DATA
