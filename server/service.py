"""The server: accept, authenticate (absorbing failures), dial under the target policy, relay."""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mptun.common.address import Address, format_sockaddr
from mptun.common.crypto import CipherSpec
from mptun.common.drive import drive
from mptun.common.errors import ConfigError, ProtocolError, Status
from mptun.common.handshake import ConnectStatus, Request, ServerHandshake, WireMode
from mptun.common.limits import fit_connections
from mptun.common.listener import AcceptLoop
from mptun.common.logutil import BurstLog, human_bytes
from mptun.common.relay import PLAIN, Engine, Session, Side
from mptun.common.replay import (
    DEFAULT_CAPACITY,
    DEFAULT_WINDOW,
    ReplayGuard,
    load_file,
    save_file,
)
from mptun.common.sockets import (
    Transport,
    connect,
    family_of,
    is_mptcp,
    listen_socket,
    resolve,
    set_keepalive,
    set_user_timeout,
    tune_leg,
)
from mptun.server.policy import TargetPolicy

log = logging.getLogger("mptun.server")

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
    max_connections: int = 4096
    accept_plain: bool = False  # plain tunnels only with --bulk plain; encrypted always
    user_timeout: float = 60.0
    replay_file: Path | None = None  # the salt cache is saved here on stop, loaded on start


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
)


def _differs(name: str, a: ServerConfig, b: ServerConfig) -> bool:
    if name == "engine":  # a new instance of the same engine is no change
        return a.engine.name != b.engine.name
    return getattr(a, name) != getattr(b, name)


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.transport = Transport(want_mptcp=config.mptcp)
        # Flights stamped before this process started are refused: a cache lost in a crash
        # cannot be replayed into (docs/PROBING.md, "Replay").
        self.started = time.time()
        self.replay = ReplayGuard(
            config.replay_window, config.replay_capacity, not_before=math.floor(self.started)
        )
        self.counters: Counter[str] = Counter()
        self._ids = 0
        self._accept: AcceptLoop | None = None
        self._fail_log = BurstLog(log, logging.INFO)
        self._keepalive_warned = False
        self.address: Address | None = None
        self.mptcp = False

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
        try:
            sock, self.mptcp = listen_socket(self.config.listen, self.transport)
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.config.listen}: {e.strerror}") from None
        if self.transport.fell_back:
            log.warning("MPTCP unavailable on this kernel: listening with plain TCP")
        host, port = sock.getsockname()[:2]
        self.address = Address.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self._accept = AcceptLoop(
            loop, sock, self._handle, log, fit_connections(self.config.max_connections, log)
        )
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
            "limit_pauses": self._accept.pauses if self._accept else 0,
            "accept_errors": self._accept.accept_errors if self._accept else 0,
            "replay": {
                "size": len(self.replay),
                "capacity": self.replay.capacity,
                "window": self.replay.window,
            },
        }

    def reload(self, config: ServerConfig) -> None:
        """Apply a new configuration to new connections; open ones and the salt cache stay."""
        changed = [name for name in _RELOADABLE if _differs(name, config, self.config)]
        kept = [
            name
            for name in ("listen", "mptcp", "max_connections", "replay_capacity", "replay_file")
            if getattr(config, name) != getattr(self.config, name)
        ]
        for name in changed:
            setattr(self.config, name, getattr(config, name))
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
    async def _handle(self, sock: socket.socket, peer_addr: tuple) -> None:
        loop = asyncio.get_running_loop()
        self._ids += 1
        cid = f"s{self._ids}"
        peer = format_sockaddr(peer_addr)
        deadline = loop.time() + self.config.handshake_timeout
        hs = ServerHandshake(self.config.psk, self.config.cipher, self.replay)
        try:
            request = await drive(loop, sock, hs, deadline)
        except ProtocolError as e:
            self._count(e.status)
            self._fail_log("%s from %s: %s (%s); absorbing", cid, peer, e, e.status.value)
            await self._absorb(loop, sock, deadline)
            return
        except TimeoutError:
            self._count(Status.TIMEOUT)
            self._fail_log("%s from %s: handshake timed out", cid, peer)
            await self._absorb(loop, sock, deadline)  # past the deadline: drain, FIN
            return
        except OSError as e:
            log.debug("%s from %s: %s before the handshake completed", cid, peer, e)
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        if request is None:  # EOF before a complete request: nothing to answer
            self._count(Status.INCOMPLETE)
            sock.close()
            return
        await self._serve(loop, cid, sock, peer, hs, request)

    def _count(self, status: Status) -> None:
        self.counters[status.value] += 1

    async def _absorb(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float
    ) -> None:
        """Read and discard until the peer closes or the deadline from accept, then close.

        Every failure kind looks the same from outside: no byte back, no early close, no reset.
        """
        try:
            async with asyncio.timeout_at(deadline):
                while await loop.sock_recv(sock, 65536):
                    pass
        except (TimeoutError, OSError):
            pass
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
        request: Request,
    ) -> None:
        mptcp = is_mptcp(tunnel)
        via = {True: "mptcp", False: "tcp-fallback", None: "tcp"}[mptcp]
        started = time.monotonic()
        if request.mode == WireMode.PLAIN and not self.config.accept_plain:
            # Encrypted is always accepted; plain only from a server started with --bulk plain.
            status, target, detail = ConnectStatus.MODE_REFUSED, None, "plain mode refused"
        else:
            status, target, detail = await self._dial(loop, request.target)
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
        if target is None:
            self._count(Status.POLICY if status == ConnectStatus.NOT_ALLOWED else Status.CONNECT)
            log.info(
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
        log.info(
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
        stats = await self.config.engine.relay(
            loop, target, tunnel, idle_timeout=self.config.idle_timeout, session=session
        )
        self.counters["relayed"] += 1
        if not stats.clean:
            self._count(stats.status or Status.RELAY)
        log.info(
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

    def _tune_tunnel(self, sock: socket.socket) -> None:
        tune_leg(sock)
        if not set_keepalive(sock) and not self._keepalive_warned:
            self._keepalive_warned = True
            log.info("keepalive timings refused on this socket type: using SO_KEEPALIVE defaults")
        set_user_timeout(sock, self.config.user_timeout)

    async def _dial(
        self, loop: asyncio.AbstractEventLoop, target: Address
    ) -> tuple[ConnectStatus, socket.socket | None, str]:
        """Resolve, check every address against the policy, connect to a checked one."""
        if target.is_domain:
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    addrs = await resolve(loop, str(target.host), target.port)
            except (OSError, TimeoutError) as e:
                return ConnectStatus.DNS_FAILURE, None, f"no address: {e}"
            if not addrs:
                return ConnectStatus.DNS_FAILURE, None, "no address"
        else:
            addrs = [target.host]  # type: ignore[list-item]
        allowed, refused = [], []
        for ip in addrs:
            why = self.config.policy.check(ip)
            (refused if why else allowed).append((ip, why))
        if not allowed:
            return ConnectStatus.NOT_ALLOWED, None, refused[0][1] or "not allowed"
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
