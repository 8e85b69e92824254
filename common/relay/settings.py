"""How a client or a server relays: the settings of `--transport`, `--relay`, `--bulk` and
`--coalesce-ms`, and the engine they choose (one place for both sides)."""

from __future__ import annotations

from dataclasses import dataclass

from mptun.common.relay.batching import Coalescing
from mptun.common.relay.bulk import ByMode, choose_bulk
from mptun.common.relay.probe import choose_engine


@dataclass(frozen=True)
class RelaySettings:
    transport: str = "mptcp"  # mptcp, tcp
    engine: str = "auto"  # plain tunnels: auto, splice, copy
    bulk: str = "auto"  # encrypted ones: auto, aead, ktls; plain asks for (accepts) plain
    coalesce_delay: float = 0.008  # seconds a streaming connection's bytes may wait

    @property
    def mptcp(self) -> bool:
        return self.transport == "mptcp"

    @property
    def plain(self) -> bool:
        return self.bulk == "plain"

    def choose(self) -> ByMode:
        """The process's engine (probes the kernel; ConfigError if a forced one cannot work)."""
        coalescing = Coalescing(delay=self.coalesce_delay)
        plain = choose_engine(self.engine, coalescing)
        return choose_bulk(self.bulk, plain, mptcp=self.mptcp, coalescing=coalescing)
