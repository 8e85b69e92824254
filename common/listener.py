"""An accept loop on a listening socket, with a connection limit that stops accepting.

At the limit the loop stops calling accept() (the kernel's backlog holds, then refuses, new
connections) instead of accepting and closing them, which a prober could tell apart.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

from mptun.common.address import Address
from mptun.common.logutil import BurstLog

Handler = Callable[[socket.socket, tuple], Awaitable[None]]

# accept() errors that concern only the connection being accepted (see accept(2))
_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH}
_RESOURCE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def listen_hint(bind: Address, error: OSError) -> str:
    """Advice to add to "cannot listen on BIND: ..." ("" when there is none)."""
    if error.errno != errno.EACCES or bind.port == 0:
        return ""
    # The lowest port an unprivileged process may bind (ip-sysctl.rst:
    # net.ipv4.ip_unprivileged_port_start, default 1024; it applies to IPv6 too).
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            lowest = int(f.read())
    except (OSError, ValueError):
        lowest = 1024
    if bind.port >= lowest:
        return ""
    return (
        f" (ports below {lowest} need root or CAP_NET_BIND_SERVICE, e.g. "
        f"AmbientCapabilities=CAP_NET_BIND_SERVICE in a systemd unit; or use a port from "
        f"{lowest} up)"
    )


class AcceptLoop:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        handler: Handler,
        logger: logging.Logger,
        max_connections: int = 4096,
    ) -> None:
        self.loop, self.sock, self.handler, self.logger = loop, sock, handler, logger
        self.max_connections = max_connections
        self.tasks: set[asyncio.Task] = set()
        self._accepting = False
        self._closed = False
        self._refusal_log = BurstLog(logger)
        self.pauses = 0  # times the limit stopped accepting (for the stats)
        self.accept_errors = 0  # accept() failures for want of fds or memory
        self._resource_retry: asyncio.TimerHandle | None = None

    @property
    def active(self) -> int:
        return len(self.tasks)

    def start(self) -> None:
        self._resume()

    def _resume(self) -> None:
        if not self._accepting and not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting:
            self.loop.remove_reader(self.sock.fileno())
            self._accepting = False

    def _on_readable(self) -> None:
        for _ in range(64):  # bounded: let other callbacks run under a flood
            if len(self.tasks) >= self.max_connections:
                self._pause()
                self.pauses += 1
                self._refusal_log(
                    "connection limit (%d) reached: not accepting until one ends",
                    self.max_connections,
                )
                return
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _TRANSIENT:
                    continue
                if e.errno in _RESOURCE:
                    # Out of fds or memory: back off for a moment instead of spinning.
                    self.accept_errors += 1
                    self._refusal_log("accept failed: %s; retrying in 1 s", e.strerror)
                    self._pause()
                    self._resource_retry = self.loop.call_later(1.0, self._retry)
                    return
                raise
            conn.setblocking(False)
            task = self.loop.create_task(self.handler(conn, peer))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)

    def _retry(self) -> None:
        self._resource_retry = None
        self._resume()

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A bug, not bad input: one line, the traceback only when debugging.
            self.logger.error("internal error in a connection handler: %r", exc)
            self.logger.debug("traceback", exc_info=exc)
        if len(self.tasks) < self.max_connections and self._resource_retry is None:
            self._resume()

    def set_limit(self, max_connections: int) -> None:
        """A new connection limit (on reload): a raised one lets a paused loop accept again."""
        self.max_connections = max_connections
        if len(self.tasks) < max_connections and self._resource_retry is None:
            self._resume()

    def close(self) -> None:
        """Stop accepting and close the listening socket (open connections go on)."""
        self._closed = True
        self._pause()
        if self._resource_retry:
            self._resource_retry.cancel()
        self.sock.close()

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for open connections to end, then cancel the rest; how many."""
        return await drain_tasks(self.tasks, timeout)


async def drain_tasks(tasks: set[asyncio.Task], timeout: float) -> int:
    """Wait up to `timeout` for `tasks` to end, then cancel the rest and wait until they have
    (their cleanup runs before the loop closes); how many were cancelled.

    `tasks` is live: each task removes itself when done (`add_done_callback(tasks.discard)`).
    """
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout)
    left = list(tasks)
    for t in left:
        t.cancel()
    if left:
        await asyncio.gather(*left, return_exceptions=True)
    return len(left)
