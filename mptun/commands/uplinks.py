"""`mptun uplinks`: configure, show, clear or watch the router's uplinks."""

from __future__ import annotations

import click

from mptun.client.health import DEFAULT_HEALTH_FILE, read_withdrawn
from mptun.client.uplinks import (
    DEFAULT_RULE_PRIORITY,
    DEFAULT_SUBFLOWS,
    DEFAULT_TABLE_BASE,
    Settings,
    clear_plan,
    describe,
    parse_gateways,
    plan,
)
from mptun.commands.options import config_option, option, uci_option
from mptun.common.errors import ConfigError, MptunError


@click.command()
@config_option
@uci_option
@click.argument("ifaces", nargs=-1, metavar="[IFACE]...")
@option(
    "table-base",
    type=click.IntRange(1, 0xFFFFFF00),
    default=DEFAULT_TABLE_BASE,
    help="First routing table mptun may use for an uplink (one table per uplink).",
)
@option(
    "rule-priority",
    type=click.IntRange(1, 32764),
    default=DEFAULT_RULE_PRIORITY,
    help="Priority of mptun's rules (N: LAN routes first, N+1: the uplink's table). "
    "Keep it below mwan3's (1000-3000: use e.g. 900) and the main table (32766).",
)
@option(
    "subflows",
    type=click.IntRange(0, 8),
    default=DEFAULT_SUBFLOWS,
    help="MPTCP limits: extra subflows per connection and ADD_ADDRs accepted (kernel max 8).",
)
@option(
    "gateway",
    multiple=True,
    metavar="IFACE=ADDRESS",
    help="The uplink's gateway when no default route through it shows it (repeatable, one "
    "per family).",
)
@option(
    "backup",
    multiple=True,
    metavar="IFACE",
    help="Mark this uplink's endpoints `backup`: used only when no other subflow works "
    "(a metered LTE link). Repeatable.",
)
@option(
    "health-file",
    default=DEFAULT_HEALTH_FILE,
    help="The uplink health file `mptun client --uplink` writes: uplinks it finds dead get no "
    "endpoint until they answer again ('' for none).",
)
@option("show", is_flag=True, help="Print what mptun configured (no changes).")
@option("clear", is_flag=True, help="Remove what mptun added (all, or these IFACEs').")
@option(
    "watch",
    is_flag=True,
    help="Configure, then keep watching: restore an uplink's route and endpoint when it "
    "comes back (runs until SIGTERM).",
)
@option("dry-run", is_flag=True, help="Print the changes without making them.")
def uplinks(
    ifaces: tuple[str, ...],
    table_base: int,
    rule_priority: int,
    subflows: int,
    gateway: tuple[str, ...],
    backup: tuple[str, ...],
    health_file: str,
    show: bool,
    clear: bool,
    watch: bool,
    dry_run: bool,
) -> None:
    """Make IFACEs MPTCP uplinks: endpoints, per-uplink routing table and rules, limits.

    Running it again changes nothing; --clear removes only what mptun added.
    """
    if sum((show, clear, watch)) > 1:
        raise ConfigError("--show, --clear and --watch exclude each other")
    try:
        gateways = parse_gateways(gateway)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    withdrawn = read_withdrawn(health_file) & frozenset(ifaces)
    settings = Settings(table_base, rule_priority, subflows, gateways, frozenset(backup), withdrawn)
    if not (ifaces or show or clear):
        raise ConfigError("give the uplink interfaces, e.g. `mptun uplinks wan wwan0` (or --show)")
    for name in [*gateways, *backup]:
        if ifaces and name not in ifaces:
            raise ConfigError(f"{name} is given to --gateway/--backup but is not an uplink")
    from mptun.client.netlink import Netlink, disable_blackhole_detection

    if not (show or clear or dry_run):
        done = disable_blackhole_detection()
        if done:
            click.echo(done, err=done.startswith("cannot"))
    if watch:
        from mptun.client.watch import watch_forever

        raise SystemExit(watch_forever(ifaces, settings, health_file or None))

    with Netlink() as nl:
        state = nl.state()
        if show:
            for line in describe(state, ifaces):
                click.echo(line)
            return
        missing = [n for n in ifaces if n not in state.links]
        if missing and not clear:
            raise ConfigError(f"no such interface: {', '.join(missing)}")
        try:
            p = clear_plan(state, ifaces) if clear else plan(state, ifaces, settings)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for note in p.notes:
            click.echo(f"mptun: note: {note}", err=True)
        if not p.actions:
            click.echo("nothing to change" if not clear else "nothing of mptun's to remove")
            return
        names = state.names
        failed = 0
        for a in p.actions:
            if dry_run:
                click.echo(f"would {a.describe(names)}")
                continue
            try:
                nl.apply(a, names)
            except MptunError as e:
                if e.status.value == "config":  # permission: nothing else will work either
                    raise
                click.echo(f"mptun: error: {e}", err=True)
                failed += 1
                continue
            click.echo(a.describe(names))
    if failed:
        raise SystemExit(1)
