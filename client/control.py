"""The client's control socket: `mptun status` connects, gets one JSON document, done.

Why a socket in the client and not inet_diag: only the client knows which MPTCP sockets are
tunnels, for which LAN peer and target; it reads each tunnel's subflows with getsockopt on the
socket it owns (common/mptcpinfo.py), which needs no privileges and works per connection.

Where: by default an abstract unix socket `@mptun/client/<pid>`. Abstract names belong to the
network namespace (unix(7)), so clients in different namespaces or test beds never collide, and
`mptun status` finds every client of its namespace in /proc/net/unix. They have no file
permissions, so the server checks the peer's credentials (SO_PEERCRED): only root and the
client's own user get an answer (the answer names LAN peers and targets).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

from mptun.client.tunnel import Tunneler
from mptun.common.errors import ConfigError, MptunError
from mptun.common.mptcpinfo import connection_info

log = logging.getLogger("mptun.client")

PREFIX = "@mptun/client/"
# sun_path holds 108 bytes (unix(7)): a path needs its NUL, an abstract name its leading NUL.
MAX_NAME_BYTES = 107


def default_name() -> str:
    return f"{PREFIX}{os.getpid()}"


def _bind_address(name: str) -> str:
    """`@name` is abstract (a leading NUL byte for the kernel), anything else a path."""
    return "\0" + name[1:] if name.startswith("@") else name


def tunnels_snapshot(tunneler: Tunneler) -> list[dict]:
    """Every relaying tunnel with what the kernel says about its subflows."""
    now = time.monotonic()
    out = []
    for t in list(tunneler.live.values()):
        try:
            info = connection_info(t.sock).to_dict()
        except (OSError, ValueError) as e:  # closed under us, or an unexpected kernel answer
            info = {"kind": "unknown", "subflows": [], "detail": str(e)}
        out.append(
            {
                "id": t.cid,
                "source": t.source,
                "target": str(t.target),
                "seconds": round(now - t.started, 1),
                **info,
            }
        )
    return out


class ControlServer:
    """Accepts status requests on `name` inside the client's event loop."""

    def __init__(self, name: str, snapshot: Callable[[], dict]) -> None:
        self.name = name
        self.snapshot = snapshot
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                s.bind(_bind_address(self.name))
            except OSError as e:
                if e.errno != errno.EADDRINUSE or not _remove_stale(self.name):
                    raise
                s.bind(_bind_address(self.name))
        except OSError as e:
            s.close()
            raise ConfigError(f"control socket {self.name}: {e.strerror or e}") from None
        if not self.name.startswith("@"):
            os.chmod(self.name, 0o600)
        s.listen(8)
        s.setblocking(False)
        self.sock, self.loop = s, loop
        loop.add_reader(s.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.sock is not None and self.loop is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("control socket accept: %s", e.strerror)
            return
        self.loop.create_task(self._answer(conn))

    async def _answer(self, conn: socket.socket) -> None:
        assert self.loop is not None
        with conn:
            conn.setblocking(False)
            pid, uid, _gid = struct.unpack(
                "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )
            if uid not in (0, os.geteuid()):
                log.info("control socket: refused status to uid %d (pid %d)", uid, pid)
                return
            data = json.dumps(self.snapshot()).encode() + b"\n"
            try:
                await self.loop.sock_sendall(conn, data)
            except OSError:
                pass

    def close(self) -> None:
        if self.sock is None:
            return
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        if not self.name.startswith("@"):
            try:
                os.unlink(self.name)
            except OSError:
                pass


def _remove_stale(name: str) -> bool:
    """Unlink a socket file nobody listens on (a client killed by SIGKILL leaves one behind,
    and every later start would fail with EADDRINUSE); True if it was removed."""
    try:
        if name.startswith("@") or not stat.S_ISSOCK(os.lstat(name).st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(name) != errno.ECONNREFUSED:
                return False  # someone answers: another client uses it
        os.unlink(name)
    except OSError:
        return False
    log.info("control socket %s: removed a stale socket file", name)
    return True


def discover() -> list[str]:
    """The control sockets of mptun clients in this network namespace (from /proc/net/unix)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening
        if len(parts) >= 8 and parts[7].startswith(PREFIX) and parts[3] == "00010000":
            found.append(parts[7])
    return sorted(set(found), key=lambda n: int(n.rsplit("/", 1)[1]) if n[-1].isdigit() else 0)


def query(name: str, timeout: float = 5.0) -> dict:
    """Ask one client for its status; MptunError when it does not answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(_bind_address(name))
        chunks = []
        while True:
            got = s.recv(65536)
            if not got:
                break
            chunks.append(got)
    except OSError as e:
        raise MptunError(f"control socket {name}: {e.strerror or e}") from None
    finally:
        s.close()
    if not chunks:
        raise MptunError(f"control socket {name}: no answer (only root or the client's user)")
    try:
        return json.loads(b"".join(chunks))
    except json.JSONDecodeError:
        raise MptunError(f"control socket {name}: not a status document") from None


def check_control_name(value: str) -> str | None:
    """Why `value` cannot be a --control value, or None: caught at parse time, before any
    listener starts."""
    if value in ("auto", "none"):
        return None
    if not value or value == "@":
        return "give auto, none, @NAME or a file path"
    raw = value[1:] if value.startswith("@") else value
    try:
        size = len(raw.encode())
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if size > MAX_NAME_BYTES:
        return f"{size} bytes; a unix socket name holds at most {MAX_NAME_BYTES}"
    if value.startswith("@"):
        return None
    path = Path(value)
    if not path.parent.is_dir():
        return f"directory {str(path.parent)!r} does not exist"
    if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
        return "exists and is not a socket"
    return None


def wrap_service(
    control: str,
    start: Callable[[asyncio.AbstractEventLoop], object],
    stop: Callable[[float], object],
    snapshot: Callable[[], dict],
) -> tuple[Callable, Callable]:
    """The service's start/stop with the control socket opened and closed around them."""
    if control == "none":
        return start, stop
    server = ControlServer(default_name() if control == "auto" else control, snapshot)

    def start_all(loop: asyncio.AbstractEventLoop) -> None:
        server.start(loop)  # first: a bad --control fails before any listener is logged
        try:
            start(loop)
        except BaseException:
            server.close()
            raise
        log.info("status on control socket %s (mptun status)", server.name)

    async def stop_all(drain_timeout: float) -> int:
        server.close()
        return await stop(drain_timeout)  # type: ignore[misc]

    return start_all, stop_all
