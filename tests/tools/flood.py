"""A flood of stalling connections, in its own process: each connection sends 10 random bytes and
waits, and reconnects as soon as the server closes it (the lockout of docs/PROBING.md, "Floods").

    python -m tests.tools.flood PORT CONNECTIONS SECONDS SOURCE [SOURCE ...]

Connections are spread over the SOURCE addresses (loopback addresses such as 127.0.1.7; the whole
127.0.0.0/8 is on `lo`). Bounded: it stops after SECONDS and prints one JSON line of counts
(`connects`, `closed_by_server`, `errors`). It prints `ready` once every connection has been
opened once (or after 3 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the port at connect(), per 4-tuple


async def stall(
    loop: asyncio.AbstractEventLoop,
    port: int,
    source: str,
    stop_at: float,
    counts: dict[str, int],
    opened: asyncio.Event,
    first: list[int],
) -> None:
    """One flooding connection, reopened whenever the server closes it, until `stop_at`."""
    once = False
    while (left := stop_at - loop.time()) > 0:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((source, 0))
            async with asyncio.timeout(left):
                await loop.sock_connect(s, ("127.0.0.1", port))
                await loop.sock_sendall(s, os.urandom(10))
                counts["connects"] += 1
                if not once:
                    once = True
                    first[0] -= 1
                    if first[0] == 0:
                        opened.set()
                while await loop.sock_recv(s, 65536):
                    pass
                counts["closed_by_server"] += 1
        except TimeoutError:
            break
        except OSError:
            counts["errors"] += 1
            await asyncio.sleep(0.01)
        finally:
            s.close()


async def main(port: int, connections: int, seconds: float, sources: list[str]) -> None:
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    counts = {"connects": 0, "closed_by_server": 0, "errors": 0}
    opened = asyncio.Event()
    first = [connections]
    tasks = [
        asyncio.create_task(
            stall(loop, port, sources[i % len(sources)], stop_at, counts, opened, first)
        )
        for i in range(connections)
    ]

    async def announce() -> None:
        # Once every connection has been opened, or after 3 s (a server that is locked out
        # leaves some waiting in connect()).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(opened.wait(), 3.0)
        print("ready", flush=True)

    waiter = asyncio.create_task(announce())
    await asyncio.gather(*tasks)
    waiter.cancel()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    port_, n_, seconds_, *sources_ = sys.argv[1:]
    asyncio.run(main(int(port_), int(n_), float(seconds_), sources_))
