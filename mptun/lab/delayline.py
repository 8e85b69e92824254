"""A link with a fixed delay between two namespaces, for hosts whose kernel has no `netem`.

Two TUN devices, one moved into each namespace, and this process between them: every IP packet
read from one is written to the other `delay` seconds later (in order; no loss, no rate limit).
A TUN device keeps working after `ip link set DEV netns NS` while its file stays open here
(Documentation/networking/tuntap.rst: the fd belongs to the process, the device to a namespace).
Run it as `python -m mptun.lab.delayline A_NS A_ADDR B_NS B_ADDR --delay-ms 50`: it prints
"ready" once both ends are up and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import os
import secrets
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA  # include/uapi/linux/if_tun.h
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    """A new TUN device (IP packets, no extra header) in this process's namespace; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def forward(fds: tuple[int, int], delay: float, stop: list[bool]) -> None:
    """Move packets between the two TUN fds, each `delay` s after it was read."""
    due: list[tuple[float, int, int, bytes]] = []  # (when, order, out fd, packet)
    order = 0
    other = {fds[0]: fds[1], fds[1]: fds[0]}
    while not stop[0]:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else 0.5
        readable, _, _ = select.select(fds, [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            for _ in range(64):
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                order += 1
                heapq.heappush(due, (now + delay, order, other[fd], packet))
        while due and due[0][0] <= time.monotonic():
            _, _, out, packet = heapq.heappop(due)
            try:
                os.write(out, packet)
            except OSError:
                pass  # the far device is down or full: a lost packet, as on a real link


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mptun.lab.delayline")
    p.add_argument("a_ns")
    p.add_argument("a_addr", help="the A end's address, e.g. 192.0.2.1")
    p.add_argument("b_ns")
    p.add_argument("b_addr")
    p.add_argument("--delay-ms", type=float, required=True, help="one way")
    a = p.parse_args(argv)
    tag = secrets.token_hex(3)
    names = (f"dlA{tag}", f"dlB{tag}")
    fds = (open_tun(names[0]), open_tun(names[1]))
    for name, ns, addr, peer in (
        (names[0], a.a_ns, a.a_addr, a.b_addr),
        (names[1], a.b_ns, a.b_addr, a.a_addr),
    ):
        _ip("link", "set", name, "netns", ns)
        _ip("-n", ns, "addr", "add", addr, "peer", peer, "dev", name)
        _ip("-n", ns, "link", "set", name, "up")
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    print("ready", flush=True)
    try:
        forward(fds, a.delay_ms / 1000.0, stop)
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
