"""Every shell script in the repository passes shellcheck (OpenWrt's ash scripts included)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, need

SHELLS = ("sh", "bash", "dash", "ash", "/etc/rc.common")


def is_shell_script(path: Path) -> bool:
    """A `.sh` file, or any file whose #! line runs a shell (rc.common for procd init scripts)."""
    if path.suffix == ".sh":
        return True
    try:
        with path.open("rb") as f:
            first = f.readline(200).decode("utf-8", "replace")
    except OSError:
        return False
    if not first.startswith("#!"):
        return False
    words = first[2:].split()
    names = [w.rsplit("/", 1)[-1] for w in words] + words
    return any(s in names for s in SHELLS)


def shell_scripts() -> list[Path]:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = [ROOT / f.decode() for f in files if f]
    return sorted(p for p in paths if p.is_file() and is_shell_script(p))


def test_finds_the_deployment_scripts() -> None:
    found = {p.relative_to(ROOT).as_posix() for p in shell_scripts()}
    for script in (
        "vps/install.sh",
        "openwrt/net/mptun/files/mptun.init",
        "openwrt/net/mptun/files/mptun.hotplug",
        "openwrt/net/mptun/files/mptun.ntp-hotplug",
        "openwrt/net/mptun/files/mptun.sh",
        "openwrt/net/mptun/files/mptun.uci-defaults",
        "tests/openwrt_shim/lib/functions.sh",
    ):
        assert script in found


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shellcheck(script: Path) -> None:
    need("shellcheck")
    r = subprocess.run(
        ["shellcheck", "--external-sources", script.name],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
