"""The DNS message codec (sans-I/O) and the answer cache: pure tests, no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptun.client.dnscache import DnsCache, cache_key
from mptun.common import dns
from mptun.common.errors import ProtocolError
from tests.peers import A_TTL, SOA_MINIMUM, respond

ONE_Q = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0)  # a header announcing one question


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def opt_record(udp_size: int = 1232, do: bool = False) -> bytes:
    return b"\0" + struct.pack("!HHIH", 41, udp_size, 0x8000 if do else 0, 0)


def query_with_opt(name: str, qtype: int, msg_id: int, udp_size: int = 1232, do: bool = False):
    q = bytearray(dns.build_query(name, qtype, msg_id))
    struct.pack_into("!H", q, 10, 1)  # ARCOUNT
    return bytes(q) + opt_record(udp_size, do)


def test_query_round_trip():
    raw = dns.build_query("WWW.Example.test", dns.Type.AAAA, msg_id=0x1234)
    m = dns.parse(raw)
    assert m.id == 0x1234 and not m.is_response and m.opcode == 0 and m.flags & dns.RD
    assert m.questions == (dns.Question(b"\x03www\x07example\x04test\x00", 28, 1),)
    assert m.questions[0].text == "www.example.test."
    assert m.udp_limit == 512 and not m.dnssec_ok


def test_response_with_compression_and_ttls():
    raw = respond(dns.build_query("www.example.test", dns.Type.A, 7))
    m = dns.parse(raw)
    assert m.is_response and m.rcode == dns.Rcode.NOERROR
    (a,) = m.section(dns.Section.ANSWER)
    assert a.name == m.questions[0].name  # decompressed from the pointer
    assert a.ttl == A_TTL and raw[a.rdata_offset : a.rdata_offset + 4] == bytes([198, 51, 100, 80])
    assert dns.cache_ttl(m) == A_TTL


def test_negative_answer_uses_the_soa():
    m = dns.parse(respond(dns.build_query("nope.example.test", dns.Type.A, 1)))
    assert m.rcode == dns.Rcode.NXDOMAIN and m.soa_minimum == SOA_MINIMUM
    assert dns.cache_ttl(m) == SOA_MINIMUM


def test_not_cached():
    refused = dns.parse(respond(dns.build_query("other.invalid", dns.Type.A, 1)))
    assert refused.rcode == dns.Rcode.REFUSED and dns.cache_ttl(refused) is None
    q = dns.parse(dns.build_query("www.example.test", dns.Type.A, 1))
    assert dns.cache_ttl(q) is None  # not a response
    raw = bytearray(respond(dns.build_query("www.example.test", dns.Type.A, 1)))
    raw[2] |= dns.TC >> 8
    assert dns.cache_ttl(dns.parse(bytes(raw))) is None
    # NODATA without a SOA: nothing says how long to keep it
    nodata = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + dns.encode_name("a.b") + b"\0\1\0\1"
    assert dns.cache_ttl(dns.parse(nodata)) is None
    # a TTL with the top bit set counts as zero (RFC 2181 8)
    raw = bytearray(respond(dns.build_query("www.example.test", dns.Type.A, 1)))
    a = dns.parse(bytes(raw)).records[0]
    struct.pack_into("!I", raw, a.ttl_offset, 0x80000005)
    assert dns.cache_ttl(dns.parse(bytes(raw))) is None


def test_aged_lowers_ttls_but_not_opt():
    raw = respond(dns.build_query("www.example.test", dns.Type.A, 1))
    raw = bytearray(raw)
    struct.pack_into("!H", raw, 10, 1)
    raw = bytes(raw) + opt_record(4096, do=True)
    m = dns.parse(raw)
    out = dns.parse(dns.aged(raw, m, 25))
    assert out.records[0].ttl == A_TTL - 25
    assert out.opt is not None and out.opt.ttl == 0x8000 and out.opt.rclass == 4096
    assert dns.parse(dns.aged(raw, m, 1000)).records[0].ttl == 0


def test_truncation_for_udp():
    query = dns.build_query("big.example.test", dns.Type.TXT, 9)
    raw = respond(query)
    assert 512 < len(raw) <= 1232
    m = dns.parse(raw)
    assert dns.truncated_for_udp(raw, m, 4096) == raw
    small = dns.truncated_for_udp(raw, m, 512)
    t = dns.parse(small)
    assert t.truncated and t.id == 9 and t.questions == m.questions and not t.records
    assert dns.parse(query_with_opt("x.test", 1, 1, udp_size=1400)).udp_limit == 1400
    assert dns.parse(query_with_opt("x.test", 1, 1, udp_size=100)).udp_limit == 512


def test_error_reply_keeps_id_and_question():
    raw = dns.build_query("www.example.test", dns.Type.A, 0xBEEF)
    r = dns.parse(dns.reply_header_only(raw, dns.parse(raw), dns.Rcode.SERVFAIL))
    assert r.is_response and r.id == 0xBEEF and r.rcode == dns.Rcode.SERVFAIL
    assert r.questions == dns.parse(raw).questions and r.flags & dns.RD


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "header"),
        (b"\0" * 11, "header"),
        (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0), "counts"),
        (struct.pack("!HHHHHH", 1, 0, 0, 0xFFFF, 0, 0) + b"\0" * 100, "counts"),
        (ONE_Q + b"\xc0\x0c\0\1\0\1", "backwards"),
        (ONE_Q + b"\xc0\x20\0\1\0\1", "backwards"),
        (ONE_Q + b"\x40abc\0\0\1\0\1", "reserved"),
        (ONE_Q + b"\x05ab\0\1\0\1", "past the end"),
        (
            ONE_Q + (b"\x3f" + b"a" * 63) * 4 + b"\0\0\1\0\1",
            "255",
        ),
    ],
)
def test_malformed(raw: bytes, why: str):
    with pytest.raises(ProtocolError, match=why):
        dns.parse(raw)


def test_every_prefix_fails_and_trailing_bytes_are_ignored():
    raw = respond(dns.build_query("nope.example.test", dns.Type.A, 3))
    for n in range(len(raw)):
        with pytest.raises(ProtocolError):
            dns.parse(raw[:n])
    assert dns.parse(raw + b"junk") == dns.parse(raw)


def test_pointer_chain_backwards_is_fine():
    # question "a.example.test"; answer name "b" + pointer to the question's "example.test"
    q = dns.build_query("a.example.test", dns.Type.A, 1)
    rr = b"\x01b\xc0\x0e" + struct.pack("!HHIH", 1, 1, 5, 4) + b"\1\2\3\4"
    raw = bytearray(q + rr)
    struct.pack_into("!HH", raw, 2, 0x8180, 1)
    struct.pack_into("!H", raw, 6, 1)
    m = dns.parse(bytes(raw))
    assert dns.name_text(m.records[0].name) == "b.example.test."


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_protocol_error(data: bytes):
    try:
        dns.parse(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_answers_parse_or_raise_protocol_error(data):
    raw = bytearray(respond(dns.build_query("nope.example.test", dns.Type.A, 3)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        m = dns.parse(bytes(raw))
    except ProtocolError:
        return
    dns.cache_ttl(m)
    dns.aged(bytes(raw), m, 3)


def test_tcp_framer_byte_at_a_time():
    msgs = [dns.build_query("a.test", 1, i) for i in range(3)]
    stream = b"".join(dns.TcpFramer.frame(m) for m in msgs)
    f = dns.TcpFramer()
    got = []
    for b in stream:
        f.receive_data(bytes([b]))
        m = f.next_message()
        if m is not None:
            got.append(m)
    assert got == msgs and f.buffered == 0


def _answer(name: str, qtype: int = 1, msg_id: int = 1) -> tuple[bytes, dns.Message]:
    raw = respond(dns.build_query(name, qtype, msg_id))
    return raw, dns.parse(raw)


def test_cache_hit_rewrites_id_and_ages():
    clock = Clock()
    cache = DnsCache(clock=clock)
    q = dns.parse(dns.build_query("www.example.test", 1, 1))
    key = cache_key(q)
    assert key is not None and cache.get(key, 5) is None
    raw, m = _answer("www.example.test")
    assert cache.put(key, raw, m)
    clock.now += 10.7
    hit = dns.parse(cache.get(key, 0x4242))
    assert hit.id == 0x4242 and hit.records[0].ttl == A_TTL - 10
    clock.now += A_TTL
    assert cache.get(key, 1) is None and len(cache) == 0
    assert (cache.hits, cache.misses) == (1, 2)


def test_cache_limits_and_keys():
    clock = Clock()
    cache = DnsCache(max_entries=2, max_ttl=20, clock=clock)
    keys = []
    for name in ("www.example.test", "mail.example.test", "x.example.test"):
        k = cache_key(dns.parse(dns.build_query(name, 1, 1)))
        keys.append(k)
        cache.put(k, *_answer(name))
    assert len(cache) == 2 and cache.get(keys[0], 1) is None  # least recently used went first
    clock.now += 21
    assert cache.get(keys[1], 1) is None  # capped at max_ttl
    # DO and CD change the key; a refused answer is not stored
    plain = cache_key(dns.parse(dns.build_query("www.example.test", 1, 1)))
    do = cache_key(dns.parse(query_with_opt("www.example.test", 1, 1, do=True)))
    assert plain != do
    assert not cache.put(plain, *_answer("other.invalid"))
    assert not DnsCache(max_entries=0).put(plain, *_answer("www.example.test"))
