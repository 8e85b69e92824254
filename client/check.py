"""`mptun client --check`: one handshake round trip that tells key/clock trouble from the rest.

The server answers a wrong key, a wrong cipher or a clock outside its window with silence (by
design: docs/PROBING.md), so the client cannot learn which of them is wrong, only that the server
is reachable yet silent. The check sends the health-check request (docs/PROTOCOL.md "Checks"),
through `probe.probe_server`: the server answers it "succeeded" at once without connecting
anywhere and counts it as a check, and an authenticated answer proves key, cipher and clock right.
A server that does not know the check request answers "unsupported" ("server too old", exit 6);
a server from before that status answers it with silence, like a wrong key (exit 4).

After its request the check half-closes the connection. An mptun server that cannot authenticate
the request closes right after reading that FIN (docs/PROBING.md), so a wrong key shows at once
rather than after the timeout; and a server of another protocol that waits for the end of a
request (an HTTP server reading a line) answers now instead of waiting. What decides the exit
status is whether the other end sent any byte: an mptun server never sends one it cannot
authenticate, so bytes that do not make an answer mean "not an mptun server" (5), whenever they
come and however the connection ends; no byte at all means silence (4), whether the connection
then timed out, was closed or was reset.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass

from mptun.client.probe import ProbeFailure, probe_server
from mptun.client.tunnel import Tunneler
from mptun.common.address import Address


class CheckResult(enum.IntEnum):
    """The exit status of `--check`."""

    OK = 0
    UNREACHABLE = 3  # no TCP/MPTCP connection to the server (address, port, firewall, DNS)
    SILENT = 4  # connected, but not a byte back: key, cipher or clock wrong, or not mptun
    GARBLED = 5  # bytes came back that are not this key's mptun server's answer
    REFUSED = 6  # an authenticated answer other than "succeeded": server too old, or full


@dataclass
class Check:
    result: CheckResult
    message: str
    rtt_ms: float | None = None


async def run_check(tunneler: Tunneler, timeout: float) -> Check:
    """Connect, send one health check, wait up to `timeout` s for the server's answer."""
    loop = asyncio.get_running_loop()
    cfg = tunneler.config
    started = loop.time()
    probe = await probe_server(
        cfg.server,
        cfg.psk,
        cfg.cipher,
        transport=tunneler.transport,
        deadline=started + cfg.connect_timeout + timeout,
        prefix=cfg.prefix,
    )
    if probe.failure == ProbeFailure.UNREACHABLE:
        return Check(CheckResult.UNREACHABLE, f"cannot reach the server: {probe.reason}")
    if probe.failure == ProbeFailure.GARBLED:
        return _garbled(cfg.server, probe.received, probe.reason)
    if probe.failure == ProbeFailure.SILENT:
        return _silent(cfg.server, probe.reason)
    if probe.failure == ProbeFailure.REFUSED:
        return Check(CheckResult.REFUSED, f"{cfg.server}: {probe.reason}")
    assert probe.rtt is not None and probe.connect_time is not None
    via = {True: "MPTCP", False: "TCP (MPTCP fell back)", None: "TCP"}[probe.mptcp]
    rtt = probe.rtt * 1000
    return Check(
        CheckResult.OK,
        f"{cfg.server}: key, cipher and clock accepted over {via}; handshake round trip "
        f"{rtt:.0f} ms (connect + handshake {(probe.connect_time + probe.rtt) * 1000:.0f} ms)",
        rtt,
    )


def _garbled(server: Address, received: int, what: str) -> Check:
    return Check(
        CheckResult.GARBLED,
        f"{what}: an mptun server sends nothing before its authenticated answer, so this is not "
        "an mptun server; check the address and port",
    )


def _silent(server: Address, what: str) -> Check:
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return Check(
        CheckResult.SILENT,
        f"{what}. The server answers a wrong key, a wrong "
        f"--cipher, or a clock more than its --replay-window (default 60 s) off with silence: "
        f"check that both ends use the same key and cipher, and that this machine's clock is "
        f"right (it says {now}; routers without a battery-backed clock need NTP first); "
        f"or this is not an mptun server (check the address and port), or a server older than "
        f"the check request (upgrade it).",
    )
