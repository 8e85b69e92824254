"""A namespace with an mptun server, client and HTTP target, for the Fast Open and pool tests.

Fast Open needs `net.ipv4.tcp_fastopen` with the server bit (0x2), a per-namespace sysctl: the
tests set it in a namespace of their own, never on the host. Ports are fixed inside it (the
namespace is the test's alone), so a server can be restarted on the same address.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mptun.common.stats import read_stats
from mptun.lab.netns import Netns, have_mptcp, have_netns
from tests.helpers import ROOT, read_stats_after_usr1, wait_listening, wait_until

SERVER = "127.0.0.1:8443"
SOCKS = "127.0.0.1:1080"
HTTP_PORT = 8080


def need_bed() -> None:
    """Skip unless namespaces (root) and MPTCP are here."""
    for ok, why in (have_netns(), have_mptcp()):
        if not ok:
            pytest.skip(why)


def nstat(ns: Netns) -> dict[str, int]:
    """The namespace's TCP Fast Open counters (TcpExtTCPFastOpen*), absolute values."""
    out = ns.exec("nstat", "-az", "--json").stdout
    counters = json.loads(out)["kernel"]
    return {k: int(v) for k, v in counters.items() if "FastOpen" in k}


class Bed:
    """One namespace: `start_server`, `start_client`, `fetch` through the client's SOCKS."""

    def __init__(self, tmp: Path, key_file: Path, tfo_sysctl: int = 3) -> None:
        self.tmp, self.key_file = tmp, key_file
        self.ns = Netns("tfo")
        self.ns.sysctl("net.ipv4.tcp_fastopen", tfo_sysctl)
        self.logs: list = []
        self.server: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None
        http = self._start("http", "-m", "tests.peers", "http", "--port", str(HTTP_PORT))
        wait_listening("::", HTTP_PORT, proc=http, prefix=self.ns.prefix())

    def __enter__(self) -> Bed:
        return self

    def __exit__(self, *exc) -> None:
        self.ns.delete()
        for f in self.logs:
            f.close()

    def _start(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        self.logs.append(log)
        return self.ns.popen(
            [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )

    def log_of(self, proc: subprocess.Popen) -> str:
        """Everything `proc` (one of ours) logged so far."""
        f = self.logs[self.ns.procs.index(proc)]
        f.flush()
        return Path(f.name).read_text(errors="replace")

    def start_server(self, *args: str) -> subprocess.Popen:
        self.server_stats = self.tmp / f"server-stats-{time.monotonic_ns()}.json"
        self.server = self._start(
            "server", "-m", "mptun", "--log-level", "debug", "server", "--listen", SERVER,
            "--key-file", str(self.key_file), "--allow-target", "127.0.0.0/8",
            "--stats-file", str(self.server_stats), *args,
        )  # fmt: skip
        wait_listening("127.0.0.1", 8443, proc=self.server, prefix=self.ns.prefix())
        return self.server

    def start_client(self, *args: str) -> subprocess.Popen:
        self.client_stats = self.tmp / f"client-stats-{time.monotonic_ns()}.json"
        self.client = self._start(
            "client", "-m", "mptun", "--log-level", "debug", "client", "--server", SERVER,
            "--key-file", str(self.key_file), "--socks", SOCKS,
            "--stats-file", str(self.client_stats), *args,
        )  # fmt: skip
        wait_listening("127.0.0.1", 1080, proc=self.client, prefix=self.ns.prefix())
        return self.client

    def kill_server(self) -> None:
        """SIGKILL the server (its sockets closed by the kernel, no clean stop)."""
        assert self.server is not None
        self.server.kill()
        self.server.wait()

    def client_counters(self) -> dict[str, int]:
        assert self.client is not None
        return read_stats_after_usr1(self.client.pid, self.client_stats)["counters"]

    def server_counters(self) -> dict[str, int]:
        assert self.server is not None
        return read_stats_after_usr1(self.server.pid, self.server_stats)["counters"]

    def wait_client(self, name: str, value: int, timeout: float = 15.0) -> dict[str, int]:
        """Poll the client's counters until `name` reaches `value`; the last counters."""

        def reached() -> dict[str, int] | None:
            c = self.client_counters()
            return c if c.get(name, 0) >= value else None

        return wait_until(reached, timeout, f"client counter {name} >= {value}")

    def fetch(self, size: int = 100) -> tuple[float, int]:
        """One HTTP GET through the client's SOCKS port (a new tunnel): (seconds to the first
        response byte, HTTP status; 0 when it failed)."""
        r = self.ns.exec(
            "curl", "--silent", "--output", "/dev/null", "--max-time", "20",
            "--write-out", "%{time_starttransfer} %{http_code}",
            "--socks5-hostname", SOCKS, f"http://127.0.0.1:{HTTP_PORT}/bytes/{size}/1",
            check=False,
        )  # fmt: skip
        first, code = r.stdout.split()
        return float(first), int(code)

    def stats_file(self) -> dict | None:
        return read_stats(self.client_stats)
