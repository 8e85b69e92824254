"""`drive` takes a handshake that is already queued without a pass of the event loop (each pass
costs a router's slow core a readiness registration per read), and still waits, never blocks,
when nothing is there yet. On uvloop, the loop mptun runs on (its sock_recv waits for readiness
before every read), and on asyncio's (whose sock_recv tries the read first)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mptun.common.crypto import CIPHERS
from mptun.common.drive import drive, recv_ready
from mptun.common.handshake import Request, ServerHandshake
from mptun.common.replay import ReplayGuard
from tests.test_handshake import NOW, PSK, make_pair


def loops() -> list:
    out = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        out.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip("uvloop not installed")))
    else:
        out.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return out


def run(factory, coro):
    loop = factory()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.mark.parametrize("factory", loops())
def test_a_queued_handshake_is_read_without_a_loop_pass(factory):
    """The client's request arrives whole: `drive` reads it part by part (exactly what the
    machine needs, the bulk bytes behind it stay queued) and returns before a callback the loop
    was asked to run next: no part waited for readiness."""
    c, _ = make_pair()
    flight = c.first_flight(b"early")

    async def go():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        with a, b:
            b.sendall(flight + b"bulk bytes")
            passes = []
            loop.call_soon(passes.append, "loop ran")
            machine = ServerHandshake(PSK, CIPHERS["aes-256-gcm"], ReplayGuard(), clock=lambda: NOW)
            request = await drive(loop, a, machine, loop.time() + 5)
            seen = list(passes)
            return request, seen, a.recv(100)

    request, seen, after = run(factory, go())
    assert isinstance(request, Request) and request.early_data == b"early"
    assert seen == [], "drive waited on the loop for bytes that were already queued"
    assert after == b"bulk bytes"


@pytest.mark.parametrize("factory", loops())
@pytest.mark.parametrize("timeout", [0.0, None], ids=["nonblocking", "blocking"])
def test_nothing_queued_waits_on_the_loop_without_blocking_it(factory, timeout):
    """An empty socket is waited for by the loop: a callback runs meanwhile and delivers the
    bytes. The try never blocks, even on a socket in blocking mode (uvloop takes those; asyncio
    itself needs non-blocking sockets)."""
    if timeout is None and factory is asyncio.new_event_loop:
        pytest.skip("asyncio's own sock_recv blocks on a blocking socket")

    async def go():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        a.settimeout(timeout)
        with a, b:
            loop.call_later(0.05, b.sendall, b"late")
            return await asyncio.wait_for(recv_ready(loop, a, 4), 5)

    assert run(factory, go()) == b"late"


@pytest.mark.parametrize("factory", loops())
def test_end_of_file_is_empty(factory):
    async def go():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        with a:
            b.close()
            return await recv_ready(loop, a, 10)

    assert run(factory, go()) == b""
