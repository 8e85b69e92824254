"""`mptun status`: ask the clients' control sockets about their tunnels and the uplinks."""

from __future__ import annotations

import json

import click

from mptun.commands.options import ControlName, option


@click.command()
@option(
    "control",
    type=ControlName(allow_none=False),
    default="auto",
    metavar="auto|@NAME|PATH",
    help="Which client to ask: auto = every client of this network namespace; else the "
    "control socket a client was started with (its --control).",
)
@option("json", "--json", "as_json", is_flag=True, help="One JSON document instead of text.")
def status(control: str, as_json: bool) -> None:
    """Live tunnels and their subflows, the uplinks, and why speeds may not add up.

    Asks every mptun client of this network namespace (or the one at --control); run it where
    the client runs (on the router, or `ip netns exec`), as the client's user (root for a
    client root started).
    """
    from mptun.client.status import gather, render

    rep = gather(None if control == "auto" else [control])
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=1))
    else:
        for line in render(rep):
            click.echo(line)
    if not rep.clients:
        raise SystemExit(1)
