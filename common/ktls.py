"""Linux kernel TLS (kTLS): hand a tunnel socket's TLS 1.3 record protection to the kernel.

Socket calls (include/uapi/linux/tls.h, Documentation/networking/tls.rst):
- `setsockopt(IPPROTO_TCP, TCP_ULP, "tls")` attaches the TLS upper-layer protocol to an
  established TCP socket. ENOENT: the kernel has no kTLS (CONFIG_TLS unset, or module `tls`
  missing; measured on this project's 6.18 build machine). ENOPROTOOPT: the socket is MPTCP
  (measured on stock Debian 6.1 and 6.12: net/mptcp/sockopt.c does not pass TCP_ULP on).
- `setsockopt(SOL_TLS, TLS_TX / TLS_RX, crypto_info)` installs one direction's key. The struct is
  `tls12_crypto_info_<cipher>`: u16 version (0x0304 for TLS 1.3), u16 cipher type, then for
  AES-GCM-256 iv[8] key[32] salt[4] rec_seq[8] (the 12-byte TLS 1.3 IV is salt || iv), for
  ChaCha20-Poly1305 iv[12] key[32] rec_seq[8]. `rec_seq` is the next record's sequence number
  (big-endian), so records sealed in user space before the handover are accounted for.
- After that, send/splice into the socket produces records, recv/splice out of it opens them.
  A non-data record (our closing record, an alert) is sent with a `TLS_SET_RECORD_TYPE` control
  message and received only by `recvmsg` with room for the `TLS_GET_RECORD_TYPE` control
  message: splice stops before it with EINVAL and recv without room fails with EIO
  (net/tls/tls_sw.c). A record that fails authentication gives EBADMSG.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from mptun.common.crypto import CipherSpec
from mptun.common.errors import ProtocolError, Status
from mptun.common.records import CLOSE_NOTIFY, CONTENT_ALERT
from mptun.common.sockets import IPPROTO_MPTCP

SOL_TLS = 282
TCP_ULP = 31
TLS_TX = 1
TLS_RX = 2
TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2
TLS_1_3_VERSION = 0x0304
TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_CHACHA20_POLY1305 = 54

_REASONS = {
    errno.ENOENT: "this kernel has no kTLS (CONFIG_TLS unset or module tls not available)",
    errno.ENOPROTOOPT: "the kernel refuses kTLS on this socket type (MPTCP)",
    errno.EOPNOTSUPP: "the kernel does not support this cipher or TLS 1.3 in kTLS",
    errno.EINVAL: "the kernel rejected the kTLS parameters",
    errno.ENOTCONN: "the socket is not connected",
    errno.EEXIST: "another upper-layer protocol is attached to the socket",
    errno.EBUSY: "another upper-layer protocol is attached to the socket",
}


def crypto_info(cipher: CipherSpec, key: bytes, iv: bytes, seq: int) -> bytes:
    """The `tls12_crypto_info_*` struct for one direction (TLS 1.3)."""
    rec_seq = seq.to_bytes(8, "big")
    if cipher.name in ("aes-256-gcm", "aes-128-gcm"):
        kind = TLS_CIPHER_AES_GCM_256 if cipher.key_len == 32 else TLS_CIPHER_AES_GCM_128
        fmt = f"<HH8s{cipher.key_len}s4s8s"
        return struct.pack(fmt, TLS_1_3_VERSION, kind, iv[4:], key, iv[:4], rec_seq)
    if cipher.name == "chacha20-poly1305":
        return struct.pack(
            "<HH12s32s8s", TLS_1_3_VERSION, TLS_CIPHER_CHACHA20_POLY1305, iv, key, rec_seq
        )
    raise KtlsRefused(f"kTLS has no cipher {cipher.name}", "ulp")


@dataclass
class KtlsRefused(Exception):
    """The kernel would not take this socket; `stage` says how far it got.

    "ulp" or "tx": nothing is installed, the socket still works as plain TCP (a user-space
    engine can take over); "rx": TX is installed, the socket is unusable without kTLS RX.
    """

    reason: str
    stage: str
    errno: int | None = None

    def __str__(self) -> str:
        return self.reason


def describe(err: OSError, sock: socket.socket | None = None) -> str:
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    why = _REASONS.get(err.errno or 0, err.strerror or "refused")
    if err.errno == errno.ENOPROTOOPT and sock is not None and sock.proto != IPPROTO_MPTCP:
        why = "the kernel refuses kTLS on this socket"
    return f"{why} ({name})"


def install(
    sock: socket.socket,
    cipher: CipherSpec,
    tx: tuple[bytes, bytes, int],
    rx: tuple[bytes, bytes, int],
) -> None:
    """Attach kTLS and install both directions: tx and rx are (key, iv, next sequence number)."""
    stage = "ulp"
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        stage = "tx"
        sock.setsockopt(SOL_TLS, TLS_TX, crypto_info(cipher, *tx))
        stage = "rx"
        sock.setsockopt(SOL_TLS, TLS_RX, crypto_info(cipher, *rx))
    except OSError as e:
        raise KtlsRefused(f"{stage}: {describe(e, sock)}", stage, e.errno) from None


def tx_record_seq(sock: socket.socket) -> int:
    """The sequence number of the next record kTLS will send (read back from the kernel).

    getsockopt wants the exact struct size (net/tls/tls_main.c): read the cipher type first.
    """
    kind = struct.unpack("<HH", sock.getsockopt(SOL_TLS, TLS_TX, 4))[1]
    size = {TLS_CIPHER_AES_GCM_128: 40, TLS_CIPHER_AES_GCM_256: 56}.get(kind, 56)
    info = sock.getsockopt(SOL_TLS, TLS_TX, size)
    return int.from_bytes(info[size - 8 : size], "big")


def send_close_notify(sock: socket.socket) -> None:
    """Send the closing record (a close_notify alert) through kTLS TX."""
    sock.sendmsg([CLOSE_NOTIFY], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([CONTENT_ALERT]))])


def recv_control(sock: socket.socket) -> bool:
    """Read the non-data record kTLS RX holds: True for close_notify, ProtocolError otherwise."""
    data, ancdata, _, _ = sock.recvmsg(256, socket.CMSG_SPACE(1))
    ctype = None
    for level, kind, value in ancdata:
        if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and value:
            ctype = value[0]
    if ctype == CONTENT_ALERT and data == CLOSE_NOTIFY:
        return True
    raise ProtocolError(f"unexpected record (type {ctype}, {data[:8].hex()})", Status.RECORD)


def _loopback_pair(proto: int) -> tuple[socket.socket, socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto) as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        a = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        try:
            a.connect(ls.getsockname())
            b, _ = ls.accept()
        except BaseException:
            a.close()
            raise
    return a, b


def probe(mptcp: bool = False) -> str | None:
    """Whether a loopback TCP (or MPTCP) socket takes kTLS: None if it does, else why not."""
    try:
        a, b = _loopback_pair(IPPROTO_MPTCP if mptcp else 0)
    except OSError as e:
        return f"no loopback {'MPTCP ' if mptcp else ''}socket to probe ({e.strerror})"
    try:
        a.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as e:
        return describe(e, a)
    finally:
        a.close()
        b.close()
    return None
