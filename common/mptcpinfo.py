"""What the kernel knows about one tunnel socket: MPTCP or fallen back, its subflows, bytes.

Read with getsockopt on the socket itself (include/uapi/linux/mptcp.h, net/mptcp/sockopt.c):
- `MPTCP_FULL_INFO` (4, kernel 6.5+): the connection's `mptcp_info` plus, per subflow, its id,
  local and remote address and `tcp_info`, in one consistent call. The caller passes pointers
  to its own arrays inside the request, so it goes through libc's getsockopt via ctypes (Python's
  `socket.getsockopt` can only hand the kernel a zeroed buffer).
- older kernels (5.16-6.4): `MPTCP_SUBFLOW_ADDRS` (3) and `MPTCP_TCPINFO` (2), same framing
  (`struct mptcp_subflow_data` header, then the array); before 5.16 only `MPTCP_INFO` (subflow
  count).
- a connection that fell back to TCP answers every SOL_MPTCP option with EOPNOTSUPP; its
  `TCP_INFO` and addresses are then the one TCP subflow's.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from mptun.common.sockets import IPPROTO_MPTCP, SOL_MPTCP

if TYPE_CHECKING:
    import ctypes

MPTCP_INFO = 1
MPTCP_TCPINFO = 2
MPTCP_SUBFLOW_ADDRS = 3
MPTCP_FULL_INFO = 4
MPTCP_INFO_FLAG_FALLBACK = 1

MAX_SUBFLOWS = 16
MPTCP_INFO_SIZE = 96  # struct mptcp_info as of 6.10+; the kernel copies min(its size, ours)
TCP_INFO_SIZE = 232  # enough for bytes_sent/bytes_retrans (offsets below); older kernels: less
SS_SIZE = 128  # struct __kernel_sockaddr_storage
SFINFO_SIZE = 8 + 2 * SS_SIZE  # struct mptcp_subflow_info: u32 id, pad, two sockaddr_storage
SFDATA_SIZE = 16  # struct mptcp_subflow_data
FULL_INFO_HEAD = struct.Struct("=6I2Q")  # sizes, num_subflows, size_arrays_user, 2 pointers

# struct tcp_info offsets (include/uapi/linux/tcp.h)
TI_STATE = 0
TI_RTT = 68  # u32 usec
TI_BYTES_ACKED = 120  # u64: bytes we sent that the peer acknowledged
TI_BYTES_RECEIVED = 128  # u64
TI_BYTES_SENT = 200  # u64 (4.19+ ... present since 5.5)


@dataclass
class SubflowInfo:
    id: int
    local: str  # "ip:port" (IPv6 in brackets)
    remote: str
    local_ip: str
    bytes_received: int | None = None
    bytes_acked: int | None = None
    rtt_ms: float | None = None


@dataclass
class ConnectionInfo:
    """`kind`: "mptcp", "fallback" (MPTCP socket, plain TCP on the wire) or "tcp"."""

    kind: str
    subflows: list[SubflowInfo] = field(default_factory=list)
    bytes_received: int | None = None
    bytes_acked: int | None = None
    subflows_max: int | None = None  # the local limit this connection runs under
    detail: str = ""  # what could not be read, if anything

    def to_dict(self) -> dict:
        return asdict(self)


def _libc() -> ctypes.CDLL:
    # ctypes only when a connection is read (`mptun status`): an idle router never pays for it
    # (its module and libffi, ~0.3 MiB of RSS, benchmarks/footprint.py).
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.getsockopt.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint32),
    ]
    return libc


def _getsockopt(fd: int, level: int, opt: int, buf: ctypes.Array) -> int:
    """getsockopt with a caller-filled buffer; returns the length the kernel wrote."""
    import ctypes

    libc = _libc()
    length = ctypes.c_uint32(ctypes.sizeof(buf))
    if libc.getsockopt(fd, level, opt, ctypes.addressof(buf), ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, errno.errorcode.get(err, str(err)))
    return length.value


def _sockaddr(raw: bytes) -> tuple[str, str]:
    """("ip:port", "ip") from a struct sockaddr_storage."""
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET:
        port = struct.unpack_from("!H", raw, 2)[0]
        ip = socket.inet_ntop(socket.AF_INET, raw[4:8])
        return f"{ip}:{port}", ip
    if family == socket.AF_INET6:
        port = struct.unpack_from("!H", raw, 2)[0]
        ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        return f"[{ip}]:{port}", ip
    return "?", "?"


def _tcp_numbers(ti: bytes) -> tuple[int | None, int | None, float | None]:
    if len(ti) < TI_BYTES_RECEIVED + 8:
        return None, None, None
    rtt = struct.unpack_from("=I", ti, TI_RTT)[0] / 1000
    acked, received = struct.unpack_from("=QQ", ti, TI_BYTES_ACKED)
    return received, acked, rtt


def _format(sa: tuple) -> str:
    host, port = sa[0], sa[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _plain_tcp(sock: socket.socket, kind: str) -> ConnectionInfo:
    info = ConnectionInfo(kind)
    try:
        ti = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError as e:
        info.detail = f"TCP_INFO: {e.strerror}"
        return info
    received, acked, rtt = _tcp_numbers(ti)
    info.bytes_received, info.bytes_acked = received, acked
    info.subflows.append(SubflowInfo(1, _format(local), _format(remote), local[0], received,
                                     acked, rtt))  # fmt: skip
    return info


def connection_info(sock: socket.socket) -> ConnectionInfo:
    """Everything `mptun status` shows about one tunnel socket."""
    if sock.proto != IPPROTO_MPTCP:
        return _plain_tcp(sock, "tcp")
    try:
        return _full_info(sock)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return _plain_tcp(sock, "fallback")
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
    return _older_kernel(sock)


def _mptcp_numbers(info: ConnectionInfo, mi: bytes) -> None:
    if len(mi) >= 4:
        info.subflows_max = mi[3]
    if len(mi) >= 80:  # bytes_* appeared in 6.5
        info.bytes_received, info.bytes_acked = struct.unpack_from("=QQ", mi, 64)


def _full_info(sock: socket.socket) -> ConnectionInfo:
    import ctypes

    sf = (ctypes.c_char * (SFINFO_SIZE * MAX_SUBFLOWS))()
    ti = (ctypes.c_char * (TCP_INFO_SIZE * MAX_SUBFLOWS))()
    req = (ctypes.c_char * (FULL_INFO_HEAD.size + MPTCP_INFO_SIZE))()
    FULL_INFO_HEAD.pack_into(
        req, 0, 0, TCP_INFO_SIZE, 0, SFINFO_SIZE, 0, MAX_SUBFLOWS,
        ctypes.addressof(sf), ctypes.addressof(ti),
    )  # fmt: skip
    _getsockopt(sock.fileno(), SOL_MPTCP, MPTCP_FULL_INFO, req)
    raw = bytes(req)
    ti_kernel, _, sf_kernel, _, num, _, _, _ = FULL_INFO_HEAD.unpack_from(raw)
    info = ConnectionInfo("mptcp")
    _mptcp_numbers(info, raw[FULL_INFO_HEAD.size :])
    sfb, tib = bytes(sf), bytes(ti)
    ti_len = min(ti_kernel, TCP_INFO_SIZE)
    for i in range(min(num, MAX_SUBFLOWS)):
        rec = sfb[i * SFINFO_SIZE : (i + 1) * SFINFO_SIZE]
        sid = struct.unpack_from("=I", rec)[0]
        local, local_ip = _sockaddr(rec[8 : 8 + SS_SIZE])
        remote, _ = _sockaddr(rec[8 + SS_SIZE :])
        received, acked, rtt = _tcp_numbers(tib[i * TCP_INFO_SIZE : i * TCP_INFO_SIZE + ti_len])
        info.subflows.append(SubflowInfo(sid, local, remote, local_ip, received, acked, rtt))
    del sf_kernel
    return info


def _subflow_array(sock: socket.socket, opt: int, size: int) -> list[bytes]:
    import ctypes

    buf = (ctypes.c_char * (SFDATA_SIZE + size * MAX_SUBFLOWS))()
    struct.pack_into("=4I", buf, 0, SFDATA_SIZE, 0, 0, size)
    _getsockopt(sock.fileno(), SOL_MPTCP, opt, buf)
    raw = bytes(buf)
    _, num, size_kernel, size_user = struct.unpack_from("=4I", raw)
    step = size_user
    return [
        raw[SFDATA_SIZE + i * step : SFDATA_SIZE + i * step + min(size_kernel, step)]
        for i in range(min(num, MAX_SUBFLOWS))
    ]


TCP_CLOSE = 7  # include/net/tcp_states.h


def live_subflows(sock: socket.socket) -> int | None:
    """How many of an MPTCP connection's subflows are not closed (MPTCP_TCPINFO, 5.16+).

    None when the question has no answer: not an MPTCP socket, fallen back to TCP, or a kernel
    without MPTCP_TCPINFO. Cheap enough for a periodic check (one getsockopt, 8 bytes a subflow).
    """
    if sock.proto != IPPROTO_MPTCP:
        return None
    try:
        states = _subflow_array(sock, MPTCP_TCPINFO, 8)
    except OSError:
        return None
    return sum(1 for ti in states if ti and ti[TI_STATE] != TCP_CLOSE)


def _older_kernel(sock: socket.socket) -> ConnectionInfo:
    info = ConnectionInfo("mptcp")
    try:
        mi = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, MPTCP_INFO_SIZE)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return _plain_tcp(sock, "fallback")
        raise
    _mptcp_numbers(info, mi)
    try:
        addrs = _subflow_array(sock, MPTCP_SUBFLOW_ADDRS, 2 * SS_SIZE)
        tinfos = _subflow_array(sock, MPTCP_TCPINFO, TCP_INFO_SIZE)
    except OSError:
        info.detail = f"this kernel reports {mi[0] + 1} subflow(s) but not their addresses"
        return info
    for i, rec in enumerate(addrs):
        local, local_ip = _sockaddr(rec[:SS_SIZE])
        remote, _ = _sockaddr(rec[SS_SIZE:])
        received, acked, rtt = _tcp_numbers(tinfos[i]) if i < len(tinfos) else (None,) * 3
        info.subflows.append(SubflowInfo(i + 1, local, remote, local_ip, received, acked, rtt))
    return info
