"""The SOCKS5 listener: the target comes from the client's CONNECT request."""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
from collections import Counter

from mptun.client import socks5
from mptun.client.tunnel import Tunneler
from mptun.common.address import format_sockaddr
from mptun.common.handshake import ConnectStatus
from mptun.common.logutil import BurstLog
from mptun.common.sockets import reset

log = logging.getLogger("mptun.client.socks")


class ReplyPolicy(enum.Enum):
    OPTIMISTIC = "optimistic"  # reply success at once; first bytes ride in the first flight
    VERIFIED = "verified"  # wait for the server's connect status and report it


# The server's connect status as a SOCKS5 reply code (values 0-6 are the same numbers).
_SOCKS_REPLY = {
    ConnectStatus.DNS_FAILURE: socks5.Reply.HOST_UNREACHABLE,
    ConnectStatus.MODE_REFUSED: socks5.Reply.GENERAL_FAILURE,
}


def socks_reply_for(status: ConnectStatus) -> socks5.Reply:
    return _SOCKS_REPLY.get(status) or socks5.Reply(int(status))


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
    ) -> None:
        self.tunneler, self.policy, self.credentials = tunneler, policy, credentials
        self.handshake_timeout = handshake_timeout
        self.per_client = per_client
        self._per_client: Counter[str] = Counter()
        self._bad_log = BurstLog(log, logging.INFO)
        self._limit_log = BurstLog(log, logging.WARNING)

    async def handle(self, sock: socket.socket, peer: tuple) -> None:
        """One SOCKS connection, within the per-address limit (one greedy host cannot starve)."""
        host = str(peer[0])
        if self._per_client[host] >= self.per_client:
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
            await self._handle(sock, peer)
        finally:
            self._per_client[host] -= 1
            if not self._per_client[host]:
                del self._per_client[host]

    async def _handle(self, sock: socket.socket, peer: tuple) -> None:
        loop = asyncio.get_running_loop()
        cid = self.tunneler.next_id()
        source = f"socks {format_sockaddr(peer)}"
        hs = socks5.Socks5Handshake(self.credentials)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                target = await _negotiate(loop, sock, hs)
        except socks5.SocksError as e:
            self.tunneler.counters["socks-refused"] += 1
            self._bad_log("%s %s: %s", cid, source, e)
            try:
                if e.response:
                    sock.send(e.response)
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
        early = hs.trailing_data
        if self.policy is ReplyPolicy.OPTIMISTIC:
            try:
                await loop.sock_sendall(sock, socks5.reply(socks5.Reply.SUCCEEDED))
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


async def _negotiate(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, hs: socks5.Socks5Handshake
):
    while True:
        event = hs.next_event()
        if isinstance(event, socks5.Connect):
            return event.target
        if isinstance(event, socks5.Send):
            await loop.sock_sendall(sock, event.data)
            continue
        data = await loop.sock_recv(sock, 4096)
        if not data:
            raise EOFError("client closed during the SOCKS handshake")
        hs.receive_data(data)
