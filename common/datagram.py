"""UDP datagrams inside a tunnel's bulk stream: the frame codec, sans-I/O.

A UDP association (request type 0x04, docs/PROTOCOL.md "UDP associations") carries datagrams
both ways as a stream of frames, sealed exactly as TCP bulk data (TLS 1.3 records in encrypted
mode, as they are in plain mode):

    frame   = length (u16, the payload's) || address (SOCKS5 ATYP form, RFC 1928 section 5)
              || payload (length bytes)

From client to server the address is the datagram's target; from server to client it is the
source the datagram came from. A payload is at most `MAX_PAYLOAD` bytes (65,507: the largest
UDP payload IPv4 carries, 65,535 - 20 - 8). `encode` refuses more; `Decoder` treats a larger
length as a broken stream. A frame whose name does not parse as a host name (`a..b`) is skipped
whole (its framing is sound) and reported as a `Dropped` event; any other malformed frame ends
the stream with a `ProtocolError` carrying a `Status`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mptun.common import address as addr_codec
from mptun.common.address import Address, InvalidName
from mptun.common.errors import ProtocolError, Status, UsageError

MAX_PAYLOAD = 65535 - 20 - 8  # IPv4's largest UDP payload (RFC 791 total length, RFC 768 header)
LENGTH_LEN = 2
MAX_ADDRESS_LEN = 1 + 1 + 255 + 2  # ATYP, name length, name, port
MAX_FRAME = LENGTH_LEN + MAX_ADDRESS_LEN + MAX_PAYLOAD
# The length of an IP address field (ATYP, address, port) by ATYP: the decoder's fast path.
_IP_FIELD = {addr_codec.ATYP_IPV4: 1 + 4 + 2, addr_codec.ATYP_IPV6: 1 + 16 + 2}
ADDRESS_CACHE = 256  # address fields a decoder keeps decoded (a flow repeats its own)


class Oversize(UsageError):
    """A payload larger than `MAX_PAYLOAD`: no UDP datagram can carry it."""


@dataclass(frozen=True, slots=True)
class Datagram:
    """One datagram: its address (target upstream, source downstream) and payload."""

    address: Address
    payload: bytes


@dataclass(frozen=True, slots=True)
class Dropped:
    """A frame skipped whole: its framing was sound but its address was not (`why`)."""

    why: str
    size: int  # the payload's length


def encode(address: Address, payload: bytes) -> bytes:
    """One frame; `Oversize` for a payload no UDP datagram carries."""
    if len(payload) > MAX_PAYLOAD:
        raise Oversize(f"datagram of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    return len(payload).to_bytes(LENGTH_LEN, "big") + address.encode() + payload


def frame_size(address: Address, payload_len: int) -> int:
    """The bytes `encode` makes of a datagram (for queue accounting without encoding)."""
    return LENGTH_LEN + len(address.encode()) + payload_len


class Decoder:
    """Frames in, events out: feed stream bytes, take `Datagram`/`Dropped` events.

    Once a `ProtocolError` is raised the decoder is dead and raises it again on every call.
    Buffering is bounded by one frame (`MAX_FRAME`): a complete frame is handed out as soon as
    its last byte arrives.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self.frames = 0  # complete frames seen, dropped ones included
        # address field bytes -> Address: decoding one costs microseconds, a lookup far less
        self._addresses: dict[bytes, Address] = {}

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (0 at a frame boundary: a clean place to end)."""
        return len(self._buf)

    def _fail(self, err: ProtocolError) -> ProtocolError:
        self._error = err
        self._buf.clear()
        return err

    def feed(self, data: bytes | bytearray | memoryview) -> list[Datagram | Dropped]:
        """Take stream bytes; return the events of every frame they complete, in order."""
        if self._error:
            raise self._error
        self._buf += data
        out: list[Datagram | Dropped] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= LENGTH_LEN + 1:
            n = (buf[pos] << 8) | buf[pos + 1]
            if n > MAX_PAYLOAD:
                raise self._fail(
                    ProtocolError(
                        f"datagram frame of {n} bytes (at most {MAX_PAYLOAD})", Status.PROTOCOL
                    )
                )
            start = pos + LENGTH_LEN
            size = _IP_FIELD.get(buf[start])
            if size is not None:  # an IP address: no name rules to apply
                end = start + size
                if len(buf) < end + n:
                    break
                key = bytes(buf[start:end])
                address = self._addresses.get(key)
                if address is None:
                    decoded = addr_codec.decode(key)
                    assert decoded is not None
                    address = decoded[0]
                    if len(self._addresses) >= ADDRESS_CACHE:
                        self._addresses.clear()
                    self._addresses[key] = address
                out.append(Datagram(address, bytes(buf[end : end + n])))
                self.frames += 1
                pos = end + n
                continue
            try:
                decoded = addr_codec.decode(buf, start)
            except InvalidName as e:
                if len(buf) < e.end + n:
                    break
                out.append(Dropped(e.why, n))
                self.frames += 1
                pos = e.end + n
                continue
            except ProtocolError as e:
                raise self._fail(ProtocolError(f"datagram frame: {e}", Status.ADDRESS)) from None
            if decoded is None:
                break
            address, end = decoded
            if len(buf) < end + n:
                break
            out.append(Datagram(address, bytes(buf[end : end + n])))
            self.frames += 1
            pos = end + n
        if pos:
            del buf[:pos]
        return out

    def end_of_stream(self) -> None:
        """The stream ended: fine at a frame boundary, a truncation inside a frame."""
        if self._error:
            raise self._error
        if self._buf:
            raise self._fail(
                ProtocolError(
                    f"stream ended inside a datagram frame ({len(self._buf)} bytes)",
                    Status.TRUNCATED,
                )
            )
