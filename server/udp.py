"""UDP associations on the server: one UDP socket per association, the target policy per datagram.

A client opens an association with request type 0x04 (docs/PROTOCOL.md "UDP associations");
its tunnel then carries datagram frames both ways (common/datagram.py over
common/udplink.py). The server behaves as a NAT that games, calls and STUN get on with
(RFC 4787):
- **endpoint-independent mapping** (REQ-1): one UDP socket per association, bound to the
  wildcard (dual-stack where the kernel has IPv6), sends to every destination, so every peer
  sees the same address and port;
- **mapping timeout** (REQ-5): `idle_timeout` seconds without a datagram either way (300 by
  default, `--udp-idle-timeout`) ends the association and its tunnel;
- **filtering** (REQ-8): endpoint-independent by default (`--udp-filter endpoint`): any peer may
  answer to the mapping; `--udp-filter address` accepts datagrams only from addresses the
  association sent to (address-dependent);
- **hairpinning** (REQ-9): a datagram to another association's mapping on one of the server's
  own addresses is handed to that association directly, as coming from the sender's mapping;
- the **target policy** (server/policy.py) judges every datagram's address, after a name is
  resolved (server/resolver.py): a refused datagram is dropped and counted (`udp-refused`),
  never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from mptun.common.address import Address, IPAddress
from mptun.common.logutil import BurstLog, human_bytes
from mptun.common.relay import Session
from mptun.common.sockets import unmapped
from mptun.common.udplink import DEFAULT_MAX_DELAY, DatagramLink, status_of
from mptun.server.policy import TargetPolicy
from mptun.server.resolver import ResolveError, Resolver

log = logging.getLogger("mptun.server.udp")

DEFAULT_IDLE_TIMEOUT = 300.0  # RFC 4787 REQ-5: at least 2 minutes, 5 recommended
READ_BATCH = 64  # datagrams read from a UDP socket per wake-up (others wait their turn)
NAME_TTL = 60.0  # seconds a resolved target name is kept by its association
MAX_NAMES = 256  # names an association keeps resolved
MAX_LOOKUPS = 16  # lookups an association may have under way; more datagrams are dropped
MAX_PEERS = 4096  # addresses `--udp-filter address` remembers per association
# How long an association trusts the policy's verdict on an address: asking whether an address
# is the server's own is an rtnetlink round trip (common/routes.py), too dear for every datagram.
VERDICT_TTL = 10.0
MAX_VERDICTS = 1024


class Filter(enum.Enum):
    """Which peers may send to an association's mapping (RFC 4787 section 5)."""

    ENDPOINT = "endpoint"  # endpoint-independent: anyone
    ADDRESS = "address"  # address-dependent: addresses the association sent to


def _sockaddr(sock: socket.socket, ip: IPAddress, port: int) -> tuple:
    """Where `sendto` on `sock` reaches `ip`: IPv4 as mapped IPv6 on a dual-stack socket."""
    if sock.family == socket.AF_INET6:
        if isinstance(ip, ipaddress.IPv4Address):
            return (f"::ffff:{ip}", port, 0, 0)
        return (str(ip), port, 0, 0)
    return (str(ip), port)


def open_udp_socket() -> socket.socket:
    """The association's mapping: a UDP socket on the wildcard, any port, dual-stack if it can."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
    else:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
        except OSError:
            sock.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)
    return sock


class UdpHub:
    """Every UDP association of one server: settings, the mapping registry for hairpinning."""

    def __init__(
        self,
        policy: Callable[[], TargetPolicy],
        resolver: Resolver,
        counters: Counter[str],
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        filter: Filter = Filter.ENDPOINT,
        max_delay: float = DEFAULT_MAX_DELAY,
        nameservers: Callable[[], Sequence[Address]] = tuple,
    ) -> None:
        self.policy, self.resolver, self.counters = policy, resolver, counters
        self.idle_timeout, self.filter, self.max_delay = idle_timeout, filter, max_delay
        self.nameservers = nameservers
        self.by_port: dict[int, UdpAssociation] = {}
        self.refuse_log = BurstLog(log, logging.INFO)
        self.drop_log = BurstLog(log, logging.INFO)

    def __len__(self) -> int:
        return len(self.by_port)

    async def serve(
        self,
        loop: asyncio.AbstractEventLoop,
        cid: str,
        tunnel: socket.socket,
        peer: str,
        source: str,
        session: Session,
        early: bytes,
    ) -> None:
        """Run one association until it ends (idle, the tunnel's end, an error)."""
        try:
            udp = open_udp_socket()
        except OSError as e:
            log.info("%s %s: no UDP socket: %s", cid, peer, e.strerror)
            tunnel.close()
            return
        a = UdpAssociation(self, cid, peer, source, udp, tunnel, session)
        await a.run(loop, early)


class UdpAssociation:
    """One association: its UDP socket (the mapping), its tunnel's link, its peers."""

    def __init__(
        self,
        hub: UdpHub,
        cid: str,
        peer: str,
        source: str,
        udp: socket.socket,
        tunnel: socket.socket,
        session: Session,
    ) -> None:
        self.hub, self.cid, self.peer, self.source = hub, cid, peer, source
        self.udp, self.tunnel = udp, tunnel
        self.port: int = udp.getsockname()[1]
        self.counters = hub.counters
        self.started = self.last = time.monotonic()
        self.done: asyncio.Future | None = None
        self.link = DatagramLink(
            tunnel,
            session,
            self._from_tunnel,
            self._link_closed,
            hub.counters,
            max_delay=hub.max_delay,
        )
        self.peers: OrderedDict[IPAddress, None] = OrderedDict()  # for --udp-filter address
        self.names: dict[str, tuple[float, IPAddress | None]] = {}  # name -> (expiry, address)
        self.lookups = 0
        # address -> (expiry, the server's own or loopback, the policy's reason to refuse)
        self.verdicts: dict[IPAddress, tuple[float, bool, str | None]] = {}
        self.verdicts_of: TargetPolicy | None = None  # the policy they came from (reloads)
        self.up = self.down = 0  # payload bytes to targets, to the client
        self.error: BaseException | None = None

    async def run(self, loop: asyncio.AbstractEventLoop, early: bytes) -> None:
        self.done = loop.create_future()
        self.hub.by_port[self.port] = self
        self.counters["udp-associations"] += 1
        loop.add_reader(self.udp.fileno(), self._from_udp)
        self.link.start(loop)
        sweeper = loop.create_task(self._idle(loop))
        try:
            if early:
                self.link.feed_frames(early)  # the first datagrams rode in the first flight
            await self.done
        except Exception as e:  # a malformed first flight's frames
            self.error = e
            self.link.close()
        finally:
            sweeper.cancel()
            loop.remove_reader(self.udp.fileno())
            self.udp.close()
            if self.hub.by_port.get(self.port) is self:
                del self.hub.by_port[self.port]
            if not self.link.closed:
                self.link.close()
        status = status_of(self.error)
        if status is not None:
            self.counters[status.value] += 1
        log.debug(
            "%s %s udp port %d closed after %.1f s: to targets %s, to client %s, %d dropped%s",
            self.cid,
            self.peer,
            self.port,
            time.monotonic() - self.started,
            human_bytes(self.up),
            human_bytes(self.down),
            self.link.dropped,
            f" ({self.error})" if self.error else "",
        )

    def _end(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _link_closed(self, error: BaseException | None) -> None:
        self.error = error
        self._end()

    async def _idle(self, loop: asyncio.AbstractEventLoop) -> None:
        timeout = self.hub.idle_timeout
        while True:
            left = self.last + timeout - time.monotonic()
            if left <= 0:
                self.counters["udp-idle"] += 1
                self.link.close()
                return
            await asyncio.sleep(left)

    # -- from the client ---------------------------------------------------------------------
    def _from_tunnel(self, target: Address, payload: bytes) -> None:
        self.last = time.monotonic()
        self.counters["udp-datagrams-up"] += 1
        if not target.is_domain:
            self._send(unmapped(target.host), target.port, payload, target)  # type: ignore[arg-type]
            return
        name = str(target.host).lower()
        known = self.names.get(name)
        if known is not None and known[0] > self.last:
            if known[1] is None:
                self._drop("udp-dns", target, "no address")
            else:
                self._send(known[1], target.port, payload, target)
            return
        if self.lookups >= MAX_LOOKUPS:
            self._drop("udp-dns", target, f"{MAX_LOOKUPS} lookups under way")
            return
        self.lookups += 1
        asyncio.get_running_loop().create_task(self._resolve(name, target, payload))

    async def _resolve(self, name: str, target: Address, payload: bytes) -> None:
        """Resolve `name` (kept NAME_TTL s), then send the datagram to its first allowed address."""
        loop = asyncio.get_running_loop()
        try:
            addrs = await self.hub.resolver.resolve(
                name, loop.time() + 5.0, self.source, self.hub.nameservers()
            )
        except ResolveError as e:
            addrs = []
            why = str(e)
        else:
            why = "no address"
        finally:
            self.lookups -= 1
        policy = self.hub.policy()
        chosen = next((ip for ip in addrs if policy.check(unmapped(ip)) is None), None)
        if chosen is None and addrs:
            chosen = unmapped(addrs[0])  # refused below, with the reason
        if len(self.names) >= MAX_NAMES:
            self.names.pop(next(iter(self.names)))
        self.names[name] = (time.monotonic() + NAME_TTL, chosen)
        if self.link.closed:
            return
        if chosen is None:
            self._drop("udp-dns", target, why)
            return
        self._send(unmapped(chosen), target.port, payload, target)

    def _drop(self, counter: str, target: Address, why: str) -> None:
        self.counters[counter] += 1
        self.hub.drop_log("%s %s udp -> %s: dropped: %s", self.cid, self.peer, target, why)

    def _verdict(self, policy: TargetPolicy, ip: IPAddress) -> tuple[bool, str | None]:
        """Whether `ip` is the server itself, and why the policy refuses it (None: allowed);
        kept VERDICT_TTL s per association, forgotten when a reload brings a new policy."""
        now = time.monotonic()
        if self.verdicts_of is not policy:
            self.verdicts.clear()
            self.verdicts_of = policy
        known = self.verdicts.get(ip)
        if known is not None and known[0] > now:
            return known[1], known[2]
        own = ip.is_loopback or policy.is_own(ip)
        why = policy.check(ip)
        if len(self.verdicts) >= MAX_VERDICTS:
            self.verdicts.pop(next(iter(self.verdicts)))
        self.verdicts[ip] = (now + VERDICT_TTL, own, why)
        return own, why

    def _send(self, ip: IPAddress, port: int, payload: bytes, target: Address) -> None:
        """One datagram to `ip`:`port`: hairpinned, refused, or sent from the mapping."""
        policy = self.hub.policy()
        own, why = self._verdict(policy, ip)
        other = self.hub.by_port.get(port)
        if other is not None and own:
            # RFC 4787 REQ-9: to another mapping of this server, delivered here, as coming
            # from this association's mapping on the address the sender used.
            self.counters["udp-hairpin"] += 1
            self._remember(ip)
            self.up += len(payload)
            other._to_client(ip, self.port, payload, hairpin=True)
            return
        if why is not None:
            self.counters["udp-refused"] += 1
            self.hub.refuse_log(
                "%s %s udp -> %s: refused (%s; %s)",
                self.cid,
                self.peer,
                target,
                why,
                policy.hint(ip, why),
            )
            return
        self._remember(ip)
        try:
            self.udp.sendto(payload, _sockaddr(self.udp, ip, port))
        except OSError as e:  # EAGAIN (a full socket buffer), unreachable, too big
            self._drop("udp-send-failed", target, e.strerror or str(e))
            return
        self.up += len(payload)

    def _remember(self, ip: IPAddress) -> None:
        if self.hub.filter is Filter.ADDRESS:
            self.peers[ip] = None
            self.peers.move_to_end(ip)
            if len(self.peers) > MAX_PEERS:
                self.peers.popitem(last=False)

    # -- to the client -----------------------------------------------------------------------
    def _from_udp(self) -> None:
        for _ in range(READ_BATCH):
            try:
                payload, sa = self.udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an ICMP error queued on the socket: nothing to read
                log.debug("%s udp port %d: %s", self.cid, self.port, e.strerror)
                continue
            ip = unmapped(ipaddress.ip_address(sa[0].split("%")[0]))
            self._to_client(ip, sa[1], payload)

    def _to_client(self, ip: IPAddress, port: int, payload: bytes, hairpin: bool = False) -> None:
        if self.hub.filter is Filter.ADDRESS and ip not in self.peers:
            self.counters["udp-filtered"] += 1
            return
        self.last = time.monotonic()
        self.counters["udp-datagrams-down"] += 1
        if self.link.send(Address(ip, port), payload):
            self.down += len(payload)


def close_all(hub: UdpHub) -> None:
    """End every association (the server stops)."""
    for a in list(hub.by_port.values()):
        with contextlib.suppress(Exception):
            a.link.close()
