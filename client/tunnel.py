"""The one path every client listener shares: dial the server, handshake, relay.

Listeners differ only in where the target comes from (a SOCKS request, the original destination of
a redirected connection, a fixed forward); each hands an accepted socket, its target and any bytes
already read to `Tunneler.run`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mptun.client import fastopen
from mptun.client.fastopen import FastOpenPaths
from mptun.client.monitor import ServerMonitor
from mptun.client.pool import TunnelPool
from mptun.client.servers import Change, Policy, Server, ServerSet, State, WhenDown
from mptun.common.address import Address
from mptun.common.crypto import CipherSpec
from mptun.common.drive import drive, recv_now
from mptun.common.errors import ProtocolError, Status
from mptun.common.handshake import (
    CHECK_TARGET,
    MAX_EARLY_DATA,
    TYPE_REQUEST,
    ClientHandshake,
    ConnectStatus,
    Response,
    WireMode,
)
from mptun.common.logutil import BurstLog, connection_level, human_bytes
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
    wait_ready,
)

if TYPE_CHECKING:
    from mptun.client.health import HealthMonitor

log = logging.getLogger("mptun.client")


async def _connect_or_close(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    addr: tuple,
    timeout: float,
    how: Coroutine[None, None, None] | None = None,
) -> OSError | None:
    """Connect `sock` (by `how` when given); on failure close it and return the error (the
    caller tries the next address), and close it on cancellation too."""
    try:
        await (how if how is not None else connect(loop, sock, addr, timeout))
    except OSError as e:
        sock.close()
        return e
    except BaseException:
        sock.close()
        raise
    return None


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
    prefix: bytes = b""  # the first bytes of every first flight (--prefix, docs/PROTOCOL.md)
    # More servers after `server`, in the order of preference (--server given again)
    more_servers: tuple[Server, ...] = ()
    policy: Policy = Policy.FAILOVER  # --server-policy
    when_down: WhenDown = WhenDown.REJECT  # --when-down: every server down
    check_interval: float = 2.0  # seconds between two checks of a server (--server-check-interval)
    log_connections: bool = False  # connected/closed lines at info (--log-connections), else debug
    fast_open: bool = False  # the first flight in the SYN once a cookie is cached (--fast-open)
    pool: int = 0  # tunnels connected ahead to the preferred server (--pool, client/pool.py)

    @property
    def servers(self) -> tuple[Server, ...]:
        """Every server, the first (`server`, `psk`) first."""
        return (Server(self.server, self.psk), *self.more_servers)


@dataclass
class _Connection:
    """One accepted connection on its way through `Tunneler.run`: what every step needs."""

    cid: str
    source: str
    inner: socket.socket
    target: Address
    on_status: StatusHook | None
    started: float  # time.monotonic() when `run` took it
    server: Server | None = None  # the server its tunnel connected to (`_open_any`)
    early: bytes = b""  # with --fast-open: the early data, read before connecting
    # with --fast-open: each server's handshake whose first flight went with its connect
    flights: dict[int, ClientHandshake] = field(default_factory=dict)
    hs: ClientHandshake | None = None  # the winner's, its first flight sent
    tunnel: socket.socket | None = None  # the fresh tunnel that replaced a dead pooled one
    kind: int = TYPE_REQUEST  # its first flight's request type (TYPE_UDP: client/udp.py)


@dataclass
class LiveTunnel:
    """A tunnel that is relaying: what `mptun status` reports (client/control.py)."""

    cid: str
    source: str
    target: Address
    sock: socket.socket
    started: float


# What a client user reads after "server says not allowed": the refusal is the server's policy.
_NOT_ALLOWED_HINT = (
    " (by the server's target policy: its own, loopback and private addresses are refused unless "
    "the server runs with --allow-target CIDR or --allow-private)"
)


class TunnelError(Exception):
    """The tunnel could not be set up; `status` says why (CONNECT, AUTH, TIMEOUT...)."""

    def __init__(self, message: str, status: Status, errno: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errno = errno  # of the last failed connect, when that is why


class Tunneler:
    """Carries the client's connections through tunnels to the server.

    `run` takes one accepted connection from start to end (connect a tunnel, handshake, relay,
    log); `open` connects a bare tunnel (also for `--check`). One instance serves every listener
    and owns what they share: the transport choice (MPTCP or TCP), the counters, the tunnels
    relaying now (`live`), and the servers: their health (`servers`, client/servers.py), the
    checks that keep it (`monitor`) and what happens while every one is down (`--when-down`).
    """

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self.servers = ServerSet(config.servers, config.policy, on_change=self._log_change)
        # a check waits for its answer as long as the interval, but 1 s at least and 3 s at most
        # (a server that takes longer to answer a check is no use to new tunnels)
        timeout = max(1.0, min(config.check_interval, 3.0))
        self.monitor = ServerMonitor(
            self.servers, config.cipher, config.check_interval, timeout, prefix=config.prefix
        )
        self._direct_log = BurstLog(log, logging.WARNING)
        # seconds a tunnel waits for a server's connect before trying the next beside it: time
        # for one lost SYN, retransmitted after 1 s (TCP_TIMEOUT_INIT, include/net/tcp.h)
        self.race_after = 2.0
        self.transport = Transport(want_mptcp=config.mptcp)
        self.counters: Counter[str] = Counter()
        # Bytes of the tunnels that have ended (--metrics): up LAN -> server, down back.
        self.bytes_up = 0
        self.bytes_down = 0
        self._ids = 0
        self.live: dict[str, LiveTunnel] = {}  # relaying now, for `mptun status`
        self._down_log = BurstLog(log, logging.WARNING)
        self._silent_log = BurstLog(log, logging.WARNING, interval=60.0)
        self._warned_fallback = False
        self._keepalive_warned = False
        self.uplinks: HealthMonitor | None = None  # uplink health, with --uplink (app.py)
        self.fast_open = FastOpenPaths()  # paths that drop SYNs with data (--fast-open)
        self.pool: TunnelPool | None = None
        self._pooled_out: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # taken from it
        if config.pool:
            opener = lambda server: self._dial(asyncio.get_running_loop(), server)  # noqa: E731
            self.pool = TunnelPool(config.pool, opener, self._pool_target, self.counters)

    def next_id(self) -> str:
        self._ids += 1
        return f"c{self._ids}"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start checking the servers (idempotent; `run` starts it too)."""
        self.monitor.start(loop)
        if self.pool is not None:
            self.pool.start(loop)

    def close(self) -> None:
        """Stop checking the servers."""
        self.monitor.close()
        if self.pool is not None:
            self.pool.close()

    @property
    def preferred(self) -> Address:
        """The server a new tunnel tries first now (the first server while every one is down)."""
        order = self.servers.order()
        return self.servers.servers[order[0] if order else 0].address

    @property
    def rejecting(self) -> bool:
        """Every server is down and `--when-down reject`: new connections are refused at once."""
        return self.servers.all_down and self.config.when_down is WhenDown.REJECT

    def _log_change(self, change: Change) -> None:
        """One line per state change of a server, saying where new tunnels go now."""
        if change.new is State.UP:
            rtt = self.servers.health[change.index].rtt
            how = f" (check round trip {rtt * 1000:.0f} ms)" if rtt is not None else ""
            again = " again" if change.old is State.DOWN else ""
            level = logging.WARNING if again else logging.INFO  # "again" ends a warning
            log.log(level, "server %s is up%s%s", change.server, again, how)
            return
        if self.servers.all_down:
            then = (
                "new connections go straight to their destinations (--when-down direct)"
                if self.config.when_down is WhenDown.DIRECT
                else "new connections are refused (--when-down reject)"
            )
            where = f"every server is down: {then}" if len(self.servers) > 1 else then
        else:
            nxt = self.servers.order()
            where = f"new tunnels go to {self.servers.servers[nxt[0]].address}" if nxt else ""
        log.warning("server %s is down: %s; %s", change.server, change.reason, where)

    async def open(self, loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, bool | None]:
        """Connect a tunnel socket to the first server; raise TunnelError when it cannot."""
        return await self._open(loop, self.config.server)

    async def open_best(
        self, loop: asyncio.AbstractEventLoop, cid: str, source: str, kind: int, early: bytes
    ) -> tuple[socket.socket, bool | None, Server, ClientHandshake | None]:
        """Connect a tunnel socket to the best server as `run` does (failover, racing, the
        pool), for tunnels that relay no accepted socket (UDP associations: client/udp.py);
        the socket, whether it is MPTCP, the server (its key signs the handshake), and the
        handshake whose first flight (of request type `kind`, with `early`) went with the
        connect (--fast-open), else None: the caller sends one. TunnelError if none."""
        self.start(loop)
        conn = _Connection(cid, source, None, CHECK_TARGET, None, time.monotonic())  # type: ignore[arg-type]
        conn.kind, conn.early = kind, early
        sock, mptcp = await self._open_any(loop, conn)
        assert conn.server is not None
        return sock, mptcp, conn.server, conn.hs

    async def _open_any(
        self, loop: asyncio.AbstractEventLoop, conn: _Connection
    ) -> tuple[socket.socket, bool | None]:
        """Connect a tunnel to the best server; sets `conn.server`.

        When a connect fails, the next server is tried at once (the failed one is down for new
        tunnels until a check answers). When one has not connected after `race_after` seconds
        (its packets may be dropped), the next is tried beside it and the first to connect wins,
        so a server that went silent costs a new tunnel `race_after`, not --connect-timeout,
        until the checks find it down (the slow one is checked at once)."""
        queue = self.servers.order()
        if not queue:
            raise TunnelError("every server is down", Status.CONNECT)
        if len(queue) == 1:  # nothing to race: no task and no wait (a connection's CPU)
            i = queue[0]
            first = self._first_flight(conn, i) if self.config.fast_open else None
            try:
                result = await self._open(loop, self.servers.servers[i].address, first)
            except TunnelError as e:
                self._attempt_failed(i, e)
                raise
            self._attempt_won(i, conn)
            return result
        attempts: dict[asyncio.Task, int] = {}
        last: TunnelError | None = None
        try:
            while queue or attempts:
                if queue and not attempts:
                    self._attempt(loop, attempts, queue.pop(0), conn)
                wait = self.race_after if queue else None
                done, _ = await asyncio.wait(
                    attempts, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:  # the first has not connected yet: the next beside it
                    for i in attempts.values():
                        self.monitor.wake(i)
                    self._attempt(loop, attempts, queue.pop(0), conn)
                    continue
                won: tuple[socket.socket, bool | None] | None = None
                for task in done:
                    i = attempts.pop(task)
                    try:
                        result = task.result()
                    except TunnelError as e:
                        last = e
                        self._attempt_failed(i, e)
                        continue
                    if won is not None:  # two at once: keep one
                        result[0].close()
                        continue
                    self._attempt_won(i, conn)
                    won = result
                if won is not None:
                    return won
        finally:
            for task in attempts:  # the slower ones: dropped, their sockets closed
                task.cancel()
                task.add_done_callback(_close_result)
        assert last is not None
        raise last

    def _attempt_failed(self, i: int, e: TunnelError) -> None:
        """Server `i` failed a tunnel's connect: down for new tunnels until a check answers."""
        reason = str(e).removeprefix(f"server {self.servers.servers[i].address} ")
        self.servers.tunnel_failed(i, reason)
        self.monitor.wake(i)

    def _attempt_won(self, i: int, conn: _Connection) -> None:
        """Server `i` connected `conn`'s tunnel."""
        self.servers.tunnel_ok(i)
        conn.server = self.servers.servers[i]
        conn.hs = conn.flights.get(i)

    def _attempt(
        self,
        loop: asyncio.AbstractEventLoop,
        attempts: dict[asyncio.Task, int],
        i: int,
        conn: _Connection,
    ) -> None:
        first = self._first_flight(conn, i) if self.config.fast_open else None
        attempts[loop.create_task(self._open(loop, self.servers.servers[i].address, first))] = i

    def _first_flight(self, conn: _Connection, i: int) -> Callable[[], bytes]:
        """What makes server `i`'s first flight for `conn` (--fast-open: it goes with the
        connect); the handshake is kept in `conn.flights`."""

        def make() -> bytes:
            cfg = self.config
            psk = self.servers.servers[i].psk
            hs = ClientHandshake(
                psk, cfg.cipher, conn.target, cfg.mode, prefix=cfg.prefix, kind=conn.kind
            )
            conn.flights[i] = hs
            return hs.first_flight(conn.early[:MAX_EARLY_DATA])

        return make

    def _pool_target(self) -> Address:
        """The server the pool connects tunnels to: the one new tunnels try first."""
        return self.preferred

    async def _open(
        self,
        loop: asyncio.AbstractEventLoop,
        server: Address,
        first: Callable[[], bytes] | None = None,
    ) -> tuple[socket.socket, bool | None]:
        """A connected tunnel socket to `server`: a pooled one when there is one (--pool),
        else a new one; with `first`, its first flight sent (in the SYN with --fast-open)."""
        pooled = self.pool.take(server) if self.pool is not None else None
        if pooled is None:
            return await self._dial(loop, server, first)
        self._pooled_out.add(pooled[0])
        if first is not None:
            try:
                await loop.sock_sendall(pooled[0], first())
            except OSError as e:
                pooled[0].close()
                raise TunnelError(f"server {server}: {e.strerror}", Status.CONNECT) from None
            except BaseException:
                pooled[0].close()
                raise
        return pooled

    async def _dial(
        self,
        loop: asyncio.AbstractEventLoop,
        server: Address,
        first: Callable[[], bytes] | None = None,
    ) -> tuple[socket.socket, bool | None]:
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
            if self.uplinks is not None:  # first subflow from a fit uplink (client/health.py)
                self.uplinks.bind(sock, Address(ip, server.port).sockaddr())
            if self.transport.fell_back and not self._warned_fallback:
                self._warned_fallback = True
                log.warning("MPTCP unavailable on this kernel: tunnels use plain TCP")
            sockaddr = Address(ip, server.port).sockaddr()
            how = None
            if first is not None:  # --fast-open: the first flight goes with the connect
                timeout, paths = self.config.connect_timeout, self.fast_open
                flight = first()
                how = fastopen.connect(loop, sock, sockaddr, flight, timeout, paths, self.counters)
            error = await _connect_or_close(loop, sock, sockaddr, self.config.connect_timeout, how)
            if error is not None:
                last = error
                continue
            tune_leg(sock)
            if not set_keepalive(sock) and not self._keepalive_warned:
                self._keepalive_warned = True
                log.info("keepalive timings refused on the tunnel socket: using SO_KEEPALIVE")
            set_user_timeout(sock, self.config.user_timeout)
            mptcp = is_mptcp(sock)
            if mptcp is False:  # no MPTCP option in the SYN-ACK (`mptun status` shows the count)
                self.counters["mptcp-fallback"] += 1
            if self.uplinks is not None:
                self.uplinks.opened(sock, mptcp)  # evidence for mptcp-broken uplinks
            return sock, mptcp
        assert last is not None
        raise TunnelError(
            f"server {server} unreachable: {last.strerror}", Status.CONNECT, last.errno
        )

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
        self.start(loop)
        if self.servers.all_down:  # no tunnel to wait for: refused or direct at once
            await self._when_down(loop, conn, early_data)
            return
        connected = await self._connect(loop, conn, early_data, wait_for_early_data)
        if connected is None:
            return
        tunnel, mptcp, early_data = connected
        answered = await self._handshake(loop, conn, tunnel, mptcp, early_data)
        if answered is None:
            return
        hs, rest = answered
        tunnel = conn.tunnel or tunnel  # --pool: a dead pooled tunnel was replaced
        await self._relay(loop, conn, tunnel, hs, rest, len(early_data))

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _Connection,
        early_data: bytes,
        wait_for_early_data: bool,
    ) -> tuple[socket.socket, bool | None, bytes] | None:
        """Connect a tunnel, then read the application's first bytes (queued in its socket while
        the tunnel connected): the tunnel socket, whether it is MPTCP (`open`), and the early
        data. None when it failed (`inner` is done)."""
        inner = conn.inner
        wait = self.config.early_data_wait
        want_early = wait_for_early_data and len(early_data) < MAX_EARLY_DATA
        if self.config.fast_open and want_early:
            # The early data rides the SYN, so it is read before connecting: at once when the
            # application has sent, else after early_data_wait (the server speaks first).
            try:
                early_data += await _read_early(loop, inner, wait, MAX_EARLY_DATA - len(early_data))
            except OSError as e:
                log.info("%s %s: client connection failed: %s", conn.cid, conn.source, e.strerror)
                reset(inner)
                return None
            want_early = False
        conn.early = early_data
        try:
            tunnel, mptcp = await self._open_any(loop, conn)
        except TunnelError as e:
            self.counters[e.status.value] += 1
            if self.servers.all_down and self.config.when_down is WhenDown.DIRECT:
                await self._when_down(loop, conn, early_data)
                return None
            line = ("%s %s -> %s: %s; resetting", conn.cid, conn.source, conn.target, e)
            if not self._down_log(*line):
                log.debug(*line)  # once per burst above; each one at debug
            await self._refuse(conn, ConnectStatus.GENERAL_FAILURE)
            return None
        except OSError as e:  # e.g. no descriptor left for the tunnel's socket (EMFILE)
            log.info("%s %s: client connection failed: %s", conn.cid, conn.source, e.strerror)
            reset(inner)
            return None
        except BaseException:
            reset(inner)
            raise
        if want_early:
            # What the application sent while the tunnel connected (kept queued in its socket
            # meanwhile), else what it sends within early_data_wait: protocols where the
            # server speaks first send nothing.
            try:
                early_data += await _read_early(loop, inner, wait, MAX_EARLY_DATA - len(early_data))
            except OSError as e:
                log.info("%s %s: client connection failed: %s", conn.cid, conn.source, e.strerror)
                tunnel.close()
                reset(inner)
                return None
            except BaseException:
                reset(tunnel)
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
        via = _VIA[mptcp]
        cfg = self.config
        psk = conn.server.psk if conn.server is not None else cfg.psk
        # --fast-open: the handshake whose first flight went with the connect
        hs = conn.hs or ClientHandshake(psk, cfg.cipher, target, cfg.mode, prefix=cfg.prefix)
        try:
            if conn.hs is None:
                await loop.sock_sendall(tunnel, hs.first_flight(early_data[:MAX_EARLY_DATA]))
            rest = early_data[MAX_EARLY_DATA:]
            if rest and self.config.mode == WireMode.PLAIN:
                await loop.sock_sendall(tunnel, rest)  # plain mode: bytes flow as they are
                rest = b""
            response = await self._read_response(loop, tunnel, hs)
        except (ProtocolError, TunnelError, OSError, TimeoutError) as e:
            fresh = await self._replace_pooled(loop, conn, tunnel, hs, e)
            if fresh is not None:
                conn.tunnel = fresh[0]
                return await self._handshake(loop, conn, *fresh, early_data)
            if isinstance(e, TimeoutError) and not hs.received:
                self.fast_open.unanswered(tunnel, self.counters)  # --fast-open held there
            status = getattr(
                e, "status", Status.TIMEOUT if isinstance(e, TimeoutError) else Status.CONNECT
            )
            self.counters[status.value] += 1
            self._log_failed_handshake(conn, hs, e, status)
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
        if response.status == ConnectStatus.SERVER_FULL:
            self._down_log(
                "%s -> %s: the server is full: its replay cache holds as many recent tunnels as "
                "it may (from this address, or in all); it refuses new ones until older ones "
                "expire (after 2 x its --replay-window). Open fewer tunnels, or ask its operator "
                "to raise --replay-capacity",
                cid,
                target,
            )
        if response.status != ConnectStatus.SUCCEEDED:
            self.counters["refused"] += 1
            log.info(
                "%s %s %s -> %s: server says %s%s",
                cid,
                source,
                via,
                target,
                response.status.name.lower().replace("_", " "),
                _NOT_ALLOWED_HINT if response.status == ConnectStatus.NOT_ALLOWED else "",
            )
            tunnel.close()
            await self._refuse(conn, response.status)
            return None
        if conn.on_status is not None and not await conn.on_status(response.status):
            tunnel.close()
            reset(conn.inner)
            return None
        level = connection_level(self.config.log_connections)
        if log.isEnabledFor(level):  # the arguments cost a connection's CPU even unlogged
            log.log(
                level,
                "%s %s %s -> %s: connected in %.0f ms%s",
                cid,
                source,
                via,
                target,
                (time.monotonic() - conn.started) * 1000,
                f" via {conn.server.address}" if conn.server and len(self.servers) > 1 else "",
            )
        return hs, rest

    async def _replace_pooled(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _Connection,
        tunnel: socket.socket,
        hs: ClientHandshake,
        error: Exception,
    ) -> tuple[socket.socket, bool | None] | None:
        """A fresh tunnel for one from the pool that the server had dropped unseen (a reset or
        an end before any answer byte: e.g. the server restarted while it waited unaccepted,
        which sends the client nothing); None when `tunnel` is no such case or none connects.

        Its first flight reached no server that kept it, so a new one goes on the new tunnel."""
        if tunnel not in self._pooled_out or hs.received:
            return None
        if not isinstance(error, OSError | TunnelError) or isinstance(error, TimeoutError):
            return None
        self._pooled_out.discard(tunnel)
        tunnel.close()
        self.counters["pool-retried"] += 1
        conn.hs = None
        try:
            server = conn.server.address if conn.server else self.config.server
            return await self._dial(loop, server)
        except TunnelError:
            return None

    def _log_failed_handshake(
        self, conn: _Connection, hs: ClientHandshake, e: Exception, status: Status
    ) -> None:
        """One line for every failed handshake: the first of a burst with the advice, the others
        short (an answer that is not mptun's, and silence, are told apart by the bytes)."""
        head = (conn.cid, conn.source, conn.target)
        if isinstance(e, TimeoutError):
            why = f"no answer within {self.config.handshake_timeout:g} s"
        else:
            why = str(e) or type(e).__name__
        if hs.received:  # an mptun server sends nothing before its authenticated answer
            logged = self._silent_log(
                "%s %s -> %s: the server answered, but not as mptun does (%d bytes, %s): this "
                "is not an mptun server; check the address and port of --server.",
                *head,
                hs.received,
                why,
            )
        elif status in (Status.TIMEOUT, Status.AUTH):
            logged = self._silent_log(
                "%s %s -> %s: the server did not answer the handshake (%s). Check that client "
                "and server use the same key and cipher, and that this machine's clock is right "
                "(the server ignores requests more than a minute off), or this is not an mptun "
                "server (check the address and port of --server).",
                *head,
                why,
            )
        else:
            logged = self._down_log("%s %s -> %s: tunnel failed: %s", *head, why)
        if not logged:  # the advice went out with the first of this burst
            log.info("%s %s -> %s: handshake failed: %s", *head, why)

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
        self.bytes_up += stats.to_tunnel + early_bytes
        self.bytes_down += stats.from_tunnel
        if not stats.clean and stats.status is not None:
            self.counters[stats.status.value] += 1
        level = connection_level(self.config.log_connections)
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
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

    async def _when_down(
        self, loop: asyncio.AbstractEventLoop, conn: _Connection, early_data: bytes
    ) -> None:
        """Every server is down: refuse the connection at once, or (--when-down direct) connect
        it straight to its destination from here, unencrypted, as if there were no tunnel."""
        head = (conn.cid, conn.source, conn.target)
        if self.config.when_down is WhenDown.REJECT:
            self.counters["all-servers-down"] += 1
            line = ("%s %s -> %s: every server is down (--when-down reject); resetting", *head)
            if not self._down_log(*line):
                log.debug(*line)
            await self._refuse(conn, ConnectStatus.GENERAL_FAILURE)
            return
        self.counters["direct"] += 1
        line = ("%s %s -> %s: every server is down: direct (--when-down direct)", *head)
        if not self._direct_log(*line):  # once per burst above; each one as --log-connections says
            log.log(connection_level(self.config.log_connections), *line)
        try:
            far = await self._open_direct(loop, conn.target)
        except TunnelError as e:
            self.counters["direct-failed"] += 1
            log.info("%s %s -> %s: direct connection failed: %s", *head, e)
            await self._refuse(
                conn, _STATUS_OF_ERRNO.get(e.errno or 0, ConnectStatus.HOST_UNREACHABLE)
            )
            return
        try:
            if conn.on_status is not None and not await conn.on_status(ConnectStatus.SUCCEEDED):
                reset(far)
                reset(conn.inner)
                return
            if early_data:
                await loop.sock_sendall(far, early_data)
        except OSError:
            reset(far)
            reset(conn.inner)
            return
        stats = await self.config.engine.relay(
            loop, conn.inner, far, idle_timeout=self.config.idle_timeout, session=PLAIN
        )
        log.log(
            connection_level(self.config.log_connections),
            "%s %s closed after %.1f s (direct): up %s, down %s",
            conn.cid,
            conn.target,
            stats.seconds,
            human_bytes(stats.to_tunnel + len(early_data)),
            human_bytes(stats.from_tunnel),
        )

    async def _open_direct(self, loop: asyncio.AbstractEventLoop, target: Address) -> socket.socket:
        """A plain TCP connection from this machine to `target` (TunnelError when none)."""
        if target.is_domain:
            try:
                addrs = await resolve(loop, str(target.host), target.port)
            except OSError as e:
                raise TunnelError(f"{target}: {e}", Status.DNS) from None
        else:
            addrs = [target.host]  # type: ignore[list-item]
        last: OSError | None = None
        for ip in addrs:
            sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
            sock.setblocking(False)
            error = await _connect_or_close(
                loop, sock, Address(ip, target.port).sockaddr(), self.config.connect_timeout
            )
            if error is not None:
                last = error
                continue
            tune_leg(sock)
            return sock
        if last is None:
            raise TunnelError(f"{target}: no address", Status.DNS)
        raise TunnelError(f"{target}: {last.strerror or last}", Status.CONNECT, last.errno)

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


_VIA = {True: "mptcp", False: "tcp-fallback", None: "tcp"}  # how a tunnel runs, for its lines


def _close_result(task: asyncio.Task) -> None:
    """Close the socket of a dropped connect attempt that connected after all."""
    if not task.cancelled() and task.exception() is None:
        task.result()[0].close()


# How a failed direct connection is told to a SOCKS client.
_STATUS_OF_ERRNO = {
    errno.ECONNREFUSED: ConnectStatus.CONNECTION_REFUSED,
    errno.ENETUNREACH: ConnectStatus.NETWORK_UNREACHABLE,
    errno.ETIMEDOUT: ConnectStatus.TIMED_OUT,
}


async def _read_early(
    loop: asyncio.AbstractEventLoop, inner: socket.socket, wait: float, limit: int
) -> bytes:
    """The application's first bytes, to ride in the first flight: what is queued now, else what
    arrives within `wait` seconds (nothing, for protocols where the server speaks first)."""
    data = recv_now(inner, limit)
    if data is None and await wait_ready(loop, inner, wait):
        data = recv_now(inner, limit)
    return data or b""
