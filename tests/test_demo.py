"""`mptun demo`: runs, explains itself without root, and leaves nothing behind when interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.usefixtures("needs_mptcp_testbed")]

DEMO = [sys.executable, "-m", "mptun", "demo"]


def namespaces(suffix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if f"mpt-{suffix}-" in ln]


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (the demo's work directory is in every child's)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if text.encode() in (p / "cmdline").read_bytes():
                found.append(int(p.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_demo_shows_the_sum_of_the_uplinks_and_cleans_up():
    r = subprocess.run([*DEMO, "--seconds", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    suffix = re.search(r"namespaces mpt-([0-9a-f]+)-\* deleted", out).group(1)
    assert "one connection averaged" in out and "intact, nothing lost" in out, out
    assert "for 4 s;" in out, out
    seconds = [int(s) for s in re.findall(r"^\s+(\d+) s\s+\d", out, re.M)]  # the per-second rows
    assert seconds and seconds == sorted(set(seconds)) and seconds[-1] <= 4, out  # no 5th row
    assert re.search(r"\d+\s+wan1\s+198\.51\.100\.17:\d+", out), out  # status showed subflows
    assert namespaces(suffix) == []
    assert not list(Path("/tmp").glob(f"mptun-demo-{suffix}-*"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_demo_leaves_nothing_behind(sig: signal.Signals):
    proc = subprocess.Popen(
        [*DEMO, "--seconds", "30"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    suffix = None
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:  # interrupt once the transfer runs: every process is up by then
        seen.append(line)
        if m := re.search(r"namespaces mpt-([0-9a-f]+)-lan", line):
            suffix = m.group(1)
        if re.match(r"\s+\d+ s\s+\d", line) or time.monotonic() > deadline:
            break
    assert suffix, "".join(seen)
    assert len(namespaces(suffix)) == 4
    assert processes_mentioning(f"mptun-demo-{suffix}-")  # server and client use its key file
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted" in rest and f"namespaces mpt-{suffix}-* deleted" in rest, rest
    assert namespaces(suffix) == []
    assert processes_mentioning(f"mptun-demo-{suffix}-") == []
    assert not list(Path("/tmp").glob(f"mptun-demo-{suffix}-*"))


def test_demo_without_root_explains_and_changes_nothing():
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *DEMO],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": "/tmp"},
    )
    assert r.returncode == 2, r.stderr
    assert "needs root" in r.stderr.replace("\n", " ") and "Nothing was changed" in r.stderr
    assert "Traceback" not in r.stderr and "[1/5]" not in r.stdout
