"""An isolated root for running installers for real: new mount and network namespaces with
overlays over /etc, /opt and /var, so `install.sh` writes its real paths and the host sees none of
it (and `sysctl -p` changes only the namespace's network stack)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.helpers import ROOT

# Overlays need an upper directory on a file system that is not itself an overlay (the
# container's root often is): a tmpfs mounted inside the namespace holds them.
SETUP = r"""
set -eu
scratch=$(mktemp -d /tmp/mptun-iso.XXXXXX)
mount -t tmpfs -o mode=0700 mptun-iso "$scratch"
for d in {dirs}; do
    mkdir -p "$scratch/$d/upper" "$scratch/$d/work"
    mount -t overlay overlay \
        -o "lowerdir=/$d,upperdir=$scratch/$d/upper,workdir=$scratch/$d/work" "/$d"
done
ip link set lo up
echo "ready $$ $scratch"
exec sleep 3600
"""

OVERLAID = ("etc", "opt", "var")


class IsolatedRoot:
    """A long-lived `unshare --mount --net` process; `run` enters it with nsenter."""

    def __init__(self, dirs: Sequence[str] = OVERLAID) -> None:
        self._proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--net",
                "--fork",
                "--kill-child",
                "--propagation",
                "private",
                "sh",
                "-c",
                SETUP.replace("{dirs}", " ".join(dirs)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().split()
        if len(line) != 3 or line[0] != "ready":
            err = self._proc.stderr.read() if self._proc.stderr else ""
            self._proc.kill()
            raise RuntimeError(f"could not build the isolated root: {line} {err}")
        self.pid = int(line[1])
        self._scratch = Path(line[2])  # an empty mount point on the host, removed in close()

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside (as `Netns.prefix()`: for
        `wait_listening` of tests/helpers.py)."""
        return ["nsenter", f"--target={self.pid}", "--mount", "--net", "--"]

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return [*self.prefix(), *map(str, cmd)]

    def run(
        self,
        cmd: Sequence[str | os.PathLike[str]],
        env: Mapping[str, str] | None = None,
        timeout: float = 300,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        r = subprocess.run(
            self.argv([str(c) for c in cmd]),
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
                f"--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
            )
        return r

    def popen(
        self,
        cmd: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        pipe_stdout: bool = False,
    ) -> subprocess.Popen:
        """Start a process inside (nsenter execs it: its PID is the process's own)."""
        with open(log, "wb") as f:
            return subprocess.Popen(
                self.argv(cmd),
                stdout=subprocess.PIPE if pipe_stdout else f,
                stderr=f,
                env={**os.environ, **(env or {})},
            )

    def python(self, code: str, timeout: float = 60) -> str:
        """Run Python (this interpreter, the repo importable) inside; its stdout."""
        env = {"PYTHONPATH": str(ROOT)}
        return self.run([sys.executable, "-c", code], env=env, timeout=timeout).stdout

    def read(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).returncode == 0

    def close(self) -> None:
        """Kill the namespace's holder (by PID); the namespaces and overlays go with it."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        try:
            self._scratch.rmdir()
        except OSError:
            pass
