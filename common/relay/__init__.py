"""Relay engines: move bytes between a local leg and the tunnel until both directions end.

Every engine has the same interface (`Engine.relay`) and the same semantics (half-close, reset on
abnormal end, every fd closed exactly once, byte counts per direction); they differ only in how a
chunk crosses from one socket to the other. `choose_engine` picks the plain engine by probing the
kernel; `choose_bulk` adds the encrypted one (aead, ktls, or auto per socket); `RelaySettings`
is the one place both sides turn their relay options into those engines. A `Session` tells an
engine the wire mode, the side and the keys.
"""

from mptun.common.relay.aead import AeadEngine
from mptun.common.relay.base import RelayStats
from mptun.common.relay.batching import Coalescing
from mptun.common.relay.bulk import BULK_CHOICES, AutoEngine, ByMode, choose_bulk
from mptun.common.relay.copy import CopyEngine
from mptun.common.relay.engine import Engine
from mptun.common.relay.ktls import KtlsEngine
from mptun.common.relay.probe import available_engines, choose_engine
from mptun.common.relay.session import PLAIN, Session, Side
from mptun.common.relay.settings import RelaySettings
from mptun.common.relay.splice import SpliceEngine

__all__ = [
    "BULK_CHOICES",
    "PLAIN",
    "AeadEngine",
    "AutoEngine",
    "ByMode",
    "Coalescing",
    "CopyEngine",
    "Engine",
    "KtlsEngine",
    "RelaySettings",
    "RelayStats",
    "Session",
    "Side",
    "SpliceEngine",
    "available_engines",
    "choose_bulk",
    "choose_engine",
]
