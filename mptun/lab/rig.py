"""A running multipath setup on the test bed: server, uplinks, client and a traffic peer.

`mptun demo`, the multipath tests and benchmarks drive the same pieces the same way:

    vps:    mptun server --listen [::]:8443            (the tunnel's far end)
    inet:   python -m mptun.lab.traffic serve              (a peer streaming a checked pattern)
    router: mptun uplinks [--watch] wan1 wan2 wan3     (endpoints, tables, rules)
            mptun client --socks 192.0.2.1:1080        (the tunnel's near end)
    lan:    python -m mptun.lab.traffic fetch --socks ...  (one TCP connection through the tunnel)

Fixed ports are safe here: every process runs in a namespace the test bed just created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mptun.common.crypto import generate_key
from mptun.lab.netns import Netns
from mptun.lab.testbed import (
    INET_HOST_V4,
    INET_HOST_V6,
    LAN_ROUTER_V4,
    SERVER_V4,
    SERVER_V6,
    Testbed,
)
from mptun.lab.wait import wait_listening

SERVER_PORT = 8443
SOCKS_PORT = 1080
TRAFFIC_PORT = 9000


def mptun_argv(*args: str) -> list[str]:
    """Run this mptun (the same interpreter and package) inside a namespace."""
    return [sys.executable, "-m", "mptun", *args]


@dataclass
class Fetch:
    """A running `traffic fetch` in the LAN namespace; `rows()` yields its JSON lines."""

    proc: subprocess.Popen

    def rows(self) -> Iterator[dict]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            yield json.loads(line)


class Rig:
    """Starts the processes on a built Testbed; the test bed's teardown stops them."""

    def __init__(
        self,
        tb: Testbed,
        workdir: Path,
        uplinks: Sequence[str] | None = ("wan1", "wan2", "wan3"),
        watch: bool = False,
        server_v6: bool = False,
        client_args: Sequence[str] = (),
    ) -> None:
        assert tb.router and tb.vps and tb.inet and tb.lan, "build the test bed first"
        self.tb = tb
        self.dir = workdir
        self.uplinks = list(uplinks or [])
        self.watch = watch
        self.server_ip = SERVER_V6 if server_v6 else SERVER_V4
        self.client_args = list(client_args)
        self.key = workdir / "key"
        self.logs: dict[str, Path] = {}
        self._files: list[IO] = []
        self.watcher: subprocess.Popen | None = None
        self.uplinks_output = ""

    def _popen(self, ns: Netns, argv: list[str], **kw) -> subprocess.Popen:
        """Start a process in `ns` in its own session: a terminal's Ctrl-C reaches only the
        owner (the demo), which then stops everything in order."""
        return ns.popen(argv, start_new_session=True, **kw)

    def log(self, name: str) -> IO:
        path = self.dir / f"{name}.log"
        self.logs[name] = path
        f = open(path, "w")  # noqa: SIM115 - closed in close()
        self._files.append(f)
        return f

    def start(self) -> None:
        tb = self.tb
        assert tb.router and tb.vps and tb.inet
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate_key() + "\n")
        srv = self._popen(
            tb.vps,
            mptun_argv(
                "server", "--listen", f"[::]:{SERVER_PORT}", "--key-file", str(self.key),
                "--allow-target", "203.0.113.0/24", "--allow-target", "fd00::/8",
            ),
            stdout=self.log("server"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        peer = self._popen(
            tb.inet,
            [
                sys.executable,
                "-m",
                "mptun.lab.traffic",
                "serve",
                "--listen",
                f"[::]:{TRAFFIC_PORT}",
            ],
            stdout=self.log("traffic-serve"),
            stderr=subprocess.STDOUT,
        )
        if self.uplinks:
            self.configure_uplinks()
        server = f"[{self.server_ip}]" if self.server_ip.version == 6 else str(self.server_ip)
        cli = self._popen(
            tb.router,
            mptun_argv(
                "client", "--server", f"{server}:{SERVER_PORT}", "--key-file", str(self.key),
                "--socks", f"{LAN_ROUTER_V4}:{SOCKS_PORT}", *self.client_args,
            ),
            stdout=self.log("client"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_listening("[::]", SERVER_PORT, 15, srv, prefix=tb.vps.prefix())
        wait_listening("[::]", TRAFFIC_PORT, 15, peer, prefix=tb.inet.prefix())
        wait_listening(str(LAN_ROUTER_V4), SOCKS_PORT, 15, cli, prefix=tb.router.prefix())

    def configure_uplinks(self) -> str:
        """`mptun uplinks` once (returns what it printed), or `--watch` in the background
        (waits for its first pass)."""
        tb = self.tb
        assert tb.router
        if not self.watch:
            r = tb.router.exec(*mptun_argv("uplinks", *self.uplinks), check=False)
            if r.returncode != 0:
                raise RuntimeError(f"mptun uplinks failed: {r.stderr.strip()}")
            self.uplinks_output = r.stdout
            return r.stdout
        log_path = self.dir / "watch.log"
        self.watcher = self._popen(
            tb.router,
            mptun_argv("uplinks", "--watch", *self.uplinks),
            stdout=self.log("watch"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while "watching" not in log_path.read_text():
            if self.watcher.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mptun uplinks --watch did not start: {log_path.read_text()}")
            time.sleep(0.05)
        return log_path.read_text()

    def fetch(self, seconds: float, v6_target: bool = False, interval: float = 0.5) -> Fetch:
        """One TCP connection from the LAN host through the tunnel, streaming for `seconds`."""
        assert self.tb.lan
        target = f"[{INET_HOST_V6}]" if v6_target else str(INET_HOST_V4)
        proc = self._popen(
            self.tb.lan,
            [
                sys.executable, "-m", "mptun.lab.traffic", "fetch",
                "--socks", f"{LAN_ROUTER_V4}:{SOCKS_PORT}",
                "--target", f"{target}:{TRAFFIC_PORT}",
                "--seconds", str(seconds), "--interval", str(interval),
            ],
            stdout=subprocess.PIPE, stderr=self.log("fetch"), text=True,
        )  # fmt: skip
        return Fetch(proc)

    def counters(self, interval: float = 0.5) -> subprocess.Popen:
        """Per-interval byte counters of the router's uplinks, as JSON lines on stdout."""
        assert self.tb.router
        ifaces = [u.router_if for u in self.tb.uplinks]
        return self._popen(
            self.tb.router,
            [
                sys.executable,
                "-m",
                "mptun.lab.traffic",
                "counters",
                *ifaces,
                "--interval",
                str(interval),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def status(self) -> dict:
        """`mptun status --json` in the router namespace."""
        assert self.tb.router
        r = self.tb.router.exec(*mptun_argv("status", "--json"), check=False)
        if not r.stdout.strip():
            raise RuntimeError(f"mptun status gave nothing: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def sent_totals(self, count: int = 1, timeout: float = 10.0) -> list[int]:
        """Bytes the traffic peer sent, per finished connection.

        The peer logs a connection once it has closed it, which can be a moment after the
        receiver saw the end: wait (up to `timeout`) until `count` connections are logged.
        """
        path = self.logs["traffic-serve"]
        deadline = time.monotonic() + timeout
        while True:
            rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.startswith("{")]
            sent = [r["bytes"] for r in rows if r.get("event") == "sent"]
            if len(sent) >= count or time.monotonic() >= deadline:
                return sent
            time.sleep(0.05)

    def dump_logs(self) -> str:
        out = []
        for name, path in self.logs.items():
            try:
                text = path.read_text()
            except OSError:
                continue
            out.append(f"--- {name} ---\n{text[-4000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
