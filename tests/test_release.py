"""The release artifacts: `python -m build` (what `make dist` runs) makes an sdist and a wheel
that carry the license and one version, ship no tests, and, installed into a fresh virtual
environment, run a tunnel: server, client with SOCKS, curl through it."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import mptun
from mptun.lab.wait import wait_logged_listeners
from tests.helpers import ROOT, curl, need
from tests.peers import http_server, sha256_of_stream

pytestmark = pytest.mark.slow


@dataclass
class Dist:
    wheel: Path
    sdist: Path


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The sdist, and the wheel built from it, as `make dist` builds them."""
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,  # not the checkout: its build/ folder would shadow the `build` package
    )
    if "No module named build" in r.stderr:
        pytest.skip("the `build` package is missing (make venv installs the test extra)")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = out.glob("mptun-*.whl")
    (sdist,) = out.glob("mptun-*.tar.gz")
    return Dist(wheel, sdist)


def test_one_version(dist: Dist) -> None:
    """mptun/__init__.py holds the version; the artifacts' names and metadata carry it."""
    v = mptun.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", v)
    assert dist.wheel.name == f"mptun-{v}-py3-none-any.whl"
    assert dist.sdist.name == f"mptun-{v}.tar.gz"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert v not in pyproject, "the version is written in mptun/__init__.py only"
    with zipfile.ZipFile(dist.wheel) as z:
        meta = z.read(f"mptun-{v}.dist-info/METADATA").decode()
    assert f"\nVersion: {v}\n" in meta


def test_license_matches_metadata(dist: Dist) -> None:
    """LICENSE is the Apache License 2.0 text the metadata names, and both artifacts carry it."""
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    v = mptun.__version__
    with zipfile.ZipFile(dist.wheel) as z:
        meta = z.read(f"mptun-{v}.dist-info/METADATA").decode()
        assert z.read(f"mptun-{v}.dist-info/licenses/LICENSE").decode() == text
    assert "\nLicense-Expression: Apache-2.0\n" in meta
    with tarfile.open(dist.sdist) as t:
        member = t.extractfile(f"mptun-{v}/LICENSE")
        assert member is not None and member.read().decode() == text


def test_wheel_ships_no_tests(dist: Dist) -> None:
    """Only the `mptun` namespace and its metadata: no tests, no top-level client/server/common."""
    with zipfile.ZipFile(dist.wheel) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"mptun", f"mptun-{mptun.__version__}.dist-info"}, tops
    assert not [n for n in names if re.search(r"(^|/)(tests?/|conftest\.py$|test_[^/]*\.py$)", n)]
    for package in ("client", "server", "common", "common/relay", "commands"):
        assert f"mptun/{package}/__init__.py" in names


class Installed:
    """A fresh virtual environment (not seeing this checkout's or the system's packages) with the
    wheel installed; runs its `mptun` script."""

    def __init__(self, venv: Path) -> None:
        self.venv = venv
        self.mptun = venv / "bin" / "mptun"
        # The checkout must not leak in: no PYTHONPATH, and a working directory outside it.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MPTUN_"))}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.mptun), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
            cwd=self.venv,
        )

    def start(self, log: Path, *args: str) -> subprocess.Popen:
        with open(log, "wb") as f:
            return subprocess.Popen(
                [str(self.mptun), "--log-level", "debug", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.venv,
            )


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(dist.wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return Installed(venv)


def test_installed_is_the_wheel(installed: Installed) -> None:
    r = installed.run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"mptun, version {mptun.__version__}"
    where = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", "import mptun, sys; print(mptun.__file__)"],
        capture_output=True,
        text=True,
        env=installed.env,
        cwd=installed.venv,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed.venv), where
    # the venv sees no system site-packages (pyvenv.cfg), so nothing but the wheel's deps is there
    cfg = (installed.venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    _stop(started)


def test_installed_wheel_runs_a_tunnel(
    installed: Installed, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    need("curl")
    key = tmp_path / "key"
    r = installed.run("genkey", "-o", str(key))
    assert r.returncode == 0, r.stderr
    server_log, client_log = tmp_path / "server.log", tmp_path / "client.log"

    def logs() -> str:
        return "".join(
            f"\n--- {p.name}\n{p.read_text(errors='replace')}"
            for p in (server_log, client_log)
            if p.exists()
        )

    # loopback targets need --allow-private (the default policy refuses them)
    server = installed.start(
        server_log, "server", "--listen", "127.0.0.1:0", "--key-file", str(key), "--allow-private"
    )
    procs.append(server)
    ((_, _, port),) = wait_logged_listeners(server_log.read_text, 1, server, 20)
    client = installed.start(
        client_log,
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--key-file",
        str(key),
        "--socks",
        "127.0.0.1:0",
    )
    procs.append(client)
    ((kind, _, socks),) = wait_logged_listeners(client_log.read_text, 1, client, 20)
    assert kind == "socks"
    size = 2_000_000
    with http_server() as (host, http_port):
        r = curl(
            "--socks5-hostname",
            f"127.0.0.1:{socks}",
            f"http://{host}:{http_port}/bytes/{size}/5",
            "-o",
            str(tmp_path / "body"),
            timeout=60,
        )
    assert r.returncode == 0, r.stderr.decode() + logs()
    body = (tmp_path / "body").read_bytes()
    assert hashlib.sha256(body).hexdigest() == sha256_of_stream(size, 5), logs()
    # both ends ran from the venv's installed copy
    for p in (server, client):
        exe = Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")
        assert any(str(installed.venv).encode() in part for part in exe), exe
