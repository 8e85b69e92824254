"""Relay engines: move bytes between a local leg and the tunnel until both directions end.

Every engine has the same interface (`Engine.relay`) and the same semantics (half-close, reset on
abnormal end, every fd closed exactly once, byte counts per direction); they differ only in how a
chunk crosses from one socket to the other. `choose_engine` picks by probing the kernel.
"""

from mptun.common.relay.base import Engine, RelayStats
from mptun.common.relay.copy import CopyEngine
from mptun.common.relay.probe import available_engines, choose_engine
from mptun.common.relay.splice import SpliceEngine

__all__ = [
    "CopyEngine",
    "Engine",
    "RelayStats",
    "SpliceEngine",
    "available_engines",
    "choose_engine",
]
