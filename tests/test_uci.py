"""The UCI parser on real OpenWrt syntax, and `--uci` mapping onto the same keys as TOML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from mptun import uci
from mptun.commands.client import client
from mptun.commands.options import uci_defaults
from mptun.common.errors import ConfigError
from tests.helpers import ROOT

# Shapes taken from stock OpenWrt files (/etc/config/network, firewall, dhcp): tabs, both
# quotes, unquoted words, anonymous and named sections, lists, comments.
OPENWRT_STYLE = """\
package network

config interface 'loopback'
\toption device 'lo'
\toption proto 'static'
\toption ipaddr '127.0.0.1'
\toption netmask '255.0.0.0'

config globals 'globals'
\toption ula_prefix 'fd12:3456:789a::/48'

config device
\toption name 'br-lan'
\toption type 'bridge'
\tlist ports 'lan1'
\tlist ports 'lan2'

# the WAN
config interface wan
\toption device eth1   # unquoted, trailing comment
\toption proto "dhcp"

config rule
\toption name 'Allow-DHCP-Renew'
\toption src		'wan'
\toption target 'ACCEPT'
"""


def test_openwrt_shapes() -> None:
    pkg = uci.parses(OPENWRT_STYLE, "network")
    assert [s.label for s in pkg.sections] == [
        "loopback",
        "globals",
        "@device[0]",
        "wan",
        "@rule[0]",
    ]
    assert pkg.section("loopback").get("ipaddr") == "127.0.0.1"
    dev = pkg.of_type("device")[0]
    assert dev.name is None
    assert dev.get_list("ports") == ["lan1", "lan2"]
    assert dev.options["ports"].is_list
    wan = pkg.section("wan")
    assert wan.get("device") == "eth1"
    assert wan.get("proto") == "dhcp"
    assert wan.options["proto"].line == 21
    assert pkg.of_type("rule")[0].get("src") == "wan"


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("option v 'single quoted'", "single quoted"),
        ('option v "double quoted"', "double quoted"),
        ("option v unquoted", "unquoted"),
        ("option v 'it'\\''s'", "it's"),  # the shell idiom `uci export` writes
        ('option v "a \\"b\\" c"', 'a "b" c'),
        ('option v "back\\\\slash"', "back\\slash"),
        ("option v 'no \\escape'", "no \\escape"),  # single quotes are literal
        ("option v a'b c'd", "ab cd"),  # adjacent parts join
        ("option v '#not a comment'", "#not a comment"),
        ("option v x#comment", "x"),
        ("option v ''", None),  # empty removes, as `uci set x.y.v=''`
        ("o v short", "short"),
        ("option v 'x'; option w 'y'", "x"),
        ("  \toption   v   spaced  ", "spaced"),
        ("option v 'ünïcödé'", "ünïcödé"),
    ],
)
def test_values(line: str, value: str | None) -> None:
    pkg = uci.parses(f"config t 's'\n{line}\n")
    assert pkg.sections[0].get("v") == value


def test_semicolons_and_short_commands() -> None:
    pkg = uci.parses("c t 'a'; o x 1; l y 2; l y 3\nc t; o x 4\n")
    a, b = pkg.sections
    assert (a.get("x"), a.get_list("y")) == ("1", ["2", "3"])
    assert (b.name, b.get("x")) == (None, "4")


def test_multiline_and_continuation() -> None:
    text = (
        "config t 's'\noption a 'one\ntwo'\noption b \"x\\\ny\"\noption c \\\n  cont\noption d ok\n"
    )
    sec = uci.parses(text).sections[0]
    assert sec.get("a") == "one\ntwo"
    assert sec.get("b") == "xy"
    assert sec.get("c") == "cont"
    assert sec.options["d"].line == 8  # lines count through quotes and continuations


def test_crlf_and_no_final_newline() -> None:
    sec = uci.parses("config t 's'\r\n\toption a 'b'\r\n\toption c d").sections[0]
    assert (sec.get("a"), sec.get("c")) == ("b", "d")


def test_reopened_section_merges_and_list_after_option() -> None:
    pkg = uci.parses(
        "config t 'x'\n option a 1\n option l first\nconfig u\nconfig t 'x'\n option a 2\n"
        " list l second\n"
    )
    assert [s.label for s in pkg.sections] == ["x", "@u[0]"]
    x = pkg.section("x")
    assert x.get("a") == "2"
    assert x.get_list("l") == ["first", "second"]  # libuci turns the option into a list


def test_enabled_convention() -> None:
    pkg = uci.parses("config t\nconfig t\n option enabled 0\nconfig t\n option disabled yes\n")
    assert [s.enabled for s in pkg.sections] == [True, False, False]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("option a b\n", "f:1: option before the first 'config' line"),
        ("config t\nfoo bar\n", "f:2: unknown command 'foo'"),
        ("config t\noption a 'open\n\n", "f:2: unterminated ' (end of file reached)"),
        ('config t\n\noption a "open\n', 'f:3: unterminated " (end of file reached)'),
        ("config\n", "f:1: config needs a type"),
        ("config t\noption\n", "f:2: option needs a name"),
        ("config t 'bad-name'\n", "f:1: invalid section name 'bad-name'"),
        ("config t\noption bad.name x\n", "f:2: invalid option name 'bad.name'"),
        ("config t\noption a b c\n", "f:2: too many arguments to option: 'c'"),
        ("config t x y\n", "f:1: too many arguments to config: 'y'"),
        ("config a 'x'\nconfig b 'x'\n", "f:2: section 'x' reopened as type 'b'"),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(uci.UciError) as e:
        uci.parses(text, "f")
    assert str(e.value).startswith(message)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(uci.UciError, match="no such file"):
        uci.load(tmp_path / "missing")
    with pytest.raises(uci.UciError, match="is a directory"):
        uci.load(tmp_path)
    bad = tmp_path / "latin1"
    bad.write_bytes(b"config t\noption a '\xe9'\n")
    with pytest.raises(uci.UciError, match="not UTF-8"):
        uci.load(bad)


def test_bool_words() -> None:
    for word in ("1", "yes", "on", "true", "enabled", "TRUE"):
        assert uci.parse_bool(word, "x") is True
    for word in ("0", "no", "off", "false", "disabled"):
        assert uci.parse_bool(word, "x") is False
    with pytest.raises(ConfigError, match="x: '2' is not a boolean"):
        uci.parse_bool("2", "x")


def _client_defaults(text: str) -> dict:
    ctx = click.Context(client, info_name="client")
    return uci_defaults(ctx, uci.parses(text, "mptun"))


def test_uci_maps_to_toml_keys(tmp_path: Path) -> None:
    """The UCI section and the TOML table give click the same default_map."""
    text = (
        "config client 'main'\n"
        " option enabled 1\n"
        " option server 'vps.example.net:8443'\n"
        " option key_file '/etc/mptun/key'\n"
        " option socks '127.0.0.1:1080'\n"
        " option max_connections '512'\n"
        " option idle_timeout '300'\n"
        "config uplink\n option interface wan\n"
    )
    toml = tmp_path / "c.toml"
    toml.write_text(
        '[client]\nserver = "vps.example.net:8443"\nkey-file = "/etc/mptun/key"\n'
        'socks = "127.0.0.1:1080"\nmax-connections = "512"\nidle-timeout = "300"\n'
    )
    ctx = click.Context(client, info_name="client")
    config = next(p for p in client.params if p.name == "config")
    config.process_value(ctx, str(toml))  # the eager --config callback
    assert ctx.default_map == _client_defaults(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config client\n option sever x\n", "mptun:2: unknown key 'sever' in config client"),
        ("config client\n option relay fast\n", "mptun:2: relay: 'fast' is not one of"),
        ("config client\n option max_connections many\n", "mptun:2: max_connections: 'many'"),
        ("config client\n option server 'no-port'\n", "mptun:2: server: "),
        ("config client\n list relay 'splice'\n", "mptun:2: relay takes one value"),
        ("config client\n option enabled maybe\n", "mptun:2: enabled: 'maybe' is not a boolean"),
        ("config client\nconfig client 'b'\n", "mptun:2: a second 'config client' section (b)"),
        ("config client\n option key 'c2VjcmV0'\n", "mptun:2: unknown key 'key'"),
    ],
)
def test_bad_values(text: str, message: str) -> None:
    with pytest.raises(click.BadParameter) as e:
        _client_defaults(text)
    assert e.value.message.startswith(message), e.value.message


def run_mptun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mptun", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "mptun"
    conf.write_text("config client 'main'\n\toption socks 'lan.example:1080'\n")
    r = run_mptun("client", "--uci", str(conf))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert f"{conf}:2: socks:" in r.stderr
    toml = tmp_path / "c.toml"
    toml.write_text("[client]\n")
    conf.write_text("config client 'main'\n\toption socks '127.0.0.1:1080'\n")
    r = run_mptun("client", "--uci", str(conf), "--config", str(toml))
    assert r.returncode == 2 and "not both" in r.stderr


def test_command_line_beats_uci(tmp_path: Path, key_file: Path) -> None:
    """Precedence is unchanged: a command-line value overrides the UCI one (here a bad one)."""
    conf = tmp_path / "mptun"
    conf.write_text(
        f"config client\n option server '127.0.0.1:9'\n option key_file '{key_file}'\n"
        " option socks '127.0.0.1:1'\n option cipher 'aes-256-gcm'\n"
    )
    r = run_mptun("client", "--uci", str(conf), "--cipher", "nope")
    assert r.returncode == 2 and "'nope' is not one of" in r.stderr


def test_uci_command_checks_and_queries(tmp_path: Path) -> None:
    conf = tmp_path / "mptun"
    conf.write_text(
        "config client 'main'\n option server 'vps.example.net:8443'\n"
        "config uplink 'wan'\n option interface 'wan'\n"
        "config uplink\n option interface 'wwan'\n"
        "config uplink\n option interface 'lte'\n option enabled '0'\n"
    )
    r = run_mptun("uci", str(conf))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "client main",
        "uplink wan",
        "uplink @uplink[1]",
        "uplink @uplink[2] (disabled)",
    ]
    r = run_mptun("uci", str(conf), "uplink", "interface")
    assert r.stdout.splitlines() == ["wan", "wwan"]
    r = run_mptun("uci", str(conf), "uplink")
    assert r.stdout.splitlines() == ["wan", "@uplink[1]"]
    r = run_mptun("uci", str(conf), "client")
    assert r.stdout.splitlines() == ["main"]
    conf.write_text(
        conf.read_text().replace("'vps.example.net:8443'\n", "x:1\n option enabled 0\n")
    )
    assert run_mptun("uci", str(conf), "client").stdout == ""
    conf.write_text("config uplink\n option device eth1\n")
    r = run_mptun("uci", str(conf))
    assert r.returncode == 2 and f"{conf}:2: unknown key 'device' in config uplink" in r.stderr
    conf.write_text("config uplink 'x'\n option enabled 1\n")
    r = run_mptun("uci", str(conf))
    assert r.returncode == 2 and "needs `option interface`" in r.stderr
    conf.write_text("config tunnel\n")
    r = run_mptun("uci", str(conf))
    assert r.returncode == 2 and "unknown section type 'tunnel'" in r.stderr


def test_shipped_openwrt_config_is_valid() -> None:
    """The /etc/config/mptun the package installs passes the same checks the service runs."""
    conf = ROOT / "openwrt" / "net" / "mptun" / "files" / "mptun.config"
    r = run_mptun("uci", str(conf))
    assert r.returncode == 0, r.stderr
    assert "client main" in r.stdout


SHELL_READ = """\
config client 'off'
\toption enabled '0'
\toption server 'a.example:1'

config client
\toption server 'b.example:1'

config uplink 'wan'
\toption interface 'wan'

config uplink
\toption interface 'wwan'
\toption disabled '0'

config uplink 'lte'
\toption interface 'lte'
\toption enabled 'no'

config uplink
\toption interface 'wan6'
"""


def test_shell_reads_what_mptun_uci_reads(tmp_path: Path) -> None:
    """The service scripts' shell questions (mptun.sh over config_load/config_get) get the
    answers `mptun uci` gives for the same file: the enabled uplinks, the enabled client."""
    shim = ROOT / "tests" / "openwrt_shim" / "lib" / "functions.sh"
    lib = ROOT / "openwrt" / "net" / "mptun" / "files" / "mptun.sh"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "functions.sh").write_bytes(shim.read_bytes())
    (tmp_path / "etc" / "config").mkdir(parents=True)
    conf = tmp_path / "etc" / "config" / "mptun"
    conf.write_text(SHELL_READ)
    script = f'. "$MPTUN_ROOT/lib/functions.sh"; . "{lib}"; config_load mptun; '
    shell = subprocess.run(
        [
            "/bin/sh",
            "-c",
            script + 'mptun_uplink_interfaces; echo --; config_get s "$(mptun_client_section)" '
            'server; echo "$s"',
        ],
        env={"MPTUN_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shell.returncode == 0, shell.stderr
    uplinks, client_server = shell.stdout.split("--\n")

    def mptun_uci(*args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "mptun", "uci", str(conf), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert uplinks == mptun_uci("uplink", "interface") == "wan\nwwan\nwan6\n"
    # the first enabled client: the anonymous second section, as `mptun uci` finds it too
    assert client_server == "b.example:1\n"
    assert mptun_uci("client") == "@client[1]\n"
