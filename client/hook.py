"""`--uplink-hook`: a program told of each uplink health change, `CMD IFACE STATE`.

Where another program owns the MPTCP endpoints (on OpenWrt the package's shell, which netifd's
hotplug events also drive), the client does not withdraw them itself: it tells that program,
which withdraws a dead uplink's endpoint and re-adds it when the uplink answers again (one owner
for the endpoints). The program runs without a shell, with a deadline, at most one at a time
per uplink; a change that comes while it runs waits for it, and only the latest state is run
next (a hook told "dead" then "up" while busy runs once more, with "up"). A failure is logged
in one line. Nothing here waits on the event loop: each run is its own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Sequence

log = logging.getLogger("mptun.client")

HOOK_TIMEOUT = 10.0  # seconds a run may take before its process group is killed
STDERR_KEPT = 300  # the last bytes of the hook's stderr, kept for the failure line


class UplinkHook:
    """Runs `argv + [uplink, state]` per state change of an uplink (see the module's text)."""

    def __init__(self, argv: Sequence[str], timeout: float = HOOK_TIMEOUT) -> None:
        self.argv = tuple(argv)
        self.timeout = timeout
        self._want: dict[str, str] = {}  # the latest state told, per uplink
        self._done: dict[str, str] = {}  # the state last run, per uplink
        self._tasks: dict[str, asyncio.Task] = {}
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self.runs = 0  # hook processes started (tests and status)
        self.failures = 0

    def notify(self, uplink: str, state: str) -> None:
        """Uplink `uplink` is now in `state`: run the hook for it (now, or after the run in
        progress for that uplink). Called from the event loop."""
        self._want[uplink] = state
        task = self._tasks.get(uplink)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._serve(uplink))
            self._tasks[uplink] = task

    @property
    def busy(self) -> bool:
        return any(not t.done() for t in self._tasks.values())

    def close(self) -> None:
        """Stop: cancel what waits, end running hooks (SIGTERM to their process groups)."""
        for task in self._tasks.values():
            task.cancel()
        for proc in self._procs.values():
            _signal_group(proc, signal.SIGTERM)
        self._tasks.clear()

    async def _serve(self, uplink: str) -> None:
        """Run the hook for `uplink` until the state last run is the latest one told."""
        while self._want[uplink] != self._done.get(uplink):
            state = self._want[uplink]
            self._done[uplink] = state  # not retried when it fails: the next change runs it
            await self._run(uplink, state)

    async def _run(self, uplink: str, state: str) -> None:
        argv = [*self.argv, uplink, state]
        shown = shlex.join(argv)
        try:
            # Its own session, so a timeout kills what it started too (a shell's `ip`).
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            self.failures += 1
            log.warning("uplink hook %s: cannot run it: %s", shown, e.strerror or e)
            return
        self.runs += 1
        self._procs[uplink] = proc
        try:
            assert proc.stderr is not None
            try:
                async with asyncio.timeout(self.timeout):
                    err = await _read_bounded(proc.stderr)
                    status = await proc.wait()
            except TimeoutError:
                _signal_group(proc, signal.SIGKILL)
                await proc.wait()
                self.failures += 1
                log.warning("uplink hook %s: killed after %g s", shown, self.timeout)
                return
        finally:
            self._procs.pop(uplink, None)
        if status != 0:
            self.failures += 1
            why = f"exit status {status}" if status > 0 else f"signal {-status}"
            last = err.decode(errors="replace").strip().splitlines()
            log.warning("uplink hook %s: %s%s", shown, why, f": {last[-1]}" if last else "")
        else:
            log.debug("uplink hook %s: done", shown)


async def _read_bounded(stream: asyncio.StreamReader) -> bytes:
    """`stream` read to its end, its last STDERR_KEPT bytes kept (where the reason of a failure
    is; a hook that writes without end costs no memory)."""
    kept = b""
    while chunk := await stream.read(4096):
        kept = (kept + chunk)[-STDERR_KEPT:]
    return kept


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
