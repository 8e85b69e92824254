"""Errors that carry a status, so logs and counters read a fixed code instead of a message.

Two families, as in h11: `ProtocolError` means the peer sent something wrong (bytes on the wire);
`UsageError` means our own code or the user's configuration asked for something impossible.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """Why a connection failed; the fixed vocabulary of logs and counters."""

    AUTH = "auth"  # first flight did not authenticate (wrong key, corrupted, probe)
    REPLAY = "replay"  # salt seen before within the window
    CLOCK = "clock"  # timestamp outside the accepted window (client clock or stale replay)
    REPLAY_FULL = "replay-full"  # salt cache full: refused rather than forgetting
    BUSY = "busy"  # authenticated, answered "server full" (replay cache near its limit)
    EVICTED = "evicted"  # unauthenticated, closed early: the handshake budget was full
    TIMEOUT = "timeout"  # handshake did not complete in time
    INCOMPLETE = "incomplete"  # peer closed before a complete first flight
    PROTOCOL = "protocol"  # authenticated but malformed (bad type, mode, ...)
    ADDRESS = "address"  # malformed target address
    POLICY = "policy"  # target not allowed by the server's policy
    DNS = "dns"  # target name did not resolve
    CONNECT = "connect"  # target refused / unreachable / timed out
    RELAY = "relay"  # a leg failed while relaying
    RECORD = "record"  # a bulk record did not authenticate or was malformed, reordered, replayed
    TRUNCATED = "truncated"  # the tunnel ended without the closing record (close_notify)
    RECORD_LIMIT = "record-limit"  # a key sealed as many records as its AEAD allows
    SOCKS = "socks"  # SOCKS5 client sent garbage or an unsupported request
    CONFIG = "config"  # bad option, key or config file


class MptunError(Exception):
    """Base of every error mptun raises on purpose; `status` says which kind."""

    status: Status = Status.PROTOCOL

    def __init__(self, message: str, status: Status | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class ProtocolError(MptunError):
    """The peer sent bytes that do not follow the protocol (or do not authenticate)."""


class UsageError(MptunError):
    """Our caller misused an API or the configuration is impossible."""

    status = Status.CONFIG


class ConfigError(UsageError):
    """A bad option, key file or config file: reported as one line, exit status 2."""
