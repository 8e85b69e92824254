"""What every parser must do with any input: parse it or raise the project's ProtocolError.

Each target takes raw fuzz bytes (and a way to cut them into chunks), drives one sans-I/O parser
and raises AssertionError when the contract breaks; any exception that is neither ProtocolError
nor AssertionError escapes and fails the run as well. The handshake targets seal the fuzz bytes
with the real key, so the fuzzer reaches the parsing behind the AEAD instead of stopping at it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from mptun.client import socks5
from mptun.common import address as addr_codec
from mptun.common import dns, records
from mptun.common.crypto import CIPHERS, KEY_LEN, nonce
from mptun.common.errors import ProtocolError
from mptun.common.handshake import (
    REQUEST_FIXED_LEN,
    RESPONSE_FIXED_LEN,
    SALT_LEN,
    BadTarget,
    CheckRequest,
    ClientHandshake,
    NeedData,
    Request,
    Response,
    ServerEvent,
    ServerHandshake,
    Unsupported,
    _request_key,
    _response_key,
)
from mptun.common.replay import ReplayGuard

PSK = bytes(range(KEY_LEN))
CIPHER = CIPHERS["aes-256-gcm"]
NOW = 1_800_000_000
TARGET = addr_codec.Address(addr_codec.ip_or_name("192.0.2.1"), 443)

Chunker = Callable[[bytes], Iterator[bytes]]


def whole(data: bytes) -> Iterator[bytes]:
    yield data


def chunks_of(sizes: list[int]) -> Chunker:
    """Cut data into pieces of the given sizes (cycled), so parsers see every split point."""

    def cut(data: bytes) -> Iterator[bytes]:
        i = k = 0
        while i < len(data):
            n = max(1, sizes[k % len(sizes)]) if sizes else len(data)
            yield data[i : i + n]
            i += n
            k += 1

    return cut


def _drive(machine, data: bytes, chunker: Chunker, done: type | tuple[type, ...]) -> object | None:
    """Feed chunks while the machine wants data; return its event, or None if it still waits."""
    for piece in chunker(data):
        machine.receive_data(piece)
        event = machine.next_event()
        if isinstance(event, done):
            return event
        assert isinstance(event, NeedData), event
        assert machine.bytes_needed() > 0
    return None


def sealed_request(fixed: bytes, variable: bytes, salt: bytes = b"\x07" * SALT_LEN) -> bytes:
    """A first flight whose two sealed parts carry exactly the given plaintexts."""
    aead = CIPHER.new(_request_key(PSK, salt))
    fixed = fixed[:REQUEST_FIXED_LEN].ljust(REQUEST_FIXED_LEN, b"\0")
    return salt + aead.encrypt(nonce(0), fixed, None) + aead.encrypt(nonce(1), variable, None)


def server_handshake(data: bytes, chunker: Chunker = whole) -> ServerEvent | None:
    """Raw bytes (mostly failing authentication) into the server's handshake."""
    hs = ServerHandshake(PSK, CIPHER, ReplayGuard(), clock=lambda: NOW)
    done = (Request, BadTarget, CheckRequest, Unsupported)  # a check, a type unknown here
    try:
        event = _drive(hs, data, chunker, done)
    except ProtocolError:
        return None
    if event is not None:
        assert isinstance(event, done)
    return event  # type: ignore[return-value]


def server_plaintext(fixed: bytes, variable: bytes, fix_length: bool, chunker: Chunker = whole):
    """Authenticated but arbitrary request contents: the parser behind the AEAD."""
    if fix_length:  # make the declared length match, so the variable part gets parsed
        head = bytearray(fixed[:REQUEST_FIXED_LEN].ljust(REQUEST_FIXED_LEN, b"\0"))
        head[0] = 0x01
        head[1:9] = NOW.to_bytes(8, "big")
        head[9:11] = len(variable).to_bytes(2, "big")
        fixed = bytes(head)
    if len(variable) > 0xFFFF:
        variable = variable[:0xFFFF]
    request = server_handshake(sealed_request(fixed, variable), chunker)
    if isinstance(request, Request):  # what parsed must re-encode to the bytes it came from
        assert request.target.encode() in variable
        assert variable.endswith(request.early_data)
    return request


def client_response(
    salt_s: bytes, fixed: bytes, padding: bytes, fix_length: bool, chunker: Chunker = whole
) -> Response | None:
    """Authenticated but arbitrary response contents into the client's handshake."""
    hs = ClientHandshake(PSK, CIPHER, TARGET, clock=lambda: NOW, urandom=lambda n: b"\x05" * n)
    hs.first_flight()
    salt_s = salt_s[:SALT_LEN].ljust(SALT_LEN, b"\0")
    fixed = fixed[:RESPONSE_FIXED_LEN].ljust(RESPONSE_FIXED_LEN, b"\0")
    if fix_length:
        fixed = bytes([0x02, fixed[1]]) + len(padding).to_bytes(2, "big")
    aead = CIPHER.new(_response_key(PSK, b"\x05" * SALT_LEN, salt_s))
    data = salt_s + aead.encrypt(nonce(0), fixed, None) + aead.encrypt(nonce(1), padding, None)
    try:
        return _drive(hs, data, chunker, Response)  # type: ignore[return-value]
    except ProtocolError:
        return None


def socks(data: bytes, chunker: Chunker = whole, with_auth: bool = False) -> object | None:
    """A SOCKS5 client's bytes into the listener's parser."""
    hs = socks5.Socks5Handshake(("user", "pass") if with_auth else None)
    try:
        for piece in chunker(data):
            hs.receive_data(piece)
            while True:
                event = hs.next_event()
                if isinstance(event, socks5.Connect):
                    return event
                if isinstance(event, socks5.Send):
                    assert event.data[:1] in (b"\x05", b"\x01")
                    continue
                assert isinstance(event, socks5.NeedData)
                break
    except socks5.SocksError as e:
        assert isinstance(e, ProtocolError)
        assert isinstance(e.response, bytes)
    return None


def address(data: bytes, offset: int = 0) -> object | None:
    """The SOCKS5-form address codec: decode, and what decodes re-encodes to the same bytes."""
    offset = min(offset, len(data))
    try:
        decoded = addr_codec.decode(data, offset)
    except ProtocolError:
        return None
    if decoded is None:
        return None
    addr, end = decoded
    assert offset < end <= len(data)
    assert addr.encode() == bytes(data[offset:end])
    return addr


def record_stream(data: bytes, chunker: Chunker = whole) -> list[bytes] | None:
    """Raw bytes as a received record stream (mostly failing authentication)."""
    opener = records.Opener(CIPHER, PSK, PSK[:12])
    out: list[bytes] = []
    try:
        for piece in chunker(data):
            out += opener.feed(piece)
        opener.end_of_stream()
    except ProtocolError:
        return None
    assert opener.closed
    return out


def record_contents(items: list[tuple[bytes, int]], chunker: Chunker = whole) -> None:
    """Authenticated records of arbitrary content and content type (padding included)."""
    sealer = records.Sealer(CIPHER, PSK, PSK[:12])
    opener = records.Opener(CIPHER, PSK, PSK[:12])
    stream = b"".join(sealer.seal(c[: records.MAX_PLAINTEXT], t & 0xFF) for c, t in items)
    try:
        for piece in chunker(stream):
            opener.feed(piece)
        opener.end_of_stream()
    except ProtocolError:
        return


def dns_message(data: bytes) -> object | None:
    """A DNS message from the LAN or from upstream: parse, and what a cache does with it."""
    try:
        msg = dns.parse(data)
    except ProtocolError:
        return None
    for r in msg.records:  # every record's recorded position lies inside the message
        assert r.ttl_offset + 4 <= len(data)
    dns.cache_ttl(msg)
    aged = dns.aged(data, msg, 30)
    assert len(aged) == len(data)
    assert len(dns.truncated_for_udp(data, msg, dns.MAX_UDP_PLAIN)) <= max(
        len(data), dns.question_end(data)
    )
    if not msg.is_response:
        dns.reply_header_only(data, msg, 2)
    return msg


def dns_tcp(data: bytes, chunker: Chunker = whole) -> None:
    """DNS over TCP framing: any byte stream yields whole messages or waits."""
    framer = dns.TcpFramer()
    for piece in chunker(data):
        framer.receive_data(piece)
        while (m := framer.next_message()) is not None:
            dns_message(m)


TARGETS: dict[str, Callable[[bytes], object]] = {
    "server-raw": server_handshake,
    "server-plain": lambda d: server_plaintext(d[:REQUEST_FIXED_LEN], d[REQUEST_FIXED_LEN:], True),
    "server-plain-len": lambda d: server_plaintext(
        d[:REQUEST_FIXED_LEN], d[REQUEST_FIXED_LEN:], False
    ),
    "client-response": lambda d: client_response(d[:32], d[32:36], d[36:], d[:1] != b"\0"),
    "socks": socks,
    "socks-auth": lambda d: socks(d, with_auth=True),
    "address": address,
    "records": record_stream,
    "record-contents": lambda d: record_contents([(d[1:], d[0] if d else 23)]),
    "dns": dns_message,
    "dns-tcp": dns_tcp,
}


def one_input(data: bytes) -> None:
    """The atheris entry: the first byte picks the target, the rest is its input."""
    if not data:
        return
    names = sorted(TARGETS)
    TARGETS[names[data[0] % len(names)]](data[1:])


def corpus_seeds() -> list[bytes]:
    """Valid inputs to start a coverage-guided run from (one per target)."""
    names = sorted(TARGETS)
    hs = ClientHandshake(PSK, CIPHER, TARGET, clock=lambda: NOW, urandom=os.urandom)
    seeds = {
        "server-raw": hs.first_flight(b"GET / HTTP/1.1\r\n\r\n"),
        "socks": b"\x05\x01\x00\x05\x01\x00\x03\x0bexample.com\x01\xbb",
        "socks-auth": b"\x05\x01\x02\x01\x04user\x04pass\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x50",
        "address": TARGET.encode(),
        "records": records.Sealer(CIPHER, PSK, PSK[:12]).seal(b"hello")
        + records.Sealer(CIPHER, PSK, PSK[:12], seq=1).close_notify(),
        "dns": dns.build_query("example.com"),
    }
    return [bytes([names.index(n)]) + d for n, d in seeds.items()]
