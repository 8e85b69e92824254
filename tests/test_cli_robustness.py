"""Bad input at every door: every option of every command, on the command line, in the
environment, in a TOML config and in UCI, gets one `mptun: error:` line naming the option, exit
status 2 and no traceback.

The bad values come from each option's type (wrong type, out of range, empty, huge, nan, a
directory where a file goes, a directory that does not exist), so a new option is swept without
editing this file. Each command runs with otherwise valid arguments that make it stop at once
if a bad value were accepted (`bench --list`, `uplinks --dry-run`, `demo` as an unprivileged
user); one that has not exited after a few seconds counts as a failure and is killed.

The sweep's ~900 invocations are forked from pre-imported interpreters (tests/cli_zygote.py:
real processes and exit statuses, in a network namespace of their own when root); the file and
usage cases run as `python -m mptun`, and one test checks the two ways give the same result.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest

from mptun.cli import cli
from mptun.commands.options import HostPort, OutputFile, Text, env
from mptun.common.crypto import generate_key
from tests.cli_zygote import Zygote

CMDS = cli.all_commands()  # every command, imported
TIMEOUT = 8.0  # a case that has not exited by now accepted its bad value
WORKERS = 3
IS_ROOT = os.geteuid() == 0
CAN_UNSHARE = IS_ROOT and shutil.which("unshare") is not None
CAN_DROP = IS_ROOT and shutil.which("setpriv") is not None


@dataclass
class Case:
    """One invocation and what its single error line must name."""

    args: list[str]
    names: list[str]  # the line must contain one of these
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # run as this user (root only)
    code: int = 2

    def label(self) -> str:
        envs = " ".join(f"{k}={v!r}" for k, v in self.env.items())
        who = f"[as {self.user}] " if self.user else ""
        return f"{who}{envs} mptun {' '.join(self.args)}".strip()


def clean_environ(extra: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MPTUN_")}, **extra}


def python_m(case: Case) -> tuple[int | str, str]:
    """(exit status or "timeout", stderr) of `python -m mptun ARGS` as its own process."""
    prefix = []
    if case.user:
        prefix = ["setpriv", f"--reuid={case.user}", "--regid=nogroup", "--clear-groups"]
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "mptun", *case.args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_environ(case.env),
        start_new_session=True,  # a bad value that starts bench or a server: kill it all
    )
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", ""
    return proc.returncode, err.decode(errors="replace")


def judge(case: Case, status: int | str, text: str) -> str | None:
    """None when the case held; else what went wrong."""
    if status == "timeout":
        return f"{case.label()}: still running after {TIMEOUT} s (the bad value was accepted)"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    problems = []
    if status != case.code:
        problems.append(f"exit {status}, not {case.code}")
    if "Traceback" in text or "internal error" in text:
        problems.append("a traceback / internal error")
    if len(lines) != 1 or not lines[0].startswith("mptun: error: "):
        problems.append("not exactly one `mptun: error:` line")
    elif not any(n.lower() in lines[0].lower() for n in case.names):
        problems.append(f"the line names none of {case.names}")
    if problems:
        return f"{case.label()}: {'; '.join(problems)}:\n    " + "\n    ".join(lines[:5])
    return None


def check_all(cases: list[Case], run) -> None:
    """Run every case (a few at a time) and report all failures at once."""
    assert cases
    with ThreadPoolExecutor(WORKERS) as pool:
        failures = [f for f in pool.map(lambda c: judge(c, *run(c)), cases) if f]
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def run_all(cases: list[Case]) -> None:
    """As `python -m mptun`, one process each."""
    check_all(cases, python_m)


@pytest.fixture(scope="module")
def zygotes() -> Iterator[queue.Queue]:
    pool: queue.Queue = queue.Queue()
    started = [Zygote(private_netns=CAN_UNSHARE) for _ in range(WORKERS)]
    for z in started:
        pool.put(z)
    yield pool
    for z in started:
        z.close()


@pytest.fixture
def sweep(zygotes: queue.Queue):
    """Run cases forked from the pre-imported interpreters."""

    def run(case: Case) -> tuple[int | str, str]:
        z = zygotes.get()
        try:
            return z.run(case.args, clean_environ(case.env), TIMEOUT, case.user)
        finally:
            zygotes.put(z)

    return lambda cases: check_all(cases, run)


# ---- the commands and their bad values ---------------------------------------------------


def long_name(p: click.Parameter) -> str:
    return next(o for o in p.opts if o.startswith("--"))[2:]


# How an error names an option, when not by its long name.
ALSO_NAMED = {"key-file": ["key file"], "cases": ["unknown case"]}


def names(p: click.Option) -> list[str]:
    """What an error about this option may call it."""
    return [long_name(p), *ALSO_NAMED.get(long_name(p), [])]


def options(command: str) -> list[click.Option]:
    cmd = cli if not command else CMDS[command]
    return [
        p
        for p in cmd.params
        if isinstance(p, click.Option) and long_name(p) not in ("help", "version")
    ]


# Plain strings whose values the command checks (in its type or before doing anything).
STRING_BAD = {
    "allow-target": ["nonsense", "", "10.0.0.0/33"],
    "bypass": ["nonsense", ""],
    "bypass-source": ["nonsense", ""],
    "bypass-udp-port": ["", "0", "70000", "9-3", "x"],
    "lan": ["", 'br"lan', "x" * 40],
    "server": ["", "not a host!", "192.0.2.1:99999"],
    "gateway": ["bad", "lo=notanip"],
    "backup": ["eth9"],
    "table": ["", "a b; flush ruleset"],
    "cases": ["nope"],
    "rates": ["abc", "0", "1,2,3,4", "nan"],
    "quotas": ["abc", "5", "101", "nan", "", "10,,20"],
    "prefix": ["x" * 17, "\\q", "\\x1", "\\", "\u00e9"],
    "uplink-hook": ["", "/no/such/program wan", "'unclosed"],
}


def bad_values(p: click.Option, tmp: Path) -> list[str]:
    """Values of the option's type that must be refused (as command-line strings)."""
    t = p.type
    if p.is_flag:
        return ["maybe", "2"]
    if isinstance(t, click.Choice):
        return ["bogus", "", str(t.choices[0]).upper()]
    if isinstance(t, click.types.IntParamType):
        out = ["abc", "", "1.5", "1" + "0" * 30]
        if isinstance(t, click.IntRange) and t.min is not None:
            out.append(str(t.min - 1))
        if isinstance(t, click.IntRange) and t.max is not None:
            out.append(str(t.max + 1))
        return out
    if isinstance(t, click.types.FloatParamType):
        out = ["abc", "", "nan", "inf", "1e999"]
        if isinstance(t, click.FloatRange) and t.min is not None:
            out.append(str(t.min - 0.5))
        return out
    if isinstance(t, HostPort):
        out = ["", "[::1]:99999", "[zz]:1", "a:b:c", "x" * 300 + ":1"]
        if not t.any_port:  # a TCP listener takes port 0 (the kernel picks one)
            out.append("127.0.0.1:0")
        return out if t.default_port else [*out, "nohost"]  # "nohost" is nohost:53 there
    if t.name == "local=target":
        return ["", "x", "127.0.0.1:1=", "host.example:1=host:2", "127.0.0.1:1=h:0"]
    if isinstance(t, OutputFile):
        return ["", str(tmp), str(tmp / "no-such-dir" / "f")]
    if isinstance(t, click.Path):  # files mptun reads
        return [str(tmp), str(tmp / "no-such-file")]
    if isinstance(t, Text):
        return ["", "u" * 256]
    if t.name == "control":
        return ["", "@", "@" + "x" * 200, str(tmp), str(tmp / "no-such-dir" / "s")]
    return STRING_BAD.get(long_name(p), [])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("robust")
    key = tmp / "key"
    key.write_text(generate_key() + "\n")
    key.chmod(0o600)
    return {"tmp": tmp, "key": key}


def base_args(command: str, files: dict[str, Path], but: str) -> tuple[list[str], str | None]:
    """(arguments, user to run as) that make `command` valid and quick, without option `but`.

    A bad value that got through then shows: `bench --list` and `nft` print and exit 0, a server
    or client keeps running, `uplinks --dry-run lo` prints its plan, `demo` as nobody explains
    that it needs root (several lines)."""
    key = str(files["key"])
    base: dict[str, list[str]] = {
        "": [],
        "genkey": ["--output", str(files["tmp"] / f"new-{os.urandom(4).hex()}")],
        "server": ["--listen", "127.0.0.1:0", "--key-file", key],
        "client": ["--server", "127.0.0.1:1", "--key-file", key, "--socks",
                   "127.0.0.1:0", "--control", "none"],
        "nft": ["--server", "192.0.2.1", "--port", "1234"],
        # --cases is checked before anything runs, but after --list (which lists them all)
        "bench": [] if but == "cases" else ["--list"],
        "uplinks": ["--dry-run"],
        "status": ["--control", "@mptun-robustness-nobody-listens"],
        "demo": [],
    }[command]  # fmt: skip
    out: list[str] = []
    i = 0
    while i < len(base):  # drop the option under test (and its value)
        if base[i] == f"--{but}":
            i += 1 if base[i] in ("--list", "--dry-run") else 2
            continue
        out.append(base[i])
        i += 1
    if command == "uplinks":
        out.append("lo")  # the loopback of the zygotes' own network namespace
    return out, "nobody" if command == "demo" and IS_ROOT else None


COMMANDS = ["", *sorted(CMDS)]


def skip_unsafe(command: str) -> None:
    """As root, `uplinks` could change this machine's routing if a bad value got through."""
    if command == "uplinks" and IS_ROOT and not CAN_UNSHARE:
        pytest.skip("uplinks as root needs `unshare` to run in a namespace of its own")


def cli_args(command: str, args: list[str]) -> list[str]:
    return [*args, "genkey"] if not command else [command, *args]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "mptun")
def test_bad_values_on_the_command_line(command: str, files: dict[str, Path], sweep) -> None:
    skip_unsafe(command)
    cases = []
    for p in options(command):
        if p.is_flag:
            continue  # a flag takes no value on the command line
        name = long_name(p)
        for bad in bad_values(p, files["tmp"]):
            args, user = base_args(command, files, name)
            cases.append(Case(cli_args(command, [*args, f"--{name}", bad]), names(p), user=user))
    if not cases:
        pytest.skip(f"{command or 'mptun'} has no option that takes a value")
    sweep(cases)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "mptun")
def test_bad_values_from_the_environment(command: str, files: dict[str, Path], sweep) -> None:
    """Every bad value (but empty: click reads an empty variable as unset); the error names
    the variable when click checked the value, the option when the command did."""
    skip_unsafe(command)
    cases = []
    for p in options(command):
        name = long_name(p)
        for bad in [v for v in bad_values(p, files["tmp"]) if v]:
            args, user = base_args(command, files, name)
            named = [env(name), *names(p)]
            cases.append(Case(cli_args(command, args), named, env={env(name): bad}, user=user))
    if not cases:
        pytest.skip(f"{command or 'mptun'} has no options")
    sweep(cases)


def toml_bad(p: click.Option) -> list[str]:
    """TOML values of a wrong kind for the option: a table, a date, a number or boolean where
    it makes no sense, an array for a single value."""
    out = ["{ a = 1 }", "1979-05-27", "[[1]]" if p.multiple else "[]"]
    if p.is_flag:
        out += ["1", "0.5"]
    elif isinstance(p.type, click.types.IntParamType | click.types.FloatParamType):
        out += ["true"]
    else:
        out += ["5", "true", "1e3"]
    return out


def config_commands(kind: str) -> list[str]:
    return [c for c in sorted(CMDS) if any(p.name == kind for p in CMDS[c].params)]


@pytest.mark.parametrize("command", config_commands("config"))
def test_bad_values_in_a_toml_config(command: str, files: dict[str, Path], sweep) -> None:
    """Wrong kinds (named with file, table and key) and every bad value as a TOML string."""
    skip_unsafe(command)
    tmp = files["tmp"]
    cases = []
    for p in options(command):
        name = long_name(p)
        if name in ("config", "uci"):
            continue
        kinds = [(v, [f"[{command}] {name}: "]) for v in toml_bad(p)]
        values = [(json.dumps(v), names(p)) for v in bad_values(p, tmp) if not p.is_flag]
        for i, (value, named) in enumerate(kinds + values):
            conf = tmp / f"{command}-{name}-{i}.toml"
            conf.write_text(f"[{command}]\n{name} = {value}\n")
            args, user = base_args(command, files, name)
            cases.append(Case([command, "--config", str(conf), *args], named, user=user))
    sweep(cases)


@pytest.mark.parametrize("command", config_commands("uci"))
def test_bad_values_in_uci(command: str, files: dict[str, Path], sweep) -> None:
    """Every bad value as a UCI option (but empty, which removes an option in UCI, as
    `uci set x=''` does), flags' non-booleans, and a `list` for a single value."""
    skip_unsafe(command)
    tmp = files["tmp"]
    cases = []
    for p in options(command):
        name = long_name(p)
        if name in ("config", "uci"):
            continue
        key = name.replace("-", "_")
        lines = [f"\toption {key} '{v}'" for v in bad_values(p, tmp) if v and "'" not in v]
        if not p.multiple:
            lines.append(f"\tlist {key} 'a'")
        for i, line in enumerate(lines):
            conf = tmp / f"{command}-{name}-{i}.uci"
            conf.write_text(f"config {command} 'main'\n{line}\n")
            args, user = base_args(command, files, name)
            named = [f"{conf}:2: {key}", *names(p)]
            cases.append(Case([command, "--uci", str(conf), *args], named, user=user))
    sweep(cases)


def test_the_sweep_sees_what_python_m_sees(files: dict[str, Path], sweep, zygotes) -> None:
    """A forked invocation gives the exit status and stderr `python -m mptun` gives."""
    port = "127.0.0.1:0"
    cases = [
        Case(["server", "--listen", port, "--max-connections", "0"], ["max-connections"]),
        Case(["server", "--listen", port], ["MPTUN_KEY"], env={"MPTUN_KEY": "garbage"}),
        Case(["client", "--server", "a:1", "--control", ""], ["control"]),
        Case(["nft", "--server", "192.0.2.1", "--port", "1", "--lan", ""], ["lan"]),
        Case(["--log-level", "loud", "genkey"], ["log-level"]),
    ]
    z = zygotes.get()
    try:
        for case in cases:
            forked = z.run(case.args, clean_environ(case.env), TIMEOUT)
            assert forked == python_m(case), case.label()
            assert judge(case, *forked) is None, judge(case, *forked)
    finally:
        zygotes.put(z)


# ---- files: malformed, unreadable, directories ------------------------------------------

MALFORMED_TOML = [
    "[server\n",
    "listen = \n",
    '[server]\nlisten = "a"\nlisten = "b"\n',
    "server = 5\n",
    "\x00\x01\x02",
    "[server]\nkey = 'unterminated\n",
]
MALFORMED_UCI = [
    "option server 'x'\n",
    "config client 'main'\n\toption server 'unterminated\n",
    "config 'client'\n\toption 'bad name' x\n",
    "config client\n\toption server a b\n",
    "config client main\nconfig client second\n",
    "config client\n\tfrobnicate x\n",
]


def test_malformed_config_files(files: dict[str, Path]) -> None:
    tmp = files["tmp"]
    cases = []
    for i, text in enumerate(MALFORMED_TOML):
        conf = tmp / f"malformed-{i}.toml"
        conf.write_text(text)
        args, _ = base_args("server", files, "")
        cases.append(Case(["server", "--config", str(conf), *args], [str(conf)]))
    for i, text in enumerate(MALFORMED_UCI):
        conf = tmp / f"malformed-{i}.uci"
        conf.write_text(text)
        args, _ = base_args("client", files, "")
        cases.append(Case(["client", "--uci", str(conf), *args], [str(conf)]))
        cases.append(Case(["uci", str(conf)], [str(conf)]))
    binary = tmp / "binary"
    binary.write_bytes(bytes(range(256)) * 4)
    for command, flag in [("server", "--config"), ("client", "--uci"), ("nft", "--uci")]:
        args, _ = base_args(command, files, "")
        cases.append(Case([command, flag, str(binary), *args], [str(binary)]))
        cases.append(Case([command, flag, str(tmp), *args], [flag]))
        cases.append(Case([command, flag, str(tmp / "nope"), *args], [str(tmp / "nope")]))
    cases.append(Case(["uci", str(binary)], [str(binary)]))
    cases.append(Case(["uci", str(tmp)], [str(tmp)]))
    cases.append(Case(["uci", str(tmp / "nope")], [str(tmp / "nope")]))
    run_all(cases)


def test_bad_keys_are_one_line_and_never_echoed(files: dict[str, Path]) -> None:
    """Malformed key files and MPTUN_KEY values: one line, and no key material in it."""
    tmp = files["tmp"]
    good = generate_key()
    bad_keys = {
        "empty": b"",
        "newline": b"\n",
        "not-base64": b"not base64!!\n",
        "short": base64.b64encode(b"short") + b"\n",
        "long": base64.b64encode(os.urandom(64)) + b"\n",
        "two-lines": (good + "\n" + good + "\n").encode(),
        "binary": os.urandom(64),
        "huge": b"A" * (8 << 20),
        "world-readable": (good + "\n").encode(),
    }
    cases = []
    for name, content in bad_keys.items():
        p = tmp / f"key-{name}"
        p.write_bytes(content)
        p.chmod(0o644 if name == "world-readable" else 0o600)
        for command in ("server", "client"):
            args, _ = base_args(command, files, "key-file")
            cases.append(Case([command, *args, "--key-file", str(p)], ["key"]))
    for value in ["garbage", base64.b64encode(b"short").decode(), " "]:
        for command in ("server", "client"):
            args, _ = base_args(command, files, "key-file")
            cases.append(Case([command, *args], ["MPTUN_KEY"], env={"MPTUN_KEY": value}))
    run_all(cases)
    for name in ("world-readable", "two-lines", "long"):
        args, _ = base_args("server", files, "key-file")
        status, err = python_m(Case(["server", *args, "--key-file", str(tmp / f"key-{name}")], []))
        assert status == 2
        assert good not in err and good[:16] not in err, f"{name}: the key is in the error"


@pytest.mark.skipif(not CAN_DROP, reason="needs root and setpriv to test as an unprivileged user")
def test_unreadable_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Files and directories the user may not use: one line naming them (run as nobody)."""
    shared = Path(tempfile.mkdtemp(prefix="mptun-unreadable-"))
    try:
        shared.chmod(0o755)
        key, conf, uci_file = shared / "key", shared / "c.toml", shared / "mptun"
        readable_key = shared / "key-nobody"
        key.write_text(generate_key() + "\n")
        readable_key.write_text(generate_key() + "\n")
        shutil.chown(readable_key, "nobody")
        readable_key.chmod(0o600)
        conf.write_text('[server]\nlisten = "127.0.0.1:1"\n')
        uci_file.write_text("config client\n")
        for f in (key, conf, uci_file):
            f.chmod(0o000)
        closed = shared / "root-only"
        closed.mkdir(mode=0o700)
        port = "127.0.0.1:0"
        cases = [
            Case(["server", "--listen", port, "--key-file", str(key)], [str(key)]),
            Case(["server", "--listen", port, "--config", str(conf)], [str(conf)]),
            Case(["client", "--uci", str(uci_file)], [str(uci_file)]),
            Case(["uci", str(uci_file)], [str(uci_file)]),
            Case(["genkey", "-o", str(closed / "k")], [str(closed)]),
            Case(["server", "--listen", port, "--key-file", str(readable_key), "--stats-file",
                  str(closed / "stats.json")], [str(closed)]),
            Case(["server", "--listen", port, "--key-file", str(readable_key), "--replay-file",
                  str(closed / "replay")], [str(closed)]),
        ]  # fmt: skip
        for c in cases:
            c.user = "nobody"
        run_all(cases)
    finally:
        shutil.rmtree(shared)


def test_usage_errors() -> None:
    """Unknown commands and options, missing values and arguments: one line each."""
    cases = [
        Case(["frobnicate"], ["frobnicate"]),
        Case(["server", "--bogus"], ["--bogus"]),
        Case(["server", "--listen"], ["--listen"]),
        Case(["server"], ["--listen", "MPTUN_LISTEN"]),
        Case(["client", "--socks", "127.0.0.1:1"], ["--server"]),
        Case(["nft", "--server", "192.0.2.1"], ["--port"]),
        Case(["genkey", "extra"], ["extra"]),
        Case(["uci"], ["FILE"]),
        Case(["--log-level"], ["--log-level"]),
        Case(["server", "--log-level", "debug"], ["goes before the command"]),
        Case(["status", "--json", "extra"], ["extra"]),
    ]
    run_all(cases)
