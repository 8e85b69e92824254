"""A UDP association's tunnel link (common/udplink.py) over real loopback TCP sockets: frames
both ways, sealed or plain, and latency before buffers (stale datagrams dropped, not sent)."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import pytest

from mptun.common.address import Address
from mptun.common.crypto import cipher_by_name
from mptun.common.datagram import MAX_PAYLOAD, Datagram, Decoder
from mptun.common.handshake import WireMode, derive_bulk_keys
from mptun.common.relay import PLAIN, Session, Side
from mptun.common.udplink import DatagramLink
from tests.helpers import loopback_pair

CIPHER = cipher_by_name("aes-256-gcm")
KEYS = derive_bulk_keys(bytes(32), CIPHER, bytes(32), bytes(range(32)))
TARGET = Address.parse("192.0.2.1:7")


def sessions(mode: WireMode) -> tuple[Session, Session]:
    if mode is WireMode.PLAIN:
        return PLAIN, PLAIN
    return (
        Session(WireMode.ENCRYPTED, Side.CLIENT, CIPHER, KEYS),
        Session(WireMode.ENCRYPTED, Side.SERVER, CIPHER, KEYS),
    )


@pytest.mark.parametrize("mode", [WireMode.PLAIN, WireMode.ENCRYPTED])
def test_datagrams_both_ways_and_a_clean_end(mode: WireMode) -> None:
    """Small and largest datagrams cross both ways; close() ends the peer's link cleanly."""

    async def main() -> None:
        a_sock, b_sock = loopback_pair(blocking=False)
        sa, sb = sessions(mode)
        got_a: list[tuple[Address, bytes]] = []
        got_b: list[tuple[Address, bytes]] = []
        ended: list[BaseException | None] = []
        loop = asyncio.get_running_loop()
        a = DatagramLink(a_sock, sa, lambda *d: got_a.append(d), ended.append, Counter())
        b = DatagramLink(b_sock, sb, lambda *d: got_b.append(d), ended.append, Counter())
        a.start(loop)
        b.start(loop)
        sent = [b"", b"x", bytes(range(256)) * 64, bytes(MAX_PAYLOAD)]
        for p in sent:
            assert a.send(TARGET, p)
        assert b.send(TARGET, b"back")
        while len(got_b) < len(sent) or not got_a:
            await asyncio.sleep(0.01)
        assert got_b == [(TARGET, p) for p in sent] and got_a == [(TARGET, b"back")]
        a.close()
        while len(ended) < 2:
            await asyncio.sleep(0.01)
        assert ended == [None, None]  # both ends: clean (close_notify and FIN)

    asyncio.run(asyncio.wait_for(main(), 20))


@pytest.mark.timing
def test_stale_datagrams_are_dropped_not_sent() -> None:
    """While the peer reads nothing, datagrams the kernel cannot take wait in the link's queue;
    once older than max_delay they are dropped (counted), never sent: when the peer reads again
    it gets what the kernel held, in order, and then only the next fresh datagram."""

    async def main() -> tuple[list[int], Counter]:
        a_sock, b_sock = loopback_pair(blocking=False)
        b_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        counters: Counter[str] = Counter()
        ended: list[BaseException | None] = []
        loop = asyncio.get_running_loop()
        a = DatagramLink(a_sock, PLAIN, lambda *d: None, ended.append, counters, max_delay=0.05)
        a.start(loop)
        total = 400
        for i in range(total):
            a.send(TARGET, i.to_bytes(4, "big") + bytes(996))
        await asyncio.sleep(0.5)  # every datagram still queued is now ten times max_delay old
        seqs: list[int] = []
        d = Decoder()

        async def read(timeout: float) -> bool:
            try:
                data = await asyncio.wait_for(loop.sock_recv(b_sock, 65536), timeout)
            except TimeoutError:
                return False
            assert data, "link closed"
            seqs.extend(
                int.from_bytes(e.payload[:4], "big")
                for e in d.feed(data)
                if isinstance(e, Datagram)
            )
            return True

        while await read(0.5):  # what the kernel held, until the link has nothing more
            pass
        a.send(TARGET, (9999).to_bytes(4, "big"))
        while not seqs or seqs[-1] != 9999:
            assert await read(10), "the fresh datagram did not come"
        a.close()
        b_sock.close()
        return seqs, counters

    seqs, counters = asyncio.run(asyncio.wait_for(main(), 30))
    held = seqs[:-1]
    assert held == list(range(len(held)))  # what the kernel took, in order
    assert len(held) < 400  # the kernel did not take everything: the test tests something
    assert counters["udp-stale"] == 400 - len(held)
