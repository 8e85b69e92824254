"""The test tools leave nothing behind: tests/tools/dns_flip.py removes its temporary directory,
after a run that worked and after one that failed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent / "tools" / "dns_flip.py"


def flip(tmp_path: Path, key_file: Path, *server_args: str) -> subprocess.CompletedProcess:
    """dns_flip.py in its own network and mount namespaces, its TMPDIR a directory of ours."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    cmd = [
        "unshare", "--net", "--mount", "--propagation", "private",
        sys.executable, str(TOOL), "--key-file", str(key_file), "--answers", "198.51.100.1",
        "--target", "flip.test", "--log", str(tmp_path / "server.log"),
        *(f"--server-arg={a}" for a in server_args),
    ]  # fmt: skip
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmpdir)}
    )


@pytest.mark.root
@pytest.mark.netns
def test_dns_flip_removes_its_temporary_directory(tmp_path: Path, key_file: Path) -> None:
    r = flip(tmp_path, key_file)
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = json.loads(r.stdout.splitlines()[-1])["results"]  # the run went through
    assert result[0] == "flip.test"
    assert os.listdir(tmp_path / "tmpdir") == []


@pytest.mark.root
@pytest.mark.netns
def test_dns_flip_removes_it_when_the_server_fails(tmp_path: Path, key_file: Path) -> None:
    r = flip(tmp_path, key_file, "--no-such-option")
    assert r.returncode != 0
    assert "no such option" in (tmp_path / "server.log").read_text().lower()
    assert os.listdir(tmp_path / "tmpdir") == []
