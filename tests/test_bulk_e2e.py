"""Encrypted bulk data end to end through real `mptun client` and `mptun server` processes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import curl, need
from tests.peers import deterministic_bytes, http_server, sha256_of_stream

SIZE = 200 << 20


def wait_for_log(proc, text: str, timeout: float = 10.0) -> str:
    """Poll a process's log until `text` appears (log lines may trail the client's view)."""
    deadline = time.monotonic() + timeout
    while True:
        log = proc.log_path.read_text(errors="replace")
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


def _upload_file(tmp_path: Path, size: int, seed: int) -> tuple[Path, str]:
    path = tmp_path / f"upload-{seed}.bin"
    h = hashlib.sha256()
    with path.open("wb") as f:
        for chunk in deterministic_bytes(size, seed):
            f.write(chunk)
            h.update(chunk)
    return path, h.hexdigest()


def _download_sha(socks: str, url: str) -> str:
    p = subprocess.Popen(
        ["curl", "--silent", "--show-error", "--max-time", "240", "--socks5-hostname", socks, url],
        stdout=subprocess.PIPE,
    )
    h = hashlib.sha256()
    assert p.stdout is not None
    while chunk := p.stdout.read(1 << 20):
        h.update(chunk)
    assert p.wait(timeout=250) == 0
    return h.hexdigest()


@pytest.mark.slow
def test_encrypted_by_default_200_mib_both_directions(mptun_pair, tmp_path: Path) -> None:
    need("curl")
    pair = mptun_pair(server_args=("--allow-private",))
    with http_server() as (host, port):
        got = _download_sha(pair.socks, f"http://{host}:{port}/bytes/{SIZE}/7")
        assert got == sha256_of_stream(SIZE, 7)
        path, want = _upload_file(tmp_path, SIZE, 8)
        r = curl(
            "--socks5-hostname",
            pair.socks,
            "-T",
            str(path),
            f"http://{host}:{port}/up",
            timeout=240,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == want
    pair.client.stop()
    pair.server.stop()
    for log in (pair.client.log_path.read_text(), pair.server.log_path.read_text()):
        assert "bulk auto:" in log  # one line saying which engine and why
        assert ", aead, clean" in log or ", ktls, clean" in log, log[-2000:]
        assert "reset (" not in log


def test_server_refuses_plain_unless_started_with_bulk_plain(mptun_pair) -> None:
    need("curl")
    with http_server() as (host, port):
        url = f"http://{host}:{port}/bytes/1000/1"
        pair = mptun_pair(server_args=("--allow-private",), client_args=("--bulk", "plain"))
        r = curl("--socks5-hostname", pair.socks, url, timeout=20)
        assert r.returncode != 0 and r.stdout == b""
        assert "refuses plain bulk data" in wait_for_log(pair.client, "refuses plain")
        assert "plain mode refused" in wait_for_log(pair.server, "plain mode refused")
        pair = mptun_pair(
            server_args=("--allow-private", "--bulk", "plain"), client_args=("--bulk", "plain")
        )
        r = curl("--socks5-hostname", pair.socks, url, timeout=20)
        assert r.returncode == 0 and hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(
            1000, 1
        )
        # the plain server still accepts encrypted clients (the default)
        pair2 = mptun_pair(server_args=("--allow-private", "--bulk", "plain"))
        r = curl("--socks5-hostname", pair2.socks, url, timeout=20)
        assert r.returncode == 0 and len(r.stdout) == 1000


def test_bulk_from_environment_and_config(mptun_pair, tmp_path: Path) -> None:
    need("curl")
    with http_server() as (host, port):
        url = f"http://{host}:{port}/bytes/5000/2"
        cfg = tmp_path / "server.toml"
        cfg.write_text('[server]\nbulk = "plain"\nallow-private = true\n')
        pair = mptun_pair(server_args=("--config", str(cfg)), env={"MPTUN_BULK": "plain"})
        r = curl("--socks5-hostname", pair.socks, url, timeout=20)
        assert r.returncode == 0 and len(r.stdout) == 5000
        assert "mode plain" in pair.client.log()


def _mptun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mptun", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_bad_bulk_values_are_one_line_errors(key_file: Path) -> None:
    r = _mptun("server", "--listen", "127.0.0.1:0", "--key-file", str(key_file), "--bulk", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--bulk" in r.stderr


def test_forced_ktls_on_a_kernel_without_it_is_a_config_error(key_file: Path) -> None:
    from mptun.common import ktls

    if ktls.probe() is None:
        pytest.skip("this kernel has kTLS (the VM tests cover --bulk ktls)")
    r = _mptun(
        "server",
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        str(key_file),
        "--bulk",
        "ktls",
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        line for line in r.stderr.strip().splitlines() if "--bulk ktls" in line
    ]
    assert "no kTLS" in r.stderr and "ENOENT" in r.stderr
