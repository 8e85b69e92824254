"""Listeners whose target is not negotiated: nftables REDIRECT, tproxy, and fixed forwards.

Each is the SOCKS listener's path minus the SOCKS exchange (go-shadowsocks2's tcp.go does the
same with one `tcpLocal` and a target function per listener): find the target, then
`Tunneler.run`, which reads the application's first bytes into the first flight and resets the
connection when the tunnel cannot be set up.

- redirect: the original destination comes from conntrack (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST);
- tproxy: the accepted socket's own local address is the original destination;
- forward: a fixed target, like ss-tunnel.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from mptun.client.service import ListenerSpec
from mptun.client.tunnel import Tunneler
from mptun.common.address import Address
from mptun.common.logutil import BurstLog
from mptun.common.sockets import is_local_address, original_dst, reset, sockaddr_address

log = logging.getLogger("mptun.client.redirect")

TargetOf = Callable[[socket.socket], Address]


class NoTarget(Exception):
    """The accepted connection has no usable destination (not redirected, or a loop)."""


class DirectListener:
    """Accepts connections and tunnels each to the target `target_of` finds for it."""

    def __init__(self, tunneler: Tunneler, kind: str, target_of: TargetOf) -> None:
        self.tunneler, self.kind, self.target_of = tunneler, kind, target_of
        self._bad_log = BurstLog(log, logging.WARNING)

    async def handle(self, sock: socket.socket, peer: tuple) -> None:
        cid = self.tunneler.next_id()
        source = f"{self.kind} {sockaddr_address(peer)}"
        try:
            target = self.target_of(sock)
        except (OSError, NoTarget) as e:
            self.tunneler.counters[f"{self.kind}-no-target"] += 1
            why = e.strerror if isinstance(e, OSError) else str(e)
            self._bad_log("%s %s: no destination to tunnel to: %s; resetting", cid, source, why)
            reset(sock)
            return
        await self.tunneler.run(cid, source, sock, target)


def redirected_target(sock: socket.socket) -> Address:
    """The destination of a connection nftables `redirect` sent to this listener."""
    try:
        target = original_dst(sock)
    except OSError as e:
        raise NoTarget(
            f"conntrack has no original destination ({e.strerror}): was it redirected?"
        ) from None
    # Made straight to the listener: conntrack's original destination is the listener itself,
    # and tunnelling it would make the server connect back here (a loop).
    if target == sockaddr_address(sock.getsockname()):
        raise NoTarget(f"{target} is this listener itself (connected directly, not redirected)")
    return target


def tproxy_target(listen_port: int) -> TargetOf:
    """The destination of a connection nftables `tproxy` handed over: the socket's own address."""

    def target_of(sock: socket.socket) -> Address:
        target = sockaddr_address(sock.getsockname())
        # Made straight to the listener (a local address and the listener's port): a loop. A
        # bind() test tells local addresses; only done for the listener's port, so a router
        # with net.ipv4.ip_nonlocal_bind=1 still tunnels everything else.
        if target.port == listen_port and is_local_address(target.host):  # type: ignore[arg-type]
            raise NoTarget(f"{target} is this listener itself (connected directly)")
        return target

    return target_of


def fixed_target(target: Address) -> TargetOf:
    """A forward's target: always the same."""
    return lambda _sock: target


def gateway_listeners(
    tunneler: Tunneler,
    redir: Address | None,
    tproxy: Address | None,
    forward: list[tuple[Address, Address]] | tuple[tuple[Address, Address], ...],
) -> list[ListenerSpec]:
    """The listeners of --redir, --tproxy and each --forward LOCAL=TARGET."""
    specs = []
    if redir is not None:
        specs.append(ListenerSpec(redir, DirectListener(tunneler, "redir", redirected_target)))
    if tproxy is not None:
        handler = DirectListener(tunneler, "tproxy", tproxy_target(tproxy.port))
        specs.append(ListenerSpec(tproxy, handler, transparent=True))
    for local, target in forward:
        specs.append(ListenerSpec(local, DirectListener(tunneler, "forward", fixed_target(target))))
    return specs
