"""The server: accept, authenticate (absorbing failures), dial under the target policy, relay."""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from mptun.common.address import Address, format_sockaddr
from mptun.common.crypto import CipherSpec
from mptun.common.drive import recv_ready
from mptun.common.errors import ConfigError, ProtocolError, Status
from mptun.common.fastopen import enable_listener
from mptun.common.handshake import (
    CHECK_TARGET,
    BadTarget,
    CheckRequest,
    ConnectStatus,
    NeedData,
    Request,
    ServerEvent,
    ServerHandshake,
    UdpRequest,
    Unsupported,
    WireMode,
)
from mptun.common.limits import fit_connections
from mptun.common.listener import AcceptLoop, listen_hint
from mptun.common.logutil import BurstLog, connection_level, human_bytes
from mptun.common.relay import PLAIN, Engine, Session, Side
from mptun.common.replay import (
    DEFAULT_CAPACITY,
    DEFAULT_WINDOW,
    HighWater,
    ReplayGuard,
    SourceView,
    load_file,
    save_file,
)
from mptun.common.sockets import (
    Transport,
    connect,
    family_of,
    is_mptcp,
    listen_socket,
    set_keepalive,
    set_user_timeout,
    tune_leg,
)
from mptun.server.admission import (
    DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
    HandshakeGate,
    Ticket,
    source_key,
)
from mptun.server.policy import TargetPolicy
from mptun.server.resolver import ResolveError, Resolver
from mptun.server.udp import DEFAULT_IDLE_TIMEOUT, Filter, UdpHub, close_all

log = logging.getLogger("mptun.server")
# The accept queue: under a flood, evicted connections come back through it, and a legitimate one
# waits behind them; the kernel caps it at net.core.somaxconn (4096 since Linux 5.4).
LISTEN_BACKLOG = 4096
DEFER_ACCEPT = 1  # seconds a silent connection waits in the kernel before accept()

_ERRNO_STATUS = {
    errno.ECONNREFUSED: ConnectStatus.CONNECTION_REFUSED,
    errno.ENETUNREACH: ConnectStatus.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ConnectStatus.HOST_UNREACHABLE,
    errno.ETIMEDOUT: ConnectStatus.TIMED_OUT,
    errno.EADDRNOTAVAIL: ConnectStatus.NETWORK_UNREACHABLE,
}


@dataclass
class ServerConfig:
    listen: Address
    psk: bytes = field(repr=False)  # never in a log line, even a debug repr
    cipher: CipherSpec
    engine: Engine
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    mptcp: bool = True
    handshake_timeout: float = 10.0  # from accept; failed handshakes are absorbed until then
    connect_timeout: float = 10.0
    idle_timeout: float | None = None
    replay_window: float = DEFAULT_WINDOW
    replay_capacity: int = DEFAULT_CAPACITY
    max_connections: int | None = None  # None: the default (common/limits.py)
    # unauthenticated connections: at most this many (lowered to half of max_connections), and
    # per source (server/admission.py); beyond it the oldest is evicted
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    max_handshakes_per_source: int = DEFAULT_MAX_HANDSHAKES_PER_SOURCE
    accept_plain: bool = False  # plain tunnels only with --bulk plain; encrypted always
    user_timeout: float = 60.0
    replay_file: Path | None = None  # the salt cache is saved here on stop, loaded on start
    nameservers: tuple[Address, ...] = ()  # DNS servers for targets; () = /etc/resolv.conf's
    log_connections: bool = False  # connected/closed lines at info (--log-connections), else debug
    udp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # a UDP mapping's idle timeout (server/udp.py)
    udp_filter: Filter = Filter.ENDPOINT  # who may answer a UDP mapping (--udp-filter)


# What a reload may change while connections stay open; the rest needs a restart.
_RELOADABLE = (
    "psk",
    "cipher",
    "engine",
    "policy",
    "handshake_timeout",
    "connect_timeout",
    "idle_timeout",
    "replay_window",
    "accept_plain",
    "user_timeout",
    "nameservers",
    "log_connections",
    "udp_idle_timeout",
    "udp_filter",
)


def _has_unread(sock: socket.socket) -> bool:
    """Whether bytes wait unread in `sock` (a peek: they stay for the handshake to read)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def _differs(name: str, a: ServerConfig, b: ServerConfig) -> bool:
    if name == "engine":  # a new instance of the same engine is no change
        return a.engine.name != b.engine.name
    return getattr(a, name) != getattr(b, name)


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.transport = Transport(want_mptcp=config.mptcp)
        # Flights stamped before this process started are refused for a window: a cache lost in
        # a crash cannot be replayed into (docs/PROBING.md, "Replay"); start() may raise the
        # bound past the high-water mark a crashed process persisted.
        self.started = time.time()
        self.replay = ReplayGuard(
            config.replay_window, config.replay_capacity, not_before=math.floor(self.started)
        )
        self.counters: Counter[str] = Counter()
        # Bytes of the tunnels that have ended (--metrics): up client -> target, down back.
        self.bytes_up = 0
        self.bytes_down = 0
        self.relaying = 0  # tunnels relaying now
        self._ids = 0
        self._accept: AcceptLoop | None = None
        self._gate = HandshakeGate(
            max(1, config.max_handshakes), max(1, config.max_handshakes_per_source)
        )
        self._fail_log = BurstLog(log, logging.INFO)
        self._evict_log = BurstLog(log, logging.INFO)
        self._refuse_log = BurstLog(log, logging.INFO)
        self._busy_log = BurstLog(log, logging.WARNING)
        # Uplink health probes send several checks a second: one line a minute, with a count.
        self._check_log = BurstLog(log, logging.INFO, interval=60.0)
        self._hwm: HighWater | None = None
        self._keepalive_warned = False
        self.address: Address | None = None
        self.mptcp = False
        self.resolver = Resolver()  # on the loop: a name that never resolves blocks no other
        self.udp = UdpHub(
            lambda: self.config.policy,
            self.resolver,
            self.counters,
            config.udp_idle_timeout,
            config.udp_filter,
            nameservers=lambda: self.config.nameservers,
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> Address:
        """Bind and listen; raise ConfigError with a one-line reason if that fails."""
        if self.config.replay_file is not None:
            try:
                n = load_file(self.replay, self.config.replay_file, time.time())
            except (OSError, ValueError) as e:
                raise ConfigError(f"replay file {self.config.replay_file}: {e}") from None
            if n is not None:
                # The file is written only by a clean stop (and consumed here): it holds every
                # salt still live, so flights from before the start need not be refused.
                self.replay.not_before = None
                log.info("replay cache: %d salts restored from %s", n, self.config.replay_file)
            self._start_high_water(self.config.replay_file, complete=n is not None)
        try:
            sock, self.mptcp = listen_socket(self.config.listen, self.transport, LISTEN_BACKLOG)
        except OSError as e:
            why = f"{e.strerror}{listen_hint(self.config.listen, e)}"
            raise ConfigError(f"cannot listen on {self.config.listen}: {why}") from None
        try:
            # The kernel hands a connection to accept() only once bytes (or a FIN) arrived, or
            # after about DEFER_ACCEPT s of silence (tcp(7), TCP_DEFER_ACCEPT): a first flight is
            # in the socket when its connection enters the handshake budget, so a flood cannot
            # evict it while it is on its way (docs/PROBING.md, "Floods").
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
        except OSError as e:
            log.info("TCP_DEFER_ACCEPT refused on the listener: %s", e.strerror)
        # Clients' --fast-open: a first flight in the SYN is accepted with it already readable;
        # it goes through the same handshake, replay cache and absorption as any other.
        why = enable_listener(sock)
        if why is not None:
            log.info("TCP Fast Open not offered: %s", why)
        if self.transport.fell_back:
            log.warning("MPTCP unavailable on this kernel: listening with plain TCP")
        host, port = sock.getsockname()[:2]
        self.address = Address.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        limit = fit_connections(self.config.max_connections, log)
        # Unauthenticated connections may take at most half the slots: the rest are the tunnels'.
        budget = min(self.config.max_handshakes, max(1, limit // 2))
        if budget < self.config.max_handshakes:
            log.info(
                "--max-handshakes lowered from %d to %d (half of %d connections)",
                self.config.max_handshakes,
                budget,
                limit,
            )
        self._gate = HandshakeGate(budget, self.config.max_handshakes_per_source)
        self._accept = AcceptLoop(loop, sock, self._handle, log, limit)
        self._accept.start()
        log.info(
            "listening on %s (%s, cipher %s, relay %s)",
            self.address,
            "MPTCP" if self.mptcp else "TCP",
            self.config.cipher.name,
            self.config.engine.name,
        )
        bulk = getattr(self.config.engine, "summary", None)
        if bulk:
            log.info("%s", bulk)
        return self.address

    @property
    def active(self) -> int:
        return self._accept.active if self._accept else 0

    def snapshot(self) -> dict:
        """Counters and gauges for `--stats-file` / SIGUSR1 (docs/CLI.md lists the names)."""
        return {
            "role": "server",
            "counters": dict(sorted(self.counters.items())),
            "active": self.active,
            "udp_associations": len(self.udp),
            "limit_pauses": self._accept.pauses if self._accept else 0,
            "accept_errors": self._accept.accept_errors if self._accept else 0,
            "replay": {
                "size": len(self.replay),
                "capacity": self.replay.capacity,
                "window": self.replay.window,
                "share": self.replay.share,
                "sources": self.replay.sources(),
            },
            "handshakes": {
                "open": len(self._gate),
                "budget": self._gate.total,
                "per_source": self._gate.per_source,
                "evicted": self._gate.evictions,
            },
        }

    def _start_high_water(self, replay_file: Path, complete: bool) -> None:
        """Keep a persisted high-water mark of accepted timestamps beside the replay file; after
        a start without the complete cache, refuse timestamps up to the last mark for a window."""
        hwm = HighWater(replay_file.with_name(replay_file.name + ".hwm"))
        try:
            mark = hwm.load()
        except (OSError, ValueError) as e:
            raise ConfigError(f"replay file {hwm.path}: {e}") from None
        if mark is not None and not complete and self.replay.not_before is not None:
            # A replayed flight's timestamp is at most the crash time plus a window: capping the
            # bound there limits the refusal of honest clients to one window after the start.
            bound = math.floor(min(mark, self.started + self.replay.window)) + 1
            if bound > self.replay.not_before:
                self.replay.not_before = bound
                log.info(
                    "replay cache lost (no clean stop): refusing flights stamped up to %.0f s "
                    "from now",
                    bound - time.time(),
                )
        self._hwm = hwm
        self.replay.before_remember = self._cover_high_water

    def _cover_high_water(self, timestamp: float) -> None:
        assert self._hwm is not None
        try:
            self._hwm.cover(timestamp)
        except OSError as e:
            self._busy_log("high-water mark %s: %s", self._hwm.path, e.strerror)

    def reload(self, config: ServerConfig, restart: tuple[str, ...] = ()) -> None:
        """Apply a new configuration to new connections; open ones and the salt cache stay.
        `restart`: settings outside the config that changed and need a restart (for the log)."""
        changed = [name for name in _RELOADABLE if _differs(name, config, self.config)]
        kept = [
            name
            for name in (
                "listen",
                "mptcp",
                "max_connections",
                "max_handshakes",
                "max_handshakes_per_source",
                "replay_capacity",
                "replay_file",
            )
            if getattr(config, name) != getattr(self.config, name)
        ]
        kept += restart
        for name in changed:
            setattr(self.config, name, getattr(config, name))
        self.udp.idle_timeout, self.udp.filter = config.udp_idle_timeout, config.udp_filter
        if config.replay_window != self.replay.window:
            self.replay.set_window(config.replay_window)
        self.counters["reload"] += 1
        log.info(
            "reloaded: %s changed%s",
            ", ".join("key" if n == "psk" else n for n in changed) or "nothing",
            f"; {', '.join(kept)} need a restart (kept as they were)" if kept else "",
        )

    async def stop(self, drain_timeout: float) -> int:
        """Stop accepting, let open connections finish for up to `drain_timeout` s."""
        if self._accept is None:
            return 0
        self._accept.close()
        close_all(self.udp)  # a UDP association has no end of its own to wait for
        left = await self._accept.drain(drain_timeout)
        if self.config.replay_file is not None:
            try:
                n = save_file(self.replay, self.config.replay_file, time.time())
            except OSError as e:
                log.warning("replay file %s: %s", self.config.replay_file, e.strerror)
            else:
                log.info("replay cache: %d salts saved to %s", n, self.config.replay_file)
        return left

    # -- one connection -----------------------------------------------------------------------
    def _handle(self, sock: socket.socket, peer_addr: tuple) -> Coroutine[None, None, None]:
        """At accept(): enter the handshake budget (evicting older connections it has no room
        for), and hand the accept loop the connection's coroutine."""
        source = source_key(str(peer_addr[0]))
        # Unauthenticated from here until the first flight authenticates. Evicted before its
        # task starts, a connection finds `evicted` set; after, its task is cancelled.
        ticket = self._gate.admit(source, lambda: None, lambda: _has_unread(sock))
        return self._connection(sock, peer_addr, source, ticket)

    async def _connection(
        self, sock: socket.socket, peer_addr: tuple, source: str, ticket: Ticket
    ) -> None:
        loop = asyncio.get_running_loop()
        self._ids += 1
        cid = f"s{self._ids}"
        peer = format_sockaddr(peer_addr)
        deadline = loop.time() + self.config.handshake_timeout
        view = self.replay.for_source(source)
        hs = ServerHandshake(self.config.psk, self.config.cipher, view)  # type: ignore[arg-type]
        task = asyncio.current_task()
        assert task is not None
        ticket.evict = task.cancel
        ticket.started = True
        try:
            if ticket.evicted:
                raise asyncio.CancelledError
            request = await self._first_flight(loop, sock, cid, peer, hs, deadline, ticket)
        except asyncio.CancelledError:
            if not ticket.evicted:
                sock.close()
                raise
            if task.cancelling():
                task.uncancel()
            self._count(Status.EVICTED)
            # Once per burst, with a count: a flood evicts thousands a second.
            self._evict_log(
                "%s from %s: handshake budget full (%d, %d per source): closed early after "
                "%d bytes",
                cid,
                peer,
                self._gate.total,
                self._gate.per_source,
                hs.received,
            )
            self._close(sock)
            return
        except BaseException:
            sock.close()
            raise
        finally:
            self._gate.release(ticket)
        if request is not None:
            await self._serve(loop, cid, sock, peer, hs, request, view)

    async def _first_flight(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        cid: str,
        peer: str,
        hs: ServerHandshake,
        deadline: float,
        ticket: Ticket,
    ) -> ServerEvent | None:
        """The authenticated first flight; or None after absorbing a failure and closing.

        One read loop for every case, so that what the server does when the peer's FIN arrives
        (or the deadline) is the same code path whatever arrived before: no byte count, no failure
        kind shows in how fast the close follows (docs/PROBING.md). Until the flight is complete
        it reads exactly what the handshake needs (the rest stays in the kernel); after a failure
        it reads and discards until the peer closes or the deadline from accept passes.
        """
        failed = False
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    # queued with the accept, as a rule (DEFER_ACCEPT): read at once
                    data = await recv_ready(loop, sock, 65536 if failed else hs.bytes_needed())
                    if not data:
                        break
                    if failed:
                        continue
                    self._gate.touch(ticket)
                    hs.receive_data(data)
                    try:
                        event = hs.next_event()
                    except ProtocolError as e:
                        failed = True
                        self._count(e.status)
                        self._fail_log(
                            "%s from %s: %s (%s); absorbing", cid, peer, e, e.status.value
                        )
                        continue
                    if not isinstance(event, NeedData):
                        return event
        except TimeoutError:
            if not failed:
                self._count(Status.TIMEOUT)
                self._fail_log("%s from %s: handshake timed out", cid, peer)
        except OSError as e:
            log.debug("%s from %s: %s before the handshake completed", cid, peer, e)
        else:
            if not failed:  # EOF before a complete request: nothing to answer
                self._count(Status.INCOMPLETE)
        self._close(sock)
        return None

    def _count(self, status: Status) -> None:
        self.counters[status.value] += 1

    @staticmethod
    def _close(sock: socket.socket) -> None:
        """How every unauthenticated connection ends: drain what is left, close (a FIN).

        Every failure kind looks the same from outside: no byte back, no early close, no reset.
        """
        try:
            while sock.recv(65536):  # leave nothing unread, so close() sends FIN, not RST
                pass
        except OSError:
            pass
        sock.close()

    async def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        cid: str,
        tunnel: socket.socket,
        peer: str,
        hs: ServerHandshake,
        request: ServerEvent,
        view: SourceView,
    ) -> None:
        if isinstance(request, CheckRequest | Unsupported):
            await self._answer_at_once(loop, cid, tunnel, peer, hs, request, view)
            return
        if isinstance(request, UdpRequest):
            await self._serve_udp(loop, cid, tunnel, peer, hs, request, view)
            return
        mptcp = is_mptcp(tunnel)
        via = {True: "mptcp", False: "tcp-fallback", None: "tcp"}[mptcp]
        started = time.monotonic()
        # `mptun client --check` asks for 0.0.0.0:0: answered "not allowed" without a dial, which
        # the client reads as "key and path work" (PROTOCOL.md "Checks").
        check = isinstance(request, Request) and request.target == CHECK_TARGET and not view.busy
        if view.busy:  # remembered, refused: the replay cache is near its limit for this source
            status, target, detail = ConnectStatus.SERVER_FULL, None, "replay cache full"
        elif isinstance(request, BadTarget):  # `a..b`: answered without a lookup (PROTOCOL.md)
            status, target = ConnectStatus.HOST_UNREACHABLE, None
            detail = f"invalid name: {request.why}"
        elif check:
            status, target, detail = ConnectStatus.NOT_ALLOWED, None, "check"
        elif request.mode == WireMode.PLAIN and not self.config.accept_plain:
            # Encrypted is always accepted; plain only from a server started with --bulk plain.
            status, target, detail = ConnectStatus.MODE_REFUSED, None, "plain mode refused"
        else:
            status, target, detail = await self._dial(loop, request.target, view.source)
        try:
            await loop.sock_sendall(tunnel, hs.respond(status))
        except OSError as e:
            log.info(
                "%s %s -> %s: tunnel lost before the response: %s",
                cid,
                peer,
                request.target,
                e.strerror,
            )
            tunnel.close()
            if target:
                target.close()
            return
        if check:
            self.counters["check"] += 1
            log.info("%s check from %s %s: authenticated (key, cipher, clock OK)", cid, peer, via)
            tunnel.close()
            return
        if target is None:
            failed = Status.ADDRESS if isinstance(request, BadTarget) else Status.CONNECT
            if view.busy:
                failed = Status.BUSY
            self._count(Status.POLICY if status == ConnectStatus.NOT_ALLOWED else failed)
            # Once per burst with a count, as for probes: refusals can come by the thousand.
            (self._busy_log if view.busy else self._refuse_log)(
                "%s %s %s -> %s: %s (%s)",
                cid,
                peer,
                via,
                request.target,
                status.name.lower().replace("_", " "),
                detail,
            )
            tunnel.close()
            return
        assert isinstance(request, Request)  # a BadTarget is never dialled
        log.log(
            connection_level(self.config.log_connections),
            "%s %s %s -> %s (%s): connected in %.0f ms",
            cid,
            peer,
            via,
            request.target,
            detail,
            (time.monotonic() - started) * 1000,
        )
        self._tune_tunnel(tunnel)
        try:
            if request.early_data:
                await loop.sock_sendall(target, request.early_data)
        except OSError as e:
            log.info("%s -> %s: target failed on early data: %s", cid, request.target, e.strerror)
            target.close()
            tunnel.close()
            return
        session = PLAIN
        if request.mode == WireMode.ENCRYPTED:
            session = Session(WireMode.ENCRYPTED, Side.SERVER, self.config.cipher, hs.bulk_keys())
        self.relaying += 1
        try:
            stats = await self.config.engine.relay(
                loop, target, tunnel, idle_timeout=self.config.idle_timeout, session=session
            )
        finally:
            self.relaying -= 1
        self.counters["relayed"] += 1
        self.bytes_up += stats.from_tunnel + len(request.early_data)
        self.bytes_down += stats.to_tunnel
        if not stats.clean:
            self._count(stats.status or Status.RELAY)
        log.log(
            connection_level(self.config.log_connections),
            "%s %s closed after %.1f s: to client %s, to target %s, %s, %s (%d reads)",
            cid,
            request.target,
            stats.seconds,
            human_bytes(stats.to_tunnel),
            human_bytes(stats.from_tunnel + len(request.early_data)),
            stats.engine,
            "clean" if stats.clean else f"reset ({stats.error})",
            stats.reads,
        )

    async def _answer_at_once(
        self,
        loop: asyncio.AbstractEventLoop,
        cid: str,
        tunnel: socket.socket,
        peer: str,
        hs: ServerHandshake,
        request: CheckRequest | Unsupported,
        view: SourceView,
    ) -> None:
        """Answer a health check (succeeded) or a request type this version does not know
        (unsupported, never silence: PROTOCOL.md "Versioning") and close; nothing is dialled."""
        if view.busy:
            status = ConnectStatus.SERVER_FULL
        elif isinstance(request, CheckRequest):
            status = ConnectStatus.SUCCEEDED
        else:
            status = ConnectStatus.UNSUPPORTED
        try:
            await loop.sock_sendall(tunnel, hs.respond(status))
        except OSError as e:
            log.debug("%s check from %s: lost before the answer: %s", cid, peer, e.strerror)
        tunnel.close()
        if isinstance(request, Unsupported):
            self.counters["unsupported"] += 1
            self._refuse_log(
                "%s %s: request type %#x unsupported (a newer client); answered so",
                cid,
                peer,
                request.type,
            )
            return
        self.counters["check"] += 1
        line = ("%s check from %s: authenticated (key, cipher, clock OK)", cid, peer)
        if not self._check_log(*line):
            log.debug(*line)

    async def _serve_udp(
        self,
        loop: asyncio.AbstractEventLoop,
        cid: str,
        tunnel: socket.socket,
        peer: str,
        hs: ServerHandshake,
        request: UdpRequest,
        view: SourceView,
    ) -> None:
        """A UDP association (server/udp.py): answered at once, no target to dial; each
        datagram is judged by the target policy on its own."""
        if view.busy:
            status = ConnectStatus.SERVER_FULL
        elif request.mode == WireMode.PLAIN and not self.config.accept_plain:
            status = ConnectStatus.MODE_REFUSED
        else:
            status = ConnectStatus.SUCCEEDED
        try:
            await loop.sock_sendall(tunnel, hs.respond(status))
        except OSError as e:
            log.info("%s %s udp: tunnel lost before the response: %s", cid, peer, e.strerror)
            tunnel.close()
            return
        if status != ConnectStatus.SUCCEEDED:
            self._count(Status.BUSY if view.busy else Status.POLICY)
            (self._busy_log if view.busy else self._refuse_log)(
                "%s %s udp: %s", cid, peer, status.name.lower().replace("_", " ")
            )
            tunnel.close()
            return
        log.log(
            connection_level(self.config.log_connections), "%s %s udp: association open", cid, peer
        )
        self._tune_tunnel(tunnel)
        session = PLAIN
        if request.mode == WireMode.ENCRYPTED:
            session = Session(WireMode.ENCRYPTED, Side.SERVER, self.config.cipher, hs.bulk_keys())
        await self.udp.serve(loop, cid, tunnel, peer, view.source, session, request.early_data)

    def _tune_tunnel(self, sock: socket.socket) -> None:
        tune_leg(sock)
        if not set_keepalive(sock) and not self._keepalive_warned:
            self._keepalive_warned = True
            log.info("keepalive timings refused on this socket type: using SO_KEEPALIVE defaults")
        set_user_timeout(sock, self.config.user_timeout)

    async def _dial(
        self, loop: asyncio.AbstractEventLoop, target: Address, source: str = ""
    ) -> tuple[ConnectStatus, socket.socket | None, str]:
        """Resolve, check every address against the policy, connect to a checked one."""
        if target.is_domain:
            deadline = loop.time() + self.config.connect_timeout
            try:
                addrs = await self.resolver.resolve(
                    str(target.host), deadline, source, self.config.nameservers
                )
            except ResolveError as e:
                return ConnectStatus.DNS_FAILURE, None, f"no address: {e}"
        else:
            addrs = [target.host]  # type: ignore[list-item]
        allowed, refused = [], []
        for ip in addrs:
            why = self.config.policy.check(ip)
            (refused if why else allowed).append((ip, why))
        if not allowed:
            ip, why = refused[0]
            hint = self.config.policy.hint(ip, why)
            return ConnectStatus.NOT_ALLOWED, None, f"{why or 'not allowed'}; {hint}"
        status, detail = ConnectStatus.GENERAL_FAILURE, ""
        per_try = self.config.connect_timeout / len(allowed)
        for ip, _ in allowed:
            sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                # Connect to exactly the address that was checked: no second lookup.
                await connect(loop, sock, Address(ip, target.port).sockaddr(), per_try)
            except OSError as e:
                sock.close()
                status = _ERRNO_STATUS.get(e.errno or 0, ConnectStatus.GENERAL_FAILURE)
                detail = f"{ip}: {e.strerror}"
                continue
            except BaseException:
                sock.close()
                raise
            tune_leg(sock)
            return ConnectStatus.SUCCEEDED, sock, str(ip)
        return status, None, detail
