"""kTLS for real: a kernel end and a user-space end interoperate, and `auto` picks per socket.

These need a kernel with kTLS: tests/test_vm.py runs them in a QEMU guest booting a stock Debian
kernel; on a kernel without kTLS (this project's build machine) they skip with the reason.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import socket

import pytest

from mptun.common import ktls
from mptun.common.crypto import CIPHERS
from mptun.common.handshake import WireMode
from mptun.common.records import Opener, Sealer
from mptun.common.relay import AeadEngine, KtlsEngine, Session
from mptun.common.relay.bulk import AutoEngine, choose_bulk
from mptun.common.sockets import IPPROTO_MPTCP, is_mptcp
from tests.helpers import curl, loopback_pair, need
from tests.peers import http_server, sha256_of_stream
from tests.test_relay_aead import read_all, send_all, sessions

NO_KTLS = ktls.probe()
pytestmark = pytest.mark.skipif(
    NO_KTLS is not None, reason=f"kTLS: {NO_KTLS} (tests/test_vm.py runs these in a guest)"
)


def mptcp_pair(listener_proto: int = IPPROTO_MPTCP) -> tuple[socket.socket, socket.socket]:
    """A loopback pair whose client socket is MPTCP (the listener MPTCP or plain TCP)."""
    return loopback_pair(IPPROTO_MPTCP, listener_proto, blocking=False)


def relay_both_ways(client_engine, server_engine, cipher: str, pair=None, size=2 << 20):
    """Run two encrypted ends over `pair()` (a loopback TCP pair by default), data both ways at
    once; return both stats."""
    up, down = os.urandom(size), os.urandom(size - 12345)

    async def main():
        loop = asyncio.get_running_loop()
        app_c, inner_c = loopback_pair(blocking=False)
        tun_c, tun_s = pair() if pair else loopback_pair(blocking=False)
        inner_s, app_s = loopback_pair(blocking=False)
        client, server = sessions(cipher)
        relays = asyncio.gather(
            client_engine.relay(loop, inner_c, tun_c, session=client),
            server_engine.relay(loop, inner_s, tun_s, session=server),
        )
        got_s, got_c, _, _ = await asyncio.gather(
            read_all(loop, app_s), read_all(loop, app_c), send_all(loop, app_c, up),
            send_all(loop, app_s, down),
        )  # fmt: skip
        stats = await relays
        assert hashlib.sha256(got_s).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_c).digest() == hashlib.sha256(down).digest()
        app_c.close()
        app_s.close()
        return stats

    return asyncio.run(main())


@pytest.mark.parametrize("cipher", sorted(CIPHERS))
@pytest.mark.parametrize("ktls_side", ["client", "server", "both"])
def test_kernel_end_and_user_space_end_interoperate(cipher: str, ktls_side: str) -> None:
    """Splice into and out of the kTLS socket on one end, cryptography on the other."""
    c = KtlsEngine() if ktls_side in ("client", "both") else AeadEngine()
    s = KtlsEngine() if ktls_side in ("server", "both") else AeadEngine()
    stats_c, stats_s = relay_both_ways(c, s, cipher)
    assert stats_c.clean and stats_s.clean, (stats_c, stats_s)
    assert (stats_c.engine, stats_s.engine) == (c.name, s.name)


def test_handover_after_records_sealed_in_user_space() -> None:
    """The client sealed 3 records itself (early data); kTLS TX continues at rec_seq 3."""

    async def main():
        loop = asyncio.get_running_loop()
        app, inner = loopback_pair(blocking=False)
        tun_c, tun_s = loopback_pair(blocking=False)
        client, server = sessions()
        first = Sealer(client.cipher, *client.tx_key_iv())  # type: ignore[arg-type]
        early = b"".join(first.seal(b"early %d;" % i) for i in range(3))
        await loop.sock_sendall(tun_c, early)
        client = Session(WireMode.ENCRYPTED, client.side, client.cipher, client.keys, tx_seq=3)
        task = asyncio.ensure_future(KtlsEngine().relay(loop, inner, tun_c, session=client))
        await send_all(loop, app, b"then the kernel")
        opener = Opener(server.cipher, *server.rx_key_iv())  # type: ignore[arg-type]
        wire = await read_all(loop, tun_s)
        assert b"".join(opener.feed(wire)) == b"early 0;early 1;early 2;then the kernel"
        assert opener.closed  # the kernel sent our closing record
        tun_s.close()
        stats = await task
        assert not stats.clean  # the far end went away without its closing record
        app.close()

    asyncio.run(main())


def test_auto_takes_ktls_on_tcp(caplog) -> None:
    caplog.set_level(logging.INFO, "mptun.relay")
    auto = AutoEngine(AeadEngine(), KtlsEngine())
    stats_c, stats_s = relay_both_ways(auto, AeadEngine(), "aes-256-gcm", size=1 << 20)
    assert stats_c.engine == "ktls" and stats_c.clean and stats_s.clean
    assert "bulk auto: ktls (this tunnel socket takes kTLS)" in caplog.text


def test_mptcp_sockets_refuse_ktls_and_auto_falls_back_to_aead(caplog) -> None:
    caplog.set_level(logging.INFO, "mptun.relay")
    a, b = mptcp_pair()
    assert is_mptcp(a)
    with pytest.raises(OSError) as e:
        a.setsockopt(socket.IPPROTO_TCP, ktls.TCP_ULP, b"tls")
    assert e.value.errno == errno.ENOPROTOOPT
    a.close()
    b.close()
    auto = AutoEngine(AeadEngine(), KtlsEngine())
    stats_c, stats_s = relay_both_ways(auto, auto, "aes-256-gcm", pair=mptcp_pair, size=1 << 20)
    assert (stats_c.engine, stats_s.engine) == ("aead", "aead")
    assert stats_c.clean and stats_s.clean
    assert "bulk auto: aead for this tunnel" in caplog.text and "ENOPROTOOPT" in caplog.text
    assert "MPTCP" in choose_bulk("auto", mptcp=True).summary


def test_mptcp_socket_that_fell_back_to_tcp_refuses_ktls_too() -> None:
    """An MPTCP client socket whose peer is plain TCP (fallback) still refuses TCP_ULP."""
    a, b = mptcp_pair(listener_proto=0)
    try:
        assert is_mptcp(a) is False  # fell back
        with pytest.raises(OSError) as e:
            a.setsockopt(socket.IPPROTO_TCP, ktls.TCP_ULP, b"tls")
        assert e.value.errno == errno.ENOPROTOOPT
        b.setsockopt(socket.IPPROTO_TCP, ktls.TCP_ULP, b"tls")  # the plain TCP end takes it
    finally:
        a.close()
        b.close()
    auto = AutoEngine(AeadEngine(), KtlsEngine())
    pair = lambda: mptcp_pair(listener_proto=0)  # noqa: E731
    stats_c, stats_s = relay_both_ways(auto, auto, "aes-256-gcm", pair=pair, size=1 << 20)
    assert (stats_c.engine, stats_s.engine) == ("aead", "ktls")
    assert stats_c.clean and stats_s.clean


def test_forced_ktls_needs_tcp_transport() -> None:
    from mptun.common.errors import ConfigError

    with pytest.raises(ConfigError, match="--transport tcp"):
        choose_bulk("ktls", mptcp=True)
    assert choose_bulk("ktls", mptcp=False).encrypted.name == "ktls"


@pytest.mark.parametrize(("server_bulk", "client_bulk"), [("ktls", "aead"), ("auto", "aead")])
def test_processes_ktls_server_aead_client_over_a_tcp_tunnel(
    mptun_pair, tmp_path, server_bulk, client_bulk
):
    """Real processes; the in-process tests above cover kTLS on the client side too."""
    need("curl")
    size = 2 << 20
    pair = mptun_pair(
        server_args=("--allow-private", "--transport", "tcp", "--bulk", server_bulk),
        client_args=("--transport", "tcp", "--bulk", client_bulk),
    )
    with http_server() as (host, port):
        r = curl("--socks5-hostname", pair.socks, f"http://{host}:{port}/bytes/{size}/3")
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(size, 3)
        body = os.urandom(size)
        (tmp_path / "body").write_bytes(body)
        r = curl(
            "--socks5-hostname", pair.socks, "-T", str(tmp_path / "body"),
            f"http://{host}:{port}/up",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == hashlib.sha256(body).hexdigest()
    pair.client.stop()
    pair.server.stop()
    server_log = pair.server.log_path.read_text()
    client_log = pair.client.log_path.read_text()
    assert server_log.count(", ktls, clean") == 2, server_log[-3000:]
    assert client_log.count(", aead, clean") == 2, client_log[-3000:]


def test_auto_over_mptcp_processes_uses_aead(mptun_pair) -> None:
    need("curl")
    pair = mptun_pair(server_args=("--allow-private",))
    with http_server() as (host, port):
        r = curl("--socks5-hostname", pair.socks, f"http://{host}:{port}/bytes/100000/4")
        assert r.returncode == 0 and len(r.stdout) == 100000
    pair.client.stop()
    pair.server.stop()
    for log in (pair.client.log_path.read_text(), pair.server.log_path.read_text()):
        assert "aead on MPTCP ones" in log  # the start line says which and why
        assert ", aead, clean" in log
