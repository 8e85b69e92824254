"""What the OpenWrt package installs: the client, the shared code and the command line, not the
server, the bench, the lab or the demo; and that what it installs runs a tunnel.

The Makefile's `Py3Package/mptun/filespec` is applied here as openwrt/packages'
python-package-install.sh applies it (`+|PATH` copies, `-|PATH` removes a file or a folder) to
the installed layout of the wheel (pyproject.toml's package-dir), giving the router's tree. That
tree is then run alone (`python -S`, so the editable install of the checkout cannot fill in a
removed module): the router's commands work, a removed one says so in one line, and a loopback
tunnel through its client to a full server carries data intact.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.wait import wait_logged_listeners
from tests.helpers import ROOT, ServerProcess, curl, need
from tests.peers import http_server, sha256_of_stream
from tests.test_openwrt_package import MAKEFILE, NOT_ON_ROUTER

# The installed layout: package -> folder of the checkout (pyproject.toml [tool.setuptools]).
LAYOUT = {"mptun": "mptun", "mptun/client": "client", "mptun/server": "server",
          "mptun/common": "common"}  # fmt: skip
LEFT_OUT = ("mptun/server", "mptun/commands/server.py", "mptun/bench", "mptun/lab", "mptun/demo.py")


def filespec() -> list[tuple[str, str]]:
    """(op, path under the site-packages folder) of the Makefile's filespec."""
    block = re.search(r"define Py3Package/mptun/filespec\n(.*?)endef", MAKEFILE.read_text(), re.S)
    assert block
    out = []
    for line in block.group(1).splitlines():
        op, path = line.split("|", 1)
        assert path.startswith("$(PYTHON3_PKG_DIR)"), line
        out.append((op, path.removeprefix("$(PYTHON3_PKG_DIR)").strip("/")))
    return out


def router_tree(dest: Path) -> Path:
    """The package's site-packages as the filespec leaves it (sources only)."""
    staged = dest / "staged"
    for pkg, folder in LAYOUT.items():
        shutil.copytree(
            ROOT / folder,
            staged / pkg,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )
    site = dest / "site"
    site.mkdir()
    for op, path in filespec():
        src, dst = staged / path, site / path
        if op == "+":
            shutil.copytree(src, dst, dirs_exist_ok=True) if src.is_dir() else shutil.copy(src, dst)
        elif op == "-":
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        else:
            raise AssertionError(f"filespec op {op!r}")
    return site


def test_the_filespec_leaves_out_server_bench_lab_and_demo(tmp_path: Path) -> None:
    site = router_tree(tmp_path)
    for path in LEFT_OUT:
        assert not (site / path).exists(), path
    # what tests/test_openwrt_package.py takes as not on the router is left out here
    for rel in NOT_ON_ROUTER:
        assert not (site / rel).exists(), rel
    for path in ("mptun/cli.py", "mptun/uci.py", "mptun/commands/client.py",
                 "mptun/commands/uci.py", "mptun/commands/nft.py", "mptun/commands/status.py",
                 "mptun/commands/uplinks.py", "mptun/client/hook.py", "mptun/common/crypto.py",
                 "mptun/common/relay/engine.py"):  # fmt: skip
        assert (site / path).is_file(), path
    # nothing else is lost: every module of client/ and common/ is there
    for folder in ("client", "common"):
        for src in (ROOT / folder).rglob("*.py"):
            assert (site / "mptun" / folder / src.relative_to(ROOT / folder)).is_file(), src


@pytest.fixture
def router_python(tmp_path: Path) -> Iterator[tuple[list[str], str]]:
    """(`python -S -m mptun`, the PYTHONPATH of the router's tree and this venv's third-party
    packages)."""
    site = router_tree(tmp_path)
    third_party = sysconfig.get_paths()["purelib"]
    yield [sys.executable, "-S", "-m", "mptun"], f"{site}:{third_party}"


def _run(router_python, *args: str) -> subprocess.CompletedProcess:
    argv, path = router_python
    return subprocess.run(
        [*argv, *args],
        env={"PYTHONPATH": path, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def test_the_router_tree_runs_its_commands_and_names_the_missing_ones(
    router_python, tmp_path: Path
) -> None:
    python, path = router_python
    site = path.split(":")[0]
    r = subprocess.run(
        [python[0], "-S", "-c", "import mptun.client.app, mptun.cli; print(mptun.__file__)"],
        env={"PYTHONPATH": path}, capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == f"{site}/mptun/__init__.py", r
    for args in (("--version",), ("--help",), ("client", "--help"), ("nft", "--help"),
                 ("uci", "--help"), ("status", "--help"), ("uplinks", "--help")):  # fmt: skip
        r = _run(router_python, *args)
        assert r.returncode == 0, (args, r.stderr)
    for command in ("server", "bench", "demo"):
        r = _run(router_python, command, "--help")
        assert r.returncode == 1, r
        assert r.stderr.count("\n") == 1 and "not part of this installation" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_a_tunnel_through_the_router_trees_client(
    router_python, tmp_path: Path, key_file: Path
) -> None:
    need("curl")
    argv, path = router_python
    allow = ("--allow-target", "127.0.0.0/8")
    with ServerProcess(tmp_path, key_file, *allow, stats=False) as srv, http_server() as (_, port):
        log = tmp_path / "router-client.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*argv, "client", "--server", f"127.0.0.1:{srv.port}", "--key-file",
                 str(key_file), "--socks", "127.0.0.1:0", "--control", "none"],
                env={"PYTHONPATH": path, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                stdout=out, stderr=subprocess.STDOUT, cwd="/",
            )  # fmt: skip
        try:
            ((_, _, socks),) = wait_logged_listeners(log.read_text, 1, proc)
            url = f"http://127.0.0.1:{port}/bytes/1000000/7"
            r = curl("--socks5", f"127.0.0.1:{socks}", url, "-o", "-")
            assert r.returncode == 0, r.stderr
            assert hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(1000000, 7)
        finally:
            proc.terminate()
            proc.wait(15)
        # it ran from the router's tree, not the checkout
        assert "Traceback" not in log.read_text()
