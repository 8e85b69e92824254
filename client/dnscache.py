"""A small TTL-aware DNS answer cache: least recently used entries go first when it is full.

Entries are keyed by question (name, type, class) and the two flags that change an answer's
content (CD, and EDNS's DO). A hit returns the stored answer with the asker's ID and every TTL
lowered by the time it spent here, so downstream caches never keep it longer than upstream said.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from mptun.common import dns

CacheKey = tuple[bytes, int, int, bool, bool]


def cache_key(query: dns.Message) -> CacheKey | None:
    """What identifies a query's answer; None for queries that are never cached."""
    if query.is_response or query.opcode != 0 or len(query.questions) != 1:
        return None
    q = query.questions[0]
    return (q.name, q.qtype, q.qclass, bool(query.flags & dns.CD), query.dnssec_ok)


@dataclass(slots=True)
class _Entry:
    raw: bytes
    msg: dns.Message
    stored: float
    ttl: int


class DnsCache:
    """At most `max_entries` answers, each kept for min(its TTL, `max_ttl`) seconds."""

    def __init__(
        self,
        max_entries: int = 1024,
        max_ttl: int = 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries, self.max_ttl, self.clock = max_entries, max_ttl, clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, msg_id: int) -> bytes | None:
        """The cached answer for `key`, ready to send to a query with ID `msg_id`."""
        entry = self._entries.get(key)
        if entry is not None:
            age = int(self.clock() - entry.stored)
            if age < entry.ttl:
                self._entries.move_to_end(key)
                self.hits += 1
                return dns.with_id(dns.aged(entry.raw, entry.msg, age), msg_id)
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: CacheKey, raw: bytes, msg: dns.Message) -> bool:
        """Store an upstream answer if it may be cached; whether it was."""
        ttl = dns.cache_ttl(msg)
        if ttl is None or self.max_entries <= 0:
            return False
        self._entries[key] = _Entry(raw, msg, self.clock(), min(ttl, self.max_ttl))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True
