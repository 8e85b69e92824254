"""Encrypted engines over real loopback TCP sockets: data both ways, endings, every failure.

Each scenario runs with the `aead` engine here, and with the `ktls` engine where the kernel has
kTLS (in the QEMU guest of tests/test_vm.py; this machine's kernel has none).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from mptun.common import ktls
from mptun.common.crypto import CIPHERS
from mptun.common.errors import Status
from mptun.common.handshake import BulkKeys, WireMode
from mptun.common.records import Opener, Sealer
from mptun.common.relay.aead import AeadEngine
from mptun.common.relay.ktls import KtlsEngine
from mptun.common.relay.session import Session, Side
from mptun.common.relay.splice import SpliceEngine
from tests.helpers import loopback_pair

NO_KTLS = ktls.probe()
ENGINES = [
    pytest.param(AeadEngine, id="aead"),
    pytest.param(
        KtlsEngine,
        id="ktls",
        marks=pytest.mark.skipif(
            NO_KTLS is not None, reason=f"kTLS: {NO_KTLS} (tests/test_vm.py runs this in a guest)"
        ),
    ),
]


def sessions(cipher: str = "aes-256-gcm") -> tuple[Session, Session]:
    spec = CIPHERS[cipher]
    keys = BulkKeys(os.urandom(32), os.urandom(12), os.urandom(32), os.urandom(12))
    return (
        Session(WireMode.ENCRYPTED, Side.CLIENT, spec, keys),
        Session(WireMode.ENCRYPTED, Side.SERVER, spec, keys),
    )


async def send_all(loop, sock: socket.socket, data: bytes, shut: bool = True) -> None:
    await loop.sock_sendall(sock, data)
    if shut:
        sock.shutdown(socket.SHUT_WR)


async def read_all(loop, sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        out += chunk
    return bytes(out)


async def read_until_error(loop, sock: socket.socket) -> tuple[bytes, OSError | None]:
    out = bytearray()
    try:
        while chunk := await loop.sock_recv(sock, 1 << 20):
            out += chunk
    except OSError as e:
        return bytes(out), e
    return bytes(out), None


@pytest.mark.parametrize("cipher", sorted(CIPHERS))
def test_two_aead_ends_carry_data_both_ways_at_once(cipher: str) -> None:
    size = 24 << 20
    up, down = os.urandom(size), os.urandom(size // 2 + 12345)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        app_c, inner_c = loopback_pair(blocking=False)
        tun_c, tun_s = loopback_pair(blocking=False)
        inner_s, app_s = loopback_pair(blocking=False)
        client, server = sessions(cipher)
        relays = asyncio.gather(
            AeadEngine().relay(loop, inner_c, tun_c, session=client),
            AeadEngine().relay(loop, inner_s, tun_s, session=server),
        )
        got_s, got_c, _, _ = await asyncio.gather(
            read_all(loop, app_s),
            read_all(loop, app_c),
            send_all(loop, app_c, up),
            send_all(loop, app_s, down),
        )
        stats_c, stats_s = await relays
        assert hashlib.sha256(got_s).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_c).digest() == hashlib.sha256(down).digest()
        assert stats_c.clean and stats_s.clean, (stats_c, stats_s)
        assert (stats_c.to_tunnel, stats_c.from_tunnel) == (len(up), len(down))
        assert (stats_s.to_tunnel, stats_s.from_tunnel) == (len(down), len(up))
        for s in (app_c, app_s):
            s.close()

    asyncio.run(main())


class FarEnd:
    """The server's side of the tunnel written by hand with the record layer."""

    def __init__(self, session: Session) -> None:
        key, iv = session.tx_key_iv()
        self.sealer = Sealer(session.cipher, key, iv)  # type: ignore[arg-type]
        key, iv = session.rx_key_iv()
        self.opener = Opener(session.cipher, key, iv)  # type: ignore[arg-type]


def run_client_relay(scenario, engine=AeadEngine) -> None:
    """Client-side relay between an app socket and a hand-driven far end."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        app, inner = loopback_pair(blocking=False)
        tun, far_sock = loopback_pair(blocking=False)
        client, server = sessions()
        task = asyncio.ensure_future(engine().relay(loop, inner, tun, session=client))
        await asyncio.sleep(0)  # the engine starts (kTLS: keys installed) before the far end acts
        try:
            await scenario(loop, app, far_sock, FarEnd(server), task)
        finally:
            task.cancel()
            app.close()
            far_sock.close()

    asyncio.run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_closing_record_then_fin_on_a_clean_end(engine) -> None:
    async def scenario(loop, app, far_sock, far: FarEnd, task) -> None:
        await send_all(loop, app, b"hello tunnel")
        wire = await read_all(loop, far_sock)  # ends with FIN
        assert far.opener.feed(wire) == [b"hello tunnel"]
        assert far.opener.closed  # the last record was close_notify
        await loop.sock_sendall(far_sock, far.sealer.seal(b"reply") + far.sealer.close_notify())
        far_sock.shutdown(socket.SHUT_WR)
        assert await read_all(loop, app) == b"reply"
        stats = await task
        assert stats.clean and stats.status is None

    run_client_relay(scenario, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_reads_of_every_shape_give_well_formed_records(engine) -> None:
    """Short, full and mixed reads, one after the other, each read by the relay on its own:
    a short record in a slot must not leave its header behind for a later full record there."""
    k = 16384
    sizes = [100, 3 * k, k + 7, 16 * k, 1, 2 * k + 3, 5 * k, 3 * k + 5, 10, 5 * k, 16 * k]

    async def scenario(loop, app, far_sock, far: FarEnd, task) -> None:
        got = bytearray()
        for n in sizes:
            data = os.urandom(n)
            await loop.sock_sendall(app, data)
            want = len(got) + n
            while len(got) < want:  # wait for it to cross, so the next write is a new read
                got += b"".join(far.opener.feed(await loop.sock_recv(far_sock, 1 << 20)))
            assert got[-n:] == data
        app.shutdown(socket.SHUT_WR)
        far.opener.feed(await read_all(loop, far_sock))
        assert far.opener.closed
        await loop.sock_sendall(far_sock, far.sealer.close_notify())
        far_sock.shutdown(socket.SHUT_WR)
        await read_all(loop, app)
        stats = await task
        assert stats.clean and stats.to_tunnel == sum(sizes), stats

    run_client_relay(scenario, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_half_close_keeps_the_other_direction_open(engine) -> None:
    async def scenario(loop, app, far_sock, far: FarEnd, task) -> None:
        await loop.sock_sendall(far_sock, far.sealer.seal(b"server first"))
        await loop.sock_sendall(far_sock, far.sealer.close_notify())
        far_sock.shutdown(socket.SHUT_WR)
        assert await read_all(loop, app) == b"server first"  # EOF passed on to the app
        await send_all(loop, app, b"still talking")
        assert far.opener.feed(await read_all(loop, far_sock)) == [b"still talking"]
        assert (await task).clean

    run_client_relay(scenario, engine)


def _expect_reset(engine, scenario_bytes, status: Status, fin: bool = True) -> None:
    async def scenario(loop, app, far_sock, far: FarEnd, task) -> None:
        await loop.sock_sendall(far_sock, scenario_bytes(far))
        if fin:
            far_sock.shutdown(socket.SHUT_WR)
        data, err = await read_until_error(loop, app)
        stats = await task
        assert not stats.clean and stats.status is status, stats
        assert stats.engine == engine.name
        assert isinstance(err, ConnectionResetError), (data, err)  # the app sees a reset
        _, err = await read_until_error(loop, far_sock)
        assert isinstance(err, ConnectionResetError)  # and so does the tunnel's far end

    run_client_relay(scenario, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_truncated_stream_resets_the_other_leg(engine) -> None:
    _expect_reset(engine, lambda far: far.sealer.seal(b"partial answer"), Status.TRUNCATED)


@pytest.mark.parametrize("engine", ENGINES)
def test_cut_inside_a_record_resets_the_other_leg(engine) -> None:
    _expect_reset(engine, lambda far: far.sealer.seal(b"x" * 1000)[:500], Status.TRUNCATED)


@pytest.mark.parametrize("engine", ENGINES)
def test_tampered_record_resets_the_other_leg(engine) -> None:
    def tampered(far: FarEnd) -> bytes:
        r = bytearray(far.sealer.seal(b"y" * 100))
        r[50] ^= 4
        return bytes(r)

    _expect_reset(engine, tampered, Status.RECORD, fin=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_replayed_record_resets_the_other_leg(engine) -> None:
    def replayed(far: FarEnd) -> bytes:
        r = far.sealer.seal(b"once")
        return r + r

    _expect_reset(engine, replayed, Status.RECORD, fin=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_reordered_records_reset_the_other_leg(engine) -> None:
    def reordered(far: FarEnd) -> bytes:
        a, b = far.sealer.seal(b"first"), far.sealer.seal(b"second")
        return b + a

    _expect_reset(engine, reordered, Status.RECORD, fin=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_plain_bytes_on_an_encrypted_tunnel_reset_it(engine) -> None:
    _expect_reset(engine, lambda far: b"GET / HTTP/1.1\r\n\r\n", Status.RECORD, fin=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_record_limit_ends_the_connection_with_a_reset(engine) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        app, inner = loopback_pair(blocking=False)
        tun, far_sock = loopback_pair(blocking=False)
        client, _ = sessions()
        task = asyncio.ensure_future(engine(record_limit=4).relay(loop, inner, tun, session=client))
        # kTLS counts an upper bound (a splice may close a record early): send plenty
        await loop.sock_sendall(app, os.urandom(80 * 16384))
        stats = await task
        assert not stats.clean and stats.status is Status.RECORD_LIMIT
        app.close()
        far_sock.close()

    asyncio.run(main())


def test_plain_engines_refuse_an_encrypted_session() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = loopback_pair(blocking=False)
        client, _ = sessions()
        with pytest.raises(Exception, match="cannot carry encrypted"):
            await SpliceEngine().relay(loop, a, b, session=client)
        a.close()
        b.close()

    asyncio.run(main())
