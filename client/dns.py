"""The router's DNS server: queries over UDP and TCP answered through the tunnel, with a cache.

Each query that misses the cache goes to the upstream resolver as DNS over TCP through one tunnel
connection (like ss-tunnel pointed at port 53, but with the query riding in the first flight): a
socket pair's far end is handed to `Tunneler.run`, the one path every listener shares, and the near
end writes the framed query and reads the framed answer. Identical queries in flight share one
upstream exchange; at most `max_inflight` tunnels are open for DNS, at most `max_pending` queries
wait, and beyond that queries get SERVFAIL at once instead of piling up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable

from mptun.client.dnscache import DnsCache, cache_key
from mptun.client.tunnel import Tunneler
from mptun.common import dns
from mptun.common.address import Address
from mptun.common.errors import ProtocolError
from mptun.common.listener import drain_tasks
from mptun.common.logutil import BurstLog
from mptun.common.sockets import family_of, sockaddr_address

log = logging.getLogger("mptun.client.dns")

Exchange = Callable[[bytes], Awaitable[bytes]]


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
    """DNS over TCP from the LAN: pipelined queries answered concurrently (RFC 7766 6.2.1.1)."""

    kind = "dns (tcp)"

    def __init__(
        self, forwarder: DnsForwarder, idle_timeout: float = 10.0, per_connection: int = 16
    ) -> None:
        self.forwarder, self.idle_timeout, self.per_connection = (
            forwarder,
            idle_timeout,
            per_connection,
        )

    async def handle(self, sock: socket.socket, peer: tuple) -> None:
        loop = asyncio.get_running_loop()
        source = str(sockaddr_address(peer))
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
            while True:
                async with asyncio.timeout(self.idle_timeout):
                    data = await loop.sock_recv(sock, 65536)
                if not data:
                    break
                framer.receive_data(data)
                while (query := framer.next_message()) is not None:
                    await slots.acquire()
                    t = loop.create_task(answer(query))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
        except (TimeoutError, OSError):
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

    def __init__(self, bind: Address, forwarder: DnsForwarder, max_datagram: int = 4096) -> None:
        self.bind, self.forwarder, self.max_datagram = bind, forwarder, max_datagram
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
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            elif wildcard:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_PKTINFO, 1)
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
            limit = dns.parse(data).udp_limit
            if len(reply) > limit:
                reply = dns.truncated_for_udp(reply, dns.parse(reply), limit)
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
        if level == socket.IPPROTO_IP and kind == socket.IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr;}: reply from addr
            ifindex = struct.unpack_from("i", data)[0]
            return level, kind, struct.pack("i4s4s", ifindex, data[8:12], b"\0" * 4)
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            # struct in6_pktinfo {in6_addr addr; int ifindex;}, IPv4-mapped for IPv4 queries
            return level, kind, data[:20]
    return None
