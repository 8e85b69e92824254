"""Uplink health: is each uplink carrying traffic to the server, not only "link up"?

Real uplinks rarely fail by going down: a WiFi client stays associated while its upstream is gone,
an LTE modem keeps its link with no service. So each uplink is probed through its own source
address and interface, over plain TCP (an MPTCP probe would open joins over the other uplinks),
with the protocol's health-check request (`probe.probe_server`): `checks` probes every
`interval` seconds. What they find goes through `UplinkHealth`, a pure state machine tested on a
fake clock:

- **dead**: no probe answered for `dead_after` seconds (`LOSSY_DEAD_FACTOR` times that for an
  uplink already degraded by loss) and at least `checks` of them were lost;
  back (up or degraded) after `recover` answers in a row, so within one or two intervals.
- **degraded**: over the last `window` seconds at least `degraded_loss` of the probes were lost,
  or their median round trip is at least `degraded_rtt`. Hysteresis keeps a lossy uplink from
  flapping: it is up again only once loss is under half the threshold and the round trip under
  0.8 of it, and has stayed so for `hold` seconds.
- **mptcp-broken**: the last tunnels whose first subflow left through it fell back to TCP (the
  option was stripped); tried again after `mptcp_retry` seconds, cleared at once by a tunnel
  that keeps MPTCP.
- **up**: none of these.

What the client does with it (docs/MULTIPATH.md, "Uplink health"): new tunnels' first subflow
leaves from a healthy uplink's address when the default route's uplink is dead or MPTCP-broken
(the tunnel socket is bound to that source address; mptun's rules route it through its table;
the LAN's default route is never touched); and the dead uplinks are written to the health file,
which `mptun uplinks` (the one owner of MPTCP endpoints) reads to withdraw their endpoints, so
no new subflow is opened over them until they answer again. With `--uplink-hook` another
program owns the endpoints (the OpenWrt package's shell): each change runs it (client/hook.py)
and the health file names no uplink to withdraw.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mptun.client.ifaddrs import read_addresses
from mptun.client.probe import ProbeResult, probe_server
from mptun.common.address import Address, IPAddress
from mptun.common.crypto import CipherSpec
from mptun.common.sockets import Transport, family_of

if TYPE_CHECKING:
    from mptun.client.hook import UplinkHook  # built by the caller, only with --uplink-hook

log = logging.getLogger("mptun.client")

DEFAULT_HEALTH_FILE = "/var/run/mptun/uplink-health.json"
# A health file not rewritten for this long is ignored (the client that wrote it stopped):
# nothing stays withdrawn because of a client that is gone. The client rewrites it every
# HEARTBEAT seconds.
HEALTH_FILE_MAX_AGE = 10.0
HEARTBEAT = 2.0
ADDRESS_REFRESH = 5.0  # seconds between two reads of the uplinks' addresses


# A degraded uplink must be silent this many times dead_after to be dead (a lossy uplink's
# probes fail in runs; 1.5 s of them is not rare at 30% loss, 4.5 s is).
LOSSY_DEAD_FACTOR = 3


class UplinkState(enum.Enum):
    UNKNOWN = "unknown"  # no probe has come back yet
    UP = "up"
    DEGRADED = "degraded"  # loss or round trip above the thresholds
    DEAD = "dead"  # no answer for dead_after seconds: no new subflows over it
    MPTCP_BROKEN = "mptcp-broken"  # answers, but tunnels from it lose MPTCP


@dataclass(frozen=True)
class HealthSettings:
    """Thresholds of uplink health (the `--uplink-*` options; defaults stated there too)."""

    interval: float = 0.5  # seconds between two rounds of probes
    checks: int = 3  # probes per round
    dead_after: float = 1.5  # no answer for this long (and `checks` lost): dead
    recover: int = 2  # answers in a row that bring a dead uplink back
    window: float = 10.0  # seconds over which loss and round trip are measured
    degraded_loss: float = 0.2  # fraction of probes lost that makes an uplink degraded
    degraded_rtt: float = 0.5  # median probe round trip (seconds) that makes it degraded
    hold: float = 10.0  # seconds an uplink must look good before degraded turns up again
    mptcp_fallbacks: int = 2  # tunnels in a row that lost MPTCP through it: mptcp-broken
    mptcp_retry: float = 60.0  # seconds after which an mptcp-broken uplink is tried again

    @property
    def timeout(self) -> float:
        """One probe's deadline: half of dead_after, so two rounds fit in it."""
        return max(self.dead_after / 2, 0.1)


@dataclass(frozen=True)
class Change:
    """One state change of one uplink (logged once, shown by `mptun status`)."""

    uplink: str
    old: UplinkState
    new: UplinkState
    reason: str
    at: float  # wall clock (time.time())


class UplinkHealth:
    """One uplink's health from its probe results: pure (time comes in as arguments)."""

    def __init__(self, name: str, settings: HealthSettings, now: float) -> None:
        self.name = name
        self.s = settings
        self.state = UplinkState.UNKNOWN
        self.reason = "not probed yet"
        self.since = now  # when the state last changed
        self.changes = 0
        self._samples: deque[tuple[float, bool, float | None]] = deque()
        self._last_ok: float | None = None
        self._started = now
        self._lost_since_ok = 0
        self._ok_in_row = 0
        self._last_not_good = now  # the last evaluation that was not clearly good
        self._quality = UplinkState.UNKNOWN  # up or degraded, ignoring dead and mptcp
        self._fallbacks = 0
        self._broken_at: float | None = None
        self._why = ""  # what the last lost probe said

    # -- inputs -----------------------------------------------------------------------------------
    def record(
        self, now: float, ok: bool, rtt: float | None = None, why: str = ""
    ) -> Change | None:
        """A probe came back (`ok`: answered; `rtt` in seconds) or was lost (`why`)."""
        self._samples.append((now, ok, rtt))
        while self._samples and self._samples[0][0] < now - self.s.window:
            self._samples.popleft()
        if ok:
            self._last_ok = now
            self._lost_since_ok = 0
            self._ok_in_row += 1
        else:
            self._lost_since_ok += 1
            self._ok_in_row = 0
            self._why = why or self._why
        return self._evaluate(now)

    def tunnel(self, now: float, mptcp: bool) -> Change | None:
        """A tunnel's first subflow left through this uplink and kept MPTCP or fell back."""
        if mptcp:
            self._fallbacks = 0
            self._broken_at = None
        else:
            self._fallbacks += 1
            if self._fallbacks >= self.s.mptcp_fallbacks and self._broken_at is None:
                self._broken_at = now
        return self._evaluate(now)

    def tick(self, now: float) -> Change | None:
        """Time passed (an mptcp-broken uplink's retry comes due)."""
        return self._evaluate(now)

    # -- what it says -----------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """Fit for a new tunnel's first subflow."""
        return self.state in (UplinkState.UP, UplinkState.DEGRADED, UplinkState.UNKNOWN)

    def loss(self) -> float | None:
        if not self._samples:
            return None
        return sum(1 for _, ok, _ in self._samples if not ok) / len(self._samples)

    def rtt(self) -> float | None:
        rtts = [r for _, ok, r in self._samples if ok and r is not None]
        if not rtts:
            return None
        import statistics  # here: it pulls in fractions and decimal (~0.9 MB) for this median

        return statistics.median(rtts)

    def snapshot(self, wall_offset: float = 0.0) -> dict:
        loss, rtt = self.loss(), self.rtt()
        return {
            "name": self.name,
            "state": self.state.value,
            "reason": self.reason,
            "since": round(self.since + wall_offset, 3),
            "changes": self.changes,
            "loss": None if loss is None else round(loss, 3),
            "rtt_ms": None if rtt is None else round(rtt * 1000, 1),
            "probes": len(self._samples),
        }

    # -- the machine ------------------------------------------------------------------------------
    def _evaluate(self, now: float) -> Change | None:
        s = self.s
        if self._broken_at is not None and now - self._broken_at >= s.mptcp_retry:
            self._broken_at, self._fallbacks = None, 0  # try MPTCP through it again
        quiet_since = self._last_ok if self._last_ok is not None else self._started
        if self.state == UplinkState.DEAD:
            if self._ok_in_row < s.recover:
                return None
            self._quality = self._judge(now, from_dead=True)
        elif now - quiet_since >= self._dead_after() and self._lost_since_ok >= s.checks:
            return self._set(
                now,
                UplinkState.DEAD,
                f"no answer for {now - quiet_since:.1f} s ({self._lost_since_ok} probes lost"
                + (f"; last: {self._why})" if self._why else ")"),
            )
        else:
            self._quality = self._judge(now)
        if self._quality == UplinkState.UNKNOWN:
            return None
        if self._broken_at is not None:
            return self._set(
                now,
                UplinkState.MPTCP_BROKEN,
                f"{self._fallbacks} tunnels in a row fell back to TCP through it (MPTCP "
                "stripped or refused on the path)",
            )
        return self._set(now, self._quality, self._describe(self._quality))

    def _dead_after(self) -> float:
        """The silence that makes an uplink dead: longer for one already degraded by loss, whose
        probes fail about half the time at 30% packet loss each way (a lost SYN or SYN-ACK
        outlasts a probe's deadline), so that a run of them is not taken for a dead uplink."""
        if self._quality == UplinkState.DEGRADED:
            return self.s.dead_after * LOSSY_DEAD_FACTOR
        return self.s.dead_after

    def _judge(self, now: float, from_dead: bool = False) -> UplinkState:
        """Up or degraded, with hysteresis (UNKNOWN while too few probes have come back)."""
        s = self.s
        loss, rtt = self.loss(), self.rtt()
        if loss is None or (len(self._samples) < s.checks and not from_dead):
            return UplinkState.UNKNOWN if self._last_ok is None else UplinkState.UP
        if self._lost_since_ok >= s.checks and self._quality != UplinkState.UNKNOWN:
            # A run of losses: an uplink dying, or a burst; dead or an answer decides.
            return self._quality
        if len(self._samples) < 4 * s.checks and self._quality != UplinkState.DEGRADED:
            # Too few probes for a loss figure (a lost probe would be 25% of 4).
            return UplinkState.UP if self._last_ok is not None else UplinkState.UNKNOWN
        bad = loss >= s.degraded_loss or (rtt is not None and rtt >= s.degraded_rtt)
        good = loss <= s.degraded_loss / 2 and (rtt is None or rtt <= s.degraded_rtt * 0.8)
        if not good:
            self._last_not_good = now
        current = self._quality
        if bad:
            return UplinkState.DEGRADED
        if current == UplinkState.DEGRADED and now - self._last_not_good < s.hold:
            return UplinkState.DEGRADED  # not good for long enough yet
        if current == UplinkState.DEGRADED and not good:
            return UplinkState.DEGRADED
        return UplinkState.UP

    def _describe(self, state: UplinkState) -> str:
        loss, rtt = self.loss() or 0.0, self.rtt()
        rtt_text = "no round trip" if rtt is None else f"round trip {rtt * 1000:.0f} ms"
        text = f"{loss:.0%} of probes lost, {rtt_text} (last {self.s.window:g} s)"
        if state == UplinkState.DEGRADED:
            return (
                f"{text}; thresholds {self.s.degraded_loss:.0%} loss, "
                f"{self.s.degraded_rtt * 1000:.0f} ms"
            )
        return text

    def _set(self, now: float, state: UplinkState, reason: str) -> Change | None:
        if state == self.state:
            self.reason = reason  # the figures move; the state did not
            return None
        old = self.state
        self.state, self.reason, self.since = state, reason, now
        self.changes += 1
        if state == UplinkState.DEAD:
            self._quality = UplinkState.UNKNOWN
        return Change(self.name, old, state, reason, now)


# -- the health file: what `mptun uplinks` reads -------------------------------------------------
def write_health_file(
    path: str, uplinks: Iterable[UplinkHealth], wall_offset: float, withdrawn: Iterable[str]
) -> None:
    """Write the uplinks' states and the ones to withdraw, atomically (a reader never sees
    half a file)."""
    doc = {
        "pid": os.getpid(),
        "updated": time.time(),
        "withdrawn": sorted(withdrawn),
        "uplinks": {u.name: u.snapshot(wall_offset) for u in uplinks},
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}")
    import json  # here, as in client/control.py: only a client with --uplink writes the file

    tmp.write_text(json.dumps(doc, sort_keys=True) + "\n")
    os.replace(tmp, p)


def read_withdrawn(path: str | None, now: float | None = None) -> frozenset[str]:
    """The uplinks a health file says to withdraw (dead ones); none when the file is missing,
    unreadable, malformed or older than HEALTH_FILE_MAX_AGE (its client stopped)."""
    if not path:
        return frozenset()
    now = time.time() if now is None else now
    import json

    try:
        doc = json.loads(Path(path).read_text())
        if now - float(doc["updated"]) > HEALTH_FILE_MAX_AGE:
            return frozenset()
        names = doc["withdrawn"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return frozenset()
        return frozenset(names)
    except (OSError, ValueError, KeyError, TypeError):
        return frozenset()


# -- the prober ----------------------------------------------------------------------------------
AddressReader = Callable[[list[str]], dict[str, list[IPAddress]]]


@dataclass
class _Uplink:
    health: UplinkHealth
    addresses: list[IPAddress] = field(default_factory=list)
    inflight: int = 0


class HealthMonitor:
    """Probes every uplink, keeps their `UplinkHealth`, and steers new tunnels' first subflow."""

    def __init__(
        self,
        uplinks: list[str],
        server: Callable[[], Address],
        psk: Callable[[], bytes] | bytes,
        cipher: CipherSpec,
        settings: HealthSettings | None = None,
        health_file: str | None = DEFAULT_HEALTH_FILE,
        prefix: bytes = b"",
        addresses: AddressReader = read_addresses,
        hook: UplinkHook | None = None,
    ) -> None:
        self.s = settings or HealthSettings()
        self.hook = hook  # told every change; then it, not `mptun uplinks`, withdraws
        self._server, self._cipher, self._prefix = server, cipher, prefix
        self._psk = psk if callable(psk) else (lambda: psk)
        self.health_file = health_file
        self._read_addresses = addresses
        now = time.monotonic()
        self.uplinks = {n: _Uplink(UplinkHealth(n, self.s, now)) for n in uplinks}
        self._transport = Transport(want_mptcp=False)  # plain TCP: no joins over other uplinks
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._addresses_at = -float("inf")
        self._written_at = -float("inf")
        self._write_failed = False

    # -- life -------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._run())
        names = ", ".join(self.uplinks)
        log.info(
            "uplink health: probing %s (%d every %g s, dead after %g s)%s",
            names,
            self.s.checks,
            self.s.interval,
            self.s.dead_after,
            f"; changes go to the hook {' '.join(self.hook.argv)}" if self.hook else "",
        )

    def close(self) -> None:
        for t in [self._task, *self._tasks]:
            if t is not None:
                t.cancel()
        if self.hook is not None:
            self.hook.close()
        if self.health_file:
            with contextlib.suppress(OSError):
                Path(self.health_file).unlink()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            if time.monotonic() - self._addresses_at >= ADDRESS_REFRESH:
                await self._refresh_addresses()
            try:
                self._round(loop)
            except Exception as e:  # a bug must not end the probing: log it, go on
                log.exception("uplink health: a round failed unexpectedly: %s", e)
            next_round += self.s.interval
            await asyncio.sleep(max(0.0, next_round - loop.time()))

    def _round(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send one round of probes through every uplink (they report when they come back)."""
        now = time.monotonic()
        for up in self.uplinks.values():
            self._note(up.health.tick(now))
            for _ in range(self.s.checks):
                t = loop.create_task(self._probe_once(up))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
        if now - self._written_at >= HEARTBEAT:
            self._write()

    async def _refresh_addresses(self) -> None:
        self._addresses_at = time.monotonic()
        try:
            found = await asyncio.to_thread(self._read_addresses, list(self.uplinks))
        except Exception as e:  # netlink refused (a seccomp filter): say so, keep going
            log.warning("uplink health: cannot read the uplinks' addresses: %s", e)
            return
        for name, up in self.uplinks.items():
            up.addresses = found.get(name, [])

    async def _probe_once(self, up: _Uplink) -> None:
        loop = asyncio.get_running_loop()
        server = self._server()
        source = self._source_of(up, server)
        if source is None:
            result = ProbeResult(False, None, None, "no address of the server's family")
        else:
            up.inflight += 1
            try:
                result = await probe_server(
                    server,
                    self._psk(),
                    self._cipher,
                    source=source,
                    device=up.health.name,
                    transport=self._transport,
                    deadline=loop.time() + self.s.timeout,
                    prefix=self._prefix,
                )
            finally:
                up.inflight -= 1
        # Any authenticated answer shows the path works (also "server full" or "unsupported").
        self._note(up.health.record(time.monotonic(), result.answered, result.rtt, result.reason))

    def _source_of(self, up: _Uplink, server: Address) -> IPAddress | None:
        family = socket.AF_INET if server.is_domain else family_of(server.host)
        return next((ip for ip in up.addresses if family_of(ip) == family), None)

    def _note(self, change: Change | None) -> None:
        if change is None:
            return
        self._write()  # at once: `mptun uplinks --watch` acts on it within its poll
        if self.hook is not None:
            self.hook.notify(change.uplink, change.new.value)
        level = logging.WARNING if change.new == UplinkState.DEAD else logging.INFO
        log.log(
            level,
            "uplink %s: %s -> %s: %s",
            change.uplink,
            change.old.value,
            change.new.value,
            change.reason,
        )

    def _write(self) -> None:
        self._written_at = time.monotonic()
        if not self.health_file:
            return
        try:
            write_health_file(
                self.health_file, self.healths(), self._wall_offset(), self.withdrawn()
            )
        except OSError as e:
            # Once: it is rewritten every HEARTBEAT seconds and would fill the log.
            level = logging.DEBUG if self._write_failed else logging.WARNING
            self._write_failed = True
            log.log(
                level,
                "uplink health: cannot write %s: %s (`mptun uplinks` will not withdraw dead "
                "uplinks' endpoints)",
                self.health_file,
                e.strerror,
            )
            return
        self._write_failed = False

    @staticmethod
    def _wall_offset() -> float:
        return time.time() - time.monotonic()

    # -- what others ask --------------------------------------------------------------------------
    def healths(self) -> list[UplinkHealth]:
        return [u.health for u in self.uplinks.values()]

    def withdrawn(self) -> frozenset[str]:
        """Dead uplinks, unless every uplink is dead (then the server is the likelier cause);
        none with a hook, which owns the endpoints then."""
        if self.hook is not None:
            return frozenset()
        dead = {n for n, u in self.uplinks.items() if u.health.state == UplinkState.DEAD}
        return frozenset() if dead == set(self.uplinks) else frozenset(dead)

    def snapshot(self) -> list[dict]:
        off = self._wall_offset()
        out = []
        for u in self.uplinks.values():
            d = u.health.snapshot(off)
            d["addresses"] = [str(ip) for ip in u.addresses]
            out.append(d)
        return out

    def source_for(self, family: int, default_source: IPAddress | None) -> IPAddress | None:
        """The source address for a new tunnel's first subflow: None (the kernel's choice)
        while the uplink the default route takes is fit, else the best fit uplink's address."""
        owner = next((u for u in self.uplinks.values() if default_source in u.addresses), None)
        if owner is None or owner.health.usable:
            return None
        order = {UplinkState.UP: 0, UplinkState.UNKNOWN: 1, UplinkState.DEGRADED: 2}
        fit = sorted(
            (u for u in self.uplinks.values() if u.health.usable),
            key=lambda u: order.get(u.health.state, 3),
        )
        for u in fit:
            ip = next((a for a in u.addresses if family_of(a) == family), None)
            if ip is not None:
                return ip
        return None

    def server_source(self, server: Address) -> IPAddress | None:
        """The source address for a server check (client/monitor.py), as for a tunnel."""
        if server.is_domain:
            return None
        family = family_of(server.host)
        return self.source_for(family, default_source(family, str(server.host)))

    # -- the tunneler's hooks ---------------------------------------------------------------------
    def bind(self, sock: socket.socket, server: tuple) -> None:
        """Bind a tunnel socket about to connect to `server` (a sockaddr) to a fit uplink's
        address when the default route's uplink is dead or MPTCP-broken."""
        if all(u.health.usable for u in self.uplinks.values()):
            return  # the common case: the kernel's choice, no route lookup needed
        family = sock.family
        src = self.source_for(family, default_source(family, server[0]))
        if src is None:
            return
        try:
            sock.bind((str(src), 0))
        except OSError as e:
            log.debug("uplink health: cannot bind a tunnel to %s: %s", src, e.strerror)

    def opened(self, sock: socket.socket, mptcp: bool | None) -> None:
        """A tunnel connected: tell its first subflow's uplink whether MPTCP survived."""
        if mptcp is None:
            return  # plain TCP asked for: no evidence either way
        try:
            local = ipaddress.ip_address(sock.getsockname()[0].split("%")[0])
        except (OSError, ValueError):
            return
        for u in self.uplinks.values():
            if local in u.addresses:
                self._note(u.health.tunnel(time.monotonic(), mptcp))
                return


def default_source(family: int, dst: str) -> IPAddress | None:
    """The source address the routing table gives a connection to `dst` (a UDP connect
    sends nothing and does only the route lookup)."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.connect((dst, 9))
        return ipaddress.ip_address(s.getsockname()[0].split("%")[0])
    except (OSError, ValueError):
        return None
    finally:
        s.close()
