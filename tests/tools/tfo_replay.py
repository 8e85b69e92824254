"""Send one first flight in a Fast Open SYN, then the same bytes again in another: a replayed
SYN payload. Run inside a test's namespace (`python -m tests.tools.tfo_replay`); prints JSON:
for each connection whether the kernel said its SYN data was acknowledged (TCPI_OPT_SYN_DATA)
and what the server sent back."""

from __future__ import annotations

import argparse
import json
import socket
import time

from mptun.common.address import Address
from mptun.common.crypto import load_key_file
from mptun.common.fastopen import syn_data_acked
from mptun.common.handshake import NeedData, Response
from mptun.common.sockets import IPPROTO_MPTCP, TCP_FASTOPEN_CONNECT
from tests.peers import flight


def fastopen_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
    return s


def send_in_syn(server: tuple[str, int], data: bytes) -> tuple[socket.socket, bool]:
    """A connection whose first write is `data` (in the SYN when a cookie is cached)."""
    s = fastopen_socket()
    s.settimeout(5)
    s.connect(server)  # returns at once with a cookie: the SYN leaves with sendall
    s.sendall(data)
    return s, syn_data_acked(s)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--server", default="127.0.0.1:8443")
    p.add_argument("--key-file", required=True)
    p.add_argument("--target", default="127.0.0.1:8080")
    p.add_argument("--wait", type=float, default=1.0, help="seconds to wait for a replay's answer")
    a = p.parse_args()
    host, port = a.server.rsplit(":", 1)
    server = (host, int(port))
    # a connection that asks for a cookie and sends nothing
    s = fastopen_socket()
    s.settimeout(5)
    s.connect(server)
    s.close()
    hs = flight(load_key_file(a.key_file), Address.parse(a.target))
    data = hs.first_flight(b"GET /bytes/10/1 HTTP/1.0\r\n\r\n")
    first, first_syn = send_in_syn(server, data)
    while isinstance(event := hs.next_event(), NeedData):
        chunk = first.recv(hs.bytes_needed())
        if not chunk:
            break
        hs.receive_data(chunk)
    first.close()
    replay, replay_syn = send_in_syn(server, data)
    replay.settimeout(a.wait)
    started = time.monotonic()
    try:
        back = replay.recv(4096)
        how = "eof" if not back else "bytes"
    except TimeoutError:
        back, how = b"", "silence"
    replay.close()
    status = event.status.value if isinstance(event, Response) else None
    print(
        json.dumps(
            {
                "first": {"syn_data": first_syn, "status": status},
                "replay": {
                    "syn_data": replay_syn,
                    "bytes": len(back),
                    "how": how,
                    "seconds": time.monotonic() - started,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
