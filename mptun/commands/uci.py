"""`mptun uci`: check /etc/config/mptun, and answer questions about it.

The OpenWrt service scripts read UCI in shell (config_load/config_get, so no Python starts for
them); this command is the reference they are tested against, and the user's check of the file:
`mptun uci FILE uplink interface` lists the enabled uplinks' interfaces.
"""

from __future__ import annotations

import click

from mptun import uci
from mptun.commands.options import UCI_SERVICE_KEYS, uci_defaults
from mptun.common.errors import ConfigError

# Section types that are not a command: one `config uplink` per uplink interface.
UPLINK_TYPE = "uplink"
UPLINK_KEYS = ("interface", *UCI_SERVICE_KEYS)


def _commands_with_uci(ctx: click.Context) -> dict[str, click.Command]:
    """The sibling commands that read a UCI section (they carry --uci)."""
    root = ctx.find_root()
    group = root.command
    if not isinstance(group, click.Group):
        return {}
    commands = {n: group.get_command(root, n) for n in group.list_commands(root)}
    return {
        name: cmd
        for name, cmd in commands.items()
        if cmd is not None and any(p.name == "uci" for p in cmd.params)
    }


def check_package(ctx: click.Context, pkg: uci.UciPackage) -> list[str]:
    """Validate every section as the command it configures would; return one line per section."""
    commands = _commands_with_uci(ctx)
    known_types = sorted([*commands, UPLINK_TYPE])
    seen: list[str] = []
    for sec in pkg.sections:
        where = f"{pkg.path}:{sec.line}"
        if sec.type in commands:
            cmd = commands[sec.type]
            sub = click.Context(cmd, info_name=sec.type, parent=ctx)
            try:
                uci_defaults(sub, pkg)
            except click.BadParameter as e:
                raise ConfigError(e.message) from None
        elif sec.type == UPLINK_TYPE:
            _check_uplink(pkg, sec)
        else:
            raise ConfigError(
                f"{where}: unknown section type {sec.type!r} (known: {', '.join(known_types)})"
            )
        state = "" if sec.enabled else " (disabled)"
        seen.append(f"{sec.type} {sec.label}{state}")
    return seen


def _check_uplink(pkg: uci.UciPackage, sec: uci.UciSection) -> None:
    for opt in sec.options.values():
        where = f"{pkg.path}:{opt.line}"
        if opt.name in UCI_SERVICE_KEYS:
            try:
                uci.parse_bool(opt.value, opt.name)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        elif opt.name not in UPLINK_KEYS:
            raise ConfigError(
                f"{where}: unknown key {opt.name!r} in config {UPLINK_TYPE} "
                f"(known: {', '.join(UPLINK_KEYS)})"
            )
        elif opt.is_list:
            raise ConfigError(f"{where}: {opt.name} takes one value: write `option {opt.name}`")
    if sec.get("interface") is None:
        raise ConfigError(
            f"{pkg.path}:{sec.line}: config {UPLINK_TYPE} {sec.label} needs `option interface` "
            "(the OpenWrt interface name, e.g. wan)"
        )


@click.command("uci")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("section_type", required=False)
@click.argument("option", required=False)
@click.pass_context
def uci_command(
    ctx: click.Context, file: str, section_type: str | None, option: str | None
) -> None:
    """Check a UCI config; with TYPE list its enabled sections, with OPTION their values.

    `mptun uci /etc/config/mptun` validates every section as its command would (exit 2 with
    `file:line: what` otherwise). `mptun uci /etc/config/mptun client` prints the enabled client
    section's name; `mptun uci /etc/config/mptun uplink interface` prints each enabled uplink's
    interface, one per line (the items of a `list` option likewise).
    """
    pkg = uci.load(file)
    if section_type is None:
        for line in check_package(ctx, pkg):
            click.echo(line)
        return
    for sec in pkg.of_type(section_type):
        if not sec.enabled:
            continue
        if option is None:
            click.echo(sec.label)
            continue
        for value in sec.get_list(option):
            click.echo(value)
