"""Several servers in every layer: the command line, MPTUN_SERVER, TOML and UCI lists, each
server's own key file; bad values refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mptun.client.servers import Policy, WhenDown
from mptun.commands.client import client, client_settings
from mptun.common.crypto import generate_key, load_key_file
from tests.helpers import ServerProcess, closed_port, run_mptun


@pytest.fixture
def other_key(tmp_path: Path) -> Path:
    p = tmp_path / "other.key"
    p.write_text(generate_key() + "\n")
    p.chmod(0o600)
    return p


def settings(args: list[str], env: dict[str, str] | None = None):
    """The ClientSettings `mptun client ARGS` would run with (click's own parse)."""
    ctx = client.make_context("client", list(args))
    with ctx:
        return client_settings(ctx)


def test_command_line_servers_and_their_keys(key_file: Path, other_key: Path):
    s = settings(
        [
            "--server", "192.0.2.1:8443",
            "--server", f"[2001:db8::1]:8443,key-file={other_key}",
            "--server", "vps3.example.net:443",
            "--key-file", str(key_file),
            "--socks", "127.0.0.1:1080",
            "--server-policy", "lowest-rtt",
            "--when-down", "direct",
            "--server-check-interval", "5",
        ]
    )  # fmt: skip
    assert str(s.server) == "192.0.2.1:8443" and s.psk == load_key_file(str(key_file))
    assert [str(m.address) for m in s.more_servers] == [
        "[2001:db8::1]:8443",
        "vps3.example.net:443",
    ]
    assert s.more_servers[0].psk == load_key_file(str(other_key))
    assert s.more_servers[1].psk == s.psk
    assert s.server_policy is Policy.LOWEST_RTT and s.when_down is WhenDown.DIRECT
    assert s.server_check_interval == 5.0


def test_defaults(key_file: Path):
    s = settings(["--server", "192.0.2.1:8443", "--key-file", str(key_file)])
    assert s.more_servers == () and s.server_policy is Policy.FAILOVER
    assert s.when_down is WhenDown.REJECT and s.server_check_interval == 2.0


def test_every_server_with_its_own_key_needs_no_common_key(key_file: Path, other_key: Path):
    s = settings(
        [
            "--server",
            f"192.0.2.1:1,key-file={key_file}",
            "--server",
            f"192.0.2.2:1,key_file={other_key}",
        ]
    )
    assert s.psk != s.more_servers[0].psk


def test_toml_and_uci_lists(tmp_path: Path, key_file: Path, other_key: Path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        "[client]\n"
        f'server = ["192.0.2.1:8443", "192.0.2.2:8443,key-file={other_key}"]\n'
        f'key-file = "{key_file}"\n'
        'server-policy = "lowest-rtt"\n'
        'when-down = "direct"\n'
        "server-check-interval = 3\n"
    )
    s = settings(["--config", str(toml)])
    assert [str(s.server), str(s.more_servers[0].address)] == ["192.0.2.1:8443", "192.0.2.2:8443"]
    assert s.more_servers[0].psk == load_key_file(str(other_key))
    assert s.server_policy is Policy.LOWEST_RTT and s.when_down is WhenDown.DIRECT
    uci = tmp_path / "mptun"
    uci.write_text(
        "config client 'main'\n"
        "\tlist server '192.0.2.1:8443'\n"
        f"\tlist server '192.0.2.2:8443,key_file={other_key}'\n"
        f"\toption key_file '{key_file}'\n"
        "\toption server_policy 'failover'\n"
        "\toption when_down 'reject'\n"
        "\toption server_check_interval '1.5'\n"
    )
    s = settings(["--uci", str(uci)])
    assert str(s.more_servers[0].address) == "192.0.2.2:8443"
    assert s.more_servers[0].psk == load_key_file(str(other_key))
    assert s.server_check_interval == 1.5 and s.when_down is WhenDown.REJECT


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("192.0.2.1:8443,key=/x", "HOST:PORT,key-file=PATH"),
        ("192.0.2.1:8443,key-file=", "HOST:PORT,key-file=PATH"),
        ("192.0.2.1:8443,", "HOST:PORT,key-file=PATH"),
        ("192.0.2.1,key-file=/x", "expected HOST:PORT"),
        ("192.0.2.1:8443,key-file=/no/such/file", "/no/such/file"),
    ],
)
def test_bad_server_values_fail_in_one_line(key_file: Path, value: str, says: str):
    r = run_mptun(
        "client", "--server", value, "--key-file", str(key_file), "--socks", "127.0.0.1:0"
    )
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_server_twice_is_refused(key_file: Path):
    r = run_mptun(
        "client", "--server", "192.0.2.1:1", "--server", "192.0.2.1:1",
        "--key-file", str(key_file), "--socks", "127.0.0.1:0",
    )  # fmt: skip
    assert r.returncode == 2 and "given twice" in r.stderr, r.stderr


def test_env_var_lists_servers(key_file: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPTUN_SERVER", "192.0.2.1:1 192.0.2.2:2")
        s = settings(["--key-file", str(key_file)])
    assert [str(s.server), str(s.more_servers[0].address)] == ["192.0.2.1:1", "192.0.2.2:2"]


def test_check_checks_every_server(tmp_path: Path, key_file: Path, other_key: Path):
    """`--check` with two servers: a line each; the status is the first failure's."""
    with (
        ServerProcess(tmp_path, key_file, stats=False) as good,
        ServerProcess(tmp_path, other_key, stats=False) as own_key,
        closed_port() as closed,
    ):
        ok = f"127.0.0.1:{good.port}"
        mine = f"127.0.0.1:{own_key.port},key-file={other_key}"
        r = run_mptun(
            "client", "--server", ok, "--server", mine, "--key-file", str(key_file), "--check"
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("key, cipher and clock accepted") == 2, r.stdout
        down = f"127.0.0.1:{closed}"
        r = run_mptun(
            "client", "--server", ok, "--server", down, "--key-file", str(key_file), "--check"
        )
        assert r.returncode == 3, r.stdout + r.stderr
        assert "accepted" in r.stdout and "cannot reach" in r.stderr
