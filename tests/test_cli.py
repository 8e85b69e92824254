"""The command line: keys, errors as one line (never a traceback), option precedence."""

from __future__ import annotations

import base64
import socket
import subprocess
from pathlib import Path

import pytest

from mptun.common.address import Address
from mptun.lab.wait import ReservedPort
from tests.helpers import MptunProcess
from tests.helpers import run_mptun as mptun


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str, code: int = 2) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mptun: error:"), lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def test_genkey_prints_one_base64_line_of_32_bytes():
    r = mptun("genkey")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    assert len(base64.b64decode(lines[0], validate=True)) == 32
    assert mptun("genkey").stdout != r.stdout


def test_genkey_output_file_is_private_and_never_overwritten(tmp_path: Path):
    p = tmp_path / "k"
    assert mptun("genkey", "-o", str(p)).returncode == 0
    assert p.stat().st_mode & 0o777 == 0o600
    before = p.read_text()
    assert_one_line_error(mptun("genkey", "-o", str(p)), "exists", code=1)
    assert p.read_text() == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["server", "--listen", "nonsense"], ["--listen"]),
        (["server", "--listen", "127.0.0.1:99999"], ["port"]),
        (["server", "--listen", "example.com:80"], ["IP address"]),
        (["server"], ["--listen"]),
        (["server", "--listen", "127.0.0.1:1", "--cipher", "rot13"], ["rot13"]),
        (["client", "--socks", "127.0.0.1:1080"], ["--server"]),
        (["server", "--bogus"], ["--bogus"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_bad_options(args, words):
    assert_one_line_error(mptun(*args), *words)


@pytest.mark.parametrize(
    ("content", "mode", "words"),
    [
        ("not base64!!\n", 0o600, ["base64"]),
        (base64.b64encode(b"short").decode(), 0o600, ["5 bytes"]),
        (base64.b64encode(bytes(32)).decode(), 0o644, ["readable by other users", "chmod 600"]),
    ],
)
def test_bad_key_files(tmp_path: Path, content, mode, words):
    p = tmp_path / "key"
    p.write_text(content)
    p.chmod(mode)
    r = mptun("server", "--listen", "127.0.0.1:0", "--key-file", str(p))
    assert_one_line_error(r, *words)
    assert content.strip() not in r.stderr  # never echo key material


def test_missing_key(tmp_path: Path):
    r = mptun("server", "--listen", "127.0.0.1:1", "--key-file", str(tmp_path / "nope"))
    assert_one_line_error(r, "no such file")
    r = mptun("server", "--listen", "127.0.0.1:1")
    assert_one_line_error(r, "no key")


def test_port_in_use(key_file: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = mptun("server", "--listen", f"127.0.0.1:{port}", "--key-file", str(key_file))
        assert_one_line_error(r, "address already in use", str(port))
        r = mptun(
            "client",
            "--server",
            "127.0.0.1:1",
            "--key-file",
            str(key_file),
            "--socks",
            f"127.0.0.1:{port}",
        )
        assert_one_line_error(r, "address already in use")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[server]\nlisten = "127.0.0.1:1"\nfrob = 1\n', ["unknown key 'frob'"]),
        ("[server\n", ["not valid TOML"]),
        ('[server]\nlisten = "nonsense"\n', ["c.toml: [server] listen: bad address"]),
    ],
)
def test_bad_config(tmp_path: Path, key_file: Path, text, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    r = mptun("server", "--config", str(cfg), "--key-file", str(key_file))
    assert_one_line_error(r, *words)


def test_precedence_cli_over_env_over_config(tmp_path: Path, key_file: Path):
    """Each layer is observed by the port the server really listens on (three ports held for
    it meanwhile: ReservedPort; mptun's own bind shares them)."""
    held = [ReservedPort() for _ in range(3)]
    p_cfg, p_env, p_cli = (h.port for h in held)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nlisten = "127.0.0.1:{p_cfg}"\nkey-file = "{key_file}"\n')
    cases = [
        ([], {}, p_cfg),
        ([], {"MPTUN_LISTEN": f"127.0.0.1:{p_env}"}, p_env),
        (["--listen", f"127.0.0.1:{p_cli}"], {"MPTUN_LISTEN": f"127.0.0.1:{p_env}"}, p_cli),
    ]
    for i, (args, env, port) in enumerate(cases):
        proc = MptunProcess(
            ["server", "--config", str(cfg), *args], tmp_path / f"s{i}.log", env=env
        )
        try:
            assert proc.ports() == [port]
        finally:
            assert proc.stop() == 0, proc.log()
    for h in held:
        h.release()


def test_key_from_environment_and_never_logged(tmp_path: Path, key_file: Path):
    key = key_file.read_text().strip()
    proc = MptunProcess(
        ["server", "--listen", "127.0.0.1:0"], tmp_path / "s.log", env={"MPTUN_KEY": key}
    )
    try:
        proc.ports()
    finally:
        proc.stop()
    assert key not in proc.log()
    assert "listening on" in proc.log()


def test_sigterm_exits_zero(tmp_path: Path, key_file: Path):
    proc = MptunProcess(
        ["server", "--listen", "127.0.0.1:0", "--key-file", str(key_file)], tmp_path / "s.log"
    )
    proc.ports()
    assert proc.stop() == 0
    assert "stopped" in proc.log()


def test_errors_say_where_a_value_came_from(tmp_path: Path, key_file: Path):
    """A bad value from the environment names its variable; a missing option its other doors."""
    r = mptun(
        "server", "--listen", "127.0.0.1:0", "--key-file", str(key_file),
        env={"MPTUN_MAX_CONNECTIONS": "many"},
    )  # fmt: skip
    assert_one_line_error(r, "--max-connections", "(from the environment: MPTUN_MAX_CONNECTIONS)")
    r = mptun("server", "--listen", "127.0.0.1:0", "--max-connections", "many")
    assert_one_line_error(r, "--max-connections")
    assert "environment" not in r.stderr
    r = mptun("client", "--socks", "127.0.0.1:1")
    assert_one_line_error(r, "(or MPTUN_SERVER, or `server` in the config file)")


def test_control_socket_file_left_by_a_killed_client_is_replaced(tmp_path: Path, key_file: Path):
    """A socket file nobody listens on (the client was SIGKILLed) does not block a restart;
    one a running client listens on does, with one error line before any listener starts."""
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what SIGKILL leaves
    args = ["client", "--server", "127.0.0.1:1", "--key-file", str(key_file)]
    proc = MptunProcess(
        [*args, "--socks", "127.0.0.1:0", "--control", str(path)], tmp_path / "c.log"
    )
    try:
        proc.ports("socks")
        assert "removed a stale socket file" in proc.log()
        r = mptun("status", "--json", "--control", str(path))
        assert r.returncode == 0, r.stderr
        r = mptun(*args, "--socks", "127.0.0.1:0", "--control", str(path))
        assert_one_line_error(r, "control socket", "address already in use")
    finally:
        assert proc.stop() == 0, proc.log()
    assert not path.exists()  # a clean stop removes it


def test_config_objects_do_not_show_keys(key_file: Path):
    """A repr of what holds the key (as a debug line or an error might print) shows no key."""
    from mptun.client.tunnel import TunnelConfig
    from mptun.common.crypto import cipher_by_name, load_key_file
    from mptun.common.handshake import derive_bulk_keys
    from mptun.common.relay import Coalescing, choose_engine
    from mptun.server.service import ServerConfig

    psk = load_key_file(str(key_file))
    cipher = cipher_by_name("aes-256-gcm")
    engine = choose_engine("copy", Coalescing())
    addr = Address.parse("127.0.0.1:1")
    keys = derive_bulk_keys(psk, cipher, bytes(32), bytes(32))
    for obj in (
        ServerConfig(listen=addr, psk=psk, cipher=cipher, engine=engine),
        TunnelConfig(server=addr, psk=psk, cipher=cipher, engine=engine),
        keys,
    ):
        text = repr(obj)
        for secret in (psk, keys.c2s_key, keys.s2c_key):
            assert repr(secret) not in text and secret.hex() not in text
