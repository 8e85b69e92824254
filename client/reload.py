"""SIGHUP for the client: new settings applied to the running client, open connections kept.

What a reload changes at once, for new connections: the keys (of every server, when the server
list is the same), cipher, relay engine, timeouts, `--prefix`, `--when-down`,
`--log-connections`, the connection limits, and the listeners: one whose address is gone is
closed (its connections go on), a new one is bound, one whose settings changed (SOCKS auth,
reply policy, per-client cap; a forward's target) gets them for its next connection. What needs
a restart is kept as it was and named in the log line: the server list, `--server-policy`,
`--server-check-interval`, `--transport`, `--dns*`, `--udp-*`, `--control`, `--stats-file`,
`--metrics`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from mptun.client.app import ClientSettings, build_client, tunnel_config
from mptun.client.service import Client, ListenerSpec
from mptun.client.socks import SocksListener
from mptun.client.tunnel import Tunneler
from mptun.common.address import Address
from mptun.common.limits import fit_connections
from mptun.common.listener import AcceptLoop, listen_hint
from mptun.common.sockets import Transport, listen_socket

log = logging.getLogger("mptun.client")

# ClientSettings fields a reload applies, by the name the log line gives them.
_APPLIED = {
    "cipher": "cipher",
    "connect_timeout": "connect-timeout",
    "handshake_timeout": "handshake-timeout",
    "idle_timeout": "idle-timeout",
    "prefix": "prefix",
    "when_down": "when-down",
    "log_connections": "log-connections",
    "max_connections": "max-connections",
    "socks_per_client": "socks-per-client",
    "credentials": "socks-user/password",
    "reply": "reply",
}
# Fields handled on their own: the servers and their keys, the relay, the listeners' addresses.
_OWN = ("server", "psk", "more_servers", "relay", "socks", "redir", "tproxy", "forward")


def _restart_fields() -> list[str]:
    """Every other field needs a restart (kept as it was when it changes), among them
    --server-policy, --server-check-interval, --dns*, --control, --stats-file, and any setting
    added later until a reload learns to apply it."""
    return [
        f.name
        for f in dataclasses.fields(ClientSettings)
        if f.name not in _APPLIED and f.name not in _OWN
    ]


def _listener_keys(app: Client) -> list[tuple[str, str]]:
    return [(spec.handler.kind, str(spec.bind)) for spec in app.specs]


def reload_client(
    app: Client, tunneler: Tunneler, old: ClientSettings, new: ClientSettings
) -> ClientSettings:
    """Apply `new` to the running client (`app` around `tunneler`, started with `old`); logs
    one line saying what changed and what needs a restart. Returns the settings now in force."""
    changed: list[str] = []
    kept: list[str] = []
    for name, label in _APPLIED.items():
        if getattr(old, name) != getattr(new, name):
            changed.append(label)
    restart = _restart_fields()
    for name in restart:
        if getattr(old, name) != getattr(new, name):
            kept.append(name.replace("_", "-"))
    # --relay, --bulk, --coalesce-ms apply; --transport (MPTCP or TCP) needs a restart
    if dataclasses.replace(new.relay, transport=old.relay.transport) != old.relay:
        changed.append("relay")
    if old.relay.transport != new.relay.transport:
        kept.append("transport")
    same_servers = [a for a, _ in _servers(old)] == [a for a, _ in _servers(new)]
    if not same_servers:
        kept.append("server")
    elif _servers(old) != _servers(new):
        changed.insert(0, "key")

    # What is kept goes back into the settings in force, so the next reload compares with them.
    keep: dict[str, Any] = {n: getattr(old, n) for n in restart}
    if not same_servers:
        keep.update(server=old.server, psk=old.psk, more_servers=old.more_servers)
    if old.relay.transport != new.relay.transport:
        keep["relay"] = dataclasses.replace(new.relay, transport=old.relay.transport)
    now = dataclasses.replace(new, **keep)

    fresh = build_client(now, tunneler).app  # first: it may refuse the settings (ConfigError)
    for spec in fresh.specs:  # a new SOCKS handler serves UDP with the running associations
        if isinstance(spec.handler, SocksListener) and spec.handler.udp is not None:
            spec.handler.udp = app.udp
    _apply_tunnel(tunneler, now)
    listeners = _apply_listeners(app, fresh, old, now)
    tunneler.counters["reload"] += 1
    log.info(
        "reloaded: %s changed%s",
        ", ".join([*changed, *listeners]) or "nothing",
        f"; {', '.join(kept)} need a restart (kept as they were)" if kept else "",
    )
    return now


def _servers(s: ClientSettings) -> list[tuple[str, bytes]]:
    """Every server's address and key, in order."""
    return [(str(s.server), s.psk)] + [(str(x.address), x.psk) for x in s.more_servers]


def _apply_tunnel(tunneler: Tunneler, s: ClientSettings) -> None:
    """The tunnel settings of `s` for new connections; the server list's keys in place."""
    cfg = tunnel_config(s)
    old = tunneler.config
    tunneler.config = dataclasses.replace(
        cfg,
        mptcp=old.mptcp,
        policy=old.policy,
        check_interval=old.check_interval,
        fast_open=old.fast_open,  # --fast-open and --pool need a restart, as the log line says
        pool=old.pool,
    )
    # same addresses (checked by the caller): the servers' keys, read at each tunnel and check
    tunneler.servers.servers = cfg.servers
    tunneler.monitor.cipher = cfg.cipher
    tunneler.monitor.prefix = cfg.prefix


def _apply_listeners(
    app: Client, fresh: Client, old: ClientSettings, s: ClientSettings
) -> list[str]:
    """Close the listeners `s` no longer has, bind its new ones (from `fresh`, built from `s`
    but not started), hand the kept ones their new handlers where their settings changed, set
    the connection limit; what it did, for the log."""
    loop = asyncio.get_running_loop()
    old_keys = _listener_keys(app)
    new_keys = _listener_keys(fresh)
    done: list[str] = []
    loops: list[AcceptLoop] = []
    specs: list[ListenerSpec] = []
    socks_changed = (old.credentials, old.reply, old.socks_per_client) != (
        s.credentials,
        s.reply,
        s.socks_per_client,
    )
    limit = fit_connections(s.max_connections, log, len(new_keys))
    for key, accept, spec in zip(old_keys, app.loops, app.specs, strict=True):
        if key not in new_keys:
            accept.close()  # its open connections go on
            done.append(f"{key[0]} on {key[1]} closed")
            continue
        new_spec = fresh.specs[new_keys.index(key)]
        forward_changed = key[0] == "forward" and old.forward != s.forward
        if (key[0] == "socks" and socks_changed) or forward_changed:
            accept.handler = new_spec.handler.handle
            spec = new_spec
        accept.set_limit(limit)
        loops.append(accept)
        specs.append(spec)
    local = Transport(want_mptcp=False)
    for key, spec in zip(new_keys, fresh.specs, strict=True):
        if key in old_keys:
            continue
        try:
            sock, _ = listen_socket(spec.bind, local, transparent=spec.transparent)
        except OSError as e:
            log.error(
                "reload: cannot listen on %s (%s): %s%s",
                spec.bind,
                key[0],
                e.strerror,
                listen_hint(spec.bind, e),
            )
            continue
        accept = AcceptLoop(loop, sock, spec.handler.handle, log, limit)
        accept.start()
        loops.append(accept)
        specs.append(spec)
        host, port = sock.getsockname()[:2]
        bound = Address.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        log.info("%s listening on %s", key[0], bound)
        done.append(f"{key[0]} on {bound} opened")
    services = app.addresses[len(app.loops) :]  # the DNS UDP server's, after the listeners'
    app.loops, app.specs = loops, specs
    app.addresses = [_bound(a) for a in loops] + services
    return done


def _bound(accept: AcceptLoop) -> Address:
    host, port = accept.sock.getsockname()[:2]
    return Address.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
