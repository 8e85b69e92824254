"""The client's local doors: the open-proxy guard on --socks, secret files (the key and the SOCKS
password), wrong SOCKS passwords, and programs on loopback sharing the SOCKS listener."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mptun.client.app import check_socks_bind
from mptun.client.socks import AuthThrottle, source_key
from mptun.common.address import Address
from mptun.common.crypto import generate_key
from mptun.common.errors import ConfigError
from tests.helpers import ClientProcess
from tests.helpers import run_mptun as mptun
from tests.test_cli import assert_one_line_error

NOBODY = 65534

# --- 19.7: the open-proxy guard ------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "0.0.0.0",
        "::",
        "::ffff:0.0.0.0",  # every IPv4 address, though Python calls ::ffff:0:0/96 private
        "0:0:0:0:0:ffff:0:0",
        "::ffff:0:0",
        "::%1",  # a scope does not narrow the wildcard
        "::ffff:8.8.8.8",  # a public IPv4 address, mapped
        "8.8.8.8",
        "2606:4700::1111",
    ],
)
def test_socks_guard_refuses_every_spelling_of_everywhere_or_public(host: str):
    bind = Address.parse(f"[{host}]:1080" if ":" in host else f"{host}:1080")
    with pytest.raises(ConfigError, match="open proxy"):
        check_socks_bind(bind, has_auth=False)
    check_socks_bind(bind, has_auth=True)  # with a password it may listen anywhere


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "::1", "::ffff:127.0.0.1", "192.168.1.1", "::ffff:192.168.1.1", "fd00::1"],
)
def test_socks_guard_accepts_loopback_and_lan_in_any_spelling(host: str):
    check_socks_bind(Address.parse(f"[{host}]:1080" if ":" in host else f"{host}:1080"), False)


def test_the_mapped_wildcard_really_binds_every_ipv4_address_and_is_refused(key_file: Path):
    """The kernel fact behind the guard (a listener on ::ffff:0.0.0.0 answers on 127.0.0.2),
    then the command: one error line, nothing listening."""
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::ffff:0.0.0.0", 0))
        s.listen()
        with socket.create_connection(("127.0.0.2", s.getsockname()[1]), timeout=5):
            pass
    r = mptun("client", "--server", "127.0.0.1:1", "--key-file", str(key_file),
              "--socks", "[::ffff:0.0.0.0]:1080", "--control", "none")  # fmt: skip
    assert_one_line_error(r, "--socks", "all addresses", "open proxy")


# --- 19.12: secret files ---------------------------------------------------------------------


def _key(tmp_path: Path, mode: int, uid: int | None = None) -> Path:
    p = tmp_path / "key"
    p.write_text(generate_key() + "\n")
    p.chmod(mode)
    if uid is not None:
        os.chown(p, uid, -1)
    return p


def _server_with_key(key: Path) -> subprocess.CompletedProcess:
    return mptun("server", "--listen", "127.0.0.1:0", "--key-file", str(key))


@pytest.mark.parametrize(
    ("mode", "words", "not_words"),
    [
        (0o620, ["writable by other users", "the group", "mode 620", "chmod 600"], ["readable"]),
        (0o602, ["writable by other users", "everyone"], ["readable"]),
        (0o640, ["readable by other users", "the group"], ["writable"]),
        (0o610, ["executable by other users"], ["readable", "writable"]),
        (0o666, ["readable and writable by other users", "the group and everyone"], []),
    ],
)
def test_key_file_mode_errors_say_what_is_wrong(tmp_path: Path, mode, words, not_words):
    r = _server_with_key(_key(tmp_path, mode))
    assert_one_line_error(r, *words)
    for w in not_words:
        assert w not in r.stderr, r.stderr


@pytest.mark.root
def test_key_file_owned_by_another_user_is_refused(tmp_path: Path):
    """That user could replace the key (or chmod it open); root's and our own are fine."""
    r = _server_with_key(_key(tmp_path, 0o600, uid=NOBODY))
    assert_one_line_error(r, "owned by uid 65534", "not by root or the user running mptun")


def test_a_fifo_as_key_file_is_refused_without_hanging(tmp_path: Path):
    fifo = tmp_path / "key"
    os.mkfifo(fifo, 0o600)
    assert_one_line_error(_server_with_key(fifo), "not a regular file")


def _password_file(tmp_path: Path, text: str, mode: int = 0o600, uid: int | None = None) -> Path:
    p = tmp_path / f"pw-{os.urandom(3).hex()}"
    p.write_text(text)
    p.chmod(mode)
    if uid is not None:
        os.chown(p, uid, -1)
    return p


def _client(key_file: Path, *args: str) -> subprocess.CompletedProcess:
    return mptun(
        "client", "--server", "127.0.0.1:1", "--key-file", str(key_file),
        "--socks", "127.0.0.1:0", "--control", "none", *args,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "mode", "words"),
    [
        ("secret\n", 0o644, ["--socks-password-file", "readable by other users", "chmod 600"]),
        ("secret\n", 0o620, ["--socks-password-file", "writable by other users"]),
        ("\n", 0o600, ["--socks-password-file", "0 bytes", "1-255"]),
        ("x" * 256, 0o600, ["256 bytes"]),
        ("one\ntwo\n", 0o600, ["more than one line"]),
    ],
)
def test_bad_socks_password_files(tmp_path: Path, key_file: Path, text, mode, words):
    pw = _password_file(tmp_path, text, mode)
    r = _client(key_file, "--socks-user", "u", "--socks-password-file", str(pw))
    assert_one_line_error(r, *words)
    assert text.strip() not in r.stderr or not text.strip()  # never echo the password


@pytest.mark.root
def test_socks_password_file_owned_by_another_user_is_refused(tmp_path: Path, key_file: Path):
    pw = _password_file(tmp_path, "secret\n", uid=NOBODY)
    r = _client(key_file, "--socks-user", "u", "--socks-password-file", str(pw))
    assert_one_line_error(r, "--socks-password-file", "owned by uid 65534")


def test_socks_password_options_in_pairs(tmp_path: Path, key_file: Path):
    pw = _password_file(tmp_path, "secret\n")
    r = _client(key_file, "--socks-user", "u", "--socks-password", "p",
                "--socks-password-file", str(pw))  # fmt: skip
    assert_one_line_error(r, "--socks-password-file", "not both")
    assert_one_line_error(_client(key_file, "--socks-password-file", str(pw)), "--socks-user")
    assert_one_line_error(_client(key_file, "--socks-user", "u"), "--socks-password-file")


def socks_login(port: int, user: bytes, password: bytes, host: str = "127.0.0.1") -> int:
    """One RFC 1929 login; the server's status byte (0 ok)."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        s.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
        answer = s.recv(2)
        assert len(answer) == 2 and answer[0] == 1, answer
        return answer[1]


def test_socks_password_file_is_used_and_not_on_the_command_line(tmp_path: Path, key_file: Path):
    pw = _password_file(tmp_path, "s3cret pass\n")
    with ClientProcess(tmp_path, key_file, 1, "--socks-user", "u",
                       "--socks-password-file", str(pw), "--control", "none") as c:  # fmt: skip
        assert socks_login(c.socks_port, b"u", b"s3cret pass") == 0
        assert socks_login(c.socks_port, b"u", b"s3cret") != 0
        assert b"s3cret" not in Path(f"/proc/{c.pid}/cmdline").read_bytes()


# --- 19.12: wrong passwords are throttled per source -----------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_auth_throttle_burst_then_one_per_interval_per_source():
    clock = FakeClock()
    t = AuthThrottle(burst=3, interval=2.0, clock=clock)
    for _ in range(3):
        assert t.may_try("a")
        t.failed("a")
    assert not t.may_try("a")
    assert t.may_try("b")  # another source is not affected
    clock.now += 1.9
    assert not t.may_try("a")
    clock.now += 0.2
    assert t.may_try("a")  # one token back after `interval`
    t.failed("a")
    assert not t.may_try("a")
    clock.now += 100
    assert t.may_try("a")


def test_auth_throttle_memory_is_bounded():
    t = AuthThrottle(burst=1, interval=60.0, max_sources=100, clock=FakeClock())
    for i in range(100_000):
        t.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(t) == 100
    assert not t.may_try("10.1.134.159")  # the most recent are kept
    assert t.may_try("10.0.0.0")  # the oldest were forgotten


def test_source_keys_loopback_is_one_source():
    """Any local program can connect from any 127.x address: loopback is one source."""
    assert {source_key(h) for h in ("127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1")} == {
        "loopback"
    }
    assert source_key("2001:db8:1:2::5") != source_key("2001:db8:1:2::6")
    assert source_key("192.0.2.7") == "192.0.2.7" == source_key("::ffff:192.0.2.7")


@pytest.mark.timing
def test_wrong_socks_passwords_are_rate_limited(tmp_path: Path, key_file: Path):
    """30 wrong passwords in a row: at most the burst (10) plus one per second elapsed are
    checked, the rest refused unchecked (counted); a second later the right one works again."""
    pw = _password_file(tmp_path, "right\n")
    with ClientProcess(tmp_path, key_file, 1, "--socks-user", "u",
                       "--socks-password-file", str(pw), "--control", "none") as c:  # fmt: skip
        start = time.monotonic()
        for _ in range(30):
            assert socks_login(c.socks_port, b"u", b"wrong") == 1
        elapsed = time.monotonic() - start
        throttled = c.stats()["counters"].get("socks-auth-throttled", 0)
        assert throttled >= 30 - 10 - int(elapsed) - 1, (throttled, elapsed)
        time.sleep(1.2)  # one token back
        assert socks_login(c.socks_port, b"u", b"right") == 0


# --- 19.12: programs on loopback share the listener ------------------------------------------


def _greets(port: int, source: str) -> bool:
    """Whether a SOCKS greeting from `source` gets its method answer."""
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"\x05\x01\x00")
        try:
            return s.recv(2) == b"\x05\x00"
        except OSError:
            return False


def test_silent_loopback_connections_do_not_lock_out_other_local_programs(
    tmp_path: Path, key_file: Path
):
    """300 silent connections from 127.0.0.1 (more than --socks-per-client 32): other programs
    on 127.0.0.1 and 127.0.0.2 still get their SOCKS answer, and the silent ones hold at most
    32 unfinished handshakes (the oldest are closed)."""
    per_client = 32
    with ClientProcess(
        tmp_path, key_file, 1, "--control", "none", "--socks-per-client", str(per_client)
    ) as c:
        silent = []
        try:
            for _ in range(300):
                silent.append(socket.create_connection(("127.0.0.1", c.socks_port), timeout=10))
            assert _greets(c.socks_port, "127.0.0.1")
            assert _greets(c.socks_port, "127.0.0.2")
            closed = 0
            for s in silent:
                s.settimeout(2)
                try:
                    closed += s.recv(1) == b""
                except TimeoutError:
                    break  # the survivors are open: the first one still open ends the count
                except OSError:
                    closed += 1
            assert closed >= 300 - per_client, closed
        finally:
            for s in silent:
                s.close()


def test_a_throttled_login_is_refused_without_comparing_even_when_right():
    from mptun.client import socks5

    hs = socks5.Socks5Handshake(("u", "right"), may_try=lambda: False)
    hs.receive_data(b"\x05\x01\x02")
    assert hs.next_event() == socks5.Send(b"\x05\x02")
    hs.receive_data(b"\x01\x01u\x05right")
    with pytest.raises(socks5.AuthFailed) as e:
        hs.next_event()
    assert not e.value.checked and e.value.response == b"\x01\x01"
