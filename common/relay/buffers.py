"""User-space stage buffers (the aead engine's): mapped when large, given back at once, a few
of the sizes a new connection starts with kept for the next one (`BufferPool`)."""

from __future__ import annotations

import mmap

BIG_BUFFER = 64 * 1024  # stage buffers this large get their own mapping (see `stage_buffer`)
# What a `BufferPool` keeps: buffers up to POOL_MAX_BUFFER (the sizes a direction starts with
# and its first 4x growth, common/relay/aead.py: a 100 KiB object grows them; not a stream's
# 1 MiB ones), POOL_BYTES of them in all (6 parallel connections' start buffers).
POOL_MAX_BUFFER = 320 * 1024
POOL_BYTES = 2 * 1024 * 1024


def stage_buffer(size: int) -> bytearray | mmap.mmap:
    """A zeroed, writable buffer for a pump's stage.

    Large ones are anonymous mappings: the kernel zero-fills only the pages a read touches, and
    closing one unmaps it at once. From the heap they would be memset up front, and glibc keeps
    freed chunks of the sizes it saw freed (its mmap threshold rises to them): measured, 1,000
    aead tunnels with 1 MiB stages left +180 MiB of RSS behind (tests/test_load.py).
    """
    return mmap.mmap(-1, size) if size >= BIG_BUFFER else bytearray(size)


def free_buffers(*buffers: bytearray | mmap.mmap) -> None:
    """Give a finished pump's buffers back now, not when the garbage collector next runs.

    A relay and its pumps reference each other, so they are freed only by a full collection:
    measured, 1,000 aead tunnels left ~1 GiB of RSS behind per round (tests/test_load.py).
    """
    for b in buffers:
        try:
            if isinstance(b, mmap.mmap):
                b.close()
            else:
                b.clear()
        except BufferError:  # still exported to a view somewhere: left to the collector
            pass


class BufferPool:
    """Stage buffers kept from one connection for the next, so a short connection maps none.

    Mapping a direction's start buffers and unmapping them at its end cost each end ~140 us per
    connection of the ~1 ms it spends (mmap, munmap and a zero-filled page fault per 4 KiB
    touched; docs/design/router-budget.md, "Per connection"), 0.6x shadowsocks-libev's whole
    cost per connection. Kept: mappings of at most `max_buffer` bytes, `max_bytes` in all (their
    touched pages stay resident: the memory price, bounded); the rest are unmapped at once as
    before. A buffer still exported to a view is never kept. A taken buffer holds an earlier
    connection's bytes: the pumps write before they read (common/relay/aead.py) and send only
    what they wrote.
    """

    def __init__(self, max_bytes: int = POOL_BYTES, max_buffer: int = POOL_MAX_BUFFER) -> None:
        self.max_bytes, self.max_buffer = max_bytes, max_buffer
        self._free: dict[int, list[mmap.mmap]] = {}
        self.bytes = 0  # held now
        self.mapped = 0  # buffers made by `take` (not reused): what tests count

    def take(self, size: int) -> bytearray | mmap.mmap:
        """A writable buffer of `size` bytes: a kept one when there is one, else a new one."""
        kept = self._free.get(size)
        if kept:
            self.bytes -= size
            return kept.pop()
        self.mapped += 1
        return stage_buffer(size)

    def give(self, *buffers: bytearray | mmap.mmap) -> None:
        """Keep what fits the bounds for the next `take`; free the rest now (`free_buffers`)."""
        for b in buffers:
            if (
                isinstance(b, mmap.mmap)
                and not b.closed
                and len(b) <= self.max_buffer
                and self.bytes + len(b) <= self.max_bytes
                and _unexported(b)
            ):
                self._free.setdefault(len(b), []).append(b)
                self.bytes += len(b)
            else:
                free_buffers(b)

    def clear(self) -> None:
        """Unmap every kept buffer."""
        for kept in self._free.values():
            free_buffers(*kept)
        self._free.clear()
        self.bytes = 0


def _unexported(b: mmap.mmap) -> bool:
    """Whether no view of `b` is alive (a kept buffer must be nobody else's): a resize to its
    own size raises BufferError exactly then (CPython's mmap `is_resizeable`) and does nothing
    else."""
    try:
        b.resize(len(b))
    except BufferError:
        return False
    except (OSError, ValueError, TypeError, SystemError):  # no resize here: keep nothing
        return False
    return True
