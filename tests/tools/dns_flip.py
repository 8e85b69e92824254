"""Run inside `unshare --net --mount`: a server whose resolver is a tiny DNS server we control.

The DNS server answers A queries for `flip.test` with the addresses of `--answers` in turn (one
per query) and logs every query; `/etc/resolv.conf` and `/etc/hosts` are bind-mounted over (only
in this mount namespace) so the server's real resolver (server/resolver.py) asks it. The
driver then opens tunnels to named targets and prints one JSON line of what happened:
  {"results": [[target, status], ...], "queries": [[name, qtype], ...], "hits": {addr: n}}
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mptun.common.address import Address  # noqa: E402
from mptun.common.crypto import load_key_file  # noqa: E402
from mptun.lab.wait import wait_logged_listeners  # noqa: E402
from tests.peers import connect_status  # noqa: E402


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


class FlipDNS:
    """UDP DNS on 127.0.0.1:53: A for `flip.test` cycles through `answers`; other names NXDOMAIN."""

    def __init__(self, answers: list[str], names: dict[str, str]) -> None:
        self.answers, self.names = answers, names
        self.queries: list[tuple[str, int]] = []
        self.n = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            data, peer = self.sock.recvfrom(512)
            try:
                self.sock.sendto(self.answer(data), peer)
            except (IndexError, struct.error):
                continue

    def answer(self, q: bytes) -> bytes:
        qid = q[:2]
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1 : i + 1 + q[i]].decode())
            i += 1 + q[i]
        qtype = struct.unpack("!H", q[i + 1 : i + 3])[0]
        question = q[12 : i + 5]
        name = ".".join(labels).lower()
        self.queries.append((name, qtype))
        rcode, answers = 0, []
        if name == "flip.test" and qtype == 1:
            answers = [self.answers[min(self.n, len(self.answers) - 1)]]
            self.n += 1
        elif name in self.names and qtype == 1:
            answers = [self.names[name]]
        elif name not in self.names and name != "flip.test":
            rcode = 3  # NXDOMAIN
        head = qid + struct.pack("!HHHHH", 0x8180 | rcode, 1, len(answers), 0, 0)
        body = b"".join(
            b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(a) for a in answers
        )
        return head + question + body


# A listener in a network namespace of its own (started by `unshare --net`), which the driver
# joins to its own over a veth pair once told the namespace exists: reachable, but not one of the
# server's addresses, which `--allow-target` never opens (server/policy.py). One line per event.
PEER = """
import socket, subprocess, sys, time
print("ready", flush=True)
for _ in range(1000):
    if subprocess.run(["ip", "link", "show", "v1"], capture_output=True).returncode == 0:
        break
    time.sleep(0.01)
for cmd in (["link", "set", "lo", "up"], ["addr", "add", sys.argv[1] + "/24", "dev", "v1"],
            ["link", "set", "v1", "up"]):
    subprocess.run(["ip", *cmd], check=True)
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    print("hit", flush=True)
    conn.close()
"""


def peer_listener(addr: str, hits: dict[str, int]) -> int:
    """A listener on `addr` in a peer namespace that counts accepted connections; its port."""
    die_with_us = ctypes.CDLL(None, use_errno=True).prctl  # PR_SET_PDEATHSIG (1), SIGKILL
    peer = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-c", PEER, addr],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: die_with_us(1, signal.SIGKILL),  # os._exit leaves no orphan
    )
    assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
    sh("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", str(peer.pid))
    sh("ip", "addr", "add", "198.51.100.2/24", "dev", "v0")
    sh("ip", "link", "set", "v0", "up")
    port = int(peer.stdout.readline())

    def count() -> None:
        for _ in peer.stdout:  # type: ignore[union-attr]
            hits[addr] = hits.get(addr, 0) + 1

    threading.Thread(target=count, daemon=True).start()
    return port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--answers", nargs="+", required=True)
    ap.add_argument("--name", action="append", default=[], help="NAME=ADDR, a fixed answer")
    ap.add_argument("--target", action="append", required=True, help="names to tunnel to")
    ap.add_argument("--server-arg", action="append", default=[])
    ap.add_argument("--log", required=True)
    args = ap.parse_args()

    sh("ip", "link", "set", "lo", "up")
    # The files bind-mounted over /etc live in a temporary directory of the shared file system
    # (a mount namespace does not make /tmp private): removed before exiting, whatever happens.
    with tempfile.TemporaryDirectory(prefix="mptun-dns-flip-") as tmp:
        try:
            out = run(args, Path(tmp))
        finally:
            subprocess.run(["umount", "/etc/resolv.conf", "/etc/hosts"], capture_output=True)
    print(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)  # the DNS and listener threads block in recv/accept: do not wait for them


def run(args: argparse.Namespace, tmp: Path) -> dict:
    """Resolver files, DNS server, listeners and the server; the tunnels asked for; the JSON."""
    (tmp / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    (tmp / "hosts").write_text("127.0.0.1 localhost\n")
    sh("mount", "--bind", str(tmp / "resolv.conf"), "/etc/resolv.conf")
    sh("mount", "--bind", str(tmp / "hosts"), "/etc/hosts")
    names = dict(n.split("=", 1) for n in args.name)
    dns = FlipDNS(args.answers, names)

    hits: dict[str, int] = {}
    # The same port on both addresses, so a connection to the wrong one would be seen (the
    # network namespace is this process's own: nothing else can hold the port).
    port = peer_listener("198.51.100.1", hits)
    counting = socket.create_server(("127.0.0.1", port))

    def serve_lo() -> None:
        while True:
            conn, _ = counting.accept()
            hits["127.0.0.1"] = hits.get("127.0.0.1", 0) + 1
            conn.close()

    threading.Thread(target=serve_lo, daemon=True).start()

    log = open(args.log, "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "mptun", "--log-level", "debug", "server", "--listen",
         "127.0.0.1:0", "--key-file", args.key_file, *args.server_arg],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        read_log = Path(args.log).read_text
        ((_, _, server_port),) = wait_logged_listeners(read_log, 1, proc=server)
        psk = load_key_file(args.key_file)
        results = []
        for name in args.target:
            status = connect_status(server_port, psk, Address.parse(f"{name}:{port}"))
            results.append([name, status.name])
    finally:
        server.terminate()
        server.wait(10)
        log.close()
    return {"results": results, "queries": dns.queries, "hits": hits}


if __name__ == "__main__":
    main()
