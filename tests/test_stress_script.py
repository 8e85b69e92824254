"""tests/stress.sh (`make test-stress`, `make test-timing`) never leaves its load behind: not
after runs that pass, nor after one that fails, nor when it is killed outright. pytest is
stood in for by a script (PYTHON=...) so that these take seconds."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

from mptun.lab.wait import wait_until
from tests.helpers import ROOT

SCRIPT = ROOT / "tests" / "stress.sh"


def fake_python(tmp: Path, body: str) -> dict[str, str]:
    """An environment whose PYTHON runs `body` (a shell script) instead of pytest."""
    fake = tmp / "python"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    return {**os.environ, "PYTHON": str(fake)}


def load_pids(out: str) -> list[int]:
    m = re.search(r"load PIDs ([\d ]+),", out)
    assert m, out
    return [int(p) for p in m.group(1).split()]


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def gone(pid: int) -> bool:
    """Exited (a zombie nobody has reaped yet counts as gone: it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_runs_in_a_row_then_the_load_is_gone(tmp_path: Path) -> None:
    env = fake_python(tmp_path, 'echo "pytest $*"')
    r = subprocess.run(
        [SCRIPT, "--busy", "2", "--runs", "3", "--max-seconds", "60", "--", "-m", "timing"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("pytest -m pytest -m timing") == 3
    for run in (1, 2, 3):
        assert f"run {run}/3: pytest exit 0 in " in r.stdout
    pids = load_pids(r.stdout)
    assert len(pids) == 2 and all(gone(p) for p in pids)


def test_a_failing_run_stops_the_runs_and_the_load(tmp_path: Path) -> None:
    env = fake_python(tmp_path, "exit 3")
    r = subprocess.run(
        [SCRIPT, "--runs", "3", "--max-seconds", "60"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert r.returncode == 3
    assert "run 1/3: pytest exit 3" in r.stdout and "run 2/3" not in r.stdout
    assert all(gone(p) for p in load_pids(r.stdout))


def test_killed_outright_the_load_still_ends_by_itself(tmp_path: Path) -> None:
    """SIGKILL runs no trap: the load's own `timeout` ends it."""
    env = fake_python(tmp_path, "exec sleep 30")
    p = subprocess.Popen(
        [SCRIPT, "--max-seconds", "2"], stdout=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    sleeper: list[int] = []
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        (pid,) = load_pids(line)
        loop = wait_until(lambda: children(pid), 10, "the busy loop")
        sleeper += wait_until(
            lambda: [c for c in children(p.pid) if cmdline(c).startswith(b"sleep")],
            10,
            "the stand-in for pytest",
        )
        p.kill()
        p.wait()
        wait_until(lambda: gone(pid) and all(gone(c) for c in loop), 20, "the load to end")
    finally:
        for c in sleeper:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGKILL)
        p.kill()
        p.wait()


def test_bad_arguments_are_one_line() -> None:
    r = subprocess.run([SCRIPT, "--busy", "many"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "whole numbers" in r.stderr
