"""Router footprint: what each command imports, and the idle client's memory.

On a router every `mptun uci` (the init script) and every hotplug call is a fresh Python: the
commands that only read configuration must not import cryptography (~10 MB, a tenth of a second
on an x86 core, seconds on a MIPS one) nor pyroute2, and no service ever imports the bench, the
demo or the lab. What a process imported is read from its own `-X importtime` report.
"""

from __future__ import annotations

import inspect
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mptun.cli import LAZY_COMMANDS, LAZY_SUMMARIES, cli
from mptun.common.address import Address
from mptun.lab.wait import start_listener, wait_logged_listeners
from tests.helpers import ROOT

TOOLS = ("mptun.bench", "mptun.lab", "mptun.demo")
UCI = """config client 'main'
\toption enabled '1'
\toption server '192.0.2.1:8443'
\toption key_file '/etc/mptun/key'
\toption socks '127.0.0.1:1080'
\toption redir '0.0.0.0:1234'

config nft
\toption server '192.0.2.1:8443'
\toption port '1234'
"""


def imported(importtime: str) -> set[str]:
    """The modules an `-X importtime` report shows imported."""
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", importtime, re.M))


def run_imports(*args: str, ok: tuple[int, ...] = (0,)) -> set[str]:
    """Run `mptun ARGS` to completion; the modules it imported."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mptun", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode in ok, r.stderr[-2000:]
    mods = imported(r.stderr)
    assert "mptun.cli" in mods  # the report was read
    return mods


def heavy(mods: set[str], *prefixes: str) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in prefixes or m.startswith(prefixes))


@pytest.fixture
def uci_file(tmp_path: Path) -> Path:
    p = tmp_path / "mptun"
    p.write_text(UCI)
    return p


def test_help_and_uci_import_no_crypto_no_pyroute2(uci_file: Path) -> None:
    for args in (
        ("--help",),
        ("--version",),
        ("uci", str(uci_file), "client"),
        ("uci", str(uci_file), "client", "socks"),
        ("uci", "--help"),
        ("nft", "--uci", str(uci_file)),
        ("genkey",),
    ):
        mods = run_imports(*args)
        assert not heavy(mods, "cryptography", "pyroute2", "asyncio", *TOOLS), args
        # none of the sides' service code either
        assert not heavy(mods, "mptun.client.tunnel", "mptun.server", "mptun.common.relay"), args


def test_status_imports_no_crypto() -> None:
    """`mptun status` reads the control socket and the uplinks (pyroute2), not the tunnel code;
    with no client running it exits 1 after saying so."""
    mods = run_imports("status", "--json", ok=(0, 1))
    assert not heavy(mods, "cryptography", *TOOLS, "mptun.client.tunnel")


def test_help_lists_commands_without_importing_them() -> None:
    """LAZY_SUMMARIES is each lazy command's own summary (the first paragraph of its help)."""
    commands = cli.all_commands()
    assert set(LAZY_SUMMARIES) == set(LAZY_COMMANDS)
    for name, summary in LAZY_SUMMARIES.items():
        cmd = commands[name]
        first = " ".join(inspect.cleandoc(cmd.help or "").split("\n\n")[0].split())
        assert cmd.short_help is None and summary == first, name
    out = subprocess.run(
        [sys.executable, "-m", "mptun", "--help"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    for name, summary in LAZY_SUMMARIES.items():
        assert re.search(rf"^  {name} +{re.escape(summary[:20])}", out, re.M), name


def _service_imports(tmp_path: Path, args: list[str], kind: str) -> set[str]:
    """Start a service with `-X importtime`, wait for its listener, stop it: its imports."""
    log = tmp_path / f"{args[0]}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "mptun", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        (found,) = wait_logged_listeners(log.read_text, 1, proc, 20)
        assert found[0] == kind
    finally:
        proc.terminate()
        proc.wait(15)
    return imported(log.read_text())


def test_services_import_no_tools(tmp_path: Path, key_file: Path) -> None:
    """The running client and server: no bench, demo, lab, pyroute2 (no uplinks given) or the
    one-shot `--check` code."""
    args = ["client", "--server", "192.0.2.1:8443", "--key-file", str(key_file)]
    client = _service_imports(tmp_path, [*args, "--socks", "127.0.0.1:0"], "socks")
    assert "mptun.client.service" in client
    assert not heavy(client, *TOOLS, "pyroute2", "mptun.client.check", "mptun.client.status")
    server = _service_imports(
        tmp_path, ["server", "--listen", "127.0.0.1:0", "--key-file", str(key_file)], ""
    )
    assert "mptun.server.service" in server
    assert not heavy(server, *TOOLS, "pyroute2", "mptun.client")


def test_idle_client_memory_within_target() -> None:
    """benchmarks/footprint.py, side by side: the idle client (asyncio's loop, as on a router)
    at most 6 MiB of RSS above a Python holding asyncio and AES-GCM; one `mptun uci` call is one
    process that imports neither cryptography nor pyroute2."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "footprint.py"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    fig = json.loads(r.stdout)
    router = fig["clients"]["asyncio"]
    assert router["tools_imported"] == []
    assert router["rss_above_baseline"] <= fig["target_mib"] * 1024 * 1024, fig
    uci = fig["uci"]
    assert not uci["cryptography"] and not uci["pyroute2"], uci
    if uci["processes"] is not None:
        assert uci["processes"] == 1, uci


# What an idle client (SOCKS only) leaves unloaded: each is imported where its option or its
# first use needs it (client/app.py, client/socks.py, common/mptcpinfo.py,
# mptun/commands/options.py), and benchmarks/footprint.py counts the difference.
LAZY = {
    "mptun.client.dns": "--dns",
    "mptun.client.dnscache": "--dns",
    "mptun.common.dns": "--dns",
    "mptun.client.redirect": "--redir, --tproxy, --forward",
    "mptun.client.tproxy": "--tproxy-udp",
    "mptun.client.hook": "--uplink-hook",
    "mptun.client.socksudp": "the first UDP ASSOCIATE",
    "mptun.client.metrics": "--metrics",
    "mptun.common.metrics_http": "--metrics",
    "ctypes": "reading a tunnel's subflows (mptun status with tunnels open)",
    "json": "the first status asked for, the uplink health file, the stats dump",
    "tomllib": "--config",
    "mptun.uci": "--uci",
}


class Importing:
    """A real client run with `-X importtime`: what it has imported so far, read from its log."""

    def __init__(self, tmp_path: Path, args: list[str]) -> None:
        self.log = tmp_path / "client.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-X", "importtime", "-m", "mptun", "client", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def read(self) -> str:
        return self.log.read_text(errors="replace")

    def modules(self) -> set[str]:
        return imported(self.read())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def client_args(key_file: Path, *more: str) -> list[str]:
    return ["--server", "192.0.2.1:8443", "--key-file", str(key_file), *more]


def test_idle_client_loads_no_optional_part(tmp_path: Path, key_file: Path) -> None:
    """A SOCKS client that has served nothing imports none of `LAZY`."""
    c = Importing(tmp_path, client_args(key_file, "--socks", "127.0.0.1:0"))
    try:
        wait_logged_listeners(c.read, 1, c.proc, 20)
        mods = c.modules()
    finally:
        c.close()
    assert "mptun.client.service" in mods  # the report was read
    assert not sorted(m for m in LAZY if m in mods), {m: LAZY[m] for m in LAZY if m in mods}


def test_options_load_their_parts(tmp_path: Path, key_file: Path) -> None:
    """The imports moved into client/app.py and options.py run when their option is given: a
    client with --dns, --redir and --config starts (its listeners up) and loaded them."""
    conf = tmp_path / "mptun.toml"
    conf.write_text("[client]\ndns-cache = 16\n")
    runs: list[Importing] = []

    def start(port: int) -> subprocess.Popen:
        # --dns takes no port 0 (one port for UDP and TCP): start_listener picks a free one
        args = client_args(key_file, "--config", str(conf), "--dns", f"127.0.0.1:{port}")
        args += ["--dns-upstream", "192.0.2.53", "--redir", "127.0.0.1:0"]
        run = tmp_path / f"run{len(runs)}"
        run.mkdir()
        runs.append(Importing(run, args))
        return runs[-1].proc

    try:
        start_listener(start, protocols=("tcp", "udp"), timeout=20)
        c = runs[-1]
        kinds = {found[0] for found in wait_logged_listeners(c.read, 3, c.proc, 20)}
        mods = c.modules()
    finally:
        for c in runs:
            c.close()
    assert kinds == {"redir", "dns (tcp)", "dns (udp)"}, kinds
    assert {"mptun.client.dns", "mptun.client.redirect", "tomllib"} <= mods
    assert "mptun.uci" not in mods and "mptun.client.socksudp" not in mods


def test_socks_udp_relay_loads_at_the_first_associate(tmp_path: Path, key_file: Path) -> None:
    """client/socksudp.py is imported by the first UDP ASSOCIATE (RFC 1928 section 7), which
    is then answered with the relay's address."""
    c = Importing(tmp_path, client_args(key_file, "--socks", "127.0.0.1:0"))
    try:
        ((_, host, port),) = wait_logged_listeners(c.read, 1, c.proc, 20)
        assert "mptun.client.socksudp" not in c.modules()
        with socket.create_connection((host, port), timeout=10) as control:
            control.sendall(b"\x05\x01\x00")
            assert control.recv(2) == b"\x05\x00"
            control.sendall(b"\x05\x03\x00\x01" + bytes(4) + bytes(2))  # from 0.0.0.0:0
            rep = b""
            while len(rep) < 10:
                chunk = control.recv(10 - len(rep))
                assert chunk, rep
                rep += chunk
            assert rep[:4] == b"\x05\x00\x00\x01", rep  # succeeded, an IPv4 relay address
            assert "mptun.client.socksudp" in c.modules()
    finally:
        c.close()


def test_dns_rate_limit_default_is_the_forwarders() -> None:
    """client/app.py repeats client/dns.py's default so DnsSettings needs no forwarder import."""
    from mptun.client import app, dns

    assert app.DEFAULT_RATE_LIMIT == dns.DEFAULT_RATE_LIMIT
    settings = app.DnsSettings(Address.parse("127.0.0.1:53"), Address.parse("192.0.2.53:53"))
    assert settings.rate_limit == dns.DEFAULT_RATE_LIMIT
