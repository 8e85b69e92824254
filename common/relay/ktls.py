"""The `ktls` engine: the kernel seals and opens the records, splice moves the bytes.

After `ktls.install` the tunnel socket speaks TLS 1.3 records on its own, so the relay is the
splice engine's socket -> pipe -> socket with two differences at the ends: the inner leg's EOF
becomes a close_notify sent with a control message before FIN, and the tunnel's close_notify
(which splice refuses with EINVAL) is read with recvmsg. A tunnel EOF without it, or a record that
fails (EBADMSG), aborts the relay, which resets both legs. Data never enters user space.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from mptun.common import ktls
from mptun.common.errors import ProtocolError, Status
from mptun.common.records import MAX_PLAINTEXT, RecordLimitReached, record_limit
from mptun.common.relay.aead import AeadEngine
from mptun.common.relay.base import Pump, Relay, RelayStats
from mptun.common.relay.batching import Coalescing
from mptun.common.relay.engine import PumpEngine, pump_pair
from mptun.common.relay.session import PLAIN, Session
from mptun.common.relay.splice import DEFAULT_PIPE_SIZE, SplicePump

log = logging.getLogger("mptun.relay")


class KtlsTxPump(SplicePump):
    """inner -> tunnel: splice into the kTLS socket; close_notify at the end.

    Counts an upper bound of the records sent (a splice of n bytes makes at most n/16 KiB + 1
    records) and reads the kernel's exact sequence number when that bound nears the limit.
    """

    def __init__(self, relay: Relay, src, dst, name: str, pipe_size: int, limit: int) -> None:
        super().__init__(relay, src, dst, name, pipe_size)
        self.limit = limit
        self.bound = 0
        self.margin = self.capacity // MAX_PLAINTEXT + 2  # most records one splice can add

    def drain(self) -> int:
        n = super().drain()
        self.bound += n // MAX_PLAINTEXT + 1
        if self.bound + self.margin >= self.limit:
            self.bound = ktls.tx_record_seq(self.dst)
            if self.bound + self.margin >= self.limit:
                raise RecordLimitReached(f"{self.bound} records sent under one key")
        return n

    def finish(self) -> None:
        ktls.send_close_notify(self.dst)
        self.dst.shutdown(socket.SHUT_WR)


class KtlsRxPump(SplicePump):
    """tunnel -> inner: splice out of the kTLS socket until its close_notify."""

    def fill(self) -> int:
        try:
            n = super().fill()
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EIO):
                # Either a non-data record is next (splice leaves it queued), or the stream is
                # malformed and kTLS reports its error once, as EINVAL (measured on 6.12).
                try:
                    ktls.recv_control(self.src)  # close_notify, or ProtocolError
                except BlockingIOError:
                    raise ProtocolError("malformed record stream (kTLS)", Status.RECORD) from e
                return 0
            if e.errno in (errno.EBADMSG, errno.EMSGSIZE):
                raise ProtocolError("a record did not authenticate (kTLS)", Status.RECORD) from e
            raise
        if n == 0:
            raise ProtocolError("stream truncated without the closing record", Status.TRUNCATED)
        return n


class KtlsEngine(PumpEngine):
    """Encrypted bulk data in the kernel; needs a socket that takes kTLS (plain TCP today)."""

    name = "ktls"
    reset_when_refused = True

    def __init__(
        self,
        pipe_size: int = DEFAULT_PIPE_SIZE,
        record_limit: int | None = None,
        coalescing: Coalescing | None = None,
    ) -> None:
        super().__init__(coalescing)
        self.pipe_size = pipe_size
        self.record_limit = record_limit

    def install(self, tunnel: socket.socket, session: Session) -> None:
        """Hand the session's keys to the kernel; raises ktls.KtlsRefused."""
        cipher = session.cipher
        assert cipher is not None
        tx_key, tx_iv = session.tx_key_iv()
        rx_key, rx_iv = session.rx_key_iv()
        ktls.install(tunnel, cipher, (tx_key, tx_iv, session.tx_seq), (rx_key, rx_iv, 0))

    async def relay(
        self,
        loop: asyncio.AbstractEventLoop,
        inner: socket.socket,
        tunnel: socket.socket,
        idle_timeout: float | None = None,
        session: Session = PLAIN,
        installed: bool = False,
    ) -> RelayStats:
        """Relay; `installed` when the caller already ran `install` (the auto engine does)."""
        session.tx_key_iv()  # an encrypted session, or UsageError
        if not installed:
            try:
                self.install(tunnel, session)
            except ktls.KtlsRefused as e:
                if e.stage != "rx" and e.errno == errno.ENOTCONN:
                    # The peer already sent FIN (a short request): kTLS takes only established
                    # sockets (net/tls/tls_main.c), user space can still finish the job.
                    log.debug("kTLS refused on a half-closed tunnel: aead for this one")
                    fallback = AeadEngine(coalescing=self.coalescing)
                    return await fallback.relay(loop, inner, tunnel, idle_timeout, session)
                return self.refuse(inner, tunnel, f"kTLS refused: {e}")
        return await super().relay(loop, inner, tunnel, idle_timeout, session)

    def make_pumps(
        self, relay: Relay, inner: socket.socket, tunnel: socket.socket, session: Session
    ) -> tuple[Pump, Pump]:
        assert session.cipher is not None
        limit = record_limit(session.cipher) if self.record_limit is None else self.record_limit
        return pump_pair(
            lambda: KtlsTxPump(relay, inner, tunnel, "inner", self.pipe_size, limit),
            lambda: KtlsRxPump(relay, tunnel, inner, "tunnel", self.pipe_size),
        )
