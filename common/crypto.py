"""Keys, ciphers and key derivation (all from `cryptography`).

A key is 32 random bytes, written as one line of base64 (`mptun genkey`). Every key used on the
wire is derived from it with HKDF-SHA256 and a label naming its single purpose, so no derived key
is ever used under two nonce schemes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mptun.common.errors import ConfigError

# `cryptography` is imported when a cipher or HKDF is first used, not with this module: the
# commands that only read keys and options (`mptun uci`, `--help`, `nft`, `status`) skip its
# ~10 MB and its import time on a router (benchmarks/footprint.py measures both).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

KEY_LEN = 32
TAG_LEN = 16
NONCE_LEN = 12


@dataclass(frozen=True, slots=True)
class CipherSpec:
    """An AEAD the tunnel can use: its name, key length and `cryptography` class (or the name of
    one in `cryptography.hazmat.primitives.ciphers.aead`, imported at the first `new`)."""

    name: str
    key_len: int
    aead: type | str

    def new(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        cls: Any = self.aead
        if isinstance(cls, str):
            from cryptography.hazmat.primitives.ciphers import aead

            cls = getattr(aead, cls)
        return cls(key)


CIPHERS: dict[str, CipherSpec] = {
    "aes-256-gcm": CipherSpec("aes-256-gcm", 32, "AESGCM"),
    "chacha20-poly1305": CipherSpec("chacha20-poly1305", 32, "ChaCha20Poly1305"),
}
DEFAULT_CIPHER = "aes-256-gcm"


def cipher_by_name(name: str) -> CipherSpec:
    try:
        return CIPHERS[name]
    except KeyError:
        raise ConfigError(f"unknown cipher {name!r} (choose from {', '.join(CIPHERS)})") from None


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869 section 2.2): the pseudorandom key. An empty salt
    is HMAC's zero-padded key, the RFC's string of zeros."""
    return hmac.digest(salt, ikm, "sha256")


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand with SHA-256 (RFC 5869 section 2.3), `length` at most 255 x 32 bytes."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"HKDF-SHA256 output of {length} bytes")
    out, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes((i,)), "sha256")
        out += block
    return out[:length]


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869). With the standard library's HMAC rather than `cryptography`'s
    HKDF object: the same bytes at a third of the cost, which every tunnel pays four times
    (docs/design/router-budget.md, "Per connection")."""
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


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


# A secret file is one short line; reading more than this is a mistake (a device, a wrong path).
MAX_SECRET_FILE = 4096
_WHO = ((stat.S_IRWXG, "the group"), (stat.S_IRWXO, "everyone"))
_RIGHTS = (
    (stat.S_IRGRP | stat.S_IROTH, "readable"),
    (stat.S_IWGRP | stat.S_IWOTH, "writable"),
    (stat.S_IXGRP | stat.S_IXOTH, "executable"),
)


def secret_file_problem(st: os.stat_result, euid: int) -> str | None:
    """Why a secret file with this stat may not be trusted, or None.

    Its owner must be root or the user running mptun: any other owner can rewrite it (or give
    it away with chmod), as OpenSSH's StrictModes also requires. No permission for the group or
    others: reading leaks the secret, writing lets them swap in one they know, and execute is
    never meant; the message says which of these the mode gives and to whom.
    """
    if st.st_uid not in (0, euid):
        return (
            f"owned by uid {st.st_uid}, not by root or the user running mptun (uid {euid}), "
            "so that user can change it"
        )
    mode = stat.S_IMODE(st.st_mode)
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return None
    rights = " and ".join(word for bits, word in _RIGHTS if mode & bits)
    whom = " and ".join(who for bits, who in _WHO if mode & bits)
    return f"{rights} by other users ({whom}; mode {mode:o})"


def read_secret_file(path: str | os.PathLike[str], what: str, hint: str) -> str:
    """The text of a private secret file, or a one-line ConfigError naming `what` and the path.

    Opened before it is checked, and checked through the open descriptor (fstat), so the file
    read is the file judged; opened non-blocking so a FIFO cannot hang the start; a regular file
    of at most MAX_SECRET_FILE bytes. `hint` says how to make a good one.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise ConfigError(f"{what} {p}: no such file ({hint})") from None
    except PermissionError:
        raise ConfigError(f"{what} {p}: permission denied") from None
    except OSError as e:
        raise ConfigError(f"{what} {p}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{what} {p}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {p}: not a regular file")
        why = secret_file_problem(st, os.geteuid())
        if why is not None:
            fix = f"chown {os.geteuid()} {p}" if "owned by" in why else f"chmod 600 {p}"
            raise ConfigError(f"{what} {p}: {why}; run: {fix}")
        data = b""
        while len(data) <= MAX_SECRET_FILE:
            got = os.read(fd, MAX_SECRET_FILE + 1 - len(data))
            if not got:
                break
            data += got
    except OSError as e:
        raise ConfigError(f"{what} {p}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise ConfigError(f"{what} {p}: longer than {MAX_SECRET_FILE} bytes ({hint})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p}: not UTF-8 text ({hint})") from None


def load_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key file; refuse one other users can read or change (the key is the whole secret)."""
    hint = "create one with `mptun genkey`"
    text = read_secret_file(path, "key file", hint)
    if not text.isascii():
        raise ConfigError(f"key file {Path(path)}: not a base64 text line ({hint})")
    return decode_key(text, f"key file {Path(path)}")
