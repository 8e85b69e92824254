"""What a new user meets in the first minutes: messages that say what to do, and behaviour that
matches them (the target policy, a wrong port, a wrong key, a misspelt config table, a port
below 1024, the open-file limit, bare `mptun`, `--check` as the server sees it, the docs)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import importlib
import inspect
import os
import pkgutil
import re
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.common.address import Address
from mptun.common.crypto import cipher_by_name, generate_key, load_key_file
from mptun.common.drive import drive
from mptun.common.handshake import ClientHandshake, ConnectStatus, WireMode
from tests.helpers import (
    ROOT,
    ClientProcess,
    ServerProcess,
    closed_port,
    run_mptun,
    wait_until,
)
from tests.peers import socks_open

README = (ROOT / "README.md").read_text()


def wrong_key(tmp_path: Path) -> Path:
    p = tmp_path / "other-key"
    p.write_text(generate_key() + "\n")
    p.chmod(0o600)
    return p


def check(port: int, key_file: Path, *extra: str) -> subprocess.CompletedProcess:
    """`mptun client --check` against 127.0.0.1:PORT, to completion."""
    return run_mptun(
        "client", "--server", f"127.0.0.1:{port}", "--key-file", str(key_file),
        "--handshake-timeout", "20", "--check", *extra,
        timeout=60,
    )  # fmt: skip


def log_lines(proc, pattern: str, count: int = 1, timeout: float = 10.0) -> list[str]:
    """The process's log lines matching `pattern`, once there are `count` of them."""
    rx = re.compile(pattern)

    def found() -> list[str]:
        lines = [ln for ln in proc.log().splitlines() if rx.search(ln)]
        return lines if len(lines) >= count else []

    return wait_until(found, timeout, f"{count} log line(s) matching {pattern!r}")


# --- the target policy, in the README and in both logs (issue item 2) -------------------------


def test_readme_quick_start_explains_the_target_policy_and_the_router_extra() -> None:
    start = README.index("## Quick start")
    quick = README[start : README.index("\n## ", start + 1)]
    for needle in ("--allow-target", "--allow-private", "Connection reset by peer", "--check"):
        assert needle in quick, needle
    assert "[router]" in quick and "pyroute2" in quick and "mptun uplinks" in quick
    requirements = README[README.index("## Requirements") :]
    assert "pyroute2" in requirements and "`router` extra" in requirements
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^router = \["pyroute2>=0\.9"\]', pyproject, re.M)


def test_a_policy_refusal_names_the_options_in_both_logs(tmp_path: Path, key_file: Path) -> None:
    """A service on the server's own machine: refused, and both logs say what opens it."""
    with (
        ServerProcess(tmp_path, key_file, stats=False) as srv,
        ClientProcess(tmp_path, key_file, srv.port, "--reply", "verified", stats=False) as cli,
    ):
        s, reply = socks_open(cli.socks_port, Address.parse(f"127.0.0.1:{srv.port}"))
        s.close()
        assert reply == 2  # connection not allowed by ruleset
        (line,) = log_lines(srv, r"-> 127\.0\.0\.1:\d+: not allowed")
        assert (
            "not allowed (loopback address 127.0.0.1; --allow-target 127.0.0.1/32 or "
            "--allow-private opens it)" in line
        ), line
        (line,) = log_lines(cli, r"server says not allowed")
        assert "target policy" in line and "--allow-target" in line, line
        assert "--allow-private" in line, line


# --- handshake failures: a reason, and a line for each (items 3 and 4) -------------------------


@pytest.mark.timing  # the advice once: the three tunnels fall within its 60 s interval
def test_every_unanswered_handshake_leaves_a_line_with_its_reason(
    tmp_path: Path, key_file: Path
) -> None:
    """A wrong key: the advice once (with a reason, never `()`), then one line per tunnel."""
    with ServerProcess(tmp_path, key_file, stats=False) as srv:
        other = wrong_key(tmp_path)
        args = ("--reply", "verified", "--handshake-timeout", "1")
        with ClientProcess(tmp_path, other, srv.port, *args, stats=False) as cli:
            targets = [f"192.0.2.1:{port}" for port in (81, 82, 83)]
            for t in targets:
                s, reply = socks_open(cli.socks_port, Address.parse(t), timeout=20)
                s.close()
                assert reply == 1
            lines = log_lines(cli, r"-> 192\.0\.2\.1:8[123]: ", count=3)
            log = cli.log()
    assert "()" not in log
    # The server checks find the silent server down soon after the start; tunnels after that
    # are refused at once (--when-down reject) and the down line carries the advice instead.
    advice = [ln for ln in lines if "same key" in ln]
    down = [ln for ln in log.splitlines() if " is down: " in ln]
    assert len(advice) <= 1 and len(advice + down) >= 1, lines
    for ln in advice:
        assert "did not answer the handshake (no answer within 1 s)" in ln, ln
        assert "or this is not an mptun server" in ln and "WARNING" in ln, ln
    for ln in down:
        assert "wrong key, cipher or clock, or not an mptun server" in ln and "WARNING" in ln
    for t in targets:  # each tunnel named with its target and how it ended
        (mine,) = [ln for ln in lines if f"-> {t}: " in ln]
        assert "no answer within 1 s" in mine or "every server is down" in mine, mine


def test_every_connection_while_the_server_is_down_leaves_a_line(
    tmp_path: Path, key_file: Path
) -> None:
    """The warning once per burst; each connection also at debug, with its target."""
    with (
        closed_port() as port,
        ClientProcess(tmp_path, key_file, port, "--reply", "verified", stats=False) as cli,
    ):
        targets = [f"192.0.2.1:{p}" for p in (81, 82, 83)]
        for t in targets:
            s, reply = socks_open(cli.socks_port, Address.parse(t))
            s.close()
            assert reply == 1
        lines = log_lines(cli, r"-> 192\.0\.2\.1:8[123]: .*resetting", count=3)
    for t in targets:
        assert len([ln for ln in lines if f"-> {t}: " in ln]) == 1, lines
    assert "WARNING" in lines[0] and all("WARNING" in ln or "DEBUG" in ln for ln in lines)


# --- a port that is not mptun's: the running client and --check (item 5) ----------------------


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Python's own HTTP server; it only notes each error response it sends."""

    errors: list[int]

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        self.errors.append(code)
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_listener() -> Iterator[tuple[int, list[int]]]:
    """A real HTTP server on 127.0.0.1: its port, and the error codes it has answered with."""
    errors: list[int] = []
    handler = type("Handler", (_RecordingHandler,), {"errors": errors})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1], errors
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def closing_listener(how: str) -> Iterator[int]:
    """A listener that ends every connection without a byte: `fin` closes at once (before or
    after the client's bytes arrive, as it happens), `late-fin` once they are there (RST, as
    they are unread), `rst` with SO_LINGER 0 (RST)."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            if how == "late-fin":
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(1, socket.MSG_PEEK)  # the first flight is there
            if how == "rst":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        srv.close()
        t.join(5)


def test_check_against_an_http_server_says_not_mptun_every_time(key_file: Path) -> None:
    """Exit 5 whenever the HTTP server answered (the check's half-close makes it answer); exit
    4, saying it may not be mptun, in the rare run where it closed without a byte (a request
    line of white space only): the status follows what came back, never the timing."""
    with http_listener() as (port, errors):
        for run in range(6):
            before = len(errors)
            r = check(port, key_file)
            answered = len(errors) > before
            assert r.returncode == (5 if answered else 4), (run, r.stdout + r.stderr)
            assert "not an mptun server" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert errors, "the HTTP server never answered"


@pytest.mark.parametrize("how", ["fin", "late-fin", "rst"])
def test_check_against_a_port_that_closes_says_silent_or_not_mptun(
    key_file: Path, how: str
) -> None:
    with closing_listener(how) as port:
        for run in range(3):
            r = check(port, key_file)
            assert r.returncode == 4, (run, r.stdout + r.stderr)
            assert "or this is not an mptun server" in r.stderr, r.stderr
            assert "same key" in r.stderr and "clock" in r.stderr, r.stderr


@pytest.mark.timing
def test_check_against_a_wrong_key_answers_at_once(tmp_path: Path, key_file: Path) -> None:
    """The check half-closes: the server, which cannot authenticate it, closes when it reads
    that FIN instead of at its handshake deadline (60 s here; the check waits up to 20 s)."""
    with ServerProcess(tmp_path, key_file, "--handshake-timeout", "60", stats=False) as srv:
        r = check(srv.port, wrong_key(tmp_path))
    assert r.returncode == 4, r.stdout + r.stderr
    assert "accepted the connection but closed it without answering" in r.stderr, r.stderr


def test_running_client_against_an_http_server_says_not_mptun(
    tmp_path: Path, key_file: Path
) -> None:
    with http_listener() as (port, _):
        args = ("--reply", "verified", "--handshake-timeout", "1")
        with ClientProcess(tmp_path, key_file, port, *args, stats=False) as cli:
            s, reply = socks_open(cli.socks_port, Address.parse("192.0.2.1:80"), timeout=20)
            s.close()
            assert reply == 1
            (line,) = log_lines(cli, r"-> 192\.0\.2\.1:80: ")
    # The HTTP server answers 400 when the first flight holds a line end, else waits: either
    # way the line says what to suspect.
    assert "not an mptun server" in line, line
    assert "did not answer" in line or "answered, but not as mptun does" in line, line


# --- TOML: unknown tables and stray keys (item 6) ---------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[sever]\nlisten = "127.0.0.1:1"\n', "unknown table [sever] (did you mean [server]?"),
        ('listen = "127.0.0.1:1"\n[server]\n', "key 'listen' is outside any table"),
        ('[client]\nserver = "127.0.0.1:1"\n[serverr.x]\n', "unknown table [serverr]"),
        ('server = "x"\n', "[server] must be a table"),
    ],
)
def test_config_names_unknown_tables_and_stray_keys(
    tmp_path: Path, key_file: Path, toml: str, expected: str
) -> None:
    conf = tmp_path / "mptun.toml"
    conf.write_text(toml)
    r = run_mptun("server", "--config", str(conf), "--key-file", str(key_file))
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and str(conf) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_config_tables_are_the_commands_that_take_config() -> None:
    from mptun.cli import cli
    from mptun.commands.options import CONFIG_TABLES

    takes = sorted(
        name
        for name, cmd in cli.all_commands().items()
        if any(p.name == "config" for p in cmd.params)
    )
    assert takes == sorted(CONFIG_TABLES)


# --- bare `mptun` (item 9) --------------------------------------------------------------------


def test_bare_mptun_shows_the_usage_without_calling_it_an_error() -> None:
    r = run_mptun()
    assert r.returncode in (0, 2), r.stderr  # click 8.2+ exits 2, 8.1 exits 0
    out = r.stdout + r.stderr
    assert out.startswith("Usage: mptun"), out
    assert "mptun: error" not in out and "Error:" not in out, out
    assert "client" in out and "server" in out


# --- --check as the server sees it (item 10) --------------------------------------------------


def test_the_server_logs_a_check_as_a_check(tmp_path: Path, key_file: Path) -> None:
    with ServerProcess(tmp_path, key_file) as srv:
        r = check(srv.port, key_file)
        assert r.returncode == 0, r.stdout + r.stderr
        counters = srv.wait_counter("check", 1)
        (line,) = log_lines(srv, r"check from 127\.0\.0\.1:\d+")
        log = srv.log()
    assert counters["check"] == 1 and "policy" not in counters, counters
    assert "authenticated" in line and "INFO" in line, line
    assert "not allowed" not in log and "0.0.0.0:0" not in log, log


def test_a_check_is_answered_without_a_dial_even_with_allow_private(
    tmp_path: Path, key_file: Path
) -> None:
    """The wire answer stays "not allowed" (what --check of any version reads as success), also
    where the policy would let 0.0.0.0 through: the server never dials for a check."""
    with ServerProcess(tmp_path, key_file, "--allow-private") as srv:
        hs = ClientHandshake(
            load_key_file(str(key_file)),
            cipher_by_name("aes-256-gcm"),
            Address.parse("0.0.0.0:0", any_port=True),
            WireMode.ENCRYPTED,
        )

        async def ask() -> object:
            loop = asyncio.get_running_loop()
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
                s.setblocking(False)  # no half-close: a check as older clients sent it
                await loop.sock_sendall(s, hs.first_flight())
                return await drive(loop, s, hs, loop.time() + 10)

        response = asyncio.run(ask())
        counters = srv.wait_counter("check", 1)
        log = srv.log()
    assert response is not None and response.status == ConnectStatus.NOT_ALLOWED
    assert counters["check"] == 1 and "connect" not in counters, counters
    assert "connected in" not in log, log


# --- a port below 1024, the open-file limit (item 11) ------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize(
    "args",
    [
        ("server", "--listen", "127.0.0.1:443"),
        ("client", "--server", "127.0.0.1:8443", "--socks", "127.0.0.1:80"),
    ],
)
def test_a_privileged_port_names_cap_net_bind_service(args: tuple[str, ...]) -> None:
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "mptun", *args],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "HOME": "/tmp", "MPTUN_KEY": generate_key()},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Permission denied" in r.stderr, r.stderr
    assert "below 1024" in r.stderr and "CAP_NET_BIND_SERVICE" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize(
    ("given", "level"), [((), "DEBUG"), (("--max-connections", "4096"), "INFO")]
)
def test_the_open_file_limit_line_is_info_only_for_a_limit_the_user_set(
    tmp_path: Path, key_file: Path, given: tuple[str, ...], level: str
) -> None:
    """256 fds hold 37 connections: lowering the default is debug, lowering a given limit info."""
    with ServerProcess(
        tmp_path, key_file, *given, prefix=["prlimit", "--nofile=256:256"], stats=False
    ) as srv:
        (line,) = log_lines(srv, r"open-file limit 256 holds only 37 connections")
    assert f" {level} mptun.server: " in line, line


# --- the repository's docs (items 12 and 13) --------------------------------------------------


def test_no_reference_to_files_outside_the_repository() -> None:
    needles = ("../" + "shared", "FACTS" + ".md")
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    hits = []
    for name in files:
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{name}: {n}" for n in needles if n in text]
    assert hits == []


def test_protocol_doc_points_at_probing_as_it_is() -> None:
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    assert "when present" not in text and (ROOT / "docs" / "PROBING.md").exists()
    assert "**Checks.**" in text and "0.0.0.0:0" in text


def test_developing_lists_every_exception_that_is_not_an_mptun_error() -> None:
    """DEVELOPING.md: deliberate errors are MptunError subclasses, except the ones it names."""
    from mptun.common.errors import MptunError

    plain = set()
    for pkg in ("mptun.common", "mptun.client", "mptun.server", "mptun.commands"):
        for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
            module = importlib.import_module(info.name)
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if (
                    cls.__module__ == module.__name__
                    and issubclass(cls, BaseException)
                    and not issubclass(cls, MptunError)
                ):
                    plain.add(name)
    developing = (ROOT / "docs" / "DEVELOPING.md").read_text()
    rules = developing[developing.index("Errors on purpose") :].split("\n- ")[0]
    named = set(re.findall(r"`(\w+)`\s+\((?:client|common|server)/", rules))
    assert plain and plain == named, (plain, named)
