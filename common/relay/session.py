"""What an engine is told about one tunnel beyond its two sockets: wire mode, side and keys.

The handshake (client/tunnel.py, server/service.py) makes a `Session`; the engines are its only
readers, so it lives with them (and `mptun.common.relay` exports it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mptun.common.crypto import CipherSpec
from mptun.common.errors import UsageError
from mptun.common.handshake import BulkKeys, WireMode
from mptun.common.records import Opener, Sealer


class Side(enum.Enum):
    """Which end of the tunnel this process is: it picks the key of each direction."""

    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class Session:
    """What an engine needs to know about one tunnel beyond its two sockets."""

    mode: WireMode = WireMode.PLAIN
    side: Side = Side.CLIENT
    cipher: CipherSpec | None = None
    keys: BulkKeys | None = None
    tx_seq: int = 0  # records this side sealed on the tunnel before the relay started

    def _require_keys(self) -> tuple[CipherSpec, BulkKeys]:
        if self.mode is not WireMode.ENCRYPTED or self.cipher is None or self.keys is None:
            raise UsageError("an encrypted session needs a cipher and bulk keys")
        return self.cipher, self.keys

    def tx_key_iv(self) -> tuple[bytes, bytes]:
        """Key and IV of the records this side sends."""
        _, k = self._require_keys()
        if self.side is Side.CLIENT:
            return k.c2s_key, k.c2s_iv
        return k.s2c_key, k.s2c_iv

    def rx_key_iv(self) -> tuple[bytes, bytes]:
        """Key and IV of the records this side receives."""
        _, k = self._require_keys()
        if self.side is Side.CLIENT:
            return k.s2c_key, k.s2c_iv
        return k.c2s_key, k.c2s_iv

    def sealer(self, limit: int | None = None) -> Sealer:
        cipher, _ = self._require_keys()
        key, iv = self.tx_key_iv()
        return Sealer(cipher, key, iv, self.tx_seq, limit)

    def opener(self) -> Opener:
        cipher, _ = self._require_keys()
        key, iv = self.rx_key_iv()
        return Opener(cipher, key, iv)


PLAIN = Session()  # the session of a plain-mode tunnel (immutable)


def require_plain(engine: str, session: Session) -> None:
    """Plain engines move bytes as they are: refuse to relay an encrypted session."""
    if session.mode is not WireMode.PLAIN:
        raise UsageError(f"relay engine {engine} cannot carry encrypted bulk data")
