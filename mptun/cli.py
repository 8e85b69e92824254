"""The `mptun` command: a thin click layer over the client, the server and the tools.

Errors reach the user as one line on stderr and a non-zero exit status, never a traceback:
2 for bad usage or configuration, 1 for anything else.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from mptun import __version__
from mptun.bench.cli import bench
from mptun.client.cli import client
from mptun.client.nftcli import nft
from mptun.client.uplinks_cli import status, uplinks
from mptun.common.crypto import generate_key
from mptun.common.errors import MptunError
from mptun.demo import demo
from mptun.options import OutputFile, env
from mptun.server.cli import server
from mptun.uci_cli import uci_command

LOG_LEVELS = ["debug", "info", "warning", "error"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mptun")
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    envvar=env("log-level"),
    help="Least severe messages to log (to stderr).",
)
def cli(log_level: str) -> None:
    """Multipath TCP tunnel for routers: joins uplinks into one fast, encrypted-handshake tunnel."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@cli.command()
@click.option(
    "-o",
    "--output",
    type=OutputFile(),
    envvar=env("output"),
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


cli.add_command(server)
cli.add_command(client)
cli.add_command(uci_command)
cli.add_command(nft)
cli.add_command(bench)
cli.add_command(uplinks)
cli.add_command(status)
cli.add_command(demo)


def _where_from(e: click.ClickException) -> str:
    """Where a bad or missing option value came from, when not the command line: a value set in
    an init script's environment is otherwise hard to find."""
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
