"""The server's resolver for target names: asynchronous on the event loop, no thread pool.

`getaddrinfo` in an executor lets names whose DNS server never answers hold the pool's threads
(a deadline around the call frees the caller, not the thread), so every other lookup waits behind
them. This resolver asks the nameservers itself, with `common/dns.py` for the messages, and keeps
what a stub resolver owes its caller:
- literal addresses are never looked up (`inet_aton` forms such as `127.1` included, as glibc's
  `getaddrinfo` accepts them);
- `/etc/hosts` first, then DNS (the default `hosts: files dns` of nsswitch.conf): a name in the
  hosts file gets every address the file lists for it;
- nameservers, `options timeout:` and `attempts:` from `/etc/resolv.conf` (glibc's defaults
  and limits: 5 s and 2 tries, at most 30 s and 5; the first 3 nameservers; 127.0.0.1 when
  none), re-read when the file changes; `--nameserver` replaces them. Search domains are not
  applied: a tunnel target is an absolute name;
- A and AAAA asked at once, each query with a random ID from a new random port (RFC 5452
  section 4), an answer accepted only from a server asked, with the ID and question sent;
  SERVFAIL, REFUSED, NOTIMP and FORMERR move on to the next server at once, as glibc does;
- a truncated (TC) UDP answer is asked again over TCP (RFC 1035 4.2.1, RFC 7766 section 5);
- CNAME chains followed through the answer, and asked anew where a chain ends without data;
- one deadline for the whole lookup; when one family has answered with addresses the other gets
  at most `FAMILY_GRACE` s more (RFC 8305 section 3 waits 50 ms for AAAA after A; the server
  tries addresses in turn rather than racing them, so it waits longer for both);
- at most `PER_SOURCE` lookups at once per source (the caller's key: an IPv4 address, an IPv6
  /64); more fail at once rather than queue behind the slow ones.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from mptun.common import dns
from mptun.common.address import Address, IPAddress
from mptun.common.errors import MptunError, ProtocolError, Status
from mptun.common.sockets import connect, family_of

RESOLV_CONF = Path("/etc/resolv.conf")
HOSTS = Path("/etc/hosts")
DNS_PORT = 53
MAX_NAMESERVERS = 3  # glibc's MAXNS (resolv/bits/types/res_state.h)
DEFAULT_TIMEOUT, MAX_TIMEOUT = 5.0, 30.0  # glibc RES_TIMEOUT, RES_MAXRETRANS (resolv.h)
DEFAULT_ATTEMPTS, MAX_ATTEMPTS = 2, 5  # glibc RES_DFLRETRY, RES_MAXRETRY
PER_SOURCE = 128  # lookups one client address may have under way
FAMILY_GRACE = 1.0  # seconds the other family may still take once one has addresses
MAX_CNAME_HOPS = 8
CLASS_IN = 1
T = TypeVar("T")
# Answers that say "ask another server" (glibc res_send.c moves on for these rcodes).
_NEXT_SERVER = {dns.Rcode.SERVFAIL, dns.Rcode.REFUSED, dns.Rcode.NOTIMP, dns.Rcode.FORMERR}


class ResolveError(MptunError):
    """The name has no address we could learn (the tunnel answers DNS_FAILURE)."""

    status = Status.DNS


@dataclass(frozen=True)
class ResolvConf:
    """What the resolver takes from resolv.conf: servers as socket addresses, timing."""

    nameservers: tuple[tuple, ...] = (("127.0.0.1", DNS_PORT),)
    timeout: float = DEFAULT_TIMEOUT
    attempts: int = DEFAULT_ATTEMPTS


def parse_resolv_conf(text: str) -> ResolvConf:
    """`nameserver` lines and `options timeout:N attempts:N`; the rest is not used here."""
    servers: list[tuple] = []
    timeout, attempts = DEFAULT_TIMEOUT, DEFAULT_ATTEMPTS
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver" and len(servers) < MAX_NAMESERVERS:
            sa = _server_sockaddr(words[1], DNS_PORT)
            if sa is not None:
                servers.append(sa)
        elif words and words[0] == "options":
            for opt in words[1:]:
                key, _, value = opt.partition(":")
                if key in ("timeout", "attempts") and value.isdigit():
                    if key == "timeout":
                        timeout = float(min(max(int(value), 1), int(MAX_TIMEOUT)))
                    else:
                        attempts = min(max(int(value), 1), MAX_ATTEMPTS)
    return ResolvConf(tuple(servers) or ResolvConf().nameservers, timeout, attempts)


def _server_sockaddr(text: str, port: int) -> tuple | None:
    """A nameserver's socket address (IPv6 with its scope, e.g. fe80::1%eth0), None if bad."""
    host, _, scope = text.partition("%")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 4:
        return (str(ip), port)
    index = 0
    if scope:
        try:
            index = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
        except OSError:
            return None
    return (str(ip), port, 0, index)


def parse_hosts(text: str) -> dict[str, list[IPAddress]]:
    """/etc/hosts as name (lowered, no trailing dot) -> addresses in file order."""
    out: dict[str, list[IPAddress]] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        try:
            ip = ipaddress.ip_address(words[0].split("%", 1)[0])
        except ValueError:
            continue
        for name in words[1:]:
            addrs = out.setdefault(name.lower().rstrip("."), [])
            if ip not in addrs:
                addrs.append(ip)
    return out


def literal(name: str) -> IPAddress | None:
    """The address a target name spells, as getaddrinfo reads numeric hosts; None for a name.

    IPv4 in every `inet_aton` form (`127.1`, `0x7f.0.0.1`, `2130706433`); the caller has
    refused whitespace, after which glibc's exact `inet_aton` and Python's agree.
    """
    try:
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        pass
    if ":" in name:
        try:
            return ipaddress.IPv6Address(name.split("%", 1)[0])
        except ValueError:
            return None
    return None


class _Cached(Generic[T]):
    """A file parsed once per change (mtime, size, inode), so each lookup costs one stat."""

    def __init__(self, path: Path, parse: Callable[[str], T], missing: T) -> None:
        self.path, self.parse, self.missing = path, parse, missing
        self.key: tuple | None = None
        self.value = missing

    def get(self) -> T:
        try:
            st = os.stat(self.path)
        except OSError:
            self.key, self.value = None, self.missing
            return self.value
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key != self.key:
            try:
                text = self.path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            self.key, self.value = key, self.parse(text)
        return self.value


class _Answers(asyncio.DatagramProtocol):
    """The UDP socket of one query: responses from servers asked, with an ID sent, queued."""

    def __init__(self, question: dns.Question) -> None:
        self.question = question
        self.sent: set[tuple[str, int, int]] = set()  # (server, port, ID) of each query sent
        self.queue: asyncio.Queue[tuple[tuple, bytes, dns.Message]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) < dns.HEADER_LEN:
            return
        key = (_host(addr[0]), addr[1], int.from_bytes(data[:2], "big"))
        if key not in self.sent or (msg := _response_to(data, self.question)) is None:
            return  # not an answer to what we asked: ignored, as spoofed or stray
        self.queue.put_nowait((addr, data, msg))

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for one server: the wait for it times out, others may answer


async def _udp_endpoint(
    loop: asyncio.AbstractEventLoop, family: int, proto: _Answers
) -> asyncio.DatagramTransport:
    """An unconnected UDP socket for `proto`; the kernel binds it to a random port on send."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport


def _host(text: str) -> str:
    """An address as text in one spelling (scope dropped), to compare senders with servers."""
    return str(ipaddress.ip_address(text.split("%", 1)[0]))


def _response_to(raw: bytes, question: dns.Question) -> dns.Message | None:
    """`raw` parsed if it is a standard response to exactly `question`, else None."""
    try:
        msg = dns.parse(raw)
    except ProtocolError:
        return None
    if not msg.is_response or msg.opcode != 0 or msg.questions != (question,):
        return None
    return msg


def _query_bytes(question: dns.Question, msg_id: int) -> bytes:
    """A recursive standard query for one question."""
    header = struct.pack("!HHHHHH", msg_id, dns.RD, 1, 0, 0, 0)
    return header + question.name + struct.pack("!HH", question.qtype, question.qclass)


@dataclass
class _Result:
    """What one query learnt: the addresses, or why there are none."""

    addresses: list[IPAddress] = field(default_factory=list)
    rcode: int = dns.Rcode.NOERROR
    error: str = ""


class Resolver:
    """Resolves target names for the server; one instance per server (it holds the caps)."""

    def __init__(
        self,
        resolv_conf: Path = RESOLV_CONF,
        hosts: Path = HOSTS,
        per_source: int = PER_SOURCE,
    ) -> None:
        self._conf = _Cached(resolv_conf, parse_resolv_conf, ResolvConf())
        self._hosts: _Cached[dict[str, list[IPAddress]]] = _Cached(hosts, parse_hosts, {})
        self.per_source = per_source
        self.pending: dict[str, int] = {}  # source key -> lookups under way

    @contextmanager
    def _slot(self, source: str) -> Iterator[None]:
        n = self.pending.get(source, 0)
        if n >= self.per_source:
            raise ResolveError(f"{n} lookups from {source} already under way")
        self.pending[source] = n + 1
        try:
            yield
        finally:
            left = self.pending[source] - 1
            if left:
                self.pending[source] = left
            else:
                del self.pending[source]

    async def resolve(
        self,
        name: str,
        deadline: float,
        source: str = "",
        nameservers: Sequence[Address] = (),
    ) -> list[IPAddress]:
        """The addresses of `name` by loop time `deadline`, or ResolveError saying why not.

        `source` is what the per-source cap counts the client as (the server's source key:
        its IPv4 address or IPv6 /64); `nameservers` replaces resolv.conf's when given.
        """
        if not name or any(c.isascii() and not 0x21 <= ord(c) < 0x7F for c in name):
            raise ResolveError(f"bad name {name!r}")
        ip = literal(name)
        if ip is not None:
            return [ip]
        try:
            text = (name.encode("idna").decode("ascii") if not name.isascii() else name).lower()
            if "" in (text[:-1] if text.endswith(".") else text).split("."):
                raise ProtocolError("empty label", Status.ADDRESS)
            wire = dns.encode_name(text)
        except (UnicodeError, ProtocolError) as e:
            raise ResolveError(f"bad name {name!r}: {e}") from None
        hosts = self._hosts.get().get(text.rstrip("."))
        if hosts:
            return _ordered(list(hosts))
        conf = self._conf.get()
        if nameservers:
            servers = (_server_sockaddr(str(a.host), a.port) for a in nameservers)
            conf = ResolvConf(tuple(s for s in servers if s), conf.timeout, conf.attempts)
        with self._slot(source):
            return await self._lookup(wire, conf, deadline)

    async def _lookup(self, wire: bytes, conf: ResolvConf, deadline: float) -> list[IPAddress]:
        """A and AAAA at once; both families' addresses, or the most telling failure."""
        loop = asyncio.get_running_loop()
        tasks = [
            asyncio.ensure_future(self._chase(wire, qtype, conf, deadline))
            for qtype in (dns.Type.A, dns.Type.AAAA)
        ]
        try:
            pending = set(tasks)
            while pending and loop.time() < deadline:
                done, pending = await asyncio.wait(
                    pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
                if any(t.result().addresses for t in done):
                    break
            if pending:
                grace = min(deadline, loop.time() + FAMILY_GRACE) - loop.time()
                await asyncio.wait(pending, timeout=max(0.0, grace))
            results = [t.result() for t in tasks if t.done()]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        addresses = [ip for r in results for ip in r.addresses]
        if addresses:
            return _ordered(addresses)
        if any(r.rcode == dns.Rcode.NXDOMAIN for r in results):
            raise ResolveError("no such name (NXDOMAIN)")
        errors = [r.error for r in results if r.error]
        if errors or len(results) < len(tasks):
            raise ResolveError(errors[0] if errors else "no answer in time")
        raise ResolveError("no A or AAAA record")

    async def _chase(self, wire: bytes, qtype: int, conf: ResolvConf, deadline: float) -> _Result:
        """Ask for `qtype` of `wire`; where a CNAME chain stops short, ask for its end.

        A recursive server follows the chain itself (RFC 1034 4.3.2) and proves an end without
        data with the zone's SOA (RFC 2308 section 2.2); an answer that stops at a CNAME with
        neither came from a server that did not follow it.
        """
        seen = {wire}
        for _ in range(MAX_CNAME_HOPS):
            result, end = await self._query(dns.Question(wire, qtype, CLASS_IN), conf, deadline)
            if result.addresses or result.error or result.rcode != dns.Rcode.NOERROR:
                return result
            if end is None or end in seen:
                return result  # no data of this type (or a CNAME loop)
            seen.add(end)
            wire = end
        return _Result(error=f"CNAME chain longer than {MAX_CNAME_HOPS}")

    async def _query(
        self, question: dns.Question, conf: ResolvConf, deadline: float
    ) -> tuple[_Result, bytes | None]:
        """One question to the servers in turn: (result, the name to ask next, if any).

        Every query of the lookup stays open until it ends: a late answer to an earlier try
        counts as much as one to the try under way.
        """
        loop = asyncio.get_running_loop()
        proto = _Answers(question)
        transports: dict[int, asyncio.DatagramTransport] = {}
        failures: list[str] = []
        try:
            for _ in range(conf.attempts):
                for server in conf.nameservers:
                    if loop.time() >= deadline:
                        break
                    family = socket.AF_INET6 if len(server) == 4 else socket.AF_INET
                    try:
                        if family not in transports:
                            transports[family] = await _udp_endpoint(loop, family, proto)
                        msg_id = secrets.randbits(16)
                        proto.sent.add((server[0], server[1], msg_id))
                        transports[family].sendto(_query_bytes(question, msg_id), server)
                    except OSError as e:
                        failures.append(f"cannot ask {server[0]}: {e.strerror or e}")
                        continue
                    until = min(deadline, loop.time() + conf.timeout)
                    got = await self._answer(proto, server[0], until, deadline, failures)
                    if got is not None:
                        return got
        finally:
            for t in transports.values():
                t.close()
        if failures:
            return _Result(error=failures[-1]), None
        servers = ", ".join(str(s[0]) for s in conf.nameservers)
        return _Result(error=f"no answer from {servers}"), None

    async def _answer(
        self, proto: _Answers, server: str, until: float, deadline: float, failures: list[str]
    ) -> tuple[_Result, bytes | None] | None:
        """A usable answer that comes by `until`; None to ask the next server."""
        while True:
            try:
                async with asyncio.timeout_at(until):
                    addr, raw, msg = await proto.queue.get()
            except TimeoutError:
                return None
            sender = _host(addr[0])
            if msg.truncated:
                try:
                    raw = await self._tcp(addr, proto.question, deadline)
                except (OSError, TimeoutError) as e:
                    failures.append(f"truncated answer; TCP to {sender}: {e or 'timed out'}")
                    if sender == server:
                        return None
                    continue
                msg = dns.parse(raw)
            if msg.rcode in _NEXT_SERVER:
                failures.append(f"{dns.Rcode(msg.rcode).name} from {sender}")
                if sender == server:
                    return None  # this server cannot help: on to the next at once
                continue
            return _addresses(raw, msg, proto.question)

    async def _tcp(self, addr: tuple, question: dns.Question, deadline: float) -> bytes:
        """The same question over TCP to the server that answered with TC."""
        loop = asyncio.get_running_loop()
        msg_id = secrets.randbits(16)
        sock = socket.socket(family_of(_host(addr[0])), socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout_at(deadline):
                await connect(loop, sock, addr, max(0.0, deadline - loop.time()))
                await loop.sock_sendall(sock, dns.TcpFramer.frame(_query_bytes(question, msg_id)))
                framer = dns.TcpFramer()
                while (raw := framer.next_message()) is None:
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        raise OSError("closed before the answer")
                    framer.receive_data(data)
        finally:
            sock.close()
        if int.from_bytes(raw[:2], "big") != msg_id or _response_to(raw, question) is None:
            raise OSError("not an answer to the question asked")
        return raw


def _addresses(
    raw: bytes, msg: dns.Message, question: dns.Question
) -> tuple[_Result, bytes | None]:
    """The addresses an answer gives for the question, following its CNAME chain; and the
    chain's end when the answer stops there without data or proof of none (to ask anew)."""
    qtype, name = question.qtype, question.name
    answers = [r for r in msg.section(dns.Section.ANSWER) if r.rclass == CLASS_IN]
    aliases: dict[bytes, bytes] = {}
    for r in answers:
        if r.rtype == dns.Type.CNAME and r.name not in aliases:
            try:
                aliases[r.name], _ = dns.read_name(
                    raw[: r.rdata_offset + r.rdata_len], r.rdata_offset
                )
            except ProtocolError:
                continue
    seen = {name}
    while name in aliases and len(seen) <= MAX_CNAME_HOPS:
        name = aliases[name]
        if name in seen:
            break  # a loop: what the chain reached so far has no data
        seen.add(name)
    size = 4 if qtype == dns.Type.A else 16
    out: list[IPAddress] = []
    for r in answers:
        if r.rtype == qtype and r.name == name and r.rdata_len == size:
            ip = ipaddress.ip_address(raw[r.rdata_offset : r.rdata_offset + size])
            if ip not in out:
                out.append(ip)
    short = not out and name != question.name and msg.soa_minimum is None
    return _Result(out, msg.rcode), (name if short else None)


def _ordered(addresses: list[IPAddress]) -> list[IPAddress]:
    """IPv6 first only where this host has a route to the first IPv6 address (RFC 6724 rule 1:
    avoid unusable destinations), as getaddrinfo's sorting would put it; else IPv4 first."""
    v4 = [a for a in addresses if a.version == 4]
    v6 = [a for a in addresses if a.version == 6]
    if not v4 or not v6:
        return addresses
    return v6 + v4 if _routable(v6[0]) else v4 + v6


def _routable(ip: IPAddress) -> bool:
    """Whether the routing table has a way to `ip` (a UDP connect sends nothing)."""
    s = socket.socket(family_of(ip), socket.SOCK_DGRAM)
    try:
        s.connect((str(ip), 9))
    except OSError:
        return False
    finally:
        s.close()
    return True
