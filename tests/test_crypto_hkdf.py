"""HKDF-SHA256 as mptun computes it (standard-library HMAC) gives the bytes of RFC 5869 and of
`cryptography`'s HKDF, so keys derived before and after the change are the same on the wire."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mptun.common.crypto import hkdf, hkdf_expand, hkdf_extract


def test_rfc5869_test_case_1() -> None:
    """RFC 5869 appendix A.1 (SHA-256, 42 bytes)."""
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    prk = hkdf_extract(salt, ikm)
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    okm = hkdf_expand(prk, info, 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_rfc5869_test_case_3_empty_salt_and_info() -> None:
    """RFC 5869 appendix A.3: an empty salt is a string of zeros."""
    okm = hkdf(bytes.fromhex("0b" * 22), b"", b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


@pytest.mark.parametrize("length", [1, 32, 33, 44, 64, 100])
def test_same_bytes_as_cryptography(length: int) -> None:
    for _ in range(20):
        ikm, salt, info = os.urandom(32), os.urandom(os.urandom(1)[0] % 64), os.urandom(20)
        theirs = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
        assert hkdf(ikm, salt, info, length) == theirs


@pytest.mark.parametrize("length", [0, 255 * 32 + 1])
def test_lengths_out_of_range_are_refused(length: int) -> None:
    with pytest.raises(ValueError, match="HKDF-SHA256 output"):
        hkdf_expand(b"k" * 32, b"", length)
