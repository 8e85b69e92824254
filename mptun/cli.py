"""The `mptun` command: a thin click layer over the client, the server and the tools
(the commands are in mptun/commands/, imported when used).

Errors reach the user as one line on stderr and a non-zero exit status, never a traceback:
2 for bad usage or configuration, 1 for anything else.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import click

from mptun import __version__
from mptun.commands.options import OutputFile, option
from mptun.common.crypto import generate_key
from mptun.common.errors import MptunError
from mptun.common.logutil import setup_logging

LOG_LEVELS = ["debug", "info", "warning", "error"]
# Commands imported when used: `mptun uci` in an OpenWrt init script should not pay for the
# bench and the client (importing everything took ~0.4 s here, a router's CPU is far slower).
LAZY_COMMANDS = {
    "server": "mptun.commands.server:server",
    "client": "mptun.commands.client:client",
    "uci": "mptun.commands.uci:uci_command",
    "nft": "mptun.commands.nft:nft",
    "bench": "mptun.bench.cli:bench",
    "uplinks": "mptun.commands.uplinks:uplinks",
    "status": "mptun.commands.status:status",
    "demo": "mptun.demo:demo",
}
# What `mptun --help` lists for each lazy command, so listing them imports none (the first
# paragraph of the command's help; tests/test_footprint.py keeps the two in step).
LAZY_SUMMARIES = {
    "server": "Run the tunnel server (the VPS end). SIGHUP reloads config and key; SIGUSR1 dumps "
    "stats.",
    "client": "Run the tunnel client (the router end). SIGHUP reloads config and key; SIGUSR1 "
    "dumps stats.",
    "uci": "Check a UCI config; with TYPE list its enabled sections, with OPTION their values.",
    "nft": "Print the nftables ruleset of router gateway mode (load it with `nft -f`).",
    "bench": "Measure mptun against kernel routing and shadowsocks-libev (takes minutes).",
    "uplinks": "Make IFACEs MPTCP uplinks: endpoints, per-uplink routing table and rules, limits.",
    "status": "Live tunnels and their subflows, the uplinks, and why speeds may not add up.",
    "demo": "The multipath demo: one TCP connection over three shaped uplinks, live, then cleanup.",
}


# click 8.2+ raises this for a group called without a command (8.1 prints the help and exits 0);
# it is a usage error only in name: the help is shown, not prefixed with "error".
_NO_ARGS_IS_HELP: type[click.ClickException] = getattr(
    click.exceptions, "NoArgsIsHelpError", type("_Never", (click.ClickException,), {})
)


class LazyGroup(click.Group):
    """A group whose commands (LAZY_COMMANDS) are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            module, attr = LAZY_COMMANDS[cmd_name].split(":")
            try:
                loaded = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if not (e.name or "").startswith("mptun"):
                    raise
                # The OpenWrt package leaves the server, the bench, the lab and the demo out.
                raise click.ClickException(
                    f"`mptun {cmd_name}` is not part of this installation ({e.name} is left out)"
                ) from None
            self.add_command(getattr(loaded, attr), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of `--help`, lazy commands from LAZY_SUMMARIES (none imported)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            cmd = self.commands.get(name)
            if cmd is None and name in LAZY_SUMMARIES:
                stand_in = click.Command(name, help=LAZY_SUMMARIES[name])  # shortened as click does
                rows.append((name, stand_in.get_short_help_str(limit)))
            elif cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def all_commands(self) -> dict[str, click.Command]:
        """Every command, imported (for tools and tests that walk the tree)."""
        with click.Context(self) as ctx:
            return {n: c for n in self.list_commands(ctx) if (c := self.get_command(ctx, n))}


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mptun")
@option(
    "log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    help="Least severe messages to log (to stderr).",
)
@option(
    "log-syslog",
    is_flag=True,
    default=False,
    help="Log to the local syslog socket (/dev/log, facility daemon) at each message's own "
    "priority instead of stderr (under procd, which logs every stderr line as an error). "
    "Under systemd, stderr lines carry journald priorities without this.",
)
def cli(log_level: str, log_syslog: bool) -> None:
    """Multipath TCP tunnel for routers: joins uplinks into one fast, encrypted-handshake tunnel."""
    setup_logging(getattr(logging, log_level.upper()), syslog=log_syslog)


@cli.command()
@option(
    "output",
    "-o",
    "--output",
    type=OutputFile(),
    help="Write the key to this file (created mode 600, never overwritten) instead of stdout.",
)
def genkey(output: str | None) -> None:
    """Print a new random 32-byte key, base64, one line (the key-file and MPTUN_KEY format)."""
    key = generate_key()
    if output is None:
        click.echo(key)
        return
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise MptunError(f"{output} exists: not overwriting a key") from None
    except OSError as e:
        raise MptunError(f"cannot create {output}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    click.echo(f"wrote a new key to {Path(output).resolve()}", err=True)


def _where_from(e: click.ClickException) -> str:
    """Where a bad or missing option value came from, when not the command line: a value set in
    an init script's environment is otherwise hard to find. And where a group option goes."""
    group_options = {o for p in cli.params for o in p.opts}
    if isinstance(e, click.NoSuchOption) and e.option_name in group_options:
        return f" ({e.option_name} goes before the command: mptun {e.option_name} ... COMMAND ...)"
    if not isinstance(e, click.BadParameter) or e.ctx is None or e.param is None:
        return ""
    envvar = e.param.envvar if isinstance(e.param.envvar, str) else None
    if isinstance(e, click.MissingParameter):
        if not envvar or not isinstance(e.param, click.Option):
            return ""
        where = f" (or {envvar}"
        if any(p.name in ("config", "uci") for p in e.ctx.command.params):
            where += f", or `{e.param.name.replace('_', '-')}` in the config file"
        return where + ")"
    source = e.ctx.get_parameter_source(e.param.name or "")
    if source == click.core.ParameterSource.ENVIRONMENT and envvar:
        return f" (from the environment: {envvar})"
    return ""


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every error into one line and an exit status."""
    prog = "mptun"
    try:
        rv = cli.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except _NO_ARGS_IS_HELP as e:  # bare `mptun` (or a group without its command): the help
        click.echo(e.format_message(), err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        msg, where = e.format_message(), _where_from(e)
        click.echo(f"{prog}: error: {msg.rstrip('.') + where if where else msg}", err=True)
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(130)
    except MptunError as e:
        click.echo(f"{prog}: error: {e}", err=True)
        sys.exit(2 if e.status.value == "config" else 1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # the promise: no traceback, but say how to get one
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            logging.getLogger("mptun").exception("internal error")
        click.echo(
            f"{prog}: internal error: {type(e).__name__}: {e} (--log-level debug shows details)",
            err=True,
        )
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
