"""Shared fixtures: a key file, running mptun server + client pairs on loopback, and the skip for
tests that need the namespace test bed. The plumbing behind them is in tests/helpers.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mptun.common.crypto import generate_key
from mptun.lab.netns import have_mptcp, have_netns
from tests.helpers import ClientProcess, MptunProcess, ServerProcess


def pytest_collection_modifyitems(config, items) -> None:
    """Skip, with the reason, tests whose requirements this machine lacks."""
    is_root = os.geteuid() == 0
    for item in items:
        if item.get_closest_marker("root") and not is_root:
            item.add_marker(pytest.mark.skip(reason="needs root (network namespaces, sysctl)"))


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    p = tmp_path / "key"
    p.write_text(generate_key() + "\n")
    p.chmod(0o600)
    return p


@dataclass
class Pair:
    server: ServerProcess
    client: ClientProcess
    server_port: int
    socks_port: int

    @property
    def socks(self) -> str:
        return f"127.0.0.1:{self.socks_port}"


@pytest.fixture
def mptun_pair(tmp_path: Path, key_file: Path) -> Iterator[Callable[..., Pair]]:
    """Factory: start `mptun server` and `mptun client` (SOCKS on loopback) and wait for both."""
    started: list[MptunProcess] = []

    def start(server_args: tuple = (), client_args: tuple = (), env: dict | None = None) -> Pair:
        srv = ServerProcess(tmp_path, key_file, *server_args, env=env, stats=False)
        started.append(srv)
        cli = ClientProcess(tmp_path, key_file, srv.port, *client_args, env=env, stats=False)
        started.append(cli)
        return Pair(srv, cli, srv.port, cli.socks_port)

    yield start
    for p in reversed(started):
        p.stop()


@pytest.fixture
def needs_mptcp_testbed() -> None:
    """Skip, with the reason, unless this machine can build the multipath test bed (namespaces,
    MPTCP, pyroute2). Use as `pytest.mark.usefixtures("needs_mptcp_testbed")`."""
    for ok, why in (have_netns(), have_mptcp()):
        if not ok:
            pytest.skip(why)
    pytest.importorskip("pyroute2", reason="pyroute2 is not installed (the `test` extra has it)")
