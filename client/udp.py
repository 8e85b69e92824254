"""UDP through the tunnel, the client's core: one association per LAN source (host, port).

Every listener that catches UDP (the SOCKS5 UDP ASSOCIATE relay in client/socks.py, the
router gateway's transparent capture, client/tproxy.py) hands its datagrams to the client's one
`UdpTunnels`, which `build_client` (client/app.py) makes from the settings and keeps as
`Client.udp` (ended by `Client.stop`). Every method is called on the event loop:

    class UdpTunnels:
        def __init__(self, tunneler: Tunneler, *, per_host: int = 256, total: int = 2048,
                     idle_timeout: float = 300.0, max_delay: float = 0.05,
                     log: logging.Logger = ...) -> None: ...
        def send(self, lan_source: tuple[str, int], target: Address, payload: bytes,
                 deliver: Callable[[Address, bytes], None]) -> None: ...
        def close(self, lan_source: tuple[str, int]) -> None: ...
        def snapshot(self) -> list[dict]: ...
        async def aclose(self) -> None: ...

`send` queues one datagram from `lan_source` to `target` (an IP address or a name, which the
server resolves). The source's first datagram opens its association: one tunnel connection
(request type 0x04, docs/PROTOCOL.md "UDP associations") that carries every datagram of that
source to any target, so the source keeps one public address and port on the server (RFC 4787
endpoint-independent mapping) and its own MPTCP connection (every uplink's subflow, the
kernel's failover). Datagrams sent while it opens wait (at most `PENDING` of them; the first ones
ride in the first flight), the rest are dropped and counted. `deliver(source, payload)` is
called, on the event loop, for every datagram the server relays back to that LAN source, with the
address it came from; it must not block. `send` never raises for what the network does: a
datagram that cannot go is dropped and counted (`counters` below), never queued without bound.

An association ends when it has been idle (no datagram either way) for `idle_timeout`
seconds, on `close(lan_source)`, or when its tunnel ends; the next datagram opens a new one (a
new public port). At most `per_host` associations per LAN host and `total` in all: a datagram
that would open one more is dropped, with one log line per burst.

Counters (in the tunneler's `counters`, hence the stats output): `udp-associations` opened,
`udp-datagrams-up`/`udp-datagrams-down`, drops `udp-cap-host`, `udp-cap-total`,
`udp-pending-full`, `udp-stale`, `udp-queue-full`, `udp-oversize`, `udp-bad-name`,
`udp-no-tunnel` (no server reachable, or refused), `udp-server-too-old`; `udp-idle`
(associations ended idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from mptun.client.servers import Server
from mptun.client.tunnel import Tunneler, TunnelError
from mptun.common import datagram
from mptun.common.address import Address
from mptun.common.drive import drive
from mptun.common.errors import ProtocolError, Status
from mptun.common.handshake import (
    CHECK_TARGET,
    MAX_EARLY_DATA,
    TYPE_UDP,
    ClientHandshake,
    ConnectStatus,
    Response,
    WireMode,
)
from mptun.common.logutil import BurstLog, connection_level, human_bytes
from mptun.common.relay import PLAIN, Session, Side
from mptun.common.udplink import DEFAULT_MAX_DELAY, DatagramLink, status_of

LOG = logging.getLogger("mptun.client.udp")
PENDING = 64  # datagrams a source may send while its association opens
MAX_DESTINATIONS = 32  # destinations an association lists in `mptun status`
TOO_OLD_RETRY = 60.0  # seconds before asking again a server that answered "unsupported"

Deliver = Callable[[Address, bytes], None]


@dataclass
class _Association:
    """One LAN source's association: its tunnel and what `mptun status` shows of it."""

    cid: str
    source: tuple[str, int]
    deliver: Deliver
    started: float
    last: float
    pending: list[tuple[Address, bytes]] = field(default_factory=list)
    link: DatagramLink | None = None
    task: asyncio.Task | None = None
    destinations: dict[Address, None] = field(default_factory=dict)  # ordered set, capped
    up: int = 0  # payload bytes from the LAN source
    down: int = 0  # payload bytes to it
    drops: int = 0
    server: str = ""
    closed: bool = False

    @property
    def host(self) -> str:
        return self.source[0]


def _show(source: tuple[str, int]) -> str:
    host, port = source[0], source[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UdpTunnels:
    """Every UDP association of one client (module docstring: the API the listeners use)."""

    def __init__(
        self,
        tunneler: Tunneler,
        *,
        per_host: int = 256,
        total: int = 2048,
        idle_timeout: float = 300.0,
        max_delay: float = DEFAULT_MAX_DELAY,
        log: logging.Logger = LOG,
    ) -> None:
        self.tunneler = tunneler
        self.per_host, self.total, self.idle_timeout = per_host, total, idle_timeout
        self.max_delay = max_delay
        self.log = log
        self.counters: Counter[str] = tunneler.counters
        self._assocs: dict[tuple[str, int], _Association] = {}
        self._per_host: Counter[str] = Counter()
        self._too_old: dict[Address, float] = {}  # server -> when it answered "unsupported"
        self._cap_log = BurstLog(log, logging.WARNING)
        self._fail_log = BurstLog(log, logging.WARNING)
        self._sweeper: asyncio.Task | None = None
        self._closing = False

    def __len__(self) -> int:
        return len(self._assocs)

    # -- the API -----------------------------------------------------------------------------
    def send(
        self, lan_source: tuple[str, int], target: Address, payload: bytes, deliver: Deliver
    ) -> None:
        """Queue one datagram from `lan_source` to `target` (module docstring)."""
        if self._closing:
            return
        if len(payload) > datagram.MAX_PAYLOAD:
            self.counters["udp-oversize"] += 1
            return
        now = time.monotonic()
        a = self._assocs.get(lan_source)
        if a is None:
            a = self._open(lan_source, deliver, now)
            if a is None:
                return
        a.last = now
        a.deliver = deliver
        if len(a.destinations) < MAX_DESTINATIONS:
            a.destinations[target] = None
        self.counters["udp-datagrams-up"] += 1
        if a.link is not None:
            if a.link.send(target, payload):
                a.up += len(payload)
            else:
                a.drops += 1
            return
        if len(a.pending) >= PENDING:
            self.counters["udp-pending-full"] += 1
            a.drops += 1
            return
        a.pending.append((target, payload))
        a.up += len(payload)

    def close(self, lan_source: tuple[str, int]) -> None:
        """End `lan_source`'s association now (its tunnel closes cleanly)."""
        a = self._assocs.get(lan_source)
        if a is not None:
            self._finish(a, None, "closed")

    def snapshot(self) -> list[dict]:
        """For `mptun status`: each association's LAN source, destinations, bytes, drops, age."""
        now = time.monotonic()
        return [
            {
                "id": a.cid,
                "source": _show(a.source),
                "destinations": [str(d) for d in a.destinations],
                "state": "open" if a.link is not None else "opening",
                "server": a.server,
                "up_bytes": a.up,
                "down_bytes": a.down,
                "drops": a.drops + (a.link.dropped if a.link is not None else 0),
                "age": round(now - a.started, 1),
                "idle": round(now - a.last, 1),
            }
            for a in self._assocs.values()
        ]

    async def aclose(self) -> None:
        """End every association and stop; later `send`s are ignored."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        tasks = [a.task for a in self._assocs.values() if a.task is not None]
        for a in list(self._assocs.values()):
            self._finish(a, None, "client stopping")
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    # -- opening -----------------------------------------------------------------------------
    def _open(self, source: tuple[str, int], deliver: Deliver, now: float) -> _Association | None:
        """A new association for `source`, within the caps; None (counted) when refused."""
        host = source[0]
        if self._per_host[host] >= self.per_host:
            self.counters["udp-cap-host"] += 1
            self._cap_log(
                "udp %s: %d associations open from this host (--udp-per-host): datagrams from "
                "its new source ports are dropped",
                _show(source),
                self.per_host,
            )
            return None
        if len(self._assocs) >= self.total:
            self.counters["udp-cap-total"] += 1
            self._cap_log(
                "udp %s: %d associations open in all (--udp-max): datagrams from new sources "
                "are dropped",
                _show(source),
                self.total,
            )
            return None
        loop = asyncio.get_running_loop()
        a = _Association(self.tunneler.next_id(), source, deliver, now, now)
        self._assocs[source] = a
        self._per_host[host] += 1
        self.counters["udp-associations"] += 1
        a.task = loop.create_task(self._connect(loop, a))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep())
        return a

    async def _connect(self, loop: asyncio.AbstractEventLoop, a: _Association) -> None:
        """Connect the association's tunnel, handshake with its first datagrams, start the link."""
        cfg = self.tunneler.config
        head = f"{a.cid} udp {_show(a.source)}"
        try:
            sock, mptcp, server, hs, response, rest = await self._handshake(loop, a)
        except (TunnelError, ProtocolError, OSError, TimeoutError) as e:
            why = (
                f"no answer within {cfg.handshake_timeout:g} s"
                if isinstance(e, TimeoutError)
                else str(e)
            )
            self.counters["udp-no-tunnel"] += 1
            if not self._fail_log("%s: no tunnel: %s; its datagrams are dropped", head, why):
                self.log.debug("%s: no tunnel: %s", head, why)
            self._finish(a, None, "no tunnel", quiet=True)
            return
        if response.status != ConnectStatus.SUCCEEDED:
            sock.close()
            if response.status == ConnectStatus.UNSUPPORTED:
                self._too_old[server.address] = time.monotonic()
                self.counters["udp-server-too-old"] += 1
                self._fail_log(
                    "%s: server %s too old: it does not know UDP associations (upgrade the "
                    "server); UDP datagrams are dropped",
                    head,
                    server.address,
                )
            else:
                self.counters["udp-no-tunnel"] += 1
                self._fail_log(
                    "%s: server %s says %s; its datagrams are dropped",
                    head,
                    server.address,
                    response.status.name.lower().replace("_", " "),
                )
            self._finish(a, None, "refused", quiet=True)
            return
        if a.closed:
            sock.close()
            return
        session = PLAIN
        if cfg.mode == WireMode.ENCRYPTED:
            session = Session(WireMode.ENCRYPTED, Side.CLIENT, cfg.cipher, hs.bulk_keys())
        via = {True: "mptcp", False: "tcp-fallback", None: "tcp"}[mptcp]

        def on_datagram(source: Address, payload: bytes) -> None:
            a.last = time.monotonic()
            a.down += len(payload)
            self.counters["udp-datagrams-down"] += 1
            try:
                a.deliver(source, payload)
            except Exception as e:  # a listener's bug must not end the tunnel
                self.log.debug("%s: delivering a datagram failed: %r", head, e)

        def on_close(error: BaseException | None) -> None:
            status = status_of(error)
            if status is not None:
                self.counters[status.value] += 1
            self._finish(a, error, "tunnel ended" if error is None else f"tunnel failed: {error}")

        link = DatagramLink(
            sock, session, on_datagram, on_close, self.counters, max_delay=self.max_delay
        )
        a.link = link
        link.start(loop)
        link.send_frames(rest)
        self.log.log(
            connection_level(cfg.log_connections),
            "%s %s: association open in %.0f ms",
            head,
            via,
            (time.monotonic() - a.started) * 1000,
        )

    async def _handshake(
        self, loop: asyncio.AbstractEventLoop, a: _Association
    ) -> tuple[socket.socket, bool | None, Server, ClientHandshake, Response, bytes]:
        """Connect a tunnel and handshake with the first datagrams: the socket, whether it is
        MPTCP, its server, the handshake, the answer, and the frames still to send. Once more
        when a tunnel ends unanswered (a pooled one the server had closed, --pool)."""
        cfg = self.tunneler.config
        early: bytes | None = None
        rest = b""
        if cfg.fast_open:  # the first flight is made at the connect, to ride the SYN
            early, rest = self._early_frames(a)
        for attempt in (1, 2):
            sock, mptcp, server, hs = await self.tunneler.open_best(
                loop, a.cid, f"udp {_show(a.source)}", TYPE_UDP, early or b""
            )
            try:
                a.server = str(server.address)
                asked = self._too_old.get(server.address)
                if asked is not None and time.monotonic() - asked < TOO_OLD_RETRY:
                    raise TunnelError(f"server {server.address} too old for UDP", Status.PROTOCOL)
                if hs is None:
                    if early is None:
                        early, rest = self._early_frames(a)
                    # the target is unused: a UDP association names one per datagram
                    hs = ClientHandshake(
                        server.psk, cfg.cipher, CHECK_TARGET, cfg.mode, prefix=cfg.prefix,
                        kind=TYPE_UDP,
                    )  # fmt: skip
                    await loop.sock_sendall(sock, hs.first_flight(early))
                deadline = loop.time() + cfg.handshake_timeout
                try:
                    response = await drive(loop, sock, hs, deadline)
                except ConnectionError:
                    response = None
                if response is None and not hs.received and attempt == 1:
                    sock.close()
                    continue
                if response is None:
                    raise TunnelError("server closed the tunnel during the handshake", Status.AUTH)
            except BaseException:
                sock.close()
                raise
            return sock, mptcp, server, hs, response, rest
        raise AssertionError("unreachable")  # pragma: no cover

    def _early_frames(self, a: _Association) -> tuple[bytes, bytes]:
        """The waiting datagrams as frames: those that fit the first flight, and the rest."""
        early: list[bytes] = []
        rest: list[bytes] = []
        size = 0
        for target, payload in a.pending:
            frame = datagram.encode(target, payload)
            if not rest and size + len(frame) <= MAX_EARLY_DATA:
                early.append(frame)
                size += len(frame)
            else:
                rest.append(frame)
        a.pending.clear()
        return b"".join(early), b"".join(rest)

    # -- ending ------------------------------------------------------------------------------
    def _finish(
        self, a: _Association, error: BaseException | None, why: str, quiet: bool = False
    ) -> None:
        """Forget `a` (once): close its link, cancel its opening."""
        if a.closed:
            return
        a.closed = True
        if self._assocs.get(a.source) is a:
            del self._assocs[a.source]
            self._per_host[a.host] -= 1
            if not self._per_host[a.host]:
                del self._per_host[a.host]
        if a.link is not None:
            a.link.close()
        elif a.task is not None and a.task is not asyncio.current_task():
            a.task.cancel()
        if quiet:
            return
        self.log.log(
            connection_level(self.tunneler.config.log_connections),
            "%s udp %s closed after %.1f s (%s): up %s, down %s, %d dropped",
            a.cid,
            _show(a.source),
            time.monotonic() - a.started,
            why,
            human_bytes(a.up),
            human_bytes(a.down),
            a.drops + (a.link.dropped if a.link is not None else 0),
        )

    async def _sweep(self) -> None:
        """End associations idle for `idle_timeout` seconds; stops when none is left."""
        step = max(0.05, min(self.idle_timeout / 4, 10.0))
        while self._assocs:
            await asyncio.sleep(step)
            cutoff = time.monotonic() - self.idle_timeout
            for a in [a for a in self._assocs.values() if a.last < cutoff]:
                self.counters["udp-idle"] += 1
                self._finish(a, None, f"idle for {self.idle_timeout:g} s")
