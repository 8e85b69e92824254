"""Drive a DNS server from one source address and print what came back as JSON (a test runs this
inside a namespace, where the source can be an address other than loopback).

    python -m tests.tools.dns_flood flood SRC DST PORT COUNT      # COUNT queries at once over UDP
    python -m tests.tools.dns_flood lockstep SRC DST PORT COUNT   # one at a time; stops at a loss
    python -m tests.tools.dns_flood tcp-hold SRC DST PORT COUNT   # COUNT TCP connections held

Every run is bounded: at most COUNT queries or connections and a few seconds of waiting.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import time

from mptun.common import dns

NAME = "www.example.test"


def _udp(src: str, dst: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.connect((dst, port))  # a connected socket takes datagrams from dst:port only
    return s


def flood(src: str, dst: str, port: int, count: int, quiet: float = 1.0) -> dict:
    """Send `count` queries back to back, then count answers until `quiet` seconds bring none."""
    with _udp(src, dst, port) as s:
        t0 = time.monotonic()
        for i in range(count):
            s.send(dns.build_query(NAME, dns.Type.A, i))
        ids: set[int] = set()
        s.settimeout(quiet)
        while True:
            try:
                ids.add(dns.parse(s.recv(65535)).id)
            except TimeoutError:
                break
        return {"sent": count, "answered": len(ids), "seconds": time.monotonic() - t0}


def lockstep(src: str, dst: str, port: int, count: int, timeout: float = 2.0) -> dict:
    """Ask `count` times, each after the previous answer; stop at the first query lost."""
    answered = 0
    with _udp(src, dst, port) as s:
        s.settimeout(timeout)
        t0 = time.monotonic()
        for i in range(count):
            s.send(dns.build_query(NAME, dns.Type.A, i))
            try:
                if dns.parse(s.recv(65535)).id == i:
                    answered += 1
            except TimeoutError:
                break
        return {"sent": count, "answered": answered, "seconds": time.monotonic() - t0}


def tcp_hold(src: str, dst: str, port: int, count: int, wait: float = 2.0) -> dict:
    """Open `count` connections and say how many the server closed within `wait` seconds; then
    ask one query on a connection still open (DNS over TCP is not rate-limited)."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    conns = []
    try:
        for _ in range(count):
            c = socket.socket(family, socket.SOCK_STREAM)
            c.bind((src, 0))
            c.settimeout(5)
            c.connect((dst, port))
            conns.append(c)
        closed: set[socket.socket] = set()
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and len(closed) < count:
            readable, _, _ = select.select([c for c in conns if c not in closed], [], [], left)
            for c in readable:
                try:
                    data = c.recv(100)
                except OSError:
                    data = b""
                if not data:
                    closed.add(c)
        answered = False
        for c in conns:
            if c not in closed:
                c.sendall(dns.TcpFramer.frame(dns.build_query(NAME, dns.Type.A, 7)))
                f = dns.TcpFramer()
                while (m := f.next_message()) is None and (data := c.recv(65536)):
                    f.receive_data(data)
                answered = m is not None and dns.parse(m).id == 7
                break
        return {"opened": count, "closed": len(closed), "answered": answered}
    finally:
        for c in conns:
            c.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.tools.dns_flood")
    p.add_argument("kind", choices=["flood", "lockstep", "tcp-hold"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("count", type=int)
    a = p.parse_args()
    run = {"flood": flood, "lockstep": lockstep, "tcp-hold": tcp_hold}[a.kind]
    print(json.dumps(run(a.src, a.dst, a.port, a.count)), flush=True)


if __name__ == "__main__":
    main()
