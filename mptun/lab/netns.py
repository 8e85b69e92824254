"""Network namespaces for tests, the demo and the benchmark (via `ip netns`, as the kernel's
MPTCP selftests do): random-suffixed names, commands run inside, processes tracked and killed by
PID, everything deleted on exit, also when the run fails or is interrupted.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence


class NetnsError(RuntimeError):
    """A namespace command failed; the message holds the command and its stderr."""


def have_netns() -> tuple[bool, str]:
    """Whether this process can build namespaces here, and why not if it cannot."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return False, "iproute2's `ip` is not installed"
    name = f"mpt-probe-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return False, f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True, ""


def have_mptcp() -> tuple[bool, str]:
    try:
        with open("/proc/sys/net/mptcp/enabled") as f:
            f.read()
    except OSError:
        return False, "this kernel has no MPTCP (no /proc/sys/net/mptcp)"
    return True, ""


def run(cmd: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("text", True)
    r = subprocess.run(list(cmd), capture_output=True, **kw)
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


class Netns:
    """One namespace. Use as a context manager or call `delete()`."""

    def __init__(self, role: str, suffix: str | None = None) -> None:
        self.suffix = suffix or secrets.token_hex(3)
        self.name = f"mpt-{self.suffix}-{role}"
        self.procs: list[subprocess.Popen] = []
        run(["ip", "netns", "add", self.name])
        self.ip("link", "set", "lo", "up")

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    def exec(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return run([*self.prefix(), *cmd], check=check, **kw)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value: str | int) -> None:
        self.exec("sysctl", "-qw", f"{key}={value}")

    def popen(self, cmd: Sequence[str], **kw) -> subprocess.Popen:
        """Start a process inside; it is killed (by PID) when the namespace is deleted."""
        p = subprocess.Popen([*self.prefix(), *cmd], **kw)
        self.procs.append(p)
        return p

    def stop_processes(self, timeout: float = 5.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def delete(self) -> None:
        self.stop_processes()
        run(["ip", "netns", "del", self.name], check=False)
