"""Keys, ciphers and key derivation (all from `cryptography`).

A key is 32 random bytes, written as one line of base64 (`mptun genkey`). Every key used on the
wire is derived from it with HKDF-SHA256 and a label naming its single purpose, so no derived key
is ever used under two nonce schemes.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mptun.common.errors import ConfigError

KEY_LEN = 32
TAG_LEN = 16
NONCE_LEN = 12


@dataclass(frozen=True, slots=True)
class CipherSpec:
    """An AEAD the tunnel can use: its name, key length and `cryptography` class."""

    name: str
    key_len: int
    aead: type

    def new(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        return self.aead(key)


CIPHERS: dict[str, CipherSpec] = {
    "aes-256-gcm": CipherSpec("aes-256-gcm", 32, AESGCM),
    "chacha20-poly1305": CipherSpec("chacha20-poly1305", 32, ChaCha20Poly1305),
}
DEFAULT_CIPHER = "aes-256-gcm"


def cipher_by_name(name: str) -> CipherSpec:
    try:
        return CIPHERS[name]
    except KeyError:
        raise ConfigError(f"unknown cipher {name!r} (choose from {', '.join(CIPHERS)})") from None


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def nonce(counter: int) -> bytes:
    """The handshake's nonce scheme: a 96-bit big-endian counter starting at 0."""
    return counter.to_bytes(NONCE_LEN, "big")


def generate_key() -> str:
    """A new random key in the key-file format: base64 of 32 bytes."""
    return base64.b64encode(os.urandom(KEY_LEN)).decode("ascii")


def decode_key(text: str, source: str = "key") -> bytes:
    """Decode a key-file line; a clear ConfigError (never the key itself) on anything else."""
    text = text.strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source}: not base64 (expected the output of `mptun genkey`)") from None
    if len(raw) != KEY_LEN:
        raise ConfigError(
            f"{source}: key is {len(raw)} bytes, expected {KEY_LEN} (use `mptun genkey`)"
        )
    return raw


def load_key_file(path: str | os.PathLike[str], *, require_private: bool = True) -> bytes:
    """Read a key file; refuse one that other users can read (the key is the whole secret)."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text(encoding="ascii", errors="strict")
    except FileNotFoundError:
        raise ConfigError(f"key file {p}: no such file (create one with `mptun genkey`)") from None
    except PermissionError:
        raise ConfigError(f"key file {p}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"key file {p}: is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"key file {p}: not a base64 text line") from None
    except OSError as e:
        raise ConfigError(f"key file {p}: {e.strerror}") from None
    if require_private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"key file {p}: readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {p}"
        )
    return decode_key(text, f"key file {p}")
