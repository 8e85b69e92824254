"""Drive a sans-I/O protocol machine from a socket: the one read loop both ends share.

The machines (`common/handshake.py`) take bytes with `receive_data()`, say how many more they need
with `bytes_needed()` and hand out events with `next_event()`, `NeedData` until one is complete.
`drive` reads exactly `bytes_needed()` at a time, so the bytes that follow the handshake stay in the
kernel socket (for splice, and for kTLS to take over). What an end of file or a deadline means is
the caller's to say: the client, its `--check` and the server each name them in their own words.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol, TypeVar

from mptun.common.handshake import NeedData

Event = TypeVar("Event", covariant=True)


class Machine(Protocol[Event]):
    """What `drive` needs of a protocol machine (both handshakes have it)."""

    def next_event(self) -> NeedData | Event: ...

    def bytes_needed(self) -> int: ...

    def receive_data(self, data: bytes) -> None: ...


async def drive(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    machine: Machine[Event],
    deadline: float,
) -> Event | None:
    """Feed `machine` from `sock` until its first event other than `NeedData`, and return it.

    None when the peer closes first. `deadline` is in `loop.time()`; reaching it raises
    TimeoutError. The machine's `ProtocolError`s and the socket's `OSError`s pass through.
    """
    while isinstance(event := machine.next_event(), NeedData):
        # Read exactly what the machine needs: what follows stays in the kernel.
        data = await recv_ready(loop, sock, machine.bytes_needed(), deadline)
        if not data:
            return None
        machine.receive_data(data)
    return event


def recv_now(sock: socket.socket, n: int) -> bytes | None:
    """Up to `n` bytes already queued on `sock` (b"" at its end), or None when nothing is.

    A handshake's answer arrives in one flight and is read in parts (`bytes_needed()`); the
    loop waits for readiness before every read, and uvloop registers and drops the socket with
    epoll around each: 9 syscalls and a loop pass per part, measured with strace
    (docs/design/router-budget.md). MSG_DONTWAIT keeps the try from blocking whatever the
    socket's mode; a socket with a timeout is left to the loop (Python polls before its read).
    """
    if sock.gettimeout() in (0.0, None):
        try:
            return sock.recv(n, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass
    return None


async def recv_ready(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, deadline: float | None = None
) -> bytes:
    """`loop.sock_recv`, but bytes already queued are taken at once, without the event loop
    (`recv_now`); with a `deadline` (in `loop.time()`), TimeoutError when the wait reaches it.
    The deadline is armed only when the loop must wait: that is its cost."""
    data = recv_now(sock, n)
    if data is not None:
        return data
    if deadline is None:
        return await loop.sock_recv(sock, n)
    async with asyncio.timeout_at(deadline):
        return await loop.sock_recv(sock, n)
