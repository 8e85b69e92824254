"""Shared fixtures: a key file, and running mptun server + client pairs on loopback."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mptun.common.crypto import generate_key
from tests.helpers import MptunProcess, free_port, wait_listening


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
    server: MptunProcess
    client: MptunProcess
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
        sport, cport = free_port(), free_port()
        srv = MptunProcess(
            ["server", "--listen", f"127.0.0.1:{sport}", "--key-file", str(key_file), *server_args],
            tmp_path / f"server-{sport}.log",
            env,
        )
        started.append(srv)
        wait_listening("127.0.0.1", sport, proc=srv.proc)
        cli = MptunProcess(
            [
                "client",
                "--server",
                f"127.0.0.1:{sport}",
                "--key-file",
                str(key_file),
                "--socks",
                f"127.0.0.1:{cport}",
                *client_args,
            ],
            tmp_path / f"client-{cport}.log",
            env,
        )
        started.append(cli)
        wait_listening("127.0.0.1", cport, proc=cli.proc)
        return Pair(srv, cli, sport, cport)

    yield start
    for p in reversed(started):
        p.stop()


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (make test installs it)")
