"""`mptun uplinks --watch`: keep uplinks configured while links go down and come back.

Kernel behaviour this answers (measured on kernel 6.18; docs/MULTIPATH.md, "Links going down and
coming back", names the kernel functions): `ip link set X down` deletes X's routes, also in
mptun's table, and `up` does not restore them (net/ipv4/fib_frontend.c, fib_disable_ip); IPv6
addresses go with the link (net.ipv6.conf.*.keep_addr_on_down=0); the in-kernel path manager
never reopens a subflow it lost (net/mptcp/pm_kernel.c: a used endpoint stays cleared in the
connection's id_avail_bitmap until the endpoint is deleted). So on every link, address or route
event the watcher re-plans: while a link is down its endpoint is removed (the kernel then closes
the subflows from it and tells the peer, so data in flight moves to the other subflows); when it
is back the table route is restored and the endpoint added again, which makes the kernel open a
subflow from it for every open connection (net/mptcp/pm_kernel.c,
mptcp_nl_add_subflow_or_signal_addr: a new `subflow` endpoint is offered to existing
connections).

Uplink health (client/health.py) feeds it too: the client writes the uplinks it finds dead to the
health file, and every pass plans with them withdrawn (`Settings.withdrawn`: no endpoint while
dead), so this watcher stays the one owner of the endpoints and never re-adds what health
withdrew. The file is read again every HEALTH_POLL seconds; a change re-plans at once.
"""

from __future__ import annotations

import dataclasses
import logging
import select
import signal
import time
from collections.abc import Callable, Sequence

from mptun.client.health import read_withdrawn
from mptun.client.netlink import Netlink, import_pyroute2
from mptun.client.uplinks import Memory, Settings, plan
from mptun.common.errors import MptunError, Status

log = logging.getLogger("mptun.uplinks")

SETTLE = 0.2  # seconds of quiet after an event before re-planning (a link change is a burst)
HEALTH_POLL = 0.25  # seconds between two reads of the health file


class Watcher:
    """Re-plans `ifaces` on rtnetlink events until stopped; owns its sockets and memory."""

    def __init__(
        self, ifaces: Sequence[str], settings: Settings, health_file: str | None = None
    ) -> None:
        self.ifaces = list(ifaces)
        self.settings = settings
        self.health_file = health_file
        self.memory = Memory()
        self.passes = 0
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def reconcile(self, nl: Netlink) -> int:
        """One pass: apply what differs; returns the number of changes."""
        self.passes += 1
        self.settings = dataclasses.replace(self.settings, withdrawn=self._withdrawn())
        state = nl.state()
        p = plan(state, self.ifaces, self.settings, self.memory)
        names = state.names
        done = 0
        for a in p.actions:
            try:
                nl.apply(a, names)
            except MptunError as e:
                if e.status is Status.CONFIG:  # no permission: nothing later will work either
                    raise
                log.warning("%s", e)
                continue
            log.info("%s", a.describe(names))
            done += 1
        return done

    def _withdrawn(self) -> frozenset[str]:
        return read_withdrawn(self.health_file) & frozenset(self.ifaces)

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        pr = import_pyroute2("mptun uplinks --watch")
        from pyroute2.netlink.rtnl import (
            RTMGRP_IPV4_IFADDR,
            RTMGRP_IPV4_ROUTE,
            RTMGRP_IPV6_IFADDR,
            RTMGRP_IPV6_ROUTE,
            RTMGRP_LINK,
        )

        groups = (
            RTMGRP_LINK
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_ROUTE
        )
        mon = pr.IPRoute(groups=0)
        mon.bind(groups=groups)  # subscribe before the first pass: no event falls in between
        try:
            with Netlink() as nl:
                self.reconcile(nl)
                log.info("watching %s", ", ".join(self.ifaces))
                if on_ready is not None:
                    on_ready()
                fd = mon.fileno()
                # With a health file, look at it 4 times a second: a recovered uplink's endpoint
                # is back well within two probe intervals of its first answers.
                tick = HEALTH_POLL if self.health_file else 1.0
                while not self._stop:
                    ready, _, _ = select.select([fd], [], [], tick)
                    if not ready:
                        if self._withdrawn() != self.settings.withdrawn:
                            self.reconcile(nl)  # uplink health changed its verdict
                        continue
                    # drain the burst, then re-plan once
                    deadline = time.monotonic() + SETTLE
                    while True:
                        mon.get()
                        left = deadline - time.monotonic()
                        if left <= 0 or not select.select([fd], [], [], left)[0]:
                            break
                    if not self._stop:
                        self.reconcile(nl)
        finally:
            mon.close()


def watch_forever(ifaces: Sequence[str], settings: Settings, health_file: str | None = None) -> int:
    """Run a Watcher until SIGTERM/SIGINT; the configuration stays in place afterwards."""
    w = Watcher(ifaces, settings, health_file)

    def stop(signum: int, frame: object) -> None:
        w.stop()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        w.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    log.info("stopped watching (the configuration stays; `mptun uplinks --clear` removes it)")
    return 0
