"""Three tunnels with `--fast-open` to a listener that takes Fast Open and never answers (what a
client saw from a server whose kernel lost its answers). Run inside a test's namespace with
net.ipv4.tcp_fastopen=3 (`python -m tests.tools.tfo_silent`); prints the client's counters and
the namespace's TcpExtTCPFastOpenPassive after each tunnel, as JSON."""

from __future__ import annotations

import asyncio
import json
import socket

from mptun.client.tunnel import TunnelConfig, Tunneler
from mptun.common.address import Address
from mptun.common.crypto import cipher_by_name, decode_key, generate_key
from mptun.common.relay import RelaySettings
from mptun.common.sockets import IPPROTO_MPTCP


def passive() -> int:
    """TcpExtTCPFastOpenPassive of this namespace (/proc/net/netstat: names, then values)."""
    with open("/proc/net/netstat") as f:
        lines = [ln.split() for ln in f if ln.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["TCPFastOpenPassive"])


async def main() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    held: list[socket.socket] = []  # accepted, never answered

    def accept() -> None:
        try:
            held.append(listener.accept()[0])
        except BlockingIOError:
            pass

    loop = asyncio.get_running_loop()
    loop.add_reader(listener.fileno(), accept)
    server = Address.parse(f"127.0.0.1:{listener.getsockname()[1]}")
    config = TunnelConfig(
        server=server,
        psk=decode_key(generate_key()),
        cipher=cipher_by_name("aes-256-gcm"),
        engine=RelaySettings().choose(),
        handshake_timeout=0.5,
        check_interval=3.0,  # its first check gives up after 3 s: the server is up until then
        fast_open=True,
    )
    tunneler = Tunneler(config)
    rows = []
    for i in range(3):
        inner, app = socket.socketpair()
        inner.setblocking(False)
        target = Address.parse("192.0.2.9:80")
        await tunneler.run(f"c{i}", "test", inner, target, b"GET / HTTP/1.0\r\n\r\n", None, False)
        app.close()
        rows.append({"counters": dict(tunneler.counters), "passive": passive()})
    tunneler.close()
    print(json.dumps(rows))


if __name__ == "__main__":
    asyncio.run(main())
