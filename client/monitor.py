"""The checks behind the choice of server: each server checked every `interval` seconds.

One task per server sends an authenticated health check (`check_once`, over plain TCP: an MPTCP
check would open subflows over every uplink) and reports the answer to the `ServerSet`
(client/servers.py), which holds the state and decides. After a failed check the next one
follows sooner (`retry`) until the server is down, so a server that stopped answering is down
within about `interval + 2 x timeout + retry` seconds, and one that answers again is up within
`interval` plus a round trip.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from mptun.client.probe import ProbeFailure, ProbeResult, probe_server
from mptun.client.servers import Server, ServerSet, State
from mptun.common.address import Address, IPAddress
from mptun.common.crypto import CipherSpec
from mptun.common.drive import drive
from mptun.common.errors import ProtocolError
from mptun.common.handshake import CHECK_TARGET, ClientHandshake, ConnectStatus
from mptun.common.sockets import Transport, connect, family_of, resolve

log = logging.getLogger("mptun.client")


async def check_once(
    server: Server,
    cipher: CipherSpec,
    transport: Transport,
    timeout: float,
    prefix: bytes = b"",
    source: IPAddress | None = None,
) -> ProbeResult:
    """One health check of `server`: the one place that says how a server is checked.

    A server older than the health-check request answers it with silence; so a silent check is
    followed by the request older servers answer at once (a connect to 0.0.0.0:0, refused "not
    allowed" without a dial: docs/PROTOCOL.md "Checks"), and an authenticated answer to that
    counts as an answer."""
    loop = asyncio.get_running_loop()
    result = await probe_server(
        server.address,
        server.psk,
        cipher,
        source=source,
        transport=transport,
        deadline=loop.time() + timeout,
        prefix=prefix,
    )
    if result.failure is not ProbeFailure.SILENT:
        return result
    deadline = loop.time() + timeout
    legacy = await _legacy_check(server, cipher, transport, deadline, prefix, source)
    if legacy is None:
        return ProbeResult(False, None, None, result.reason + SILENT_HINT, ProbeFailure.SILENT)
    status, rtt = legacy
    return ProbeResult(status != ConnectStatus.SERVER_FULL, status, rtt, "")


# Appended to why a server is down when it took the connection but sent nothing back.
SILENT_HINT = " (a wrong key, cipher or clock, or not an mptun server)"


async def _legacy_check(
    server: Server,
    cipher: CipherSpec,
    transport: Transport,
    deadline: float,
    prefix: bytes,
    source: IPAddress | None,
) -> tuple[ConnectStatus, float] | None:
    """The answer to a request for CHECK_TARGET and its round trip; None without one."""
    loop = asyncio.get_running_loop()
    address = server.address
    try:
        if address.is_domain:
            ips = await asyncio.wait_for(
                resolve(loop, str(address.host), address.port), deadline - loop.time()
            )
            if not ips:
                return None
            ip = ips[0]
        else:
            ip = address.host  # type: ignore[assignment]
        sock, _ = transport.socket(family_of(ip))
    except (OSError, TimeoutError):
        return None
    try:
        if source is not None:
            sock.bind((str(source), 0))
        await connect(loop, sock, Address(ip, address.port).sockaddr(), deadline - loop.time())
        hs = ClientHandshake(server.psk, cipher, CHECK_TARGET, prefix=prefix)
        sent = loop.time()
        await loop.sock_sendall(sock, hs.first_flight())
        sock.shutdown(socket.SHUT_WR)  # the request is complete (client/probe.py says why)
        answer = await drive(loop, sock, hs, deadline)
    except (OSError, TimeoutError, ProtocolError):
        return None
    finally:
        sock.close()
    return None if answer is None else (answer.status, loop.time() - sent)


def usable(result: ProbeResult) -> bool:
    """Whether a check's answer means new tunnels may go there: it answered, and not "full"
    (an older server answers the check "unsupported": it is alive all the same)."""
    return result.answered and result.status != ConnectStatus.SERVER_FULL


class ServerMonitor:
    """Checks every server of `servers` periodically and reports to it."""

    def __init__(
        self,
        servers: ServerSet,
        cipher: CipherSpec,
        interval: float = 2.0,
        timeout: float = 2.0,
        retry: float = 0.5,
        prefix: bytes = b"",
    ) -> None:
        self.servers, self.cipher = servers, cipher
        self.interval, self.timeout, self.retry = interval, timeout, retry
        self.prefix = prefix
        self.transport = Transport(want_mptcp=False)
        # The source address of a check (uplink health steers it off a dead default uplink).
        self.source: Callable[[Address], IPAddress | None] | None = None
        self._tasks: list[asyncio.Task] = []
        self._wake = [asyncio.Event() for _ in range(len(servers))]

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """One checking task per server (idempotent)."""
        if self.running:
            return
        self._tasks = [loop.create_task(self._watch(i)) for i in range(len(self.servers))]

    def wake(self, i: int) -> None:
        """Check server `i` now rather than at its next interval (a tunnel could not connect)."""
        self._wake[i].set()

    async def _pause(self, i: int, seconds: float) -> None:
        """Wait `seconds`, or less if `wake(i)` is called meanwhile."""
        event = self._wake[i]
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
        event.clear()

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks = []

    async def _watch(self, i: int) -> None:
        while True:
            server = self.servers.servers[i]  # each time: a reload may give it a new key
            try:
                source = self.source(server.address) if self.source else None
                result = await check_once(
                    server, self.cipher, self.transport, self.timeout, self.prefix, source
                )
            except Exception as e:  # a bug must not end the checks: log it, go on
                log.exception("server %s: check failed unexpectedly: %s", server.address, e)
                await self._pause(i, self.interval)
                continue
            if usable(result):
                assert result.rtt is not None
                self.servers.check_ok(i, result.rtt)
                await self._pause(i, self.interval)
            else:
                self.servers.check_failed(i, result.reason)
                # not down yet: confirm soon; down: keep checking at the interval
                down = self.servers.health[i].state is State.DOWN
                await self._pause(i, self.interval if down else min(self.retry, self.interval))
