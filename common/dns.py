"""DNS messages (RFC 1035 section 4), sans-I/O: parse, rewrite for a cache, frame for TCP.

Only what a forwarding cache needs: the header, the questions, every resource record's position
(to age TTLs in place) and the SOA MINIMUM for negative caching (RFC 2308 section 5). Anything
malformed raises `ProtocolError` and nothing else: names that run past the end, compression
pointers that do not point backwards (the loop guard: each pointer must go to an earlier offset
than the one it sits at), names longer than 255 octets, counts larger than the message.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from mptun.common.errors import ProtocolError, Status

HEADER_LEN = 12
MAX_NAME_LEN = 255  # octets of the wire form, root label included (RFC 1035 3.1)
MAX_UDP_PLAIN = 512  # UDP payload limit without EDNS (RFC 1035 4.2.1)
MAX_TCP_MESSAGE = 0xFFFF

QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
CD = 0x0010
RCODE_MASK = 0x000F
EDNS_DO = 0x8000  # in the OPT record's TTL field (RFC 6891 6.1.3)

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class Type(enum.IntEnum):
    """The record types this module looks at (any other number is carried as is)."""

    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    TXT = 16
    AAAA = 28
    OPT = 41


class Section(enum.IntEnum):
    ANSWER = 1
    AUTHORITY = 2
    ADDITIONAL = 3


@dataclass(frozen=True, slots=True)
class Question:
    name: bytes  # uncompressed wire form, ASCII letters lowered (the cache key's part)
    qtype: int
    qclass: int

    @property
    def text(self) -> str:
        """The name for logs: dotted labels, odd bytes escaped."""
        return name_text(self.name)


@dataclass(frozen=True, slots=True)
class Record:
    section: Section
    name: bytes
    rtype: int
    rclass: int
    ttl: int
    ttl_offset: int  # where the TTL sits in the message, to age it in place
    rdata_offset: int
    rdata_len: int


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...]
    records: tuple[Record, ...]
    soa_minimum: int | None  # min(SOA TTL, SOA MINIMUM) of the authority section's SOA

    @property
    def is_response(self) -> bool:
        return bool(self.flags & QR)

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK

    @property
    def truncated(self) -> bool:
        return bool(self.flags & TC)

    def section(self, which: Section) -> list[Record]:
        return [r for r in self.records if r.section == which]

    @property
    def opt(self) -> Record | None:
        for r in self.records:
            if r.rtype == Type.OPT and r.section == Section.ADDITIONAL:
                return r
        return None

    @property
    def udp_limit(self) -> int:
        """Largest UDP answer the sender of this query accepts (EDNS payload size, or 512)."""
        opt = self.opt
        return max(MAX_UDP_PLAIN, opt.rclass) if opt else MAX_UDP_PLAIN

    @property
    def dnssec_ok(self) -> bool:
        opt = self.opt
        return bool(opt and opt.ttl & EDNS_DO)


def _bad(why: str) -> ProtocolError:
    return ProtocolError(f"malformed DNS message: {why}", Status.PROTOCOL)


def read_name(data: bytes, offset: int) -> tuple[bytes, int]:
    """Decode the (possibly compressed) name at `offset`: (wire form lowered, offset after it)."""
    labels: list[bytes] = []
    length = 1  # the root label
    end: int | None = None  # where the name ends in the message: after its first pointer
    pos = offset
    while True:
        if pos >= len(data):
            raise _bad("name runs past the end")
        n = data[pos]
        kind = n & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(data):
                raise _bad("compression pointer runs past the end")
            target = ((n & 0x3F) << 8) | data[pos + 1]
            if end is None:
                end = pos + 2
            if target >= pos:  # only backwards: no loops, and each hop shortens the way
                raise _bad("compression pointer does not point backwards")
            pos = target
            continue
        if kind:
            raise _bad(f"reserved label type {kind:#x}")
        if n == 0:
            break
        if pos + 1 + n > len(data):
            raise _bad("label runs past the end")
        length += n + 1
        if length > MAX_NAME_LEN:
            raise _bad("name longer than 255 octets")
        labels.append(data[pos + 1 : pos + 1 + n].lower())
        pos += 1 + n
    wire = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    return wire, (pos + 1 if end is None else end)


def name_text(wire: bytes) -> str:
    """An uncompressed wire-form name as dotted text ('.' for the root)."""
    out: list[str] = []
    pos = 0
    while pos < len(wire) and wire[pos]:
        n = wire[pos]
        label = wire[pos + 1 : pos + 1 + n]
        out.append(
            "".join(chr(b) if 0x21 <= b < 0x7F and b not in b".\\" else f"\\{b:03d}" for b in label)
        )
        pos += 1 + n
    return ".".join(out) + "." if out else "."


def encode_name(text: str) -> bytes:
    """Dotted ASCII text as an uncompressed wire-form name (for building queries)."""
    labels = [p for p in text.rstrip(".").split(".") if p] if text not in ("", ".") else []
    out = b""
    for label in labels:
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise ProtocolError(f"bad DNS label {label!r}", Status.PROTOCOL)
        out += bytes([len(raw)]) + raw
    out += b"\0"
    if len(out) > MAX_NAME_LEN:
        raise ProtocolError("DNS name longer than 255 octets", Status.PROTOCOL)
    return out


def parse(data: bytes) -> Message:
    """Parse a whole DNS message; trailing bytes after the last record are ignored."""
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise _bad("shorter than the 12-byte header")
    msg_id, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    # Every question takes at least 5 bytes and every record 11: reject impossible counts early.
    if qd * 5 + (an + ns + ar) * 11 > len(data) - HEADER_LEN:
        raise _bad("section counts larger than the message")
    pos = HEADER_LEN
    questions = []
    for _ in range(qd):
        name, pos = read_name(data, pos)
        if pos + 4 > len(data):
            raise _bad("question runs past the end")
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        pos += 4
        questions.append(Question(name, qtype, qclass))
    records = []
    soa_minimum: int | None = None
    for section, count in ((Section.ANSWER, an), (Section.AUTHORITY, ns), (Section.ADDITIONAL, ar)):
        for _ in range(count):
            name, pos = read_name(data, pos)
            if pos + _RR_FIXED.size > len(data):
                raise _bad("record runs past the end")
            rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
            ttl_offset = pos + 4
            pos += _RR_FIXED.size
            if pos + rdlen > len(data):
                raise _bad("record data runs past the end")
            records.append(Record(section, name, rtype, rclass, ttl, ttl_offset, pos, rdlen))
            if section == Section.AUTHORITY and rtype == Type.SOA and soa_minimum is None:
                soa_minimum = min(_ttl_value(ttl), _soa_minimum(data, pos, rdlen))
            pos += rdlen
    return Message(msg_id, flags, tuple(questions), tuple(records), soa_minimum)


def _soa_minimum(data: bytes, start: int, rdlen: int) -> int:
    """The MINIMUM field of SOA rdata: after two names and four 32-bit numbers."""
    end = start + rdlen
    _, pos = read_name(data[:end], start)
    _, pos = read_name(data[:end], pos)
    if pos + 20 != end:
        raise _bad("SOA record data has the wrong length")
    return _ttl_value(struct.unpack_from("!I", data, pos + 16)[0])


def _ttl_value(ttl: int) -> int:
    """TTLs with the top bit set count as zero (RFC 2181 section 8)."""
    return 0 if ttl & 0x80000000 else ttl


def cache_ttl(msg: Message) -> int | None:
    """Seconds a response may be cached, or None when it must not be.

    Only complete, single-question answers to standard queries: NOERROR with answers uses the
    smallest TTL of the answer and authority records; NXDOMAIN and NOERROR without answers use
    the SOA's negative TTL (RFC 2308 section 5) and are not cached without a SOA.
    """
    if not msg.is_response or msg.opcode != 0 or msg.truncated or len(msg.questions) != 1:
        return None
    if msg.rcode not in (Rcode.NOERROR, Rcode.NXDOMAIN):
        return None
    answers = msg.section(Section.ANSWER)
    if msg.rcode == Rcode.NOERROR and answers:
        ttls = [_ttl_value(r.ttl) for r in answers + msg.section(Section.AUTHORITY)]
        ttl = min(ttls)
    else:
        if msg.soa_minimum is None:
            return None
        ttl = msg.soa_minimum
    return ttl or None


def with_id(raw: bytes, msg_id: int) -> bytes:
    """The same message with another ID."""
    return msg_id.to_bytes(2, "big") + raw[2:]


def aged(raw: bytes, msg: Message, seconds: int) -> bytes:
    """The message with every TTL but the OPT record's lowered by `seconds` (not below 0)."""
    if seconds <= 0:
        return raw
    out = bytearray(raw)
    for r in msg.records:
        if r.rtype == Type.OPT:
            continue  # its "TTL" holds EDNS flags
        struct.pack_into("!I", out, r.ttl_offset, max(0, _ttl_value(r.ttl) - seconds))
    return bytes(out)


def question_end(raw: bytes) -> int:
    """Offset right after the question section (the header and questions of a message)."""
    msg_qd = _HEADER.unpack_from(raw)[2]
    pos = HEADER_LEN
    for _ in range(msg_qd):
        _, pos = read_name(raw, pos)
        pos += 4
    return pos


def reply_header_only(raw_query: bytes, query: Message, rcode: int, extra_flags: int = 0) -> bytes:
    """A reply to `query` carrying only its question: for errors and truncated answers."""
    flags = QR | (query.flags & (OPCODE_MASK | RD | CD)) | RA | extra_flags | (rcode & RCODE_MASK)
    end = question_end(raw_query)
    qd = len(query.questions)
    return _HEADER.pack(query.id, flags, qd, 0, 0, 0) + raw_query[HEADER_LEN:end]


def truncated_for_udp(raw_response: bytes, response: Message, limit: int) -> bytes:
    """The response as is if it fits `limit`, else its header and question with TC set.

    The client then asks again over TCP (RFC 1035 4.2.1, RFC 7766 section 5).
    """
    if len(raw_response) <= limit:
        return raw_response
    flags = response.flags | TC
    end = question_end(raw_response)
    return (
        _HEADER.pack(response.id, flags, len(response.questions), 0, 0, 0)
        + raw_response[HEADER_LEN:end]
    )


def build_query(name: str, qtype: int = Type.A, msg_id: int = 0, rd: bool = True) -> bytes:
    """A standard query for one name (tests, probes)."""
    header = _HEADER.pack(msg_id, RD if rd else 0, 1, 0, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, 1)


class TcpFramer:
    """DNS over TCP framing (RFC 1035 4.2.2): each message behind a 2-byte big-endian length."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> bytes | None:
        """The next complete message, or None until more bytes come."""
        if len(self._buf) < 2:
            return None
        n = int.from_bytes(self._buf[:2], "big")
        if len(self._buf) < 2 + n:
            return None
        msg = bytes(self._buf[2 : 2 + n])
        del self._buf[: 2 + n]
        return msg

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @staticmethod
    def frame(message: bytes) -> bytes:
        if len(message) > MAX_TCP_MESSAGE:
            raise ProtocolError("DNS message too long for TCP framing", Status.PROTOCOL)
        return len(message).to_bytes(2, "big") + message
