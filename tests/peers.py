"""Peers to run inside test-bed namespaces: `python -m tests.peers http|udp-echo ...`.

Each prints one line per client it serves, `<kind> <source address>`, flushed at once, so a test
can tell which address a connection came from (the VPS's: through the tunnel; the LAN host's:
around it).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

from tests.helpers import _Handler, _V6Server


class _LoggingHandler(_Handler):
    def setup(self) -> None:
        super().setup()
        _report("http", self.client_address[0])


def _report(kind: str, host: str) -> None:
    if host.startswith("::ffff:"):
        host = host[len("::ffff:") :]
    print(kind, host, flush=True)


def serve_http(bind: str, port: int) -> None:
    """GET /bytes/SIZE/SEED (tests.helpers' stream) on a dual-stack socket."""
    srv = _V6Server((bind, port), _LoggingHandler)
    print("ready", flush=True)
    srv.serve_forever()


def serve_udp_echo(bind: str, port: int) -> None:
    """Echo every datagram back (stands in for a QUIC server)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((bind, port))
    print("ready", flush=True)
    while True:
        data, addr = sock.recvfrom(65535)
        _report("udp", addr[0])
        sock.sendto(data, addr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.peers")
    p.add_argument("kind", choices=["http", "udp-echo"])
    p.add_argument("--bind", default="::")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    target = serve_http if a.kind == "http" else serve_udp_echo
    t = threading.Thread(target=target, args=(a.bind, a.port), daemon=True)
    t.start()
    try:
        t.join()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
