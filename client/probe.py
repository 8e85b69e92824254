"""One authenticated health check against a server: `probe_server`, shared by `mptun client
--check`, the uplink health prober (`health.py`) and the choice between several servers.

The check request (docs/PROTOCOL.md, "Checks") is answered at once: nothing is dialled, the server
counts it as a check, and it is replay-protected like any request. After the request the probe
half-closes, so a server that cannot authenticate it closes at once (docs/PROBING.md) and a
wrong key shows without waiting for the deadline. What the other end sent tells the failures
apart: nothing at all is silence (wrong key, cipher or clock, or not mptun), bytes that do not
authenticate are "not an mptun server".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import ipaddress
import socket
from dataclasses import dataclass

from mptun.common.address import Address, IPAddress
from mptun.common.crypto import CipherSpec
from mptun.common.drive import drive
from mptun.common.errors import ProtocolError
from mptun.common.handshake import (
    CHECK_TARGET,
    TYPE_CHECK,
    ClientHandshake,
    ConnectStatus,
    WireMode,
)
from mptun.common.sockets import Transport, connect, family_of, is_mptcp, resolve

# Linux: bind() takes the address now and the port only at connect(), so probes bound to a
# source address do not use up the ephemeral ports of every protocol (include/uapi/linux/in.h).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class ProbeFailure(enum.Enum):
    """Why a probe did not come back "succeeded" (NONE when it did)."""

    NONE = "none"
    UNREACHABLE = "unreachable"  # no connection (no route, refused, connect timed out, DNS)
    SILENT = "silent"  # connected, not a byte back: wrong key, cipher or clock, or a dead path
    GARBLED = "garbled"  # bytes that are not this key's mptun answer
    REFUSED = "refused"  # an authenticated answer other than "succeeded" (too old, full)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe found; `answered` (authenticated answer) proves key, clock and path."""

    ok: bool  # the server answered the check "succeeded"
    status: ConnectStatus | None  # the authenticated status, None without one
    rtt: float | None  # seconds from the request sent to the answer read (handshake round trip)
    reason: str  # one line for a log or `mptun status` ("" when ok)
    failure: ProbeFailure = ProbeFailure.NONE
    connect_time: float | None = None  # seconds the connect took
    mptcp: bool | None = None  # the probe's socket: MPTCP, fell back to TCP, or plain TCP
    received: int = 0  # bytes the server sent

    @property
    def answered(self) -> bool:
        """An authenticated answer of any status: the server and the path to it work."""
        return self.status is not None


def _too_old(status: ConnectStatus) -> str:
    if status == ConnectStatus.UNSUPPORTED:
        return "server too old: it does not know the check request (upgrade the server)"
    if status == ConnectStatus.SERVER_FULL:
        return "server full: its replay cache is (nearly) full for this address; try later"
    return f"the server answered the check {status.name.lower().replace('_', ' ')}"


async def probe_server(
    address: Address,
    key: bytes,
    cipher: CipherSpec,
    *,
    source: IPAddress | str | None = None,
    device: str | None = None,
    transport: Transport,
    deadline: float,
    prefix: bytes = b"",
) -> ProbeResult:
    """One health check to `address`, shared by `--check`, uplink health and server failover.

    From `source` and through `device` if given; never raises for the network's or the
    server's failures (a result says what failed). `deadline` (loop.time()) bounds connect and
    answer together."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    if address.is_domain:
        try:
            addrs = await asyncio.wait_for(
                resolve(loop, str(address.host), address.port), max(0.0, deadline - started)
            )
        except (OSError, TimeoutError) as e:
            return _unreachable(f"cannot resolve {address.host}: {e}")
        if not addrs:
            return _unreachable(f"{address.host}: no address")
        if source is not None:  # the family of the source decides
            want = family_of(str(source))
            addrs = [a for a in addrs if family_of(a) == want] or addrs
        ip: IPAddress = addrs[0]
    else:
        ip = address.host  # type: ignore[assignment]
    sock, _ = transport.socket(family_of(ip))
    try:
        return await _probe(
            loop,
            sock,
            Address(ip, address.port),
            key,
            cipher,
            source,
            device,
            deadline,
            prefix,
            started,
        )
    finally:
        sock.close()


async def _probe(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    server: Address,
    key: bytes,
    cipher: CipherSpec,
    source: IPAddress | str | None,
    device: str | None,
    deadline: float,
    prefix: bytes,
    started: float,
) -> ProbeResult:
    try:
        if device:
            # Only routes through `device` (socket(7) SO_BINDTODEVICE): the probe leaves by its
            # uplink even where no policy rule routes its source address. Unprivileged since
            # Linux 5.7 for a socket not bound to a device yet; where refused, the source
            # address alone routes it (through mptun's rules).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if source is not None:
            src = ipaddress.ip_address(str(source))
            if src.version == 4:
                try:
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                except OSError:
                    pass  # MPTCP sockets of older kernels: an ordinary bind then
            sock.bind((str(src), 0))
        await connect(loop, sock, server.sockaddr(), max(0.0, deadline - loop.time()))
    except ValueError:
        return _unreachable(f"{source!r} is no IP address to send from")
    except OSError as e:
        if e.errno == errno.ECONNRESET:
            return _silent(server, "reset it without answering")
        return _unreachable(f"cannot reach {server}: {e.strerror or e}")
    connected = loop.time()
    mptcp = is_mptcp(sock)
    hs = ClientHandshake(
        key,
        cipher,
        CHECK_TARGET,
        WireMode.ENCRYPTED,
        prefix=prefix,
        kind=TYPE_CHECK,
    )
    what = ""  # how the server failed: "<server> accepted the connection but <what>"
    event = None
    try:
        await loop.sock_sendall(sock, hs.first_flight())
        sock.shutdown(socket.SHUT_WR)  # the request is complete (see the module's docstring)
        event = await drive(loop, sock, hs, deadline)
        if event is None:
            what = "closed it" if hs.received else "closed it without answering"
    except TimeoutError:
        what = f"did not answer within {deadline - connected:.3g} s"
    except ProtocolError as e:
        what = str(e)
    except OSError as e:
        what = f"dropped it ({e.strerror or e})"
    answered = loop.time()
    timing = {"connect_time": connected - started, "mptcp": mptcp, "received": hs.received}
    if what:
        if hs.received:
            return ProbeResult(
                False,
                None,
                None,
                f"{server} answered, but not as mptun does ({hs.received} bytes that are no "
                f"mptun answer; {what})",
                ProbeFailure.GARBLED,
                **timing,
            )
        return _silent(server, what, **timing)
    assert event is not None
    rtt = answered - connected
    if event.status != ConnectStatus.SUCCEEDED:
        return ProbeResult(
            False, event.status, rtt, _too_old(event.status), ProbeFailure.REFUSED, **timing
        )
    return ProbeResult(True, event.status, rtt, "", **timing)


def _unreachable(reason: str) -> ProbeResult:
    return ProbeResult(False, None, None, reason, ProbeFailure.UNREACHABLE)


def _silent(server: Address, what: str, **timing) -> ProbeResult:
    reason = f"{server} accepted the connection but {what}"
    return ProbeResult(False, None, None, reason, ProbeFailure.SILENT, **timing)
