"""docs/CLI.md is the contract: the real click tree must match it, option by option.

Walks `mptun.cli.cli` (every command, every option) and checks that docs/CLI.md documents each
option with its default, that the environment variable named by the rule (`--some-name` ->
`MPTUN_SOME_NAME`) and the config key of the same name (TOML, and UCI where `--uci` exists) set
it, that an unknown key is refused, and that the command lines the docs show parse. Parsing is
click's own (`make_context`: conversion, callbacks, eager --config), without running a command.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from mptun.cli import cli
from mptun.commands.options import ENV_PREFIX, HostPort, OutputFile, Text, env

CMDS = cli.all_commands()  # every command, imported
ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "CLI.md"
# Options click adds itself; they are documented once, in General rules, and have no env var.
BUILTIN = {"help", "version"}
# Sample values for plain-string options whose meaning a generic string would not fit.
STRING_SAMPLES = {
    "allow-target": "192.0.2.0/24",
    "bypass": "192.0.2.0/24",
    "bypass-source": "192.0.2.9",
    "bypass-udp-port": "3074",
    "lan": "eth9",
    "server": "192.0.2.1",
    "gateway": "eth9=192.0.2.1",
    "backup": "eth9",
    "table": "t1",
    "cases": "route",
    "rates": "50,50",
    "quotas": "10,20",
    "control": "@mptun-contract-test",
    "uplink-hook": "/bin/true x1",
}
OTHER_SAMPLES = {
    "allow-target": "198.51.100.0/24",
    "bypass": "198.51.100.0/24",
    "bypass-source": "192.0.2.10/31",
    "bypass-udp-port": "3478-3480",
    "lan": "eth8",
    "server": "192.0.2.2",
    "gateway": "eth9=192.0.2.2",
    "backup": "eth8",
    "table": "t2",
    "cases": "splice-tcp",
    "rates": "40,40",
    "quotas": "15,30",
    "control": "@mptun-contract-test2",
    "uplink-hook": "/bin/false x2",
}


def commands() -> Iterator[tuple[str, click.Command]]:
    """("", the group) and then (name, command) for every command of the tree."""
    yield "", cli
    yield from sorted(CMDS.items())


def long_name(p: click.Parameter) -> str | None:
    """`key-file` for --key-file (None for an argument or an option without a long name)."""
    if not isinstance(p, click.Option):
        return None
    longs = [o for o in p.opts if o.startswith("--")]
    return longs[0][2:] if longs else None


def options() -> list[tuple[str, click.Option]]:
    """Every (command, option) pair that the contract covers."""
    out = []
    for name, cmd in commands():
        for p in cmd.params:
            if isinstance(p, click.Option) and long_name(p) not in BUILTIN:
                out.append((name, p))
    return out


def option_id(item: tuple[str, click.Option]) -> str:
    return f"{item[0] or 'mptun'}--{long_name(item[1])}"


ALL = options()


def has_option(cmd: click.Command, name: str) -> bool:
    return any(isinstance(p, click.Option) and long_name(p) == name for p in cmd.params)


def no_default(value: object) -> bool:
    """click 8.1 says None, 8.3+ a sentinel."""
    return value is None or value == () or type(value).__name__ == "Sentinel"


# ---- docs/CLI.md, parsed -------------------------------------------------------------------


def doc_sections() -> dict[str, str]:
    """Command name -> its section of docs/CLI.md ("" for General rules: the group's options)."""
    sections: dict[str, str] = {}
    current = None
    for line in CLI_MD.read_text().splitlines():
        m = re.match(r"## (.*)", line)
        if m:
            title = m.group(1)
            cm = re.match(r"`mptun (\w+)", title)
            current = cm.group(1) if cm else ("" if title == "General rules" else None)
            if current is not None:
                sections[current] = ""
            continue
        if current is not None:
            sections[current] += line + "\n"
    return sections


def doc_rows(section: str) -> dict[str, str]:
    """Option name -> the default cell, from the section's option tables."""
    rows: dict[str, str] = {}
    for line in section.splitlines():
        line = line.strip()
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) < 3 or cells[0] == "option":
            continue
        for name in re.findall(r"(?<![\w-])--([a-z0-9][a-z0-9-]*)", cells[0]):
            rows[name] = cells[1]
        for short in re.findall(r"`(-[a-z]) ", cells[0]):
            rows[short] = cells[1]
    return rows


SECTIONS = doc_sections()


def default_documented(p: click.Option, cell: str) -> bool:
    """Does the default cell say what the code's default is?"""
    text = cell.replace("`", "").strip()
    default = p.default
    if p.required:
        return text.startswith("required")
    if p.is_flag:
        if default is True:
            return text.split()[:1] == ["on"]
        return text in ("", "off")
    if no_default(default):
        return text == "" or text.startswith("(") or text == "all"
    if not text:
        return False
    token = text.split()[0]
    if isinstance(default, tuple):
        default = ",".join(str(d) for d in default)
    if isinstance(default, int | float):
        try:
            return float(int(token, 0) if token.lower().startswith("0x") else token) == default
        except ValueError:
            return False
    return token == str(default)


def test_every_command_has_a_section() -> None:
    missing = [name for name, _ in commands() if name not in SECTIONS]
    assert not missing, f"docs/CLI.md has no `## \\`mptun NAME ...\\`` section for {missing}"


@pytest.mark.parametrize("item", ALL, ids=option_id)
def test_option_documented_with_its_default(item: tuple[str, click.Option]) -> None:
    command, p = item
    rows = doc_rows(SECTIONS.get(command, ""))
    name = long_name(p)
    assert name in rows, f"docs/CLI.md, `mptun {command}`: no table row for --{name}"
    assert default_documented(p, rows[name]), (
        f"docs/CLI.md, `mptun {command}` --{name}: default cell {rows[name]!r}, "
        f"code default {p.default!r}{' (required)' if p.required else ''}"
    )


@pytest.mark.parametrize("command", [n for n, _ in commands()], ids=lambda n: n or "mptun")
def test_documented_options_exist(command: str) -> None:
    """Every option a section's table names is an option of that command (no stale rows)."""
    cmd = cli if not command else CMDS[command]
    known = {long_name(p) for p in cmd.params} | BUILTIN
    shorts = {o for p in cmd.params for o in getattr(p, "opts", []) if not o.startswith("--")}
    shorts |= {"-h"}
    secondary = {o[2:] for p in cmd.params for o in getattr(p, "secondary_opts", [])}
    for name in doc_rows(SECTIONS.get(command, "")):
        if name.startswith("-"):
            assert name in shorts, f"`mptun {command}` documents {name}, which it does not have"
        else:
            assert name in known | secondary, (
                f"`mptun {command}` documents --{name}, which it does not have"
            )


@pytest.mark.parametrize("item", ALL, ids=option_id)
def test_option_has_its_env_var(item: tuple[str, click.Option]) -> None:
    _, p = item
    assert p.envvar == env(long_name(p) or ""), (
        f"--{long_name(p)}: envvar {p.envvar!r}, the rule says {env(long_name(p) or '')}"
    )


# ---- every layer sets every option -----------------------------------------------------------


def sample(p: click.Option, tmp: Path, other: bool = False) -> str | bool:
    """A valid value for `p` that differs from its default (a bool for flags); `other`: a second
    valid value that differs from the first."""
    if p.is_flag:
        return (p.default is not True) != other
    t = p.type
    name = long_name(p) or ""
    if isinstance(t, click.Choice):
        first = next(str(c) for c in t.choices if c != p.default)
        return next(str(c) for c in t.choices if c != first) if other else first
    if isinstance(t, click.types.IntParamType):
        lo = t.min if isinstance(t, click.IntRange) and t.min is not None else 1
        return str((lo if lo != p.default else lo + 1) + 2 * other)
    if isinstance(t, click.types.FloatParamType):
        lo = t.min if isinstance(t, click.FloatRange) and t.min is not None else 0
        return str(lo + 1.5 + other)
    if isinstance(t, HostPort):
        return f"127.0.0.1:{1234 + other}"
    if t.name == "local=target":
        return f"127.0.0.1:{1234 + other}=example.net:22"
    if isinstance(t, OutputFile | click.Path):
        return str(tmp / f"{name}{int(other)}.out")
    if isinstance(t, Text):
        return f"user{1 + other}"
    if other:
        return OTHER_SAMPLES.get(name, "x2")
    return STRING_SAMPLES.get(name, "x1")


def required_args(cmd: click.Command, tmp: Path, but: click.Option) -> list[str]:
    """Command-line values for the command's required options other than `but`."""
    out: list[str] = []
    for q in cmd.params:
        if isinstance(q, click.Option) and q.required and q is not but:
            out += [f"--{long_name(q)}", str(sample(q, tmp))]
    return out


def parse(command: str, args: list[str]) -> click.Context:
    """Parse `mptun COMMAND ARGS` the way the command line does, without running anything."""
    if not command:
        return cli.make_context("mptun", [*args, "genkey"])
    parent = cli.make_context("mptun", [command], resilient_parsing=True)
    return CMDS[command].make_context(command, args, parent=parent)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MPTUN_* of the developer's shell leaks into what is being checked."""
    import os

    for k in list(os.environ):
        if k.startswith(ENV_PREFIX):
            monkeypatch.delenv(k)


def cli_value(command: str, p: click.Option, tmp: Path) -> object:
    """What the option parses to when given on the command line."""
    v = sample(p, tmp)
    cmd = cli if not command else CMDS[command]
    base = required_args(cmd, tmp, p)
    if p.is_flag:
        flag = (p.opts if v else p.secondary_opts or p.opts)[0]
        ctx = parse(command, [*base, flag])
    else:
        ctx = parse(command, [*base, f"--{long_name(p)}", str(v)])
    value = ctx.params[p.name or ""]
    none = parse(command, base) if not p.required else None
    if none is not None:
        assert value != none.params[p.name or ""], f"--{long_name(p)}: sample equals default"
    return value


VALUED = [(c, p) for c, p in ALL if p.expose_value]  # not --config/--uci: they read a file


@pytest.mark.parametrize("item", VALUED, ids=option_id)
def test_env_var_sets_the_option(
    item: tuple[str, click.Option], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command, p = item
    want = cli_value(command, p, tmp_path)
    v = sample(p, tmp_path)
    monkeypatch.setenv(env(long_name(p) or ""), ("1" if v else "0") if p.is_flag else str(v))
    cmd = cli if not command else CMDS[command]
    ctx = parse(command, required_args(cmd, tmp_path, p))
    assert ctx.params[p.name or ""] == want
    assert ctx.get_parameter_source(p.name or "") == click.core.ParameterSource.ENVIRONMENT


@pytest.mark.parametrize("kind", ["config", "uci"])
def test_env_var_names_the_config_file(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MPTUN_CONFIG / MPTUN_UCI name the file as --config / --uci do."""
    conf = tmp_path / "conf"
    if kind == "config":
        conf.write_text('[client]\nserver = "192.0.2.1:8443"\n')
    else:
        conf.write_text("config client 'main'\n\toption server '192.0.2.1:8443'\n")
    monkeypatch.setenv(env(kind), str(conf))
    ctx = parse("client", [])
    assert [str(address) for address, _ in ctx.params["server"]] == ["192.0.2.1:8443"]


def with_config(kind: str) -> list[tuple[str, click.Option]]:
    """The options of commands that read a config file of this kind ("config" or "uci")."""
    return [
        (c, p)
        for c, p in ALL
        if c and has_option(CMDS[c], kind) and long_name(p) not in ("config", "uci")
    ]


def toml_value(p: click.Option, v: str | bool) -> str:
    if p.is_flag:
        return "true" if v else "false"
    if isinstance(p.type, click.types.IntParamType | click.types.FloatParamType):
        text = str(v)
    else:
        text = json.dumps(v)  # a TOML basic string
    return f"[{text}]" if p.multiple else text


@pytest.mark.parametrize("item", with_config("config"), ids=option_id)
def test_config_key_sets_the_option(item: tuple[str, click.Option], tmp_path: Path) -> None:
    command, p = item
    want = cli_value(command, p, tmp_path)
    conf = tmp_path / "c.toml"
    conf.write_text(f"[{command}]\n{long_name(p)} = {toml_value(p, sample(p, tmp_path))}\n")
    cmd = CMDS[command]
    ctx = parse(command, ["--config", str(conf), *required_args(cmd, tmp_path, p)])
    assert ctx.params[p.name or ""] == want
    assert ctx.get_parameter_source(p.name or "") == click.core.ParameterSource.DEFAULT_MAP


@pytest.mark.parametrize("item", with_config("uci"), ids=option_id)
def test_uci_key_sets_the_option(item: tuple[str, click.Option], tmp_path: Path) -> None:
    command, p = item
    want = cli_value(command, p, tmp_path)
    v = sample(p, tmp_path)
    key = (long_name(p) or "").replace("-", "_")
    value = ("1" if v else "0") if p.is_flag else str(v)
    conf = tmp_path / "mptun"
    conf.write_text(
        f"config {command} 'main'\n\t{'list' if p.multiple else 'option'} {key} '{value}'\n"
    )
    cmd = CMDS[command]
    ctx = parse(command, ["--uci", str(conf), *required_args(cmd, tmp_path, p)])
    assert ctx.params[p.name or ""] == want
    assert ctx.get_parameter_source(p.name or "") == click.core.ParameterSource.DEFAULT_MAP


def env_text(p: click.Option, v: str | bool) -> str:
    return ("1" if v else "0") if p.is_flag else str(v)


def cli_words(p: click.Option, v: str | bool) -> list[str]:
    if p.is_flag:
        return [(p.opts if v else p.secondary_opts or p.opts)[0]] if v or p.secondary_opts else []
    return [f"--{long_name(p)}", str(v)]


@pytest.mark.parametrize("item", with_config("config"), ids=option_id)
def test_precedence_command_line_then_environment_then_config(
    item: tuple[str, click.Option], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per option: the environment beats the config file, the command line beats both."""
    command, p = item
    a, b = sample(p, tmp_path), sample(p, tmp_path, other=True)
    cmd = CMDS[command]
    base = required_args(cmd, tmp_path, p)
    want_a = parse(command, [*base, *cli_words(p, a)]).params[p.name or ""]
    want_b = parse(command, [*base, *cli_words(p, b)]).params[p.name or ""]
    assert want_a != want_b
    conf = tmp_path / "c.toml"
    conf.write_text(f"[{command}]\n{long_name(p)} = {toml_value(p, a)}\n")
    monkeypatch.setenv(env(long_name(p) or ""), env_text(p, b))
    assert parse(command, ["--config", str(conf), *base]).params[p.name or ""] == want_b
    if cli_words(p, a):  # a flag without --no-x cannot be switched off on the command line
        got = parse(command, ["--config", str(conf), *base, *cli_words(p, a)])
        assert got.params[p.name or ""] == want_a


CONFIG_COMMANDS = sorted({c for c, _ in with_config("config")})
UCI_COMMANDS = sorted({c for c, _ in with_config("uci")})


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("key", ["no-such-option", "config", "uci", "log-level", "help"])
def test_unknown_config_key_is_refused(command: str, key: str, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[{command}]\n{key} = "x"\n')
    with pytest.raises(click.BadParameter, match=f"unknown key '{key}'"):
        parse(command, ["--config", str(conf)])


@pytest.mark.parametrize("command", UCI_COMMANDS)
def test_unknown_uci_key_is_refused(command: str, tmp_path: Path) -> None:
    conf = tmp_path / "mptun"
    conf.write_text(f"config {command}\n\toption no_such_option 'x'\n")
    with pytest.raises(click.BadParameter, match="mptun:2: unknown key 'no_such_option'"):
        parse(command, ["--uci", str(conf)])


def test_commands_reading_a_config_are_the_documented_ones() -> None:
    """General rules name the commands that take --config; the code agrees."""
    general = SECTIONS[""]
    m = re.search(r"read by the commands that take settings:(.*?)\(the tools", general, re.S)
    assert m, "docs/CLI.md General rules: the sentence naming the commands with --config"
    documented = set(re.findall(r"`(\w+)`", m.group(1)))
    assert documented == set(CONFIG_COMMANDS)


@pytest.mark.parametrize("command", [n for n, _ in commands()], ids=lambda n: n or "mptun")
def test_help_renders(command: str) -> None:
    cmd = cli if not command else CMDS[command]
    with click.Context(cmd, info_name=command or "mptun") as ctx:
        text = cmd.get_help(ctx)
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            assert p.opts[0] in text


# ---- what the docs show ---------------------------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "openwrt/README.md"]
DOCS += [ROOT / "vps/README.md"]


def fenced_blocks(path: Path) -> Iterator[tuple[str, str]]:
    """(language, text) of every fenced code block."""
    for m in re.finditer(r"^\s*```(\w*)\n(.*?)^\s*```", path.read_text(), re.S | re.M):
        yield m.group(1), m.group(2)


def doc_command_lines() -> list[tuple[str, str]]:
    """(where, line) for every `mptun ...` command in a shell code block of the docs."""
    out = []
    for path in DOCS:
        where = str(path.relative_to(ROOT))
        if not path.exists():
            continue
        for lang, block in fenced_blocks(path):
            if lang not in ("sh", "shell", "bash", ""):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                words = line.strip().split()
                if words and words[0] in ("mptun", ".venv/bin/mptun", "sudo"):
                    if words[0] == "sudo":
                        words = words[1:]
                    if words and words[0].endswith("mptun"):
                        out.append((where, line.strip()))
    return out


def shell_words(line: str) -> list[str]:
    """The command's own words: up to a redirection, pipe or list operator; no comment."""
    words = []
    for w in shlex.split(line, comments=True):
        if w in (">", ">>", "|", "&&", ";", "||", "&") or w.startswith(">"):
            break
        words.append(w)
    return words


@pytest.mark.parametrize(("where", "line"), doc_command_lines())
def test_doc_command_lines_parse(where: str, line: str, tmp_path: Path) -> None:
    """Every command line the docs show parses: its options exist, its values are valid.

    /etc/mptun is a tmp directory here (the docs create it before writing there)."""
    lexer = shlex.shlex(line.split("#")[0], posix=False)
    lexer.whitespace_split = True
    for token in lexer:
        assert token[:1] in "'\"" or "[" not in token, (
            f"{where}: `{line}`: quote {token} ([...] is a shell glob; zsh refuses it unmatched)"
        )
    etc = tmp_path / "etc-mptun"
    etc.mkdir()
    words = [w.replace("/etc/mptun", str(etc)) for w in shell_words(line)][1:]
    group: list[str] = []
    if words[:1] == ["--log-level"]:
        group, words = words[:2], words[2:]
    assert words, f"{where}: `{line}` names no command"
    command, args = words[0], words[1:]
    assert command in CMDS, f"{where}: `{line}`: no command {command!r}"
    cli.make_context("mptun", [*group, command])
    parse(command, args)


def test_doc_config_examples_parse(tmp_path: Path) -> None:
    """The TOML examples in docs/CLI.md are configs the commands accept."""
    blocks = [b for lang, b in fenced_blocks(CLI_MD) if lang == "toml"]
    assert blocks
    for block in blocks:
        conf = tmp_path / "c.toml"
        conf.write_text(block)
        for table in re.findall(r"^\s*\[(\w+)\]", block, re.M):
            parse(table, ["--config", str(conf)])


def doc_inline_commands() -> list[tuple[str, str]]:
    """(where, text) of inline code spans that start with `mptun COMMAND`."""
    out = []
    for path in DOCS:
        if path.exists():
            for m in re.finditer(r"`(mptun [a-z][^`]*)`", path.read_text()):
                out.append((str(path.relative_to(ROOT)), m.group(1)))
    return out


@pytest.mark.parametrize(("where", "text"), doc_inline_commands())
def test_doc_inline_commands_name_real_options(where: str, text: str) -> None:
    """`mptun nft --mode tproxy` in prose: the command exists and so do the options it names."""
    words = text.split()
    if words[1].startswith("-"):
        return  # `mptun [--log-level ...] COMMAND` (the synopsis)
    command = words[1]
    assert command in CMDS, f"{where}: `{text}`: no command {command!r}"
    cmd = CMDS[command]
    names = {o for p in cmd.params for o in [*getattr(p, "opts", []), *p.secondary_opts]}
    for w in words[2:]:
        opt = w.split("=")[0]
        if re.fullmatch(r"--[a-z0-9-]+", opt):
            assert opt in names | {"--help"}, f"{where}: `{text}`: {command} has no {opt}"
