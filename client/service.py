"""The client process: one Tunneler shared by every listener (SOCKS5, redirect, forward, DNS)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from mptun.client.tunnel import Tunneler
from mptun.client.udp import UdpTunnels
from mptun.common.address import Address
from mptun.common.errors import ConfigError
from mptun.common.limits import fit_connections
from mptun.common.listener import AcceptLoop, listen_hint
from mptun.common.sockets import Transport, listen_socket

log = logging.getLogger("mptun.client")


class ListenerHandler(Protocol):
    kind: str

    async def handle(self, sock, peer: tuple) -> None: ...


class Service(Protocol):
    """Something that is not a TCP accept loop (the DNS server's UDP socket)."""

    kind: str
    bind: Address

    def start(self, loop: asyncio.AbstractEventLoop) -> Address: ...

    def close(self) -> None: ...

    async def drain(self, timeout: float) -> int: ...


class Background(Protocol):
    """Work that runs beside the listeners and accepts nothing (the uplink health monitor)."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def close(self) -> None: ...


@dataclass
class ListenerSpec:
    bind: Address
    handler: ListenerHandler
    transparent: bool = False  # accept connections nftables tproxy hands over (IP_TRANSPARENT)


class Client:
    def __init__(
        self,
        tunneler: Tunneler,
        listeners: list[ListenerSpec],
        max_connections: int | None = None,  # None: the default (common/limits.py)
        services: list[Service] | None = None,
    ) -> None:
        if not listeners and not services:
            raise ConfigError(
                "nothing to listen on: give --socks, --redir, --tproxy, --tproxy-udp, --forward "
                "or --dns"
            )
        self.tunneler = tunneler
        self.specs = listeners
        self.services = services or []
        self.max_connections = max_connections
        self.loops: list[AcceptLoop] = []
        self.started: list[Service] = []
        self.addresses: list[Address] = []
        # Tasks beside the listeners, started and closed with them (the uplink health monitor).
        self.background: list[Background] = []
        self.udp: UdpTunnels | None = None  # the UDP associations (client/udp.py), ended at stop

    def start(self, loop: asyncio.AbstractEventLoop) -> list[Address]:
        local = Transport(want_mptcp=False)  # the LAN side is plain TCP
        for spec in self.specs:
            try:
                sock, _ = listen_socket(spec.bind, local, transparent=spec.transparent)
            except OSError as e:
                self._close_all()
                hint = listen_hint(spec.bind, e)
                if spec.transparent:
                    hint = " (IP_TRANSPARENT needs CAP_NET_ADMIN)"
                raise ConfigError(
                    f"cannot listen on {spec.bind} ({spec.handler.kind}): {e.strerror}{hint}"
                ) from None
            if not self.loops:  # after the first bind: a failed start logs nothing else
                limit = fit_connections(self.max_connections, log, len(self.specs))
            accept = AcceptLoop(loop, sock, spec.handler.handle, log, limit)
            accept.start()
            self.loops.append(accept)
            host, port = sock.getsockname()[:2]
            bound = Address.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self.addresses.append(bound)
            log.info("%s listening on %s", spec.handler.kind, bound)
        for service in self.services:
            try:
                bound = service.start(loop)
            except OSError as e:
                self._close_all()
                raise ConfigError(
                    f"cannot listen on {service.bind} ({service.kind}): {e.strerror}"
                    + listen_hint(service.bind, e)
                ) from None
            self.started.append(service)
            self.addresses.append(bound)
            log.info("%s listening on %s", service.kind, bound)
        cfg = self.tunneler.config
        servers = cfg.servers
        log.info(
            "tunnel to %s (%s, cipher %s, relay %s, mode %s)",
            ", ".join(str(s.address) for s in servers)
            + (f" (--server-policy {cfg.policy.value})" if len(servers) > 1 else ""),
            "MPTCP" if cfg.mptcp else "TCP",
            cfg.cipher.name,
            cfg.engine.name,
            cfg.mode.name.lower(),
        )
        bulk = getattr(cfg.engine, "summary", None)
        if bulk and cfg.mode.name == "ENCRYPTED":
            log.info("%s", bulk)
        self.tunneler.start(loop)  # the server checks
        for task in self.background:
            task.start(loop)
        return self.addresses

    def _close_all(self) -> None:
        for a in self.loops:
            a.close()
        self.loops.clear()
        for s in self.started:
            s.close()
        self.started.clear()

    def snapshot(self) -> dict:
        """Counters and gauges for `--stats-file` / SIGUSR1 (docs/CLI.md lists the names)."""
        return {
            "role": "client",
            "counters": dict(sorted(self.tunneler.counters.items())),
            "active": sum(a.active for a in self.loops),
            "limit_pauses": sum(a.pauses for a in self.loops),
            "accept_errors": sum(a.accept_errors for a in self.loops),
        }

    async def stop(self, drain_timeout: float) -> int:
        self.tunneler.close()
        for task in self.background:
            task.close()
        for a in self.loops:
            a.close()
        for s in self.started:
            s.close()
        if self.udp is not None:
            await self.udp.aclose()
        left = await asyncio.gather(
            *(a.drain(drain_timeout) for a in self.loops),
            *(s.drain(drain_timeout) for s in self.started),
        )
        return sum(left)
