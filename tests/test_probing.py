"""Probing resistance of a real `mptun server` (modelled on outline-ss-server's probe tests).

Every first flight that fails (random bytes, each proper prefix of a valid flight, each one-byte
corruption, a replay, a reflected server response, a stale timestamp) must look the same from
outside: zero bytes back, no reset, and a close exactly at the handshake deadline counted from
accept (or, when the prober half-closes, right after its FIN). The server's per-status counters,
read through SIGUSR1 and `--stats-file`, must match the cases exactly.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mptun.common.address import Address
from mptun.common.crypto import TAG_LEN
from mptun.common.handshake import REQUEST_FIXED_LEN, SALT_LEN
from tests.helpers import ServerProcess
from tests.peers import closing_target, delta, exchange, flight

DEADLINE = 2.0  # the server's --handshake-timeout in these tests
AUTH_AT = SALT_LEN + REQUEST_FIXED_LEN + TAG_LEN  # bytes the server needs to authenticate
BUDGET = ("--max-handshakes", "1000", "--max-handshakes-per-source", "1000")
RANDOM_LENGTHS = [*range(222), 1000, 4096, 65536]  # 221: largest random probe on gfw.report


@dataclass
class Outcome:
    received: int  # bytes the server sent back
    end: str  # "eof", "reset" or "open" (nothing within the wait)
    seconds: float  # from calling connect() to the end: never less than from the server's accept


async def probe(port: int, data: bytes, fin: bool, wait: float) -> Outcome:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received, end = 0, "open"
    try:
        writer.write(data)
        await writer.drain()
        if fin:
            writer.write_eof()
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                received += len(chunk)
        end = "eof"
    except ConnectionResetError:
        end = "reset"
    except TimeoutError:
        pass
    finally:
        writer.transport.abort()
    return Outcome(received, end, time.monotonic() - t0)


async def probe_all(port: int, cases: dict[str, bytes], fin: bool) -> dict[str, Outcome]:
    sem = asyncio.Semaphore(400)

    async def one(data: bytes) -> Outcome:
        async with sem:
            return await probe(port, data, fin, DEADLINE + 8)

    results = await asyncio.gather(*(one(d) for d in cases.values()))
    return dict(zip(cases, results, strict=True))


@pytest.fixture
def server(tmp_path: Path, key_file: Path):
    # A burst of ~400 probes from one address: a handshake budget that holds them all.
    with ServerProcess(
        tmp_path, key_file, "--handshake-timeout", str(DEADLINE), "--allow-private", *BUDGET
    ) as srv:
        yield srv


def make_cases(srv: ServerProcess, target: Address) -> tuple[dict[str, bytes], dict[str, int]]:
    """Every probe, and the counter increments it must cause when the prober does not FIN."""
    psk = srv.psk
    valid = flight(psk, target)
    good = valid.first_flight()
    response = exchange(srv.port, good, valid)  # accepted once: its salt is now in the cache
    cases: dict[str, bytes] = {}
    expect = {"auth": 0, "timeout": 0, "replay": 1, "clock": 1}
    for n in RANDOM_LENGTHS:
        cases[f"random-{n}"] = os.urandom(n)
        expect["auth" if n >= AUTH_AT else "timeout"] += 1
    for n in range(len(good)):
        cases[f"prefix-{n}"] = good[:n]
        expect["timeout"] += 1
    for i in range(len(good)):
        flipped = bytearray(good)
        flipped[i] ^= 0xFF
        cases[f"flip-{i}"] = bytes(flipped)
        expect["auth"] += 1
    cases["replay"] = good
    cases["reflected"] = response
    expect["auth"] += 1
    cases["clock"] = flight(psk, target, clock=lambda: time.time() - 3600).first_flight()
    return cases, expect


def probe_burst(server: ServerProcess, fin: bool) -> tuple[dict, dict, dict[str, Outcome], dict]:
    """Every case of `make_cases` at once, a closing target behind the server: the cases, the
    counts they should move, each probe's outcome and how the counters moved. Asserts what every
    probe must see: no byte back and a clean close."""
    with closing_target() as tport:
        target = Address.parse(f"127.0.0.1:{tport}")
        cases, expect = make_cases(server, target)
        before = server.counters()
        results = asyncio.run(probe_all(server.port, cases, fin=fin))
        after = server.counters()
    bad = {k: r for k, r in results.items() if r.received or r.end != "eof"}
    assert not bad, f"bytes back or not a clean close: {bad}"
    return cases, expect, results, delta(after, before)


@pytest.mark.timing
def test_failed_first_flights_all_look_the_same(server: ServerProcess) -> None:
    cases, expect, results, moved = probe_burst(server, fin=False)
    # The server accepts after connect() was called: a close at accept + DEADLINE is never seen
    # earlier than DEADLINE after that call, give or take uvloop's 1 ms timer resolution.
    early = {k: r.seconds for k, r in results.items() if r.seconds < DEADLINE - 0.005}
    assert not early, f"closed before the deadline from accept: {early}"
    # A wide upper bound: 2 shared cores and ~700 connections at once.
    late = {k: r.seconds for k, r in results.items() if r.seconds > DEADLINE + 3}
    assert not late, f"closed long after the deadline: {late}"
    assert moved == expect
    # Logged once per burst, not once per probe.
    lines = [ln for ln in server.log().splitlines() if "absorbing" in ln or "timed out" in ln]
    assert 1 <= len(lines) <= 3, lines
    spread = sorted(r.seconds for r in results.values())
    print(f"{len(cases)} probes without FIN: {expect}; closed {spread[0]:.3f}-{spread[-1]:.3f} s")


@pytest.mark.timing
def test_half_closed_probes_end_at_the_fin(tmp_path: Path, key_file: Path) -> None:
    """A prober that sends FIN gets a FIN back right away, whatever the failure (no RST)."""
    with ServerProcess(
        tmp_path, key_file, "--handshake-timeout", "20", "--allow-private", *BUDGET
    ) as server:
        cases, _, results, moved = probe_burst(server, fin=True)
    slow = {k: r.seconds for k, r in results.items() if r.seconds > 10}
    assert not slow, f"held until the deadline although the prober closed: {slow}"
    complete = [k for k in cases if not k.startswith(("prefix", "random-"))]
    long_random = [n for n in RANDOM_LENGTHS if n >= AUTH_AT]
    flips = len([k for k in cases if k.startswith("flip")])
    assert moved == {
        "auth": flips + len(long_random) + 1,  # + the reflected response
        "replay": 1,
        "clock": 1,
        "incomplete": len(cases) - len(complete) - len(long_random),
    }


def listen_queue(port: int) -> int:
    """Connections waiting in the listener's accept queue (ss: Recv-Q of a LISTEN socket)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[1])


def test_connection_limit_holds_the_backlog(tmp_path: Path, key_file: Path) -> None:
    """At --max-connections the server stops accepting; the kernel queues the next connection.

    The slots are held by tunnels (relaying to a target that never reads): unauthenticated
    connections could not hold them, their budget is half the limit (test_flood.py)."""
    limit = 3
    srv = ServerProcess(
        tmp_path, key_file, "--max-connections", str(limit), "--handshake-timeout", "30",
        "--allow-private",
    )  # fmt: skip
    held: list[socket.socket] = []
    sink = socket.create_server(("127.0.0.1", 0), backlog=16)  # connects succeed, nobody reads
    try:
        base = srv.stats()
        sink_at = Address.parse(f"127.0.0.1:{sink.getsockname()[1]}")
        for _ in range(limit):
            held.append(socket.create_connection(("127.0.0.1", srv.port)))
            held[-1].sendall(flight(srv.psk, sink_at).first_flight())
            held[-1].settimeout(10)
            assert held[-1].recv(1), "no answer: the tunnel was not set up"  # one at a time
        deadline = time.monotonic() + 10
        while srv.stats()["active"] < limit and time.monotonic() < deadline:
            time.sleep(0.05)
        with closing_target() as tport:
            hs = flight(srv.psk, Address.parse(f"127.0.0.1:{tport}"))
            extra = socket.create_connection(("127.0.0.1", srv.port), timeout=1.0)
            extra.sendall(hs.first_flight())
            with pytest.raises(TimeoutError):  # neither an answer nor a close nor a reset
                extra.recv(1)
            assert listen_queue(srv.port) == 1
            stats = srv.stats()
            assert stats["active"] == limit
            assert stats["limit_pauses"] > base["limit_pauses"]
            gone = held.pop()  # one ends (a reset ends its relay): the queued one is served
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            gone.close()
            extra.settimeout(10)
            assert extra.recv(1), "the queued connection was not served after a slot freed"
            extra.close()
            assert listen_queue(srv.port) == 0
    finally:
        for s in held:
            s.close()
        sink.close()
        srv.stop()
