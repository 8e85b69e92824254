"""What the benchmark reads from /proc: CPU time and RSS of a process, busy time of the machine."""

from __future__ import annotations

import ctypes
import os
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads, dead ones included, to the nanosecond.

    The process's CPU-time clock (clock_getcpuclockid(3)) is the scheduler's runtime, which
    /proc/PID/stat's utime + stime are scaled to (kernel/sched/cputime.c cputime_adjust) but
    rounded to clock ticks: 10 ms, ~6% of what a relay spends on one 5 s run at 200 Mbit.
    """
    clock = _process_clock(pid)
    if clock is not None:
        try:
            return time.clock_gettime(clock)
        except OSError:
            pass
    with open(f"/proc/{pid}/stat") as f:
        # the command name (field 2) may hold spaces: split after its closing parenthesis
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _process_clock(pid: int) -> int | None:
    # CDLL(None): the symbols already loaded, libc's among them. (ctypes.util.find_library
    # would run ldconfig in a subprocess on every call, inside the run being measured.)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        clock = ctypes.c_int()
        if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return clock.value


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_busy_seconds() -> float:
    """CPU time all cores spent not idle (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK
