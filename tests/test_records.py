"""TLS 1.3 record protection: RFC 8448 known answers, and every way a record stream can break."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mptun.common.crypto import CIPHERS, CipherSpec
from mptun.common.errors import ProtocolError, Status
from mptun.common.records import (
    AES_GCM_RECORD_LIMIT,
    CONTENT_ALERT,
    MAX_PLAINTEXT,
    Opener,
    RecordLimitReached,
    Sealer,
    record_limit,
    record_nonce,
)

# RFC 8448 section 3 ("Simple 1-RTT Handshake", TLS_AES_128_GCM_SHA256). The vectors were
# cross-checked against the published trace in several independent TLS implementations.
AES128 = CipherSpec("aes-128-gcm", 16, AESGCM)
H = bytes.fromhex
CLIENT_APP_KEY, CLIENT_APP_IV = H("17422dda596ed5d9acd890e3c63f5051"), H("5b78923dee08579033e523d9")
SERVER_APP_KEY, SERVER_APP_IV = H("9f02283b6c9c07efc26bb9f2ac92e356"), H("cf782b88dd83549aadf1e984")
CLIENT_HS_KEY, CLIENT_HS_IV = H("dbfaa693d1762c5b666af5d950258d01"), H("5bd3c71b836e0b76bb73265f")
FIFTY = bytes(range(50))
CLIENT_APP_RECORD = H(
    "1703030043a23f7054b62c94d0affafe8228ba55cbefacea42f914aa66bcab3f2b9819a8a5b46b395bd54a9a20"
    "441e2b62974e1f5a6292a2977014bd1e3deae63aeebb21694915e4"
)
CLIENT_CLOSE_NOTIFY = H("1703030013c9872760655666b74d7ff1153efd6db6d0b0e3")
SERVER_APP_RECORD = H(  # sequence number 1: the NewSessionTicket was record 0
    "17030300432e937e11ef4ac740e538ad36005fc4a46932fc3225d05f82aa1b36e30efaf97d90e6dffc602dcb50"
    "1a59a8fcc49c4bf2e5f0a21c0047c2abf332540dd032e167c2955d"
)
SERVER_CLOSE_NOTIFY = H("1703030013b58fd67166ebf599d24720cfbe7efa7a8864a9")  # sequence number 2
CLIENT_FINISHED = H("14000020a8ec436d677634ae525ac1fcebe11a039ec17694fac6e98527b642f2edd5ce61")
CLIENT_FINISHED_RECORD = H(
    "170303003575ec4dc238cce60b298044a71e219c56cc77b0517fe9b93c7a4bfc44d87f38f80338ac98fc46deb3"
    "84bd1caeacab6867d726c40546"
)


def test_nonce_is_iv_xor_padded_sequence_number() -> None:
    iv = H("5b78923dee08579033e523d9")
    assert record_nonce(iv, 0) == iv
    assert record_nonce(iv, 1) == H("5b78923dee08579033e523d8")
    assert record_nonce(iv, 0x0102030405060708) == H("5b78923def0a549436e324d1")


def test_rfc8448_client_application_data_and_close_notify() -> None:
    s = Sealer(AES128, CLIENT_APP_KEY, CLIENT_APP_IV)
    assert s.seal(FIFTY) == CLIENT_APP_RECORD
    assert s.close_notify() == CLIENT_CLOSE_NOTIFY
    o = Opener(AES128, CLIENT_APP_KEY, CLIENT_APP_IV)
    assert o.feed(CLIENT_APP_RECORD + CLIENT_CLOSE_NOTIFY) == [FIFTY]
    assert o.closed
    o.end_of_stream()


def test_rfc8448_server_records_at_later_sequence_numbers() -> None:
    s = Sealer(AES128, SERVER_APP_KEY, SERVER_APP_IV, seq=1)
    assert s.seal(FIFTY) == SERVER_APP_RECORD
    assert s.close_notify() == SERVER_CLOSE_NOTIFY
    o = Opener(AES128, SERVER_APP_KEY, SERVER_APP_IV, seq=1)
    assert o.feed(SERVER_APP_RECORD) == [FIFTY]
    assert o.feed(SERVER_CLOSE_NOTIFY) == []
    assert o.closed


def test_rfc8448_other_content_type_seals_byte_for_byte_and_is_refused_on_open() -> None:
    s = Sealer(AES128, CLIENT_HS_KEY, CLIENT_HS_IV)
    assert s.seal(CLIENT_FINISHED, content_type=22) == CLIENT_FINISHED_RECORD
    o = Opener(AES128, CLIENT_HS_KEY, CLIENT_HS_IV)
    with pytest.raises(ProtocolError, match="content type 22") as e:
        o.feed(CLIENT_FINISHED_RECORD)
    assert e.value.status is Status.RECORD


def test_rfc8448_vectors_without_encrypt_into() -> None:
    """The fallback for cryptography < 47 (no encrypt_into) gives the same bytes."""
    s = Sealer(AES128, CLIENT_APP_KEY, CLIENT_APP_IV)
    s._into = False
    assert s.seal(FIFTY) == CLIENT_APP_RECORD
    o = Opener(AES128, CLIENT_APP_KEY, CLIENT_APP_IV)
    o._into = False
    assert o.feed(CLIENT_APP_RECORD + CLIENT_CLOSE_NOTIFY) == [FIFTY]


def _stream(cipher: CipherSpec, chunks: list[bytes]) -> tuple[bytes, bytes, bytes]:
    key, iv = os.urandom(cipher.key_len), os.urandom(12)
    s = Sealer(cipher, key, iv)
    wire = b"".join(s.seal(c) for c in chunks) + s.close_notify()
    return key, iv, wire


def _records(wire: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(wire):
        n = int.from_bytes(wire[pos + 3 : pos + 5], "big")
        out.append(wire[pos : pos + 5 + n])
        pos += 5 + n
    return out


@pytest.mark.parametrize("name", sorted(CIPHERS))
def test_round_trip_fed_byte_by_byte(name: str) -> None:
    cipher = CIPHERS[name]
    chunks = [b"", b"x", os.urandom(1000), os.urandom(MAX_PLAINTEXT)]
    key, iv, wire = _stream(cipher, chunks)
    o = Opener(cipher, key, iv)
    got = []
    for i in range(len(wire)):
        got += o.feed(wire[i : i + 1])
    assert b"".join(got) == b"".join(chunks)
    assert o.closed
    o.end_of_stream()


@pytest.mark.parametrize("name", sorted(CIPHERS))
def test_every_flipped_bit_position_is_rejected(name: str) -> None:
    cipher = CIPHERS[name]
    key, iv, wire = _stream(cipher, [b"hello", b"world"])
    first = _records(wire)[0]
    for pos in range(len(first)):
        for bit in (0x01, 0x80):
            bad = bytearray(wire)
            bad[pos] ^= bit
            o = Opener(cipher, key, iv)
            with pytest.raises(ProtocolError) as e:
                o.feed(bytes(bad))
                o.end_of_stream()  # a larger length field leaves the record incomplete
            assert e.value.status in (Status.RECORD, Status.TRUNCATED), pos


def test_reordered_replayed_and_dropped_records_are_rejected() -> None:
    cipher = CIPHERS["aes-256-gcm"]
    key, iv, wire = _stream(cipher, [b"one", b"two", b"three"])
    r = _records(wire)
    for bad in (
        r[1] + r[0],  # reordered
        r[0] + r[0],  # replayed
        r[0] + r[2],  # one dropped
        r[0] + r[1] + r[2] + r[2],  # replayed after the end... of data
    ):
        o = Opener(cipher, key, iv)
        with pytest.raises(ProtocolError) as e:
            o.feed(bad)
        assert e.value.status is Status.RECORD
        with pytest.raises(ProtocolError):  # dead after an error
            o.feed(b"")


def test_record_from_the_other_direction_is_rejected() -> None:
    cipher = CIPHERS["aes-256-gcm"]
    key, iv, wire = _stream(cipher, [b"hello"])
    other_iv = bytes(b ^ 0xFF for b in iv)
    with pytest.raises(ProtocolError):
        Opener(cipher, key, other_iv).feed(wire)


def test_stream_cut_without_close_notify_is_truncated() -> None:
    cipher = CIPHERS["chacha20-poly1305"]
    key, iv, wire = _stream(cipher, [b"hello", b"world"])
    r = _records(wire)
    cuts = [b"", r[0], r[0] + r[1], (r[0] + r[1] + r[2])[:-1], r[0][:3], r[0] + r[1][:10]]
    for cut in cuts:
        o = Opener(cipher, key, iv)
        o.feed(cut)
        with pytest.raises(ProtocolError) as e:
            o.end_of_stream()
        assert e.value.status is Status.TRUNCATED, cut


def test_data_after_close_notify_is_rejected() -> None:
    cipher = CIPHERS["aes-256-gcm"]
    key, iv = os.urandom(32), os.urandom(12)
    s = Sealer(cipher, key, iv)
    wire = s.seal(b"a") + s.close_notify() + s.seal(b"late")
    with pytest.raises(ProtocolError, match="after close_notify"):
        Opener(cipher, key, iv).feed(wire)


def test_header_checks() -> None:
    cipher = CIPHERS["aes-256-gcm"]
    key, iv = os.urandom(32), os.urandom(12)
    for header in (
        b"\x16\x03\x03\x00\x20",
        b"\x17\x03\x01\x00\x20",
        b"\x17\x03\x03\x00\x10",
        b"\x17\x03\x03\x41\x01",
    ):
        with pytest.raises(ProtocolError) as e:
            Opener(cipher, key, iv).feed(header)
        assert e.value.status is Status.RECORD


def test_padded_record_from_another_implementation_is_accepted() -> None:
    cipher = CIPHERS["aes-256-gcm"]
    key, iv = os.urandom(32), os.urandom(12)
    s = Sealer(cipher, key, iv)
    padded = s.seal(b"data\x17" + bytes(7), content_type=0)  # content, type 23, 8 zero bytes
    assert Opener(cipher, key, iv).feed(padded) == [b"data"]


def test_other_alerts_end_the_stream_with_an_error() -> None:
    cipher = CIPHERS["aes-256-gcm"]
    key, iv = os.urandom(32), os.urandom(12)
    s = Sealer(cipher, key, iv)
    with pytest.raises(ProtocolError, match="alert 0228"):
        Opener(cipher, key, iv).feed(s.seal(b"\x02\x28", CONTENT_ALERT))


def _full_slots(n: int) -> tuple[list[memoryview], list[memoryview], list[memoryview], bytes]:
    from mptun.common.records import FULL_HEADER, FULL_RECORD, HEADER_LEN

    content = os.urandom(n * MAX_PLAINTEXT)
    inners = [
        memoryview(bytearray(content[i * MAX_PLAINTEXT : (i + 1) * MAX_PLAINTEXT] + b"\x17"))
        for i in range(n)
    ]
    out = bytearray(FULL_RECORD * n)
    view = memoryview(out)
    records = [view[i * FULL_RECORD : (i + 1) * FULL_RECORD] for i in range(n)]
    for r in records:
        r[:HEADER_LEN] = FULL_HEADER
    sealed = [r[HEADER_LEN:] for r in records]
    return inners, records, sealed, content


@pytest.mark.parametrize("name", sorted(CIPHERS))
def test_seal_full_gives_the_records_seal_gives(name: str) -> None:
    cipher = CIPHERS[name]
    key, iv = os.urandom(cipher.key_len), os.urandom(12)
    inners, records, sealed, content = _full_slots(3)
    Sealer(cipher, key, iv, seq=7).seal_full(inners, records, sealed, 3)
    s = Sealer(cipher, key, iv, seq=7)
    expect = b"".join(
        s.seal(content[i * MAX_PLAINTEXT : (i + 1) * MAX_PLAINTEXT]) for i in range(3)
    )
    assert b"".join(bytes(r) for r in records) == expect


def test_seal_full_stops_at_the_record_limit() -> None:
    cipher = CIPHERS["aes-256-gcm"]
    key, iv = os.urandom(32), os.urandom(12)
    inners, records, sealed, content = _full_slots(3)
    s = Sealer(cipher, key, iv, limit=2)
    with pytest.raises(RecordLimitReached):
        s.seal_full(inners, records, sealed, 3)
    assert s.seq == 2  # the two records under the limit were sealed, the third refused
    o = Opener(cipher, key, iv)
    assert o.feed(bytes(records[0]) + bytes(records[1])) == [content[: 2 * MAX_PLAINTEXT]]


@pytest.mark.parametrize("name", sorted(CIPHERS))
def test_open_records_stops_at_a_tampered_record_and_stays_dead(name: str) -> None:
    cipher = CIPHERS[name]
    chunks = [os.urandom(MAX_PLAINTEXT), b"two", os.urandom(5000), b"four"]
    key, iv, wire = _stream(cipher, chunks)
    recs = _records(wire)
    bad = bytearray(b"".join(recs))
    bad[len(recs[0]) + len(recs[1]) + 40] ^= 1  # inside the third record
    o = Opener(cipher, key, iv)
    out = bytearray(len(bad))
    with pytest.raises(ProtocolError, match="record 2 did not authenticate") as e:
        o.open_records(memoryview(bad), len(bad), memoryview(out))
    assert e.value.status is Status.RECORD
    assert out[: MAX_PLAINTEXT + 3] == chunks[0] + b"two"  # the two before it were opened
    with pytest.raises(ProtocolError):
        o.open_records(memoryview(bytes(recs[3])), len(recs[3]), memoryview(out))


def test_record_limits() -> None:
    assert record_limit(CIPHERS["aes-256-gcm"]) == AES_GCM_RECORD_LIMIT == 23_726_566
    assert record_limit(CIPHERS["chacha20-poly1305"]) == 1 << 64
    s = Sealer(CIPHERS["aes-256-gcm"], os.urandom(32), os.urandom(12), limit=2)
    s.seal(b"1")
    s.seal(b"2")
    with pytest.raises(RecordLimitReached) as e:
        s.seal(b"3")
    assert e.value.status is Status.RECORD_LIMIT
