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
import subprocess
import sys
from pathlib import Path

import pytest

from mptun.cli import LAZY_COMMANDS, LAZY_SUMMARIES, cli
from mptun.lab.wait import wait_logged_listeners
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
