"""How long a legitimate tunnel takes to open while a flood of stalling connections runs.

    python -m tests.tools.flood_measure [--connections 2100] [--seconds 20] [--sources 1]
        [--server-args "--max-connections 1000"] [--pythonpath DIR]

Starts `mptun server` (from DIR when given: an older tree, for before/after figures), a closing
target, and `tests/tools/flood.py` in its own process; then starts one tunnel every 0.1 s from
127.0.0.x (the flood comes from 127.0.1.x), each in its own thread, and prints the open times'
median, 95th percentile, maximum and failures (no answer within 20 s). Bounded: the flood stops
after --seconds, the probes with it. tests/test_flood.py uses `open_tunnel` and `Flood`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mptun.common.address import Address
from mptun.common.crypto import generate_key
from mptun.common.handshake import ConnectStatus, Response
from tests.helpers import ReservedPort, ServerProcess
from tests.peers import closing_target, flight
from tests.tools.flood import IP_BIND_ADDRESS_NO_PORT

ROOT = Path(__file__).resolve().parents[2]


def open_tunnel(
    port: int, psk: bytes, target: Address, source: str = "127.0.0.1", timeout: float = 20.0
) -> tuple[float, ConnectStatus | None]:
    """One tunnel from `source`: seconds from connect() to the server's answer, and its status
    (None: no answer within `timeout`: closed, reset or silent)."""
    hs = flight(psk, target)
    t0 = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)  # port chosen at connect()
        s.bind((source, 0))
        s.settimeout(timeout)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(hs.first_flight())
            while not isinstance(event := hs.next_event(), Response):
                chunk = s.recv(hs.bytes_needed())
                if not chunk:
                    return time.monotonic() - t0, None
                hs.receive_data(chunk)
        except OSError:
            return time.monotonic() - t0, None
    return time.monotonic() - t0, event.status


class Flood:
    """tests/tools/flood.py in its own process, started and waited for (`ready`)."""

    def __init__(self, port: int, connections: int, seconds: float, sources: list[str]) -> None:
        argv = [str(port), str(connections), str(seconds), *sources]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.tools.flood", *argv],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # "ready" once each has connected once
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"flood did not start: {line!r}")
        self.counts: dict[str, int] = {}

    def wait(self, timeout: float) -> dict[str, int]:
        assert self.proc.stdout is not None
        out, _ = self.proc.communicate(timeout=timeout)
        self.counts = json.loads(out.strip().splitlines()[-1])
        return self.counts

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def probe_every(
    port: int, psk: bytes, target: Address, every: float, seconds: float
) -> list[tuple[float, ConnectStatus | None]]:
    """Start one `open_tunnel` every `every` s for `seconds` (each in its own thread, so a slow
    one does not delay the next); all their results."""
    n = int(seconds / every)
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = []
        start = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, start + i * every - time.monotonic()))
            # A fresh source address each time (127.0.0.2-251; the flood uses 127.0.1+.x): a
            # reset tunnel frees its client port at once, and the same 4-tuple reused while the
            # server's end still closes would fail for reasons of the test, not of the server.
            futures.append(pool.submit(open_tunnel, port, psk, target, f"127.0.0.{2 + i % 250}"))
        return [f.result() for f in futures]


def sources(n: int) -> list[str]:
    """`n` loopback flood sources, 127.0.1.1 onwards (never 127.0.0.1, the legitimate one)."""
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]


def measure(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mptun-flood-"))
    key = tmp / "key"
    key.write_text(generate_key() + "\n")
    key.chmod(0o600)
    env = {"PYTHONPATH": args.pythonpath} if args.pythonpath else None
    # Run an older tree from elsewhere: in this checkout `-m mptun` would find ./mptun first.
    prefix = ["env", "-C", str(tmp)] if args.pythonpath else None
    # an older tree may not take port 0: a port held for it until it listens
    held = ReservedPort() if args.pythonpath else None
    srv = ServerProcess(
        tmp,
        key,
        "--allow-private",
        *shlex.split(args.server_args),
        env=env,
        prefix=prefix,
        port=held.port if held else None,
    )
    if held:
        held.release()
    try:
        with closing_target() as tport:
            target = Address.parse(f"127.0.0.1:{tport}")
            flood = Flood(srv.port, args.connections, args.seconds, sources(args.sources))
            try:
                results = probe_every(srv.port, srv.psk, target, 0.1, args.seconds - 1)
                counts = flood.wait(timeout=args.seconds + 30)
            finally:
                flood.kill()
    finally:
        srv.stop()
    times = sorted(took for took, status in results if status is not None)
    failures = sum(1 for _, status in results if status is None)
    return {
        "tunnels": len(times) + failures,
        "failed": failures,
        "median_ms": round(statistics.median(times) * 1000, 1) if times else None,
        "p95_ms": round(times[int(0.95 * (len(times) - 1))] * 1000, 1) if times else None,
        "max_ms": round(times[-1] * 1000, 1) if times else None,
        "flood": counts,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=2100)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--sources", type=int, default=1)
    p.add_argument("--server-args", default="--max-connections 1000")
    p.add_argument("--pythonpath", default="")
    a = p.parse_args()
    if a.pythonpath:
        os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    print(json.dumps(measure(a)))
