"""Test plumbing: free ports, waiting for listeners, mptun processes, an HTTP peer."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# How much slower than this machine the tests run: the QEMU guest (tests/test_vm.py) sets it,
# since its software-emulated CPU starts a Python process in seconds, not milliseconds.
SLOWDOWN = float(os.environ.get("MPTUN_TEST_SLOWDOWN", "1"))


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, timeout: float | None = None, proc=None) -> None:
    """Poll until something accepts on host:port (never a fixed sleep)."""
    timeout = timeout or 10.0 * SLOWDOWN
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def deterministic_bytes(size: int, seed: int = 1) -> Iterator[bytes]:
    """A reproducible pseudo-random stream, in 1 MiB chunks (cheap: SHAKE-256)."""
    chunk = 1 << 20
    done = 0
    block = 0
    while done < size:
        n = min(chunk, size - done)
        yield hashlib.shake_256(f"{seed}:{block}".encode()).digest(n)
        done += n
        block += 1


def sha256_of_stream(size: int, seed: int = 1) -> str:
    h = hashlib.sha256()
    for c in deterministic_bytes(size, seed):
        h.update(c)
    return h.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # /bytes/<size>/<seed>
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "bytes":
            self.send_error(404)
            return
        size, seed = int(parts[1]), int(parts[2])
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        for c in deterministic_bytes(size, seed):
            self.wfile.write(c)

    def do_PUT(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        while n:
            c = self.rfile.read(min(n, 1 << 20))
            if not c:
                break
            h.update(c)
            n -= len(c)
        body = (h.hexdigest() + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


class _V4Server(ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def http_server(host: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """A local HTTP peer: GET /bytes/SIZE/SEED streams a known stream; PUT returns sha256."""
    cls = _V6Server if ":" in host else _V4Server
    srv = cls((host, 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield host, srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


class MptunProcess:
    """`python -m mptun ...` as a child process, its log in a file, stopped by PID."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "mptun", "--log-level", "debug", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        timeout=timeout + 10,
    )
