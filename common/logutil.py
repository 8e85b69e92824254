"""Logging: where lines go (stderr, journald, syslog) with their priority; byte counts for
humans; burst-limited messages (one line per burst); the level of per-connection lines."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from mptun.common.errors import ConfigError

STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"  # where syslog(3) writes; OpenWrt's logd and journald listen there
# syslog priorities (RFC 5424 6.2.1), as journald's `<N>` prefixes (sd-daemon(3)) also spell them.
LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG = 3, 4, 6, 7


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: ERROR and above err, WARNING warning, INFO
    info, below it debug (never err for an ordinary line)."""
    if levelno >= logging.ERROR:
        return LOG_ERR
    if levelno >= logging.WARNING:
        return LOG_WARNING
    if levelno >= logging.INFO:
        return LOG_INFO
    return LOG_DEBUG


def journal_stream(env: Mapping[str, str], stream: TextIO) -> bool:
    """Whether `stream` is the journald stream systemd connected: JOURNAL_STREAM is
    "DEVICE:INODE" of it (systemd.exec(5)); compared, since a child whose stderr was redirected
    inherits the variable but not the stream."""
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):  # unset, malformed, or no descriptor
        return False


class JournalFormatter(logging.Formatter):
    """`<N>name: message` for journald's stream (sd-daemon(3) prefixes): the priority in the
    line, no timestamp (journald stamps each line); every line of a traceback prefixed too."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup_logging(
    level: int,
    syslog: bool = False,
    env: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    syslog_socket: str = SYSLOG_SOCKET,
) -> str:
    """Send the root logger's lines where the platform keeps them; returns "stderr",
    "journal" or "syslog".

    syslog (`--log-syslog`, for procd, whose stderr capture logs every line at LOG_ERR): the
    local syslog socket, facility daemon, each line at its own priority. journald (stderr is
    the stream JOURNAL_STREAM names): `<N>` prefixes and no timestamp. Else stderr with a
    timestamp and the level name.
    """
    stream = sys.stderr if stream is None else stream
    handler: logging.Handler
    if syslog:
        from logging.handlers import SysLogHandler  # here: it imports pickle, queue, threading

        _check_syslog_socket(syslog_socket)
        handler = SysLogHandler(syslog_socket, facility=SysLogHandler.LOG_DAEMON)
        # A line syslog cannot take (the daemon restarting; the handler reconnects for the next
        # one) is lost, not turned into a traceback on stderr, which procd would log as errors.
        handler.handleError = lambda record: None  # type: ignore[method-assign]
        handler.append_nul = False  # as syslog(3) sends them
        handler.ident = f"mptun[{os.getpid()}]: "
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        where = "syslog"
    elif journal_stream(os.environ if env is None else env, stream):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JournalFormatter())
        where = "journal"
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
        where = "stderr"
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return where


def _check_syslog_socket(path: str) -> None:
    """A ConfigError unless something listens at `path` (SysLogHandler would only fail at the
    first line, with a traceback); datagram first, as syslog(3) and logd use."""
    import socket  # here: `mptun uci` need not import it

    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(path)
                return
            except OSError as e:
                why = e.strerror
    raise ConfigError(f"--log-syslog: cannot reach the syslog socket {path}: {why}")


def connection_level(log_connections: bool) -> int:
    """The level of the lines every connection logs (connected, closed): debug unless
    `--log-connections`, since they name LAN hosts and targets and come by the thousand;
    failures and summaries are logged at info either way."""
    return logging.INFO if log_connections else logging.DEBUG


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class BurstLog:
    """Logs the first event of a burst at once, then at most one summary per `interval`."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.level, self.interval, self.clock = logger, level, interval, clock
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, msg: str, *args: object) -> bool:
        """Log `msg` if it starts a burst; False when it was only counted (the caller may then
        log a shorter line of its own, so that every event leaves one)."""
        now = self.clock()
        if now - self._last >= self.interval:
            if self._suppressed:
                self.logger.log(
                    self.level,
                    "%d more like this in the last %.0f s",
                    self._suppressed,
                    now - self._last,
                )
            self.logger.log(self.level, msg, *args)
            self._last = now
            self._suppressed = 0
            return True
        self._suppressed += 1
        return False
