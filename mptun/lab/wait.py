"""Ports and listeners, here or inside a namespace: the one `free_port` and `wait_listening` of
the lab, the benchmark and the tests.

`prefix` is the argv prefix that runs a command inside a namespace (`Netns.prefix()`, `nsenter
...`); empty means this process's own network. Here a listener is found by connecting to it (so
the listener sees one probe connection, as the loopback tests expect); inside a namespace by
`ss` (no connection at all).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from mptun.common.sockets import family_of

# How much slower than this machine the tests run: the QEMU guest (tests/test_vm.py) sets it,
# since its software-emulated CPU starts a Python process in seconds, not milliseconds.
SLOWDOWN = float(os.environ.get("MPTUN_TEST_SLOWDOWN", "1"))


def free_port(host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> int:
    """A port the kernel picks (port 0, never a guess), here or inside `prefix`'s namespace."""
    if prefix:
        code = f"from mptun.lab.wait import free_port; print(free_port({host!r}))"
        out = subprocess.run(
            [*prefix, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": _package_root()},
        )
        return int(out.stdout)
    with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(
    host: str,
    port: int,
    timeout: float | None = None,
    proc: subprocess.Popen | None = None,
    *,
    prefix: Sequence[str] = (),
    udp: bool = False,
) -> None:
    """Poll until something listens on host:port (never a fixed sleep); 10 s x SLOWDOWN unless
    told. A RuntimeError if `proc` exits first, a TimeoutError after `timeout`. Inside a
    namespace (`prefix`), any address on `port` counts; `udp` looks for a bound UDP socket."""
    timeout = timeout or 10.0 * SLOWDOWN
    where = f" in {' '.join(prefix)}" if prefix else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process exited with {proc.returncode} before listening on {port}{where}"
            )
        if _listening(host, port, prefix, udp):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}{where} after {timeout} s")


def _listening(host: str, port: int, prefix: Sequence[str], udp: bool) -> bool:
    if prefix or udp:
        flags = "-Hlnu" if udp else "-Hlnt"
        r = subprocess.run(
            [*prefix, "ss", flags, f"sport = :{port}"], capture_output=True, text=True
        )
        return bool(r.stdout.strip())
    with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _package_root() -> str:
    """The directory `mptun` is imported from (for a Python started inside a namespace)."""
    import mptun

    return os.path.dirname(os.path.dirname(os.path.abspath(mptun.__file__)))
