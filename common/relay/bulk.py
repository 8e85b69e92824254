"""Choosing how encrypted bulk data is sealed: `--bulk auto|aead|ktls|plain`.

The wire mode (plain or encrypted) is agreed in the handshake; how a side seals the records is
its own choice, per connection: `ktls` where this tunnel socket takes kTLS, else `aead`. The
choice is made by asking the socket (never by kernel version), so a kernel that accepts kTLS on
MPTCP sockets is used as soon as it exists.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import Awaitable, Callable

from mptun.common import ktls
from mptun.common.errors import ConfigError
from mptun.common.handshake import WireMode
from mptun.common.relay.aead import AeadEngine
from mptun.common.relay.base import RelayStats
from mptun.common.relay.batching import Coalescing
from mptun.common.relay.engine import Engine
from mptun.common.relay.ktls import KtlsEngine
from mptun.common.relay.session import PLAIN, Session
from mptun.common.relay.splice import SpliceEngine

log = logging.getLogger("mptun.relay")

BULK_CHOICES = ("auto", "aead", "ktls", "plain")

# An engine's `relay` with its options bound: (loop, inner, tunnel, idle_timeout, session).
RelayCall = Callable[
    [asyncio.AbstractEventLoop, socket.socket, socket.socket, float | None, Session],
    Awaitable[RelayStats],
]


class Dispatcher:
    """An engine that hands each connection to another one: it states only which (`pick`)."""

    name: str

    def pick(self, tunnel: socket.socket, session: Session) -> RelayCall:
        raise NotImplementedError

    async def relay(
        self,
        loop: asyncio.AbstractEventLoop,
        inner: socket.socket,
        tunnel: socket.socket,
        idle_timeout: float | None = None,
        session: Session = PLAIN,
    ) -> RelayStats:
        return await self.pick(tunnel, session)(loop, inner, tunnel, idle_timeout, session)


class AutoEngine(Dispatcher):
    """Per connection: kTLS if this tunnel socket takes it, else aead; says which once per why."""

    name = "auto"

    def __init__(self, aead: AeadEngine, ktls_engine: KtlsEngine | None) -> None:
        self.aead = aead
        self.ktls = ktls_engine  # None: this kernel has no kTLS at all (do not ask every time)
        self._said: set[str] = set()

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.info("%s", message)

    def pick(self, tunnel: socket.socket, session: Session) -> RelayCall:
        engine = self.ktls
        if engine is not None:
            try:
                engine.install(tunnel, session)
            except ktls.KtlsRefused as e:
                if e.errno == errno.ENOENT:  # the tls module went away: stop asking
                    self.ktls = None
                if e.stage == "rx":  # TX is already in the kernel: aead cannot take over
                    log.warning("kTLS took the send key but not the receive key: %s", e)
                    return functools.partial(engine.relay, installed=True)
                self._say_once(f"bulk auto: aead for this tunnel ({e})")
            else:
                self._say_once("bulk auto: ktls (this tunnel socket takes kTLS)")
                return functools.partial(engine.relay, installed=True)
        return self.aead.relay


class ByMode(Dispatcher):
    """The engine a process relays with: one for plain tunnels, one for encrypted ones."""

    def __init__(self, plain: Engine, encrypted: Engine, summary: str = "") -> None:
        self.plain = plain
        self.encrypted = encrypted
        self.name = f"{plain.name}/{encrypted.name}"
        self.summary = summary  # logged once at start: which encrypted engine and why

    def pick(self, tunnel: socket.socket, session: Session) -> RelayCall:
        return (self.encrypted if session.mode is WireMode.ENCRYPTED else self.plain).relay


def encrypted_engine(
    bulk: str, mptcp: bool, coalescing: Coalescing | None = None
) -> tuple[Engine, str]:
    """The engine for encrypted tunnels under `--bulk`, and one line saying which and why.

    A forced ktls is checked against the kernel here, so a refusal is a startup error.
    """
    if bulk not in BULK_CHOICES:
        raise ConfigError(f"unknown bulk mode {bulk!r} (choose from {', '.join(BULK_CHOICES)})")
    if bulk == "aead":
        return AeadEngine(coalescing=coalescing), "bulk aead: records sealed in user space (forced)"
    tcp_refusal = ktls.probe(mptcp=False)
    if bulk == "ktls":
        why = tcp_refusal or (ktls.probe(mptcp=True) if mptcp else None)
        if why:
            hint = "; use --transport tcp" if mptcp and not tcp_refusal else ""
            raise ConfigError(f"--bulk ktls: {why}{hint} (or --bulk auto to fall back to aead)")
        return KtlsEngine(coalescing=coalescing), "bulk ktls: records sealed by the kernel (forced)"
    # auto (and plain, whose servers still accept encrypted tunnels)
    if tcp_refusal:
        return AutoEngine(
            AeadEngine(coalescing=coalescing), None
        ), f"bulk auto: aead ({tcp_refusal})"
    mptcp_refusal = ktls.probe(mptcp=True) if mptcp else None
    if mptcp_refusal:
        why = (
            f"bulk auto: ktls on TCP tunnels, aead on MPTCP ones ({mptcp_refusal}); "
            "--transport tcp keeps the encryption in the kernel"
        )
    else:
        why = f"bulk auto: ktls (the kernel takes kTLS on {'MPTCP' if mptcp else 'TCP'} sockets)"
    return AutoEngine(AeadEngine(coalescing=coalescing), KtlsEngine(coalescing=coalescing)), why


def choose_bulk(
    bulk: str,
    plain: Engine | None = None,
    mptcp: bool = True,
    coalescing: Coalescing | None = None,
) -> ByMode:
    """Everything a client or server relays with, from `--bulk` and the plain relay engine."""
    plain = plain or SpliceEngine(coalescing=coalescing)
    return ByMode(plain, *encrypted_engine(bulk, mptcp, coalescing))
