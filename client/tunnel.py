"""The one path every client listener shares: dial the server, handshake, relay.

Listeners differ only in where the target comes from (a SOCKS request, the original destination of
a redirected connection, a fixed forward); each hands an accepted socket, its target and any bytes
already read to `Tunneler.run`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mptun.common.address import Address
from mptun.common.crypto import CipherSpec
from mptun.common.drive import drive
from mptun.common.errors import ProtocolError, Status
from mptun.common.handshake import (
    MAX_EARLY_DATA,
    ClientHandshake,
    ConnectStatus,
    Response,
    WireMode,
)
from mptun.common.logutil import BurstLog, human_bytes
from mptun.common.records import MAX_PLAINTEXT
from mptun.common.relay import PLAIN, Engine, Session, Side
from mptun.common.sockets import (
    Transport,
    connect,
    family_of,
    is_mptcp,
    reset,
    resolve,
    set_keepalive,
    set_user_timeout,
    tune_leg,
)

log = logging.getLogger("mptun.client")

# Called with the server's answer before relaying (a SOCKS reply in `verified` mode); returns
# False when the connection should not be relayed.
StatusHook = Callable[[ConnectStatus], Awaitable[bool]]


@dataclass
class TunnelConfig:
    server: Address
    psk: bytes = field(repr=False)  # never in a log line, even a debug repr
    cipher: CipherSpec
    engine: Engine
    mptcp: bool = True
    mode: WireMode = WireMode.ENCRYPTED
    connect_timeout: float = 10.0
    handshake_timeout: float = 15.0  # covers the server's own connect to the target
    early_data_wait: float = 0.05  # how long to wait for the application's first bytes
    idle_timeout: float | None = None
    user_timeout: float = 60.0


@dataclass
class _Connection:
    """One accepted connection on its way through `Tunneler.run`: what every step needs."""

    cid: str
    source: str
    inner: socket.socket
    target: Address
    on_status: StatusHook | None
    started: float  # time.monotonic() when `run` took it


@dataclass
class LiveTunnel:
    """A tunnel that is relaying: what `mptun status` reports (client/control.py)."""

    cid: str
    source: str
    target: Address
    sock: socket.socket
    started: float


class TunnelError(Exception):
    """The tunnel could not be set up; `status` says why (CONNECT, AUTH, TIMEOUT...)."""

    def __init__(self, message: str, status: Status) -> None:
        super().__init__(message)
        self.status = status


class Tunneler:
    """Carries the client's connections through tunnels to the server.

    `run` takes one accepted connection from start to end (connect a tunnel, handshake, relay,
    log); `open` connects a bare tunnel (also for `--check`). One instance serves every listener
    and owns what they share: the transport choice (MPTCP or TCP), the counters, the tunnels
    relaying now (`live`) and the fail-fast state while the server is down.
    """

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self.transport = Transport(want_mptcp=config.mptcp)
        self.counters: Counter[str] = Counter()
        self._ids = 0
        self.live: dict[str, LiveTunnel] = {}  # relaying now, for `mptun status`
        self._down_log = BurstLog(log, logging.WARNING)
        self._silent_log = BurstLog(log, logging.WARNING, interval=60.0)
        self._warned_fallback = False
        self._keepalive_warned = False
        # Fail fast while the server is down: after a failed connect, new tunnels fail at once for
        # `down_hold` seconds and while one retry is under way, instead of each one waiting out
        # --connect-timeout (a blackholed VPS would hang every redirected connection for it).
        self.down_hold = 1.0
        self._failed_at: float | None = None
        self._retrying = False

    def next_id(self) -> str:
        self._ids += 1
        return f"c{self._ids}"

    async def open(self, loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, bool | None]:
        """Connect a tunnel socket to the server; raise TunnelError when it cannot."""
        if self._failed_at is not None and (
            self._retrying or time.monotonic() - self._failed_at < self.down_hold
        ):
            raise TunnelError(
                f"server {self.config.server} unreachable (failing fast until a retry connects)",
                Status.CONNECT,
            )
        retry = self._failed_at is not None
        self._retrying = retry
        try:
            result = await self._open(loop)
        except TunnelError:
            self._failed_at = time.monotonic()
            raise
        finally:
            if retry:
                self._retrying = False
        self._failed_at = None
        return result

    async def _open(self, loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, bool | None]:
        server = self.config.server
        if server.is_domain:
            try:
                addrs = await resolve(loop, str(server.host), server.port)
            except OSError as e:
                raise TunnelError(f"server {server}: {e}", Status.DNS) from None
            if not addrs:
                raise TunnelError(f"server {server}: no address", Status.DNS)
        else:
            addrs = [server.host]  # type: ignore[list-item]
        last: OSError | None = None
        for ip in addrs:
            sock, _ = self.transport.socket(family_of(ip))
            if self.transport.fell_back and not self._warned_fallback:
                self._warned_fallback = True
                log.warning("MPTCP unavailable on this kernel: tunnels use plain TCP")
            try:
                await connect(
                    loop, sock, Address(ip, server.port).sockaddr(), self.config.connect_timeout
                )
            except OSError as e:
                sock.close()
                last = e
                continue
            except BaseException:
                sock.close()
                raise
            tune_leg(sock)
            if not set_keepalive(sock) and not self._keepalive_warned:
                self._keepalive_warned = True
                log.info("keepalive timings refused on the tunnel socket: using SO_KEEPALIVE")
            set_user_timeout(sock, self.config.user_timeout)
            return sock, is_mptcp(sock)
        assert last is not None
        raise TunnelError(f"server {server} unreachable: {last.strerror}", Status.CONNECT)

    async def run(
        self,
        cid: str,
        source: str,
        inner: socket.socket,
        target: Address,
        early_data: bytes = b"",
        on_status: StatusHook | None = None,
        wait_for_early_data: bool = True,
    ) -> None:
        """Tunnel `inner` to `target`. Owns `inner` from here: it is always closed.

        Three steps, each of which ends the connection itself when it fails: connect a tunnel
        while reading the application's first bytes, handshake, relay.
        """
        loop = asyncio.get_running_loop()
        conn = _Connection(cid, source, inner, target, on_status, time.monotonic())
        tune_leg(inner)
        connected = await self._connect(loop, conn, early_data, wait_for_early_data)
        if connected is None:
            return
        tunnel, mptcp, early_data = connected
        answered = await self._handshake(loop, conn, tunnel, mptcp, early_data)
        if answered is None:
            return
        hs, rest = answered
        await self._relay(loop, conn, tunnel, hs, rest, len(early_data))

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _Connection,
        early_data: bytes,
        wait_for_early_data: bool,
    ) -> tuple[socket.socket, bool | None, bytes] | None:
        """Connect a tunnel, reading the application's first bytes meanwhile: the tunnel socket,
        whether it is MPTCP (`open`), and the early data. None when it failed (`inner` is done)."""
        inner = conn.inner
        connecting = loop.create_task(self.open(loop))
        try:
            if wait_for_early_data and len(early_data) < MAX_EARLY_DATA:
                early_data += await _read_early(
                    loop, inner, connecting, self.config, MAX_EARLY_DATA - len(early_data)
                )
            tunnel, mptcp = await connecting
        except TunnelError as e:
            self.counters[e.status.value] += 1
            self._down_log("%s %s -> %s: %s; resetting", conn.cid, conn.source, conn.target, e)
            await self._refuse(conn, ConnectStatus.GENERAL_FAILURE)
            return None
        except OSError as e:
            connecting.cancel()
            log.info("%s %s: client connection failed: %s", conn.cid, conn.source, e.strerror)
            reset(inner)
            return None
        except BaseException:
            connecting.cancel()
            reset(inner)
            raise
        return tunnel, mptcp, early_data

    async def _handshake(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _Connection,
        tunnel: socket.socket,
        mptcp: bool | None,
        early_data: bytes,
    ) -> tuple[ClientHandshake, bytes] | None:
        """Send the first flight, read the server's answer, tell the application (`on_status`).

        Returns the handshake and the early data that did not fit the first flight (still to
        send, sealed in encrypted mode); None when the connection ended here.
        """
        cid, source, target = conn.cid, conn.source, conn.target
        via = {True: "mptcp", False: "tcp-fallback", None: "tcp"}[mptcp]
        hs = ClientHandshake(self.config.psk, self.config.cipher, target, self.config.mode)
        try:
            await loop.sock_sendall(tunnel, hs.first_flight(early_data[:MAX_EARLY_DATA]))
            rest = early_data[MAX_EARLY_DATA:]
            if rest and self.config.mode == WireMode.PLAIN:
                await loop.sock_sendall(tunnel, rest)  # plain mode: bytes flow as they are
                rest = b""
            response = await self._read_response(loop, tunnel, hs)
        except (ProtocolError, TunnelError, OSError, TimeoutError) as e:
            status = getattr(
                e, "status", Status.TIMEOUT if isinstance(e, TimeoutError) else Status.CONNECT
            )
            self.counters[status.value] += 1
            if status in (Status.TIMEOUT, Status.AUTH):
                self._silent_log(
                    "%s %s -> %s: the server did not answer the handshake (%s). Check that "
                    "client and server use the same key and cipher, and that this machine's "
                    "clock is right (the server ignores requests more than a minute off).",
                    cid,
                    source,
                    target,
                    e or "timed out",
                )
            else:
                self._down_log("%s %s -> %s: tunnel failed: %s", cid, source, target, e)
            tunnel.close()
            await self._refuse(conn, ConnectStatus.GENERAL_FAILURE)
            return None
        except BaseException:
            reset(tunnel)
            reset(conn.inner)
            raise
        if response.status == ConnectStatus.MODE_REFUSED:
            self._down_log(
                "%s -> %s: the server refuses plain bulk data (this client runs --bulk plain; "
                "start the server with --bulk plain too, or use the default encrypted mode)",
                cid,
                target,
            )
        if response.status != ConnectStatus.SUCCEEDED:
            self.counters["refused"] += 1
            log.info(
                "%s %s %s -> %s: server says %s",
                cid,
                source,
                via,
                target,
                response.status.name.lower().replace("_", " "),
            )
            tunnel.close()
            await self._refuse(conn, response.status)
            return None
        if conn.on_status is not None and not await conn.on_status(response.status):
            tunnel.close()
            reset(conn.inner)
            return None
        log.info(
            "%s %s %s -> %s: connected in %.0f ms",
            cid,
            source,
            via,
            target,
            (time.monotonic() - conn.started) * 1000,
        )
        return hs, rest

    async def _relay(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _Connection,
        tunnel: socket.socket,
        hs: ClientHandshake,
        rest: bytes,
        early_bytes: int,
    ) -> None:
        """Relay until either end closes, listed in `live` meanwhile; count and log the end.

        `early_bytes` (all the early data, in the first flight or after it) count as sent up.
        """
        cid, target = conn.cid, conn.target
        session: Session | None = PLAIN
        if self.config.mode == WireMode.ENCRYPTED:
            session = await self._encrypted_session(loop, tunnel, hs, rest)
        if session is None:
            reset(tunnel)
            reset(conn.inner)
            return
        self.live[cid] = LiveTunnel(cid, conn.source, target, tunnel, time.monotonic())
        try:
            stats = await self.config.engine.relay(
                loop, conn.inner, tunnel, idle_timeout=self.config.idle_timeout, session=session
            )
        finally:
            self.live.pop(cid, None)
        self.counters["relayed"] += 1
        if not stats.clean and stats.status is not None:
            self.counters[stats.status.value] += 1
        log.info(
            "%s %s closed after %.1f s: up %s, down %s, %s, %s (%d reads)",
            cid,
            target,
            stats.seconds,
            human_bytes(stats.to_tunnel + early_bytes),
            human_bytes(stats.from_tunnel),
            stats.engine,
            "clean" if stats.clean else f"reset ({stats.error})",
            stats.reads,
        )

    async def _encrypted_session(
        self,
        loop: asyncio.AbstractEventLoop,
        tunnel: socket.socket,
        hs: ClientHandshake,
        rest: bytes,
    ) -> Session | None:
        """The session of an encrypted tunnel; early data beyond the first flight goes first,
        sealed here (so a kTLS engine starts at the next sequence number)."""
        cipher, keys = self.config.cipher, hs.bulk_keys()
        session = Session(WireMode.ENCRYPTED, Side.CLIENT, cipher, keys)
        if not rest:
            return session
        sealer = session.sealer()
        wire = b"".join(
            sealer.seal(rest[i : i + MAX_PLAINTEXT]) for i in range(0, len(rest), MAX_PLAINTEXT)
        )
        try:
            await loop.sock_sendall(tunnel, wire)
        except OSError:
            return None
        return Session(WireMode.ENCRYPTED, Side.CLIENT, cipher, keys, tx_seq=sealer.seq)

    async def _read_response(
        self, loop: asyncio.AbstractEventLoop, tunnel: socket.socket, hs: ClientHandshake
    ) -> Response:
        deadline = loop.time() + self.config.handshake_timeout
        response = await drive(loop, tunnel, hs, deadline)
        if response is None:
            raise TunnelError("server closed the tunnel during the handshake", Status.AUTH)
        return response

    async def _refuse(self, conn: _Connection, status: ConnectStatus) -> None:
        """Tell the application it failed: a SOCKS reply if it waits for one, else a reset."""
        if conn.on_status is not None:
            try:
                await conn.on_status(status)
            except OSError:
                pass
            conn.inner.close()
        else:
            reset(conn.inner)


async def _read_early(
    loop: asyncio.AbstractEventLoop,
    inner: socket.socket,
    connecting: asyncio.Task,
    config: TunnelConfig,
    limit: int,
) -> bytes:
    """The application's first bytes, read while the tunnel connects, to ride in the first flight.

    Waits until the tunnel is connected, then at most `early_data_wait` more, for protocols where
    the server speaks first.
    """
    readable = loop.create_future()
    fd = inner.fileno()
    loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
    try:
        await asyncio.wait({readable, connecting}, return_when=asyncio.FIRST_COMPLETED)
        connected = connecting.done() and not connecting.cancelled() and not connecting.exception()
        if not readable.done() and connected:
            await asyncio.wait({readable}, timeout=config.early_data_wait)
    finally:
        loop.remove_reader(fd)
    if not readable.done():
        return b""
    try:
        return inner.recv(limit)
    except BlockingIOError:
        return b""
