"""The server checks against a server older than the health-check request: it answers that with
silence, so the client asks again the way older servers answer (a request for 0.0.0.0:0) and
counts the server up; a server that answers neither is down, with the likely reasons."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mptun.common.crypto import DEFAULT_CIPHER, cipher_by_name, load_key_file
from mptun.common.handshake import (
    CHECK_TARGET,
    CheckRequest,
    ConnectStatus,
    NeedData,
    Request,
    ServerHandshake,
)
from mptun.common.replay import ReplayGuard
from tests.helpers import MptunProcess, wait_until


@contextmanager
def old_server(psk: bytes, answer_legacy: bool = True) -> Iterator[int]:
    """A stand-in for a server of an older version: silent to a check request (a type it does
    not know), "not allowed" to a request for CHECK_TARGET (`answer_legacy`), as such servers
    answer; nothing else."""
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        guard = ReplayGuard()
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                hs = ServerHandshake(psk, cipher_by_name(DEFAULT_CIPHER), guard)
                try:
                    while isinstance(ev := hs.next_event(), NeedData):
                        data = conn.recv(hs.bytes_needed())
                        if not data:
                            break
                        hs.receive_data(data)
                    else:
                        if isinstance(ev, CheckRequest):
                            conn.recv(1)  # silence until the client's FIN
                        elif (
                            isinstance(ev, Request) and ev.target == CHECK_TARGET and answer_legacy
                        ):
                            conn.sendall(hs.respond(ConnectStatus.NOT_ALLOWED))
                except Exception:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield lsock.getsockname()[1]
    finally:
        lsock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not)
        lsock.close()
        t.join(10)


def test_an_older_server_is_up_and_a_silent_one_down(tmp_path: Path, key_file: Path):
    psk = load_key_file(key_file)
    with old_server(psk) as old, old_server(psk, answer_legacy=False) as mute:
        args = ["client", "--server", f"127.0.0.1:{old}", "--server", f"127.0.0.1:{mute}"]
        args += ["--key-file", str(key_file), "--socks", "127.0.0.1:0"]
        with MptunProcess(args, tmp_path / "client.log") as cli:
            wait_until(lambda: f"server 127.0.0.1:{mute} is down" in cli.log(), 20, "down")
            wait_until(lambda: f"server 127.0.0.1:{old} is up" in cli.log(), 20, "up")
            log = cli.log()
            assert f"server 127.0.0.1:{old} is down" not in log, log
            assert "(a wrong key, cipher or clock, or not an mptun server)" in log, log
