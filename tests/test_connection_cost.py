"""What a tunneled connection costs each end, counted rather than timed.

- The aead engine's stage buffers: a short connection takes the buffers the last one gave back
  (`BufferPool`) instead of mapping four new ones and unmapping them at its end (mmap, munmap
  and a zero-filled fault per page: ~140 us of the ~900 each end spent per connection,
  docs/design/router-budget.md "Per connection"), within a bound of kept memory, never a buffer
  a view still holds.
- The server reads a first flight that is queued at accept without a pass of the event loop per
  part (each costs a readiness registration: ~9 syscalls on uvloop).
- The SOCKS listener answers a greeting and request that came together in one send, not two.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import socket

import pytest

from mptun.client import socks5
from mptun.client.socks import _negotiate
from mptun.common.address import Address
from mptun.common.crypto import CIPHERS
from mptun.common.handshake import ClientHandshake, Request, ServerHandshake, WireMode
from mptun.common.relay.aead import AeadEngine
from mptun.common.relay.buffers import BIG_BUFFER, BufferPool
from mptun.server.service import Server, ServerConfig
from tests.helpers import loopback_pair
from tests.test_relay_aead import read_all, send_all, sessions

PSK = bytes(range(32))


def test_a_given_back_buffer_is_taken_again_and_a_new_size_is_mapped() -> None:
    pool = BufferPool()
    a = pool.take(100_000)
    assert isinstance(a, mmap.mmap) and pool.mapped == 1
    pool.give(a)
    assert pool.bytes == 100_000
    assert pool.take(100_000) is a, "the kept buffer was not reused"
    assert pool.bytes == 0 and pool.mapped == 1
    b = pool.take(90_000)  # another size: a new mapping
    assert b is not a and pool.mapped == 2
    pool.give(a, b)
    pool.clear()
    assert pool.bytes == 0 and a.closed and b.closed


def test_what_is_kept_is_bounded() -> None:
    """At most `max_buffer` per buffer (a stream's grown buffers are unmapped at once) and
    `max_bytes` in all; small heap buffers are never kept."""
    pool = BufferPool(max_bytes=250_000, max_buffer=100_000)
    big = pool.take(200_000)
    pool.give(big)
    assert big.closed and pool.bytes == 0
    bufs = [pool.take(100_000) for _ in range(3)]
    pool.give(*bufs)
    assert pool.bytes == 200_000, "kept past max_bytes"
    assert [b.closed for b in bufs] == [False, False, True]
    small = pool.take(BIG_BUFFER - 1)
    assert isinstance(small, bytearray)
    pool.give(small)
    assert pool.bytes == 200_000 and len(small) == 0  # freed, as before
    pool.clear()


def test_a_buffer_still_viewed_is_never_kept() -> None:
    """A view that outlived its pump must not see the next connection's bytes: such a buffer is
    left to the collector, not handed out again."""
    pool = BufferPool()
    a = pool.take(100_000)
    view = memoryview(a)
    pool.give(a)
    assert pool.bytes == 0
    assert pool.take(100_000) is not a
    view.release()
    pool.clear()


@pytest.mark.parametrize("size", [5 * 1024, 60 * 1024, 100 * 1024])
def test_short_connections_after_the_first_map_no_buffer(size: int) -> None:
    """Ten fresh connections through one aead engine per end, each a page object down and a
    request up, byte-exact: the buffers are mapped for the first connection only."""
    up = b"GET / HTTP/1.1\r\n\r\n"
    down = os.urandom(size)
    client_engine, server_engine = AeadEngine(), AeadEngine()

    async def one() -> None:
        loop = asyncio.get_running_loop()
        app_c, inner_c = loopback_pair(blocking=False)
        tun_c, tun_s = loopback_pair(blocking=False)
        inner_s, app_s = loopback_pair(blocking=False)
        client, server = sessions()
        relays = asyncio.gather(
            client_engine.relay(loop, inner_c, tun_c, session=client),
            server_engine.relay(loop, inner_s, tun_s, session=server),
        )
        got_s, got_c, _, _ = await asyncio.gather(
            read_all(loop, app_s),
            read_all(loop, app_c),
            send_all(loop, app_c, up),
            send_all(loop, app_s, down),
        )
        stats = await relays
        assert got_s == up
        assert hashlib.sha256(got_c).digest() == hashlib.sha256(down).digest()
        assert all(s.clean for s in stats), stats
        for s in (app_c, app_s):
            s.close()

    async def main() -> list[int]:
        mapped = []
        for _ in range(10):
            await one()
            mapped.append(client_engine.buffers.mapped + server_engine.buffers.mapped)
        return mapped

    mapped = asyncio.run(main())
    assert mapped[0] > 0
    assert mapped[-1] == mapped[0], f"buffers mapped after each connection: {mapped}"
    for engine in (client_engine, server_engine):
        engine.buffers.clear()


def test_the_server_reads_a_queued_first_flight_without_a_loop_pass() -> None:
    """The first flight is queued when the server accepts (DEFER_ACCEPT): its parts (salt,
    header, request) are read as they are, and the request comes back before a callback the
    loop was asked to run next. The bytes behind it stay queued."""
    uvloop = pytest.importorskip("uvloop")  # mptun's loop: its sock_recv waits first
    cipher = CIPHERS["aes-256-gcm"]
    target = Address.parse("192.0.2.7:80")
    config = ServerConfig(Address.parse("127.0.0.1:0", any_port=True), PSK, cipher, AeadEngine())
    server = Server(config)
    server.started = 0.0  # the flight may be stamped in the second the server was made

    async def go():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        with a, b:
            flight = ClientHandshake(PSK, cipher, target, WireMode.ENCRYPTED).first_flight(b"hi")
            b.sendall(flight + b"bulk")
            passes: list[str] = []
            loop.call_soon(passes.append, "loop ran")
            ticket = server._gate.admit("192.0.2.1", lambda: None, lambda: False)
            hs = ServerHandshake(PSK, cipher, server.replay.for_source("192.0.2.1"))
            try:
                event = await server._first_flight(
                    loop, a, "s1", "192.0.2.1:1", hs, loop.time() + 5, ticket
                )
            finally:
                server._gate.release(ticket)
            return event, list(passes), a.recv(100)

    loop = uvloop.new_event_loop()
    try:
        event, passes, after = loop.run_until_complete(go())
    finally:
        loop.close()
    assert isinstance(event, Request) and event.early_data == b"hi", event
    assert passes == [], "the server waited on the loop for a flight already queued"
    assert after == b"bulk"


def _socks_peer(go) -> object:
    """`go(loop, listener_side, client_side)` on uvloop (mptun's loop) over a real socket pair."""
    uvloop = pytest.importorskip("uvloop")

    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        with a, b:
            return await asyncio.wait_for(go(loop, a, b), 5)

    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


GREETING = b"\x05\x01\x00"
CONNECT = b"\x05\x01\x00\x01\xc0\x00\x02\x07\x00\x50"  # 192.0.2.7:80


def test_a_pipelined_greeting_is_answered_with_the_connect_reply() -> None:
    """Greeting and CONNECT in one flight: nothing is sent until the target is known, and the
    greeting's reply is handed to the caller, which sends it with the CONNECT's reply."""

    async def go(loop, a, b):
        b.sendall(GREETING + CONNECT + b"GET")
        held = bytearray()
        target = await _negotiate(loop, a, socks5.Socks5Handshake(None), held, loop.time() + 5)
        try:
            sent = b.recv(100)
        except BlockingIOError:
            sent = b""
        return target, bytes(held), sent

    target, held, sent = _socks_peer(go)
    assert str(target) == "192.0.2.7:80"
    assert held == b"\x05\x00"
    assert sent == b"", "the greeting's reply went out on its own"


def test_a_client_that_waits_for_the_greeting_reply_gets_it() -> None:
    """Greeting alone: its reply is sent before the listener waits for the request."""

    async def go(loop, a, b):
        held = bytearray()
        b.sendall(GREETING)
        hs = socks5.Socks5Handshake(None)
        task = asyncio.ensure_future(_negotiate(loop, a, hs, held, loop.time() + 5))
        reply = await loop.sock_recv(b, 100)
        assert not task.done()
        b.sendall(CONNECT)
        return await task, bytes(held), reply

    target, held, reply = _socks_peer(go)
    assert reply == b"\x05\x00"
    assert str(target) == "192.0.2.7:80" and held == b""
