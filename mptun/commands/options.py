"""Options shared by the commands, and the config file.

Precedence: command line > environment (MPTUN_<OPTION>) > config file (TOML, one table per
command, keys are the long option names) > built-in default. The config file is read by an eager
`--config` option into click's `default_map`, which click consults exactly between environment and
default; required options are checked after that merge.

On OpenWrt the same table comes from UCI instead (`--uci /etc/config/mptun`): the section whose
type is the command's name (`config client 'main'`) gives option names as keys, with `_` for
`-`. Both files go through `_merge_defaults`, so they accept the same keys and values.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mptun.common.address import Address
from mptun.common.crypto import CIPHERS, DEFAULT_CIPHER, decode_key, load_key_file
from mptun.common.errors import ConfigError, MptunError

if TYPE_CHECKING:
    from mptun import uci
    from mptun.common.relay import RelaySettings

ENV_PREFIX = "MPTUN_"
# Keys a UCI section may carry for the init script and the hotplug hook, not for the command.
UCI_SERVICE_KEYS = ("enabled", "disabled")
# Keys of `config client` for the init script only, with their values: it passes log_level to
# `mptun --log-level`, an option of mptun itself (before the command), which no config sets.
UCI_CLIENT_SERVICE_KEYS = {"log_level": ("debug", "info", "warning", "error")}
_CONFIG_SOURCE = "mptun.config_source"  # ctx.meta key: which file filled default_map
# Bounds that turn an absurd value into an error instead of a process that misbehaves later.
MAX_SECONDS = 86400.0  # durations: at most a day
MAX_CONNECTIONS = 1_000_000  # no process holds more fds (the kernel's default fs.nr_open: 2**20)
# The tables of a TOML config: the commands that take --config (tests/test_first_minutes.py
# checks this against the command tree).
CONFIG_TABLES = ("client", "nft", "server", "uplinks")


def env(name: str) -> str:
    """The environment variable for a long option: --key-file -> MPTUN_KEY_FILE."""
    return ENV_PREFIX + name.upper().replace("-", "_")


def option(name: str, *decls: str, **attrs: Any) -> Callable[[Callable], Callable]:
    """The long option `--NAME` (or `decls`, e.g. `-o --output`), also set by MPTUN_NAME.

    A default shows in --help (a flag's does not: `--check` is off unless given).
    """
    if "default" in attrs and not attrs.get("is_flag"):
        attrs.setdefault("show_default", True)
    return click.option(*(decls or [f"--{name}"]), envvar=env(name), **attrs)


class Number(click.FloatRange):
    """A finite number in [min, max]: click's FloatRange lets nan through (nan fails no
    comparison), and a nan timeout never fires."""

    def __init__(self, min: float, max: float) -> None:
        super().__init__(min=min, max=max)

    def convert(self, value: Any, param, ctx) -> float:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a number", param, ctx)
        return rv


def seconds(min: float = 0.0) -> Number:
    """A duration option's type: finite, at least `min`, at most a day."""
    return Number(min, MAX_SECONDS)


class OutputFile(click.Path):
    """A file mptun writes later (counters, the replay cache, a key, a report): its directory
    must exist and be writable now, so a typo fails at start rather than at SIGUSR1 or exit."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, readable=False)

    def convert(self, value: Any, param, ctx) -> str:
        rv = super().convert(value, param, ctx)
        if not str(rv):
            self.fail("empty path", param, ctx)
        parent = Path(rv).parent
        if not parent.is_dir():
            self.fail(f"{rv}: directory {str(parent)!r} does not exist", param, ctx)
        if not os.access(parent, os.W_OK | os.X_OK):
            self.fail(f"{rv}: directory {str(parent)!r} is not writable", param, ctx)
        return rv


class Text(click.ParamType):
    """Text of `min`-`max` UTF-8 bytes, as a wire format bounds it (`why` names the format)."""

    name = "text"

    def __init__(self, min: int, max: int, why: str) -> None:
        self.min, self.max, self.why = min, max, why

    def convert(self, value: Any, param, ctx) -> str:
        text = str(value)
        try:
            n = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # undecodable bytes in argv or the environment
            self.fail("not valid UTF-8", param, ctx)
        if not self.min <= n <= self.max:
            self.fail(f"{n} bytes; {self.why} allows {self.min}-{self.max}", param, ctx)
        return text


class ProgramLine(click.ParamType):
    """A program and its first arguments, split as a shell would split the words (no shell runs
    it): the program must exist and be executable now, not when it is first run."""

    name = "command"

    def convert(self, value: Any, param, ctx) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        import shlex
        import shutil

        try:
            words = shlex.split(str(value))
        except ValueError as e:
            self.fail(f"{value!r}: {e}", param, ctx)
        if not words:
            self.fail("empty: give a program (and its first arguments)", param, ctx)
        found = shutil.which(words[0])
        if found is None:
            self.fail(f"{words[0]!r}: no such executable program", param, ctx)
        return (words[0], *words[1:])


class HostPort(click.ParamType):
    """HOST:PORT with IPv6 as [addr]:port. `ip_only` for addresses we bind to; `any_port` for
    a TCP listener, which also takes port 0 (the kernel picks a free port; the start logs it)."""

    name = "host:port"

    def __init__(
        self, ip_only: bool = False, default_port: int | None = None, any_port: bool = False
    ) -> None:
        self.ip_only = ip_only
        self.default_port = default_port
        self.any_port = any_port

    def convert(self, value: Any, param, ctx) -> Address:
        if isinstance(value, Address):
            return value
        try:
            addr = Address.parse(str(value), self.default_port, any_port=self.any_port)
        except MptunError as e:
            self.fail(str(e), param, ctx)
        if self.ip_only and addr.is_domain:
            if addr.host == "localhost":
                return Address.parse(f"127.0.0.1:{addr.port}", any_port=self.any_port)
            self.fail(
                f"{value!r}: give an IP address to listen on, e.g. 0.0.0.0:{addr.port} or "
                f"[::]:{addr.port}",
                param,
                ctx,
            )
        return addr


class ServerSpec(HostPort):
    """`--server HOST:PORT[,key-file=PATH]`: a server, and the key file it needs when it is not
    the one of --key-file (`key_file=` too, as UCI spells option names). The path is the rest
    of the value (it may hold commas)."""

    name = "server"

    def __init__(self) -> None:
        super().__init__()

    def convert(self, value: Any, param, ctx) -> tuple[Address, str | None]:
        if isinstance(value, tuple):
            return value
        text, sep, extra = str(value).partition(",")
        key_file = None
        if sep:
            field, eq, path = extra.partition("=")
            if field.strip() not in ("key-file", "key_file") or not eq or not path:
                self.fail(f"{value!r}: expected HOST:PORT or HOST:PORT,key-file=PATH", param, ctx)
            key_file = path
        return super().convert(text, param, ctx), key_file


class ForwardPair(click.ParamType):
    """LOCAL_HOST:PORT=TARGET_HOST:PORT: an address to listen on and the target to tunnel to."""

    name = "local=target"

    def convert(self, value: Any, param, ctx) -> tuple[Address, Address]:
        if isinstance(value, tuple):
            return value
        local, sep, target = str(value).partition("=")
        if not sep or not local or not target:
            self.fail(f"{value!r}: expected LOCAL_HOST:PORT=TARGET_HOST:PORT", param, ctx)
        return (
            HostPort(ip_only=True, any_port=True).convert(local, param, ctx),
            HostPort().convert(target, param, ctx),
        )


class FlightPrefix(click.ParamType):
    """`--prefix`: the bytes that start every first flight, written as text (`POST /`) with
    escapes (`\\x16\\x03\\x01`); at most 16 bytes (docs/PROTOCOL.md, "Prefix")."""

    name = "prefix"

    def convert(self, value: Any, param, ctx) -> bytes:
        if isinstance(value, bytes):
            return value
        # Here, not at the top: the commands that do not take --prefix skip the handshake.
        from mptun.common.handshake import parse_prefix

        try:
            return parse_prefix(str(value))
        except MptunError as e:
            self.fail(str(e), param, ctx)


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    # Here, not at the top: only --config reads TOML (tomllib's parser stays out of an idle
    # router's memory, benchmarks/footprint.py).
    import tomllib

    table = ctx.command.name or ""
    path = Path(value)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise click.BadParameter(f"{value}: no such file", ctx, param) from None
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{value}: cannot read: {e}", ctx, param) from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{value}: not valid TOML: {e}", ctx, param) from None
    _check_tables(data, value, ctx, param)
    section = data.get(table, {})
    if not isinstance(section, dict):
        raise click.BadParameter(f"{value}: [{table}] must be a table", ctx, param)
    _claim_config_source(ctx, param, value)
    defaults: dict[str, Any] = {}
    for key, val in section.items():
        p = _known_option(ctx, key, f"{value}: unknown key {key!r} in [{table}]", param)
        where = f"{value}: [{table}] {key}"
        if p.multiple and not isinstance(val, list):
            val = [val]
        elif not p.multiple and isinstance(val, list):
            raise click.BadParameter(f"{where}: takes one value, not an array", ctx, param)
        for item in val if p.multiple else [val]:
            _check_toml_kind(p, item, where, ctx, param)
        try:
            p.type_cast_value(ctx, val)
        except click.BadParameter as e:
            raise click.BadParameter(f"{where}: {e.message}", ctx, param) from None
        defaults[p.name or key] = val
    _merge_defaults(ctx, defaults)
    return value


def _check_tables(
    data: dict[str, Any], path: str, ctx: click.Context, param: click.Parameter
) -> None:
    """Every top-level name must be one command's table: a misspelt `[sever]` or a key above
    the first table would otherwise be ignored, and the user told that `--listen` is missing."""
    tables = ", ".join(f"[{t}]" for t in CONFIG_TABLES)
    for name, val in data.items():
        if name in CONFIG_TABLES and isinstance(val, dict):
            continue
        if name in CONFIG_TABLES:
            raise click.BadParameter(f"{path}: [{name}] must be a table", ctx, param)
        if isinstance(val, dict):
            import difflib  # only for this error message

            close = difflib.get_close_matches(name, CONFIG_TABLES, n=1)
            hint = f"did you mean [{close[0]}]? " if close else ""
            raise click.BadParameter(
                f"{path}: unknown table [{name}] ({hint}the tables are {tables})", ctx, param
            )
        raise click.BadParameter(
            f"{path}: key {name!r} is outside any table: put it under the table of its command "
            f"({tables}), e.g. [{ctx.command.name}]",
            ctx,
            param,
        )


def _toml_kind(val: Any) -> str:
    """What a TOML value is, in the words of the TOML spec."""
    if isinstance(val, bool):
        return "a boolean"
    if isinstance(val, int):
        return "an integer"
    if isinstance(val, float):
        return "a float"
    if isinstance(val, str):
        return "a string"
    if isinstance(val, list):
        return "an array"
    if isinstance(val, dict):
        return "a table"
    if isinstance(val, datetime.date | datetime.time):
        return "a date/time"
    return type(val).__name__


def _check_toml_kind(
    p: click.Option, val: Any, where: str, ctx: click.Context, param: click.Parameter
) -> None:
    """A string is read as on the command line; besides strings, flags take booleans and numeric
    options numbers. `max-connections = true` or `socks-password = 1e3` are mistakes, not 1 and
    "1000.0" (Python's bool is an int, and click would take either)."""
    if isinstance(val, str):
        return
    if p.is_flag:
        ok, want = isinstance(val, bool), "a boolean (true or false)"
    elif isinstance(p.type, click.types.IntParamType):
        ok, want = isinstance(val, int) and not isinstance(val, bool), "an integer"
    elif isinstance(p.type, click.types.FloatParamType):
        ok, want = isinstance(val, int | float) and not isinstance(val, bool), "a number"
    else:
        ok, want = False, "a string (in quotes)"
    if not ok:
        raise click.BadParameter(f"{where}: expected {want}, not {_toml_kind(val)}", ctx, param)


def _config_params(ctx: click.Context) -> dict[str, click.Parameter]:
    return {p.name: p for p in ctx.command.params if p.name and p.name not in ("config", "uci")}


def _known_option(
    ctx: click.Context, key: str, unknown: str, param: click.Parameter | None, sep: str = "-"
) -> click.Option:
    """The option a config key names (`-` and `_` alike), or the "unknown key" error."""
    known = _config_params(ctx)
    p = known.get(key.replace("-", "_"))
    if p is None or not isinstance(p, click.Option):
        choices = ", ".join(sorted(k.replace("_", sep) for k in known))
        raise click.BadParameter(f"{unknown} (known: {choices})", ctx, param)
    return p


def _claim_config_source(ctx: click.Context, param: click.Parameter, value: str) -> None:
    """One config file per run: --config (TOML) or --uci, not both."""
    previous = ctx.meta.get(_CONFIG_SOURCE)
    if previous is not None:
        raise click.BadParameter(
            f"{value}: a config was already read from {previous}; give --config or --uci, not both",
            ctx,
            param,
        )
    ctx.meta[_CONFIG_SOURCE] = value


def _merge_defaults(ctx: click.Context, defaults: dict[str, Any]) -> None:
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def uci_defaults(
    ctx: click.Context, pkg: uci.UciPackage, param: click.Parameter | None = None
) -> dict[str, Any]:
    """Map the package's section named after the command onto its options, checking each value
    with the option's own type so a bad one is reported as `file:line: key: why`."""
    from mptun import uci  # only with --uci or `mptun uci`, as tomllib above

    command = ctx.command.name or ""
    sections = pkg.of_type(command)
    if len(sections) > 1:
        raise click.BadParameter(
            f"{pkg.path}:{sections[1].line}: a second 'config {command}' section "
            f"({sections[1].label}); one per file (the first is at line {sections[0].line})",
            ctx,
            param,
        )
    if not sections:
        return {}
    defaults: dict[str, Any] = {}
    for opt in sections[0].options.values():
        where = f"{pkg.path}:{opt.line}"
        if opt.name in UCI_SERVICE_KEYS:
            try:
                uci.parse_bool(opt.value, opt.name)
            except ConfigError as e:
                raise click.BadParameter(f"{where}: {e}", ctx, param) from None
            continue
        if command == "client" and opt.name in UCI_CLIENT_SERVICE_KEYS:
            allowed = UCI_CLIENT_SERVICE_KEYS[opt.name]
            if opt.is_list or opt.value not in allowed:
                raise click.BadParameter(
                    f"{where}: {opt.name}: {opt.value!r} is not one of {', '.join(allowed)} "
                    f"(write `option {opt.name}`)",
                    ctx,
                    param,
                )
            continue
        p = _known_option(
            ctx, opt.name, f"{where}: unknown key {opt.name!r} in config {command}", param, "_"
        )
        val: Any
        if p.multiple:
            val = list(opt.values)
        elif opt.is_list:
            raise click.BadParameter(
                f"{where}: {opt.name} takes one value: write `option {opt.name}`, not `list`",
                ctx,
                param,
            )
        elif p.is_flag:
            try:
                val = uci.parse_bool(opt.value, opt.name)
            except ConfigError as e:
                raise click.BadParameter(f"{where}: {e}", ctx, param) from None
        else:
            val = opt.value
        try:
            p.type_cast_value(ctx, val)
        except click.BadParameter as e:
            raise click.BadParameter(f"{where}: {opt.name}: {e.message}", ctx, param) from None
        defaults[p.name or opt.name] = val
    return defaults


def _load_uci(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from mptun import uci

    try:
        pkg = uci.load(value)
    except uci.UciError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    _claim_config_source(ctx, param, value)
    _merge_defaults(ctx, uci_defaults(ctx, pkg, param))
    return value


def config_option(f: Callable) -> Callable:
    return option(
        "config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config,
        help="TOML config file; its table for this command uses the long option names as keys.",
    )(f)


def uci_option(f: Callable) -> Callable:
    return option(
        "uci",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_uci,
        help="OpenWrt UCI config (e.g. /etc/config/mptun): its `config <command>` section, "
        "option names with _ for -, instead of --config.",
    )(f)


def key_options(f: Callable) -> Callable:
    return option(
        "key-file",
        type=click.Path(dir_okay=False),
        help="File holding the pre-shared key (one base64 line, from `mptun genkey`). "
        "The environment variable MPTUN_KEY may hold the key itself instead.",
    )(f)


def cipher_option(f: Callable) -> Callable:
    return option(
        "cipher",
        type=click.Choice(list(CIPHERS)),
        default=DEFAULT_CIPHER,
        help="AEAD of the handshake (and of encrypted bulk data). Both ends must agree.",
    )(f)


def transport_option(f: Callable) -> Callable:
    return option(
        "transport",
        type=click.Choice(["mptcp", "tcp"]),
        default="mptcp",
        help="Tunnel protocol. mptcp falls back to TCP (with a warning) where the kernel refuses.",
    )(f)


def relay_option(f: Callable) -> Callable:
    return option(
        "relay",
        type=click.Choice(["auto", "splice", "copy"]),
        default="auto",
        help="Relay engine: splice keeps bytes in the kernel; copy goes through user space; "
        "auto = splice where the kernel can.",
    )(f)


def bulk_option(f: Callable) -> Callable:
    return option(
        "bulk",
        type=click.Choice(["auto", "aead", "ktls", "plain"]),
        default="auto",
        help="Bulk data after the handshake. auto: encrypted (TLS 1.3 records), sealed by kTLS "
        "where the tunnel socket takes it, else in user space (aead); aead/ktls force one; "
        "plain: unencrypted (a client asks for it; a server then also accepts it).",
    )(f)


def coalesce_option(f: Callable) -> Callable:
    return option(
        "coalesce-ms",
        type=Number(min=0, max=100),
        default=8.0,
        help="While a connection streams, let bytes wait up to this long (a one-way "
        "download or upload: up to 1% of how long it has run, at most 4x this) so the relay "
        "wakes once per batch instead of once per burst (less CPU at WiFi rates); "
        "interactive traffic is not delayed. 0: relay every byte at once.",
    )(f)


def relay_settings(params: dict[str, Any]) -> RelaySettings:
    """The settings of --transport, --relay, --bulk and --coalesce-ms."""
    # Here, not at the top: `mptun uci` and `mptun nft` need not import the relay engines.
    from mptun.common.relay import RelaySettings

    return RelaySettings(
        transport=params["transport"],
        engine=params["relay"],
        bulk=params["bulk"],
        coalesce_delay=params["coalesce_ms"] / 1000,
    )


def timeout_option(name: str, default: float, what: str) -> Callable[[Callable], Callable]:
    return option(name, type=seconds(min=0.1), default=default, help=what)


def idle_timeout_option(f: Callable) -> Callable:
    return option(
        "idle-timeout",
        type=seconds(),
        default=0,
        help="Reset a relayed connection after this many seconds without traffic (0: never).",
    )(f)


def max_connections_option(what: str) -> Callable[[Callable], Callable]:
    return option(
        "max-connections", type=click.IntRange(1, MAX_CONNECTIONS), default=4096, help=what
    )


def given(ctx: click.Context, name: str) -> bool:
    """Whether the user set option `name` (command line, environment or config file), rather
    than leaving it at its built-in default."""
    return ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT


def resolve_key(ctx: click.Context, key_file: str | None) -> bytes:
    """The key: --key-file on the command line, else MPTUN_KEY, else the merged key-file."""
    source = ctx.get_parameter_source("key_file")
    inline = os.environ.get(ENV_PREFIX + "KEY")
    if key_file and source == click.core.ParameterSource.COMMANDLINE:
        return load_key_file(key_file)
    if inline:
        return decode_key(inline, "MPTUN_KEY")
    if key_file:
        return load_key_file(key_file)
    raise ConfigError(
        "no key: give --key-file PATH (or set MPTUN_KEY); create one with `mptun genkey`"
    )


class ReloadableCommand(click.Command):
    """A command that remembers its own arguments, so SIGHUP can parse them again.

    `reparse(ctx)` re-reads the config file, the environment and the key file exactly as at start.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["mptun.args"] = list(args)
        return super().parse_args(ctx, args)

    def reparse(self, ctx: click.Context) -> click.Context:
        """A fresh context for the same arguments (raises click errors for a broken config)."""
        # click shares `meta` along the context chain: without this, the config file's claim
        # from the start refuses the same file read again ("give --config or --uci, not both").
        ctx.meta.pop(_CONFIG_SOURCE, None)
        return self.make_context(ctx.info_name, list(ctx.meta["mptun.args"]), parent=ctx.parent)


def log_connections_option(f: Callable) -> Callable:
    return option(
        "log-connections",
        is_flag=True,
        default=False,
        help="Log every connection (who, where to, bytes) at info; without it those lines are "
        "debug, since they name LAN hosts and their destinations. Failures stay at info.",
    )(f)


def stats_option(f: Callable) -> Callable:
    return option(
        "stats-file",
        type=OutputFile(),
        help="Write the counters here as JSON on SIGUSR1 and at exit (they are logged too).",
    )(f)


class ControlName(click.ParamType):
    """Where a client's control socket is: auto, @NAME (abstract), a file path, or none."""

    name = "control"

    def __init__(self, allow_none: bool = True) -> None:
        self.allow_none = allow_none  # `none` turns the client's socket off; status needs one

    def convert(self, value: Any, param, ctx) -> str:
        # Here, not at the top: the commands that do not take --control skip the client's imports.
        from mptun.client.control import check_control_name

        why = check_control_name(str(value), self.allow_none)
        if why is not None:
            self.fail(f"{value!r}: {why}", param, ctx)
        return str(value)


def control_option(f: Callable) -> Callable:
    """`--control` for `mptun client` (and `mptun status`, which asks there)."""
    return option(
        "control",
        type=ControlName(),
        default="auto",
        metavar="auto|@NAME|PATH|none",
        help="Control socket `mptun status` reads: auto = @mptun/client/PID-RANDOM (abstract, "
        "per network namespace); @NAME abstract; a file path; none.",
    )(f)


def metrics_options(f: Callable) -> Callable:
    """`--metrics` and `--metrics-public` (client and server: common/metrics_http.py)."""
    f = option(
        "metrics-public",
        is_flag=True,
        default=False,
        help="Let --metrics bind an address other than loopback (the page has no "
        "authentication: keep the port behind a firewall).",
    )(f)
    return option(
        "metrics",
        type=HostPort(ip_only=True, any_port=True),
        metavar="HOST:PORT",
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (loopback unless "
        "--metrics-public; off by default).",
    )(f)
