"""A CPU quota for the bench's router-side relays: a cgroup holding them to a share of one core.

A router core is many times slower than these machines' cores; a CFS bandwidth quota with a
short period stands in for one. The period is 10 ms, so a quota is a slow core rather than long
freezes (with a 100 ms period and a few percent, the relay runs for a few milliseconds, then is
frozen for the rest of the period, which TCP sees as stalls, not as a slow CPU). The kernel
refuses a quota below 1 ms (kernel/sched/core.c, `min_cfs_quota_period`), so with a 10 ms
period the smallest quota is 10% of one core.

The cgroup v2 `cpu` controller (`cpu.max`: "QUOTA PERIOD") is used where it is mounted, else
v1's (`cpu.cfs_period_us`, `cpu.cfs_quota_us`), as on this kernel's test machines.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from pathlib import Path

PERIOD_US = 10_000
MIN_PERCENT = 10.0  # 1 ms of a 10 ms period: the kernel's smallest quota
MAX_PERCENT = 100.0  # one core


class QuotaError(RuntimeError):
    """The machine cannot give a process a CPU quota (no controller, no permission)."""


def parse_percentages(text: str) -> tuple[float, ...]:
    """ "10,15,20" -> (10.0, 15.0, 20.0), sorted and unique; a ValueError saying what is wrong."""
    out: set[float] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a number") from None
        if not MIN_PERCENT <= value <= MAX_PERCENT:  # nan fails this too
            raise ValueError(
                f"{part} is outside {MIN_PERCENT:g}-{MAX_PERCENT:g} (% of one core; the kernel "
                f"refuses a quota under 1 ms of the {PERIOD_US // 1000} ms period)"
            )
        out.add(value)
    return tuple(sorted(out))


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of every cgroup mount."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            out.append((parts[1], parts[2], set(parts[3].split(","))))
    return out


def find_controller() -> tuple[Path, int]:
    """(the directory to create cgroups in, cgroup version) of the `cpu` controller."""
    mounts = _mounts()
    for point, fstype, _ in mounts:
        if fstype == "cgroup2":
            controllers = Path(point, "cgroup.controllers")
            try:
                if "cpu" in controllers.read_text().split():
                    return Path(point), 2
            except OSError:
                continue
    for point, fstype, opts in mounts:
        if fstype == "cgroup" and "cpu" in opts:
            return Path(point), 1
    raise QuotaError("no cgroup cpu controller is mounted (v2 cpu.max or v1 cpu)")


def availability() -> str | None:
    """Why no quota can be set here, or None when it can (root and a cpu controller)."""
    if os.geteuid() != 0:
        return "needs root (a cgroup per relay)"
    try:
        find_controller()
    except (QuotaError, OSError) as e:
        return str(e)
    return None


class CpuQuota:
    """One cgroup, created on construction; `set(percent)`, `add(pid)`, `close()` removes it."""

    def __init__(self, label: str) -> None:
        self.root, self.version = find_controller()
        self.path = self.root / f"mptun-bench-{label}-{secrets.token_hex(3)}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise QuotaError(f"cannot create {self.path}: {e.strerror}") from None
        if not (self.path / ("cpu.max" if self.version == 2 else "cpu.cfs_quota_us")).exists():
            self.path.rmdir()
            raise QuotaError(f"no cpu controller in {self.path} (cgroup.subtree_control)")
        self.percent: float | None = None

    def _write(self, name: str, value: str) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError as e:
            raise QuotaError(f"{self.path / name} <- {value}: {e.strerror}") from None

    def set(self, percent: float | None) -> None:
        """Hold the group to `percent` of one core per 10 ms period (None: no limit)."""
        quota = -1 if percent is None else round(percent / 100 * PERIOD_US)
        if self.version == 2:
            self._write("cpu.max", f"{'max' if quota < 0 else quota} {PERIOD_US}")
        else:
            # the period first: with the old (100 ms) period a 1 ms quota would be accepted,
            # but 1 ms of quota is then enforced against a 100 ms period until the next write
            self._write("cpu.cfs_period_us", str(PERIOD_US))
            self._write("cpu.cfs_quota_us", str(quota))
        self.percent = percent

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the group."""
        self._write("cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def stat(self) -> dict[str, int]:
        """The group's cpu.stat counters; `throttled_us` in both versions."""
        out: dict[str, int] = {}
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                out[key] = int(value)
        except (OSError, ValueError):
            return out
        if "throttled_time" in out:  # v1 counts nanoseconds
            out["throttled_us"] = out.pop("throttled_time") // 1000
        elif "throttled_usec" in out:
            out["throttled_us"] = out.pop("throttled_usec")
        return out

    def close(self) -> None:
        """Move what is left to the parent and remove the group (idempotent)."""
        if not self.path.exists():
            return
        for pid in self.pids():
            try:
                (self.root / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass  # it exited meanwhile
        deadline = time.monotonic() + 5
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                # EBUSY while a moved task is still being migrated out
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise QuotaError(f"cannot remove {self.path}: {e.strerror}") from None
                time.sleep(0.05)
