"""`mptun client --check`: one handshake round trip that tells key/clock trouble from the rest.

The server answers a wrong key, a wrong cipher or a clock outside its window with silence (by
design: docs/PROBING.md), so the client cannot learn which of them is wrong, only that the server
is reachable yet silent. The check asks for a target every server refuses by policy (0.0.0.0:0,
"unspecified"): an authenticated answer of any status proves key, cipher and clock right without
the server connecting anywhere (the server counts it under `policy`).
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass

from mptun.client.tunnel import Tunneler, TunnelError
from mptun.common.address import Address, ip_or_name
from mptun.common.drive import drive
from mptun.common.errors import ProtocolError
from mptun.common.handshake import ClientHandshake

CHECK_TARGET = Address(ip_or_name("0.0.0.0"), 0)


class CheckResult(enum.IntEnum):
    """The exit status of `--check`."""

    OK = 0
    UNREACHABLE = 3  # no TCP/MPTCP connection to the server (address, port, firewall, DNS)
    SILENT = 4  # connected, but no answer: key, cipher or clock is wrong (or not mptun)
    GARBLED = 5  # something answered that is not this key's mptun server


@dataclass
class Check:
    result: CheckResult
    message: str
    rtt_ms: float | None = None


async def run_check(tunneler: Tunneler, timeout: float) -> Check:
    """Connect, send one first flight, wait up to `timeout` s for the server's answer."""
    loop = asyncio.get_running_loop()
    cfg = tunneler.config
    started = time.monotonic()
    try:
        tunnel, mptcp = await tunneler.open(loop)
    except TunnelError as e:
        return Check(CheckResult.UNREACHABLE, f"cannot reach the server: {e}")
    via = {True: "MPTCP", False: "TCP (MPTCP fell back)", None: "TCP"}[mptcp]
    hs = ClientHandshake(cfg.psk, cfg.cipher, CHECK_TARGET, cfg.mode)
    sent = time.monotonic()
    try:
        await loop.sock_sendall(tunnel, hs.first_flight())
        if await drive(loop, tunnel, hs, loop.time() + timeout) is None:
            return _silent(cfg.server, "closed the connection without answering")
    except TimeoutError:
        return _silent(cfg.server, f"did not answer within {timeout:g} s")
    except ProtocolError as e:
        return Check(
            CheckResult.GARBLED,
            f"{cfg.server} answered, but not as an mptun server with this key ({e}); "
            "check the address, port, key and --cipher",
        )
    except OSError as e:
        return _silent(cfg.server, f"dropped the connection ({e.strerror})")
    finally:
        tunnel.close()
    rtt = (time.monotonic() - sent) * 1000
    return Check(
        CheckResult.OK,
        f"{cfg.server}: key, cipher and clock accepted over {via}; handshake round trip "
        f"{rtt:.0f} ms (connect + handshake {(time.monotonic() - started) * 1000:.0f} ms)",
        rtt,
    )


def _silent(server: Address, what: str) -> Check:
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return Check(
        CheckResult.SILENT,
        f"{server} accepted the connection but {what}. The server answers a wrong key, a wrong "
        f"--cipher, or a clock more than its --replay-window (default 60 s) off with silence: "
        f"check that both ends use the same key and cipher, and that this machine's clock is "
        f"right (it says {now}; routers without a battery-backed clock need NTP first).",
    )
