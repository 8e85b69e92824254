"""TCP Fast Open on the tunnel: what the kernel offers and tells, for both ends.

Kernel facts used here:
- A listener takes data in a SYN only when `net.ipv4.tcp_fastopen` (per network namespace) has
  bit 0x2 (TFO_SERVER_ENABLE) and the listener set TCP_FASTOPEN to a queue length
  (tcp_try_fastopen(), net/ipv4/tcp_fastopen.c; Documentation/networking/ip-sysctl.rst). The
  default, 1, is the client bit alone. MPTCP listeners take it from Linux 6.2
  (net/mptcp/fastopen.c), MPTCP clients TCP_FASTOPEN_CONNECT from 6.1.
- A client socket with TCP_FASTOPEN_CONNECT: connect() returns 0 at once when a cookie for
  the path is cached (the SYN leaves with the first write and carries it); without one it sends
  a plain SYN asking for a cookie and returns EINPROGRESS (tcp_fastopen_defer_connect()). Cookies
  live in the TCP metrics cache, keyed by source and destination address (net/ipv4/tcp_metrics.c).
- `struct tcp_info` (include/uapi/linux/tcp.h): byte 5 is tcpi_options, whose TCPI_OPT_SYN_DATA
  (0x20) says the SYN's data was acknowledged; byte 7 holds tcpi_fastopen_client_fail in bits
  1-2 (after the 1-bit tcpi_delivery_rate_app_limited): 1 no cookie, 2 the data was not
  acknowledged, 3 the SYN was retransmitted (tcp_rcv_fastopen_synack(), net/ipv4/tcp_input.c).
  An MPTCP socket answers TCP_INFO with its first subflow's (measured on Linux 6.18).
"""

from __future__ import annotations

import enum
import socket
from pathlib import Path

TFO_SERVER_ENABLE = 0x2  # net.ipv4.tcp_fastopen's server bit
TCPI_OPT_SYN_DATA = 0x20
_SYSCTL = Path("/proc/sys/net/ipv4/tcp_fastopen")
# Pending Fast Open connections a listener holds before it answers SYN data as a plain SYN
# (tcp_fastopen_queue_check()); the accept queue bounds them anyway.
LISTEN_QUEUE = 1024


class ClientFail(enum.IntEnum):
    """tcpi_fastopen_client_fail: why a client's Fast Open did not carry its data."""

    NONE = 0
    NO_COOKIE = 1
    DATA_NOT_ACKED = 2
    SYN_RETRANSMITTED = 3


def sysctl_value(path: Path = _SYSCTL) -> int | None:
    """net.ipv4.tcp_fastopen in this process's namespace (None when unreadable)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def enable_listener(sock: socket.socket, qlen: int = LISTEN_QUEUE) -> str | None:
    """Let a listener take a first flight in the SYN; None when done, else why not (one line).

    The socket option is set whatever the sysctl says (it costs nothing), so that a later
    `sysctl -w net.ipv4.tcp_fastopen=3` takes effect without a restart.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, qlen)
    except OSError as e:
        return f"the kernel refused TCP_FASTOPEN on the listener ({e.strerror})"
    value = sysctl_value()
    if value is not None and not value & TFO_SERVER_ENABLE:
        return (
            f"net.ipv4.tcp_fastopen is {value}, without the server bit 0x2; "
            f"`sysctl -w net.ipv4.tcp_fastopen={value | TFO_SERVER_ENABLE}` lets clients' "
            "--fast-open save a round trip"
        )
    return None


def tcp_info_head(sock: socket.socket) -> bytes:
    """The first bytes of TCP_INFO (b"" when the socket gives none)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return b""


def syn_data_acked(sock: socket.socket) -> bool:
    """Whether the data this connection sent in its SYN was acknowledged by the SYN-ACK."""
    head = tcp_info_head(sock)
    return len(head) > 5 and bool(head[5] & TCPI_OPT_SYN_DATA)


def client_fail(sock: socket.socket) -> ClientFail:
    """tcpi_fastopen_client_fail of a connected client socket."""
    head = tcp_info_head(sock)
    if len(head) < 8:
        return ClientFail.NONE
    return ClientFail((head[7] >> 1) & 0x3)
