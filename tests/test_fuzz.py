"""Property tests: any input to a parser parses or raises ProtocolError, nothing else.

The targets (fuzz/targets.py) are shared with the coverage-guided atheris entry point, which runs
briefly here too. Cut points are drawn as well, so every parser also sees its input split at
arbitrary places (h11's habit: whole buffer, byte by byte, and everything between).
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import targets
from mptun.common.address import Address, ip_or_name
from mptun.common.handshake import REQUEST_FIXED_LEN

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
cuts = st.lists(st.integers(min_value=1, max_value=64), max_size=8)


@SETTINGS
@given(st.binary(max_size=600), cuts)
def test_server_handshake_raw_bytes(data: bytes, sizes: list[int]) -> None:
    assert targets.server_handshake(data, targets.chunks_of(sizes)) is None  # never authenticates


@SETTINGS
@given(st.binary(min_size=REQUEST_FIXED_LEN, max_size=REQUEST_FIXED_LEN), st.binary(max_size=400),
       st.booleans(), cuts)  # fmt: skip
def test_server_handshake_authenticated_garbage(fixed, variable, fix_length, sizes) -> None:
    targets.server_plaintext(fixed, variable, fix_length, targets.chunks_of(sizes))


@SETTINGS
@given(st.sampled_from([0, 1]), st.sampled_from([1, 3, 4]), st.binary(max_size=300),
       st.integers(0, 0xFFFF), st.binary(max_size=80), st.binary(max_size=80))  # fmt: skip
def test_server_handshake_structured_requests(mode, atyp, host, pad, padding, early) -> None:
    """Requests that look nearly right: a real mode and ATYP with arbitrary lengths after them."""
    var = bytes([mode, atyp]) + host + pad.to_bytes(2, "big") + padding + early
    targets.server_plaintext(b"", var, True)


@SETTINGS
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=4, max_size=4),
       st.binary(max_size=300), st.booleans(), cuts)  # fmt: skip
def test_client_handshake_authenticated_garbage(salt, fixed, padding, fix_length, sizes) -> None:
    targets.client_response(salt, fixed, padding, fix_length, targets.chunks_of(sizes))


@SETTINGS
@given(st.binary(max_size=600), cuts, st.booleans())
def test_socks5_any_bytes(data: bytes, sizes: list[int], with_auth: bool) -> None:
    targets.socks(data, targets.chunks_of(sizes), with_auth)


@SETTINGS
@given(st.sampled_from([b"\x05\x01\x00", b"\x05\x02\x00\x02"]),
       st.sampled_from([1, 2, 3, 0x7F]), st.sampled_from([1, 3, 4, 0, 2, 0xFF]),
       st.binary(max_size=300), cuts)  # fmt: skip
def test_socks5_structured_requests(greeting, cmd, atyp, rest, sizes) -> None:
    data = greeting + bytes([5, cmd, 0, atyp]) + rest
    targets.socks(data, targets.chunks_of(sizes))


@SETTINGS
@given(st.binary(max_size=300), st.integers(0, 8))
def test_address_decode_any_bytes(data: bytes, offset: int) -> None:
    targets.address(data, offset)


NAMES = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}(\.[a-z0-9-]{1,63}){0,3}", fullmatch=True)


@SETTINGS
@given(st.one_of(st.ip_addresses(), NAMES), st.integers(0, 0xFFFF))
def test_address_round_trip(host, port: int) -> None:
    addr = Address(ip_or_name(str(host)), port)
    assert targets.address(addr.encode()) == addr


@SETTINGS
@given(st.binary(max_size=600), cuts)
def test_record_stream_any_bytes(data: bytes, sizes: list[int]) -> None:
    assert targets.record_stream(data, targets.chunks_of(sizes)) is None  # never authenticates


@SETTINGS
@given(st.lists(st.tuples(st.binary(max_size=64), st.integers(0, 255)), max_size=5), cuts)
def test_record_contents_authenticated_garbage(items, sizes) -> None:
    """Authenticated records of any content type, padding included (RFC 8446 5.4)."""
    targets.record_contents(items, targets.chunks_of(sizes))


@SETTINGS
@given(st.binary(max_size=600))
def test_dns_any_bytes(data: bytes) -> None:
    targets.dns_message(data)


@SETTINGS
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.lists(st.integers(0, 3), min_size=4,
       max_size=4), st.binary(max_size=300))  # fmt: skip
def test_dns_structured(msg_id, flags, counts, body) -> None:
    """A header with small counts, so the parser walks names, records and pointers in the body."""
    data = struct.pack("!HHHHHH", msg_id, flags, *counts) + body
    targets.dns_message(data)


@SETTINGS
@given(st.binary(max_size=600), cuts)
def test_dns_tcp_framing(data: bytes, sizes: list[int]) -> None:
    targets.dns_tcp(data, targets.chunks_of(sizes))


def test_atheris_short_run(tmp_path: Path) -> None:
    """A coverage-guided run of every target from the seed corpus (bounded: 30,000 inputs)."""
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (the test extra installs it on CPython x86-64)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(targets.corpus_seeds()):
        (corpus / f"seed{i}").write_bytes(seed)
    r = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "run.py"), str(corpus), "-atheris_runs=30000"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Done 30000" in r.stderr or "Done" in r.stderr
