"""Measure what `mptun client --dns` sends back over UDP for a small query: the amplification.

Starts a DNS-over-TCP peer whose `huge.example.test` TXT answer is about 61 KB, an `mptun server`
and an `mptun client --dns` on loopback, then asks over UDP with EDNS (payload size 65535) and
without, and prints each query's size, the answer's size, the factor and whether TC was set.

    .venv/bin/python -m tests.tools.dns_amplification
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

from mptun.common import dns
from mptun.common.crypto import generate_key
from tests.peers import tcp_dns_server
from tests.test_dns_hardening import dns_client, edns_query


def ask(port: int, query: bytes, tries: int = 20) -> tuple[bytes, float]:
    """One UDP exchange with 127.0.0.1:port (retried while the tunnel warms up); answer, seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.connect(("127.0.0.1", port))
        for _ in range(tries):
            t0 = time.monotonic()
            try:
                s.send(query)
                return s.recv(65535), time.monotonic() - t0
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise SystemExit("no answer")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, tcp_dns_server() as up:
        key = Path(tmp) / "key"
        key.write_text(generate_key() + "\n")
        key.chmod(0o600)
        with dns_client(Path(tmp), key, up.port, "127.0.0.1") as (_, port):
            cases = [
                ("EDNS 65535, upstream", edns_query("huge.example.test", 16, 1, 65535)),
                ("EDNS 65535, cached", edns_query("huge.example.test", 16, 2, 65535)),
                ("EDNS 4096, cached", edns_query("huge.example.test", 16, 3, 4096)),
                ("no EDNS", dns.build_query("huge.example.test", 16, 4)),
            ]
            for what, query in cases:
                answer, took = ask(port, query)
                msg = dns.parse(answer)
                print(
                    f"{what:22} query {len(query):3} B  answer {len(answer):6} B  "
                    f"x{len(answer) / len(query):7.1f}  TC={int(msg.truncated)}  "
                    f"{took * 1000:.1f} ms"
                )


if __name__ == "__main__":
    main()
