"""The router's DNS server: queries over UDP and TCP answered through the tunnel, with a cache.

Each query that misses the cache goes to the upstream resolver as DNS over TCP through one tunnel
connection (like ss-tunnel pointed at port 53, but with the query riding in the first flight): a
socket pair's far end is handed to `Tunneler.run`, the one path every listener shares, and the near
end writes the framed query and reads the framed answer. Identical queries in flight share one
upstream exchange; at most `max_inflight` tunnels are open for DNS, at most `max_pending` queries
wait, and beyond that queries get SERVFAIL at once instead of piling up.

It must not become an amplifier for the internet (an open resolver): it binds to loopback or a
LAN address unless told otherwise (`check_dns_bind`), a UDP answer is at most 1232 bytes (512
without EDNS) and a source address other than loopback gets a limited rate of UDP answers
(`SourceRateLimit`); DNS over TCP, which cannot be spoofed, has a whole-query deadline and a cap
on connections instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

from mptun.client.dnscache import DnsCache, cache_key
from mptun.client.socks import Reach, bind_reach
from mptun.client.tunnel import Tunneler
from mptun.common import dns
from mptun.common.address import Address
from mptun.common.errors import ConfigError, ProtocolError
from mptun.common.listener import drain_tasks
from mptun.common.logutil import BurstLog
from mptun.common.sockets import family_of, sockaddr_address, unmapped

log = logging.getLogger("mptun.client.dns")

Exchange = Callable[[bytes], Awaitable[bytes]]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# The largest UDP answer whatever the asker's EDNS size: DNS Flag Day 2020's default buffer size,
# which fits a 1280-byte IPv6 minimum MTU without fragments (RFC 6891 6.2.5, RFC 8200 5).
MAX_UDP_ANSWER = 1232
# Linux socket option numbers Python 3.11's socket module lacks (IP_PKTINFO) or may lack:
# include/uapi/linux/in.h and include/uapi/linux/in6.h.
IP_PKTINFO = 8
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
DEFAULT_RATE_LIMIT = 50  # UDP queries a second per source address (--dns-rate-limit)
RATE_BURST_SECONDS = 2.0  # a source may spend this many seconds' worth at once
RATE_MAX_SOURCES = 4096  # buckets kept; the least recently seen source goes first
TCP_QUERY_TIMEOUT = 10.0  # a whole query within this of the connection's start or last query
TCP_MAX_CONNECTIONS = 128  # DNS-over-TCP connections at once from addresses other than loopback
TCP_PER_SOURCE = 16  # ... and from one such address


def is_local_source(ip: IP) -> bool:
    """Whether queries from `ip` are exempt from the per-source limits: loopback (dnsmasq on the
    router forwards the whole LAN from 127.0.0.1)."""
    return unmapped(ip).is_loopback


def check_dns_bind(bind: Address, allow_open: bool) -> None:
    """Refuse a DNS listener the internet can reach (an open resolver) without --dns-open.

    Loopback, private and link-local addresses are the LAN; the wildcard (in any spelling,
    IPv4-mapped included) and public addresses need the explicit option.
    """
    reach = bind_reach(bind.host)  # type: ignore[arg-type]
    if allow_open or reach in (Reach.LOOPBACK, Reach.LAN):
        return
    what = "all addresses" if reach is Reach.EVERYWHERE else "a public address"
    raise ConfigError(
        f"--dns {bind}: the DNS server binds only to loopback or a LAN address (e.g. "
        "127.0.0.1:5353 for dnsmasq, or the router's LAN IP) unless --dns-open is given: "
        f"{what} would answer anyone who reaches it, an open resolver"
    )


class SourceRateLimit:
    """A token bucket per source address: `rate` queries a second, bursts of `burst`.

    Loopback is exempt; 0 turns the limit off. At most `max_sources` buckets are kept (the least
    recently seen goes first), so spoofed sources cannot grow the table without bound.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        max_sources: int = RATE_MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.max_sources, self.clock = rate, max_sources, clock
        self.burst = max(1.0, rate * RATE_BURST_SECONDS) if burst is None else burst
        self._buckets: OrderedDict[IP, tuple[float, float]] = OrderedDict()  # tokens, when

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: IP) -> bool:
        """Take one token from `ip`'s bucket; False when it is empty."""
        if self.rate <= 0 or is_local_source(ip):
            return True
        ip = unmapped(ip)
        now = self.clock()
        tokens, then = self._buckets.pop(ip, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        ok = tokens >= 1.0
        self._buckets[ip] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return ok


def udp_answer_limit(query: dns.Message) -> int:
    """The largest UDP answer for `query`: its EDNS size up to 1232, or 512 without EDNS
    (RFC 1035 4.2.1, RFC 6891 6.2.3-6.2.5)."""
    return min(query.udp_limit, MAX_UDP_ANSWER) if query.opt else dns.MAX_UDP_PLAIN


def fit_for_udp(reply: bytes, limit: int) -> bytes:
    """`reply` if it fits `limit`, else its header and question with TC set, and the OPT record
    (without options) when it had one (RFC 6891 7: an EDNS query gets an EDNS answer)."""
    if len(reply) <= limit:
        return reply
    msg = dns.parse(reply)
    out = dns.truncated_for_udp(reply, msg, limit)
    opt = msg.opt
    if opt is None:
        return out
    # root name, TYPE OPT, CLASS: the payload size this server accepts, TTL: extended RCODE,
    # version and flags as upstream sent them, no options
    record = b"\0" + struct.pack("!HHIH", dns.Type.OPT, MAX_UDP_ANSWER, opt.ttl, 0)
    if len(out) + len(record) > limit:
        return out
    return out[:10] + struct.pack("!H", 1) + out[12:] + record


class UpstreamError(Exception):
    """The upstream exchange gave no usable answer."""


class TunnelExchange:
    """One query, one tunnel connection to the upstream resolver, DNS over TCP (RFC 7766)."""

    def __init__(self, tunneler: Tunneler, upstream: Address) -> None:
        self.tunneler, self.upstream = tunneler, upstream
        self.tasks: set[asyncio.Task] = set()

    async def __call__(self, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        near, far = socket.socketpair()
        near.setblocking(False)
        far.setblocking(False)
        try:
            near.send(dns.TcpFramer.frame(query))  # fits: a socket pair buffers far more
        except BaseException:
            near.close()
            far.close()
            raise
        # The query is readable on `far` before the tunnel connects, so Tunneler.run sends it in the
        # first flight. The task owns `far`; it ends when the relay sees `near` close.
        task = loop.create_task(
            self.tunneler.run(self.tunneler.next_id(), "dns", far, self.upstream)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        framer = dns.TcpFramer()
        try:
            while (answer := framer.next_message()) is None:
                data = await loop.sock_recv(near, 65536)
                if not data:
                    raise UpstreamError("the tunnel closed without an answer")
                framer.receive_data(data)
            return answer
        except ConnectionError as e:
            raise UpstreamError(f"the tunnel failed: {e.strerror}") from None
        finally:
            near.close()


class DnsForwarder:
    """Answers raw queries: from the cache, else through `exchange` under concurrency limits."""

    def __init__(
        self,
        exchange: Exchange,
        cache: DnsCache,
        max_inflight: int = 64,
        max_pending: int = 512,
        timeout: float = 5.0,
        counters: Counter[str] | None = None,
    ) -> None:
        self.exchange, self.cache = exchange, cache
        self.max_inflight, self.max_pending, self.timeout = max_inflight, max_pending, timeout
        # shared with the Tunneler's in the client, so --stats-file shows them; keys start "dns-"
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._slots = asyncio.Semaphore(max_inflight)
        self._inflight: dict[object, asyncio.Future[tuple[bytes, dns.Message] | None]] = {}
        self._active = 0
        self._fail_log = BurstLog(log, logging.WARNING)
        self._bad_log = BurstLog(log, logging.INFO)

    async def resolve(self, raw: bytes, source: str = "") -> bytes | None:
        """The answer to send back, or None when the query deserves no answer at all."""
        try:
            query = dns.parse(raw)
        except ProtocolError as e:
            self.counters["dns-malformed"] += 1
            self._bad_log("dns %s: dropped: %s", source, e)
            return None
        if query.is_response:
            self.counters["dns-malformed"] += 1
            return None
        key = cache_key(query)
        if key is None:
            self.counters["dns-not-implemented"] += 1
            rcode = dns.Rcode.NOTIMP if query.opcode else dns.Rcode.FORMERR
            return dns.reply_header_only(raw, query, rcode)
        hit = self.cache.get(key, query.id)
        if hit is not None:
            self.counters["dns-cache-hit"] += 1
            return hit
        if self._active >= self.max_pending:
            self.counters["dns-overload"] += 1
            self._fail_log("dns %s: %d queries waiting: answering SERVFAIL", source, self._active)
            return dns.reply_header_only(raw, query, dns.Rcode.SERVFAIL)
        self._active += 1
        try:
            shared = self._inflight.get(key)
            if shared is not None:
                self.counters["dns-coalesced"] += 1
                result = await asyncio.shield(shared)
            else:
                result = await self._ask_upstream(key, raw, query, source)
        finally:
            self._active -= 1
        if result is None:
            return dns.reply_header_only(raw, query, dns.Rcode.SERVFAIL)
        return dns.with_id(result[0], query.id)

    async def _ask_upstream(
        self, key: object, raw: bytes, query: dns.Message, source: str
    ) -> tuple[bytes, dns.Message] | None:
        fut: asyncio.Future[tuple[bytes, dns.Message] | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._inflight[key] = fut
        result = None
        try:
            async with self._slots, asyncio.timeout(self.timeout):
                answer = await self.exchange(raw)
            msg = dns.parse(answer)
            if not msg.is_response or msg.id != query.id or msg.questions != query.questions:
                raise UpstreamError("the answer does not match the question")
            self.counters["dns-upstream"] += 1
            self.cache.put(key, answer, msg)  # type: ignore[arg-type]
            result = (answer, msg)
        except (UpstreamError, ProtocolError, OSError, TimeoutError) as e:
            self.counters["dns-upstream-failed"] += 1
            name = query.questions[0].text
            why = "timed out" if isinstance(e, TimeoutError) else str(e)
            self._fail_log("dns %s %s: upstream failed: %s; answering SERVFAIL", source, name, why)
        finally:
            del self._inflight[key]
            fut.set_result(result)
        return result


class DnsTcpHandler:
    """DNS over TCP from the LAN: pipelined queries answered concurrently (RFC 7766 6.2.1.1).

    Each whole query must arrive within `query_timeout` of the connection's start or of the
    previous query: the deadline does not restart on each read, so a client trickling a byte at
    a time cannot hold a connection open (RFC 7766 6.2.3 lets servers close idle connections).
    Sources other than loopback hold at most `max_connections` connections, `per_source` each;
    one more is closed at once.
    """

    kind = "dns (tcp)"

    def __init__(
        self,
        forwarder: DnsForwarder,
        query_timeout: float = TCP_QUERY_TIMEOUT,
        per_connection: int = 16,
        max_connections: int = TCP_MAX_CONNECTIONS,
        per_source: int = TCP_PER_SOURCE,
    ) -> None:
        self.forwarder, self.query_timeout, self.per_connection = (
            forwarder,
            query_timeout,
            per_connection,
        )
        self.max_connections, self.per_source = max_connections, per_source
        self._open: Counter[IP] = Counter()  # connections of non-loopback sources
        self._refusal_log = BurstLog(log, logging.INFO)

    def _admit(self, ip: IP) -> bool:
        """Count a new connection from `ip` in, unless it is over a limit."""
        if is_local_source(ip):
            return True
        if sum(self._open.values()) >= self.max_connections or self._open[ip] >= self.per_source:
            return False
        self._open[ip] += 1
        return True

    def _release(self, ip: IP) -> None:
        if is_local_source(ip):
            return
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]

    async def handle(self, sock: socket.socket, peer: tuple) -> None:
        ip = sockaddr_address(peer).host
        assert not isinstance(ip, str)
        if not self._admit(ip):
            self.forwarder.counters["dns-tcp-refused"] += 1
            self._refusal_log(
                "dns %s: over the DNS-over-TCP connection limit (%d, %d per address): closed",
                ip,
                self.max_connections,
                self.per_source,
            )
            sock.close()
            return
        try:
            await self._serve(sock, str(sockaddr_address(peer)))
        finally:
            self._release(ip)

    async def _serve(self, sock: socket.socket, source: str) -> None:
        loop = asyncio.get_running_loop()
        framer = dns.TcpFramer()
        slots = asyncio.Semaphore(self.per_connection)
        lock = asyncio.Lock()
        tasks: set[asyncio.Task] = set()

        async def answer(query: bytes) -> None:
            try:
                reply = await self.forwarder.resolve(query, source)
                if reply is not None:
                    async with lock:
                        await loop.sock_sendall(sock, dns.TcpFramer.frame(reply))
            except OSError:
                pass
            finally:
                slots.release()

        try:
            deadline = loop.time() + self.query_timeout
            while True:
                async with asyncio.timeout_at(deadline):
                    data = await loop.sock_recv(sock, 65536)
                if not data:
                    break
                framer.receive_data(data)
                while (query := framer.next_message()) is not None:
                    deadline = loop.time() + self.query_timeout  # the next query's turn
                    async with asyncio.timeout_at(deadline):
                        await slots.acquire()
                    t = loop.create_task(answer(query))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
        except TimeoutError:
            self.forwarder.counters["dns-tcp-timeout"] += 1
        except OSError:
            pass
        finally:
            try:
                if tasks:
                    await asyncio.wait(set(tasks), timeout=self.forwarder.timeout + 1)
            finally:
                for t in tasks:
                    t.cancel()
                sock.close()


class DnsUdpServer:
    """DNS over UDP: one socket; answers leave from the address each query was sent to.

    Bound to a wildcard address, the socket asks for each datagram's destination (IP_PKTINFO /
    IPV6_RECVPKTINFO) and sends the answer from it: a query REDIRECTed by nftables must be answered
    from the address conntrack expects, and a router's LAN interface often has several.
    """

    kind = "dns (udp)"

    def __init__(
        self,
        bind: Address,
        forwarder: DnsForwarder,
        max_datagram: int = 4096,
        rate_limit: SourceRateLimit | None = None,
    ) -> None:
        self.bind, self.forwarder, self.max_datagram = bind, forwarder, max_datagram
        self.rate_limit = SourceRateLimit(DEFAULT_RATE_LIMIT) if rate_limit is None else rate_limit
        self._limit_log = BurstLog(log, logging.WARNING)
        self.sock: socket.socket | None = None
        self.tasks: set[asyncio.Task] = set()
        self._pktinfo = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> Address:
        family = family_of(self.bind.host)  # type: ignore[arg-type]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            wildcard = ipaddress.ip_address(self.bind.host).is_unspecified  # type: ignore[arg-type]
            if family == socket.AF_INET6:
                if wildcard:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            elif wildcard:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind(self.bind.sockaddr())
        except BaseException:
            sock.close()
            raise
        self.sock, self._pktinfo, self._loop = sock, wildcard, loop
        loop.add_reader(sock.fileno(), self._on_readable)
        host, port = sock.getsockname()[:2]
        return Address(ipaddress.ip_address(host), port)

    def _on_readable(self) -> None:
        assert self.sock is not None and self._loop is not None
        for _ in range(64):  # bounded: other callbacks run under a flood
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(
                    self.max_datagram, socket.CMSG_SPACE(32)
                )
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error for an earlier answer: nothing to do
            source = sockaddr_address(addr).host
            assert not isinstance(source, str)
            if not self.rate_limit.allow(source):
                # dropped, not answered: an answer of any size would still reach a spoofed victim
                self.forwarder.counters["dns-rate-limited"] += 1
                self._limit_log(
                    "dns %s: over %g queries a second: dropping", source, self.rate_limit.rate
                )
                continue
            if len(self.tasks) >= self.forwarder.max_pending:
                self.forwarder.counters["dns-udp-dropped"] += 1
                continue
            local = _pktinfo(ancdata) if self._pktinfo else None
            task = self._loop.create_task(self._answer(data, addr, local))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _answer(self, data: bytes, addr: tuple, local: tuple[int, int, bytes] | None) -> None:
        reply = await self.forwarder.resolve(data, str(sockaddr_address(addr)))
        if reply is None or self.sock is None:
            return
        try:
            limit = udp_answer_limit(dns.parse(data))
            if len(reply) > limit:
                reply = fit_for_udp(reply, limit)
                self.forwarder.counters["dns-udp-truncated"] += 1
        except ProtocolError:
            return
        cmsg = [] if local is None else [local]
        try:
            self.sock.sendmsg([reply], cmsg, 0, addr)
        except OSError:
            self.forwarder.counters["dns-udp-send-failed"] += 1

    def close(self) -> None:
        if self.sock is not None and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for queries in flight, then cancel the rest; how many."""
        return await drain_tasks(self.tasks, timeout)


def _pktinfo(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, int, bytes] | None:
    """The control message that sends an answer from the address the query came to."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr;}: reply from addr
            ifindex = struct.unpack_from("i", data)[0]
            return level, kind, struct.pack("i4s4s", ifindex, data[8:12], b"\0" * 4)
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            # struct in6_pktinfo {in6_addr addr; int ifindex;}, IPv4-mapped for IPv4 queries
            return level, kind, data[:20]
    return None
