"""The SOCKS5 listener: the target comes from the client's CONNECT request.

Sharing among the LAN's hosts: each source address may hold `--socks-per-client` connections,
and as many unfinished SOCKS handshakes (a new one closes its oldest), so silent or slow
connections cannot lock a source's other programs out; wrong passwords are throttled per source
(`AuthThrottle`). Loopback is one source for the last two (any local program can pick any 127.x
address) and has no cap on its connections: every local program connects from it, so one
program's connections would lock out all others (`--max-connections` still bounds them all).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import ipaddress
import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from mptun.client import socks5
from mptun.client.tunnel import Tunneler
from mptun.common.address import Address, format_sockaddr
from mptun.common.crypto import read_secret_file
from mptun.common.drive import recv_ready
from mptun.common.errors import ConfigError
from mptun.common.handshake import ConnectStatus
from mptun.common.logutil import BurstLog
from mptun.common.sockets import reset

if TYPE_CHECKING:
    from mptun.client.udp import UdpTunnels

log = logging.getLogger("mptun.client.socks")


class ReplyPolicy(enum.Enum):
    OPTIMISTIC = "optimistic"  # reply success at once; first bytes ride in the first flight
    VERIFIED = "verified"  # wait for the server's connect status and report it


# The server's connect status as a SOCKS5 reply code (values 0-6 are the same numbers).
_SOCKS_REPLY = {
    ConnectStatus.DNS_FAILURE: socks5.Reply.HOST_UNREACHABLE,
    ConnectStatus.MODE_REFUSED: socks5.Reply.GENERAL_FAILURE,
    ConnectStatus.SERVER_FULL: socks5.Reply.GENERAL_FAILURE,
}


def socks_reply_for(status: ConnectStatus) -> socks5.Reply:
    return _SOCKS_REPLY.get(status) or socks5.Reply(int(status))


def socks_credentials(
    user: str | None, password: str | None, password_file: str | None
) -> tuple[str, str] | None:
    """RFC 1929 user and password from the options, or None; one-line errors for bad pairs."""
    if password is not None and password_file is not None:
        raise ConfigError("give --socks-password or --socks-password-file, not both")
    if password_file is not None:
        password = read_password_file(password_file)
    if (user is None) != (password is None):
        raise ConfigError(
            "--socks-user goes with --socks-password-file (or --socks-password), and they with it"
        )
    return (user, password) if user is not None and password is not None else None


def read_password_file(path: str) -> str:
    """The password in a --socks-password-file: its one line, checked like the key file."""
    what = "--socks-password-file"
    text = read_secret_file(path, what, "one line: the SOCKS password")
    line = text.removesuffix("\n").removesuffix("\r")
    if "\n" in line or "\r" in line:
        raise ConfigError(f"{what} {path}: more than one line (the password is one line)")
    size = len(line.encode())
    if not 1 <= size <= 255:
        raise ConfigError(f"{what} {path}: the password is {size} bytes; RFC 1929 allows 1-255")
    return line


class Reach(enum.Enum):
    """Who can reach a listener bound to an address."""

    LOOPBACK = "loopback"  # this machine only
    LAN = "lan"  # private or link-local: the LAN
    EVERYWHERE = "everywhere"  # a wildcard: every address of the machine, the WAN's too
    PUBLIC = "public"  # a public address: the internet


def bind_reach(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Reach:
    """Who reaches a listener bound to `ip`, whatever spelling the address has.

    An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) binds the IPv4 address a.b.c.d, and
    `::ffff:0.0.0.0` binds every IPv4 address (net/ipv6/af_inet6.c `__inet6_bind`: a mapped
    address is bound as its IPv4 address; measured: a listener on it accepts connections to
    127.0.0.2), though Python calls all of ::ffff:0:0/96 private; so the mapped address is judged
    as the IPv4 address it is. A scope (`::%eth0`) does not narrow the wildcard.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ipaddress.IPv6Address(int(ip))  # int(): drop any %scope
    if ip.is_unspecified:
        return Reach.EVERYWHERE
    if ip.is_loopback:
        return Reach.LOOPBACK
    if ip.is_private or ip.is_link_local:
        return Reach.LAN
    return Reach.PUBLIC


@functools.lru_cache(maxsize=1024)  # a LAN's few hosts connect again and again
def source_key(ip: str) -> str:
    """The source a connection counts against: its address (an IPv4-mapped one as IPv4), and
    "loopback" for every loopback address."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return "loopback" if addr.is_loopback else str(addr)


class AuthThrottle:
    """Wrong SOCKS passwords per source: a token bucket each, `burst` tries, then one more per
    `interval` seconds; an attempt without a token is refused unchecked.

    Memory is bounded: at most `max_sources` buckets, the least recently failing forgotten first
    (a forgotten source starts again with a full bucket). A source with a full bucket has no
    entry, so good logins cost nothing.
    """

    def __init__(
        self,
        burst: int = 10,
        interval: float = 1.0,
        max_sources: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.interval, self.max_sources = burst, interval, max_sources
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def _tokens(self, source: str, now: float) -> float:
        got = self._buckets.get(source)
        if got is None:
            return float(self.burst)
        tokens, when = got
        return min(float(self.burst), tokens + (now - when) / self.interval)

    def may_try(self, source: str) -> bool:
        """Whether `source` may have a password checked now."""
        return self._tokens(source, self.clock()) >= 1

    def failed(self, source: str) -> None:
        """A wrong password from `source` was checked: it costs a token."""
        now = self.clock()
        tokens = self._tokens(source, now) - 1
        self._buckets.pop(source, None)
        self._buckets[source] = (max(tokens, 0.0), now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class SocksListener:
    """Handles accepted SOCKS5 connections for an AcceptLoop."""

    kind = "socks"

    def __init__(
        self,
        tunneler: Tunneler,
        policy: ReplyPolicy = ReplyPolicy.OPTIMISTIC,
        credentials: tuple[str, str] | None = None,
        handshake_timeout: float = 10.0,
        per_client: int = 256,
        throttle: AuthThrottle | None = None,
        udp: UdpTunnels | None = None,
    ) -> None:
        self.tunneler, self.policy, self.credentials = tunneler, policy, credentials
        self.udp = udp  # UDP ASSOCIATE is served with it (client/socksudp.py), refused without
        self.handshake_timeout = handshake_timeout
        self.per_client = per_client
        self.throttle = throttle or AuthThrottle()
        self._per_client: Counter[str] = Counter()
        # source -> its sockets in the SOCKS handshake, oldest first
        self._handshaking: dict[str, OrderedDict[int, socket.socket]] = {}
        self._bad_log = BurstLog(log, logging.INFO)
        self._limit_log = BurstLog(log, logging.WARNING)
        self._evict_log = BurstLog(log, logging.WARNING)

    async def handle(self, sock: socket.socket, peer: tuple) -> None:
        """One SOCKS connection, within the per-address limit (one greedy host cannot starve)."""
        host = str(peer[0])
        key = source_key(host)
        if key != "loopback" and self._per_client[host] >= self.per_client:
            self.tunneler.counters["socks-per-client"] += 1
            self._limit_log(
                "socks %s: %d connections open from this address (--socks-per-client): resetting",
                host,
                self.per_client,
            )
            reset(sock)
            return
        self._per_client[host] += 1
        try:
            await self._handle(sock, peer, key)
        finally:
            self._per_client[host] -= 1
            if not self._per_client[host]:
                del self._per_client[host]

    def _begin_handshake(self, key: str, sock: socket.socket) -> None:
        """Count `sock` among `key`'s unfinished handshakes; at `per_client` of them, close the
        oldest (its pending read ends, and its task closes it). A handshake takes a round trip
        or two, so a legitimate one is closed only if its source opens that many more
        connections meanwhile."""
        waiting = self._handshaking.setdefault(key, OrderedDict())
        if len(waiting) >= self.per_client:
            _, oldest = waiting.popitem(last=False)
            self.tunneler.counters["socks-handshake-evicted"] += 1
            self._evict_log(
                "socks %s: %d unfinished SOCKS handshakes from this source: closing the oldest",
                key,
                self.per_client,
            )
            try:
                oldest.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        waiting[id(sock)] = sock

    def _end_handshake(self, key: str, sock: socket.socket) -> None:
        waiting = self._handshaking.get(key)
        if waiting is not None:
            waiting.pop(id(sock), None)
            if not waiting:
                del self._handshaking[key]

    async def _handle(self, sock: socket.socket, peer: tuple, key: str) -> None:
        loop = asyncio.get_running_loop()
        cid = self.tunneler.next_id()
        source = f"socks {format_sockaddr(peer)}"
        hs = socks5.Socks5Handshake(
            self.credentials, lambda: self.throttle.may_try(key), udp=self.udp is not None
        )
        self._begin_handshake(key, sock)
        held = bytearray()  # replies not sent yet (`_negotiate`)
        try:
            deadline = loop.time() + self.handshake_timeout
            target = await _negotiate(loop, sock, hs, held, deadline)
        except socks5.SocksError as e:
            self.tunneler.counters["socks-refused"] += 1
            if isinstance(e, socks5.AuthFailed):
                if e.checked:
                    self.throttle.failed(key)
                else:
                    self.tunneler.counters["socks-auth-throttled"] += 1
            self._bad_log("%s %s: %s", cid, source, e)
            try:
                if held or e.response:
                    sock.send(bytes(held) + e.response)
            except OSError:
                pass
            sock.close()
            return
        except (TimeoutError, OSError, EOFError) as e:
            log.debug("%s %s: SOCKS handshake ended: %r", cid, source, e)
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        finally:
            self._end_handshake(key, sock)
        optimistic = self.policy is ReplyPolicy.OPTIMISTIC and not self.tunneler.rejecting
        if held and (isinstance(target, socks5.UdpAssociate) or not optimistic):
            try:  # the greeting's reply now; an optimistic CONNECT's goes with it, below
                await loop.sock_sendall(sock, bytes(held))
            except OSError:
                sock.close()
                return
            held.clear()
        if isinstance(target, socks5.UdpAssociate):
            await self._udp_associate(loop, sock, peer, target.source, cid)
            return
        early = hs.trailing_data
        if self.tunneler.rejecting:  # every server down, --when-down reject: say so at once
            await self.tunneler.run(cid, source, sock, target, early, on_status=self._refused(sock))
            return
        if self.policy is ReplyPolicy.OPTIMISTIC:
            try:
                await loop.sock_sendall(sock, bytes(held) + socks5.reply(socks5.Reply.SUCCEEDED))
            except OSError:
                sock.close()
                return
            await self.tunneler.run(cid, source, sock, target, early)
            return

        async def on_status(status: ConnectStatus) -> bool:
            await loop.sock_sendall(sock, socks5.reply(socks_reply_for(status)))
            return status == ConnectStatus.SUCCEEDED

        await self.tunneler.run(
            cid, source, sock, target, early, on_status=on_status, wait_for_early_data=False
        )

    async def _udp_associate(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        peer: tuple,
        announced: Address,
        cid: str,
    ) -> None:
        """Serve a UDP ASSOCIATE until its control connection closes (client/socksudp.py)."""
        assert self.udp is not None
        # Here, not at the top: the relay's code is loaded by the first UDP ASSOCIATE, not by
        # an idle client (benchmarks/footprint.py).
        from mptun.client.socksudp import SocksUdpRelay

        try:
            relay = SocksUdpRelay(self.udp, sock, peer, announced, cid, self._bad_log)
        except OSError as e:
            log.info("%s socks %s: no UDP relay socket: %s", cid, format_sockaddr(peer), e)
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, socks5.reply(socks5.Reply.GENERAL_FAILURE))
            sock.close()
            return
        try:
            await loop.sock_sendall(sock, socks5.reply(socks5.Reply.SUCCEEDED, relay.bound))
        except OSError:
            relay.sock.close()
            sock.close()
            return
        await relay.run(loop)

    @staticmethod
    def _refused(sock: socket.socket) -> Callable[[ConnectStatus], Awaitable[bool]]:
        """The status hook of a connection that will be refused: the failure reply."""

        async def on_status(status: ConnectStatus) -> bool:
            await asyncio.get_running_loop().sock_sendall(
                sock, socks5.reply(socks_reply_for(status))
            )
            return status == ConnectStatus.SUCCEEDED

        return on_status


async def _negotiate(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    hs: socks5.Socks5Handshake,
    held: bytearray,
    deadline: float,
):
    """The client's request (a target or a UDP ASSOCIATE); the replies on the way are held in
    `held` until the machine needs more bytes, then sent before waiting for them.

    A client that sends its greeting and request together (mptun's own bench clients do) gets
    the greeting's reply with the CONNECT's, in one send the caller makes: one segment and one
    wakeup of the application, not two. A client that waits for the greeting's reply gets it
    before the listener waits for its request.
    """
    while True:
        event = hs.next_event()
        if isinstance(event, socks5.Connect):
            return event.target
        if isinstance(event, socks5.UdpAssociate):
            return event
        if isinstance(event, socks5.Send):
            held += event.data
            continue
        if held:  # a client that waits for the greeting's reply before its request
            async with asyncio.timeout_at(deadline):
                await loop.sock_sendall(sock, bytes(held))
            held.clear()
        data = await recv_ready(loop, sock, 4096, deadline)  # queued with the accept, as a rule
        if not data:
            raise EOFError("client closed during the SOCKS handshake")
        hs.receive_data(data)
