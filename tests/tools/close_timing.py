"""How fast the server closes after a prober's FIN, by how many bytes the prober sent first.

    python -m tests.tools.close_timing [--trials 300] [--pythonpath DIR]

Starts `mptun server` (from DIR when given: an older tree, for before/after figures) and, for
each length (31, 32, 58, 59, 60 random bytes), interleaved, `--trials` times: connects, sends,
waits until the server has read them (ss: Recv-Q 0), half-closes and times until the server's
FIN. Prints the median and the 10th/90th percentiles in microseconds per length. Bounded by
the trial count. tests/test_close_path.py checks the mechanism itself.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from mptun.common.crypto import generate_key
from tests.helpers import ReservedPort, ServerProcess, wait_until
from tests.test_close_path import recv_q

LENGTHS = (31, 32, 58, 59, 60)


def reaction(port: int, n: int) -> float:
    """Seconds from our FIN to the server's, after sending `n` random bytes."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(os.urandom(n))
        wait_until(lambda: recv_q(port) == 0, 10, "the server to read the probe")
        t0 = time.perf_counter()
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        assert s.recv(1) == b""
        return time.perf_counter() - t0


def measure(trials: int, pythonpath: str) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mptun-close-"))
    key = tmp / "key"
    key.write_text(generate_key() + "\n")
    key.chmod(0o600)
    env = {"PYTHONPATH": pythonpath} if pythonpath else None
    prefix = ["env", "-C", str(tmp)] if pythonpath else None  # not ./mptun of this checkout
    held = ReservedPort()  # an older tree may not take port 0: a port held until it listens
    times: dict[int, list[float]] = {n: [] for n in LENGTHS}
    with ServerProcess(
        tmp, key, "--handshake-timeout", "30", env=env, prefix=prefix, port=held.port
    ) as srv:
        held.release()
        for _ in range(trials):
            for n in LENGTHS:
                times[n].append(reaction(srv.port, n))
    out = {}
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        out[n] = {
            "median_us": round(statistics.median(ts) * 1e6),
            "p10_us": round(q[0] * 1e6),
            "p90_us": round(q[-1] * 1e6),
        }
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--pythonpath", default="")
    a = p.parse_args()
    print(json.dumps(measure(a.trials, a.pythonpath)))
