"""`--uplink-hook` (client/hook.py): real programs run per uplink health change.

The hooks are real shell scripts writing what they were given to files; what is checked is what
the issue asks of the runner: no shell between the client and the program, one run at a time per
uplink with the latest state winning, a deadline that kills the hook and what it started, a
failure logged in one line, and an event loop that keeps running while a hook does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from mptun.client.hook import UplinkHook

# Appends "start IFACE STATE" and "end IFACE STATE" around an optional pause and exit status
# the test sets per state (files PAUSE_<STATE>, EXIT_<STATE> in the folder).
HOOK = """#!/bin/sh
dir=$(dirname "$0")
echo "start $*" >>"$dir/runs"
[ -e "$dir/GATE_$2" ] && while [ ! -e "$dir/open" ]; do sleep 0.02; done
[ -e "$dir/EXIT_$2" ] && { echo "failing on purpose for $1" >&2; exit "$(cat "$dir/EXIT_$2")"; }
echo "end $*" >>"$dir/runs"
"""


def _hook(tmp_path: Path, text: str = HOOK) -> Path:
    path = tmp_path / "hook"
    path.write_text(text)
    path.chmod(0o755)
    return path


def _runs(tmp_path: Path) -> list[str]:
    f = tmp_path / "runs"
    return f.read_text().splitlines() if f.exists() else []


async def _settle(hook: UplinkHook, seconds: float = 20.0) -> None:
    """Wait until no hook runs (bounded: a hang fails the test, it does not stall the suite)."""
    async with asyncio.timeout(seconds):
        while hook.busy:
            await asyncio.sleep(0.01)


def test_runs_the_program_with_iface_and_state_and_no_shell(tmp_path: Path) -> None:
    """The words of the command line reach the program as they are: a `;` or a space in them
    is no shell syntax."""
    out = tmp_path / "args"
    script = _hook(tmp_path, f'#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done >"{out}"\n')

    async def main() -> None:
        hook = UplinkHook([str(script), "a b;touch x"])
        hook.notify("wan1", "dead")
        await _settle(hook)
        assert hook.runs == 1 and hook.failures == 0

    asyncio.run(main())
    assert out.read_text().splitlines() == ["[a b;touch x]", "[wan1]", "[dead]"]
    assert not (tmp_path / "x").exists()


def test_one_run_at_a_time_per_uplink_and_the_latest_state_wins(tmp_path: Path) -> None:
    script = _hook(tmp_path)
    (tmp_path / "GATE_dead").touch()  # the "dead" run waits until the test opens the gate

    async def main() -> None:
        hook = UplinkHook([str(script)])
        hook.notify("wan1", "dead")
        async with asyncio.timeout(10):
            while not _runs(tmp_path):
                await asyncio.sleep(0.01)
        # while it runs: three more changes of wan1, and one of wan2 (which runs at once)
        for state in ("up", "degraded", "up"):
            hook.notify("wan1", state)
        hook.notify("wan2", "mptcp-broken")
        async with asyncio.timeout(10):
            while "end wan2 mptcp-broken" not in _runs(tmp_path):
                await asyncio.sleep(0.01)
        assert _runs(tmp_path)[0] == "start wan1 dead"
        assert not any(r.startswith("start wan1 up") for r in _runs(tmp_path))
        (tmp_path / "open").touch()
        await _settle(hook)
        # "dead" then "up" before the loop runs the hook: the last run was "up", nothing runs
        hook.notify("wan1", "dead")
        hook.notify("wan1", "up")
        await _settle(hook)
        assert hook.runs == 3 and hook.failures == 0

    asyncio.run(main())
    wan1 = [r for r in _runs(tmp_path) if " wan1 " in r]
    assert wan1 == ["start wan1 dead", "end wan1 dead", "start wan1 up", "end wan1 up"]


def test_a_failure_is_one_log_line_with_the_hooks_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = _hook(tmp_path)
    (tmp_path / "EXIT_dead").write_text("3")
    caplog.set_level(logging.WARNING, "mptun.client")

    async def main() -> None:
        hook = UplinkHook([str(script)])
        hook.notify("wan1", "dead")
        await _settle(hook)
        assert hook.failures == 1
        os.unlink(script)  # gone: not runnable is a failure too, not an exception
        hook.notify("wan1", "up")
        await _settle(hook)
        assert hook.failures == 2

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].endswith("hook wan1 dead: exit status 3: failing on purpose for wan1")
    assert "hook wan1 up: cannot run it" in lines[1]
    assert all("\n" not in line for line in lines)


@pytest.mark.timing
def test_a_hook_past_its_deadline_is_killed_with_what_it_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The deadline kills the hook's process group: a shell's child (here a `sleep`) too."""
    pid_file = tmp_path / "child"
    script = _hook(tmp_path, f'#!/bin/sh\nsleep 60 &\necho $! >"{pid_file}"\nwait\n')
    caplog.set_level(logging.WARNING, "mptun.client")

    async def main() -> None:
        hook = UplinkHook([str(script)], timeout=0.5)
        hook.notify("wan1", "dead")
        await _settle(hook)  # within 20 s, not the 60 s of the sleep
        assert hook.failures == 1

    asyncio.run(main())
    assert "killed after 0.5 s" in caplog.text
    child = int(pid_file.read_text())
    # the sleep was killed (it may linger as a zombie until init reaps it: not running)
    try:
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X"), state


def test_the_event_loop_runs_while_a_hook_does(tmp_path: Path) -> None:
    """The hook waits for a file only the event loop creates: were the loop blocked while the
    hook runs, neither would finish (the deadline would fail the test)."""
    script = _hook(tmp_path)
    (tmp_path / "GATE_dead").touch()

    async def main() -> None:
        hook = UplinkHook([str(script)])
        hook.notify("wan1", "dead")
        async with asyncio.timeout(10):
            while not _runs(tmp_path):
                await asyncio.sleep(0.01)
        assert hook.busy
        (tmp_path / "open").touch()  # the loop runs this while the hook waits
        await _settle(hook)

    asyncio.run(main())
    assert _runs(tmp_path) == ["start wan1 dead", "end wan1 dead"]
