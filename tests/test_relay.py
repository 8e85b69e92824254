"""Relay engines over real loopback TCP/MPTCP sockets: integrity, half-close, resets, fds."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading

import pytest

from mptun.common.relay import CopyEngine, SpliceEngine, available_engines
from mptun.common.relay.splice import make_pipe
from mptun.common.sockets import IPPROTO_MPTCP
from tests.helpers import loopback_pair

ENGINES = {"splice": SpliceEngine, "copy": CopyEngine}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Setup:
    """app_a <-> inner [relay] tunnel <-> app_b."""

    def __init__(self, proto: int = 0) -> None:
        self.app_a, self.inner = loopback_pair()
        self.tunnel, self.app_b = loopback_pair(proto)
        for s in (self.inner, self.tunnel):
            s.setblocking(False)

    def run(self, engine_name: str, script, **kw):
        engine = ENGINES[engine_name](**kw)

        async def main():
            loop = asyncio.get_running_loop()
            t = threading.Thread(target=script, daemon=True)
            t.start()
            stats = await asyncio.wait_for(engine.relay(loop, self.inner, self.tunnel), 60)
            await loop.run_in_executor(None, t.join, 30)
            return stats

        try:
            return asyncio.run(main())
        finally:
            self.app_a.close()
            self.app_b.close()


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        c = s.recv(1 << 16)
        if not c:
            return bytes(out)
        out += c


@pytest.fixture(params=available_engines())
def engine(request) -> str:
    return request.param


def test_splice_is_available_here():
    assert "splice" in available_engines()


@pytest.mark.parametrize("proto", [0, IPPROTO_MPTCP], ids=["tcp", "mptcp"])
def test_both_directions_intact_and_counted(engine, proto):
    up = os.urandom(3 * 1024 * 1024 + 17)
    down = os.urandom(5 * 1024 * 1024 + 3)
    st = Setup(proto)
    got = {}

    def script():
        def a():
            st.app_a.sendall(up)
            st.app_a.shutdown(socket.SHUT_WR)
            got["a"] = recv_all(st.app_a)

        ta = threading.Thread(target=a)
        ta.start()
        st.app_b.sendall(down)
        st.app_b.shutdown(socket.SHUT_WR)
        got["b"] = recv_all(st.app_b)
        ta.join()

    stats = st.run(engine, script)
    assert hashlib.sha256(got["b"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["a"]).digest() == hashlib.sha256(down).digest()
    assert (stats.to_tunnel, stats.from_tunnel) == (len(up), len(down))
    assert stats.clean and stats.error is None


def test_half_close_keeps_other_direction(engine):
    """A sends and shuts down its write side; B's reply still arrives in full afterwards."""
    st = Setup()
    reply = os.urandom(2 * 1024 * 1024)
    got = {}

    def script():
        st.app_a.sendall(b"request")
        st.app_a.shutdown(socket.SHUT_WR)
        got["req"] = recv_all(st.app_b)  # EOF arrives only after A's shutdown crossed
        st.app_b.sendall(reply)
        st.app_b.close()
        got["reply"] = recv_all(st.app_a)

    stats = st.run(engine, script)
    assert got["req"] == b"request"
    assert got["reply"] == reply
    assert stats.clean


@pytest.mark.parametrize("side", ["inner", "tunnel"])
def test_abnormal_end_resets_the_other_leg(engine, side):
    st = Setup()
    got = {}

    def script():
        victim, survivor = (st.app_a, st.app_b) if side == "inner" else (st.app_b, st.app_a)
        victim.sendall(b"partial")
        survivor.recv(7)
        # RST from the victim's end
        victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        victim.close()
        try:
            got["data"] = survivor.recv(100)
        except ConnectionResetError:
            got["data"] = "reset"

    stats = st.run(engine, script)
    assert got["data"] == "reset"
    assert not stats.clean
    assert side in (stats.error or "")


def test_every_fd_closed_once(engine):
    before = open_fds()
    for _ in range(5):
        st = Setup()

        def script(st=st):
            st.app_a.sendall(b"x" * 100_000)
            st.app_a.shutdown(socket.SHUT_WR)
            recv_all(st.app_b)
            st.app_b.shutdown(socket.SHUT_WR)
            recv_all(st.app_a)

        st.run(engine, script)
    assert open_fds() == before
    assert st.inner.fileno() == -1 and st.tunnel.fileno() == -1


def test_small_pipe_still_moves_everything():
    """A 4 KiB pipe forces many partial splices and the pipe-full path."""
    st = Setup()
    data = os.urandom(4 * 1024 * 1024)
    got = {}

    def script():
        t = threading.Thread(target=lambda: got.setdefault("b", recv_all(st.app_b)))
        t.start()
        st.app_a.sendall(data)
        st.app_a.shutdown(socket.SHUT_WR)
        t.join()
        st.app_b.shutdown(socket.SHUT_WR)
        recv_all(st.app_a)

    st.run("splice", script, pipe_size=4096)
    assert got["b"] == data


def test_pipe_size_falls_back_when_refused():
    r, w, cap = make_pipe(1 << 40)  # far over pipe-max-size: EINVAL, keeps the default
    os.close(r)
    os.close(w)
    assert cap >= 4096


@pytest.mark.root
@pytest.mark.timing
def test_dead_mptcp_tunnel_is_noticed_and_the_inner_leg_reset(engine):
    """Every subflow destroyed (`ss -K`) leaves the MPTCP socket silent, with no error; the
    relay's liveness watchdog must still end it and reset the application's connection."""
    import subprocess
    import time

    from mptun.common.mptcpinfo import live_subflows

    st = Setup(IPPROTO_MPTCP)
    port = st.app_b.getsockname()[1]  # the tunnel's far end; st.tunnel connects to it
    got = {}

    def script():
        st.app_b.sendall(b"hello")
        assert st.app_a.recv(5) == b"hello"
        r = subprocess.run(["ss", "-K", "-t", "dport", f"= :{port}"], capture_output=True)
        got["ss"] = r.returncode
        got["live"] = live_subflows(st.tunnel)
        t0 = time.monotonic()
        st.app_a.settimeout(20)
        try:
            got["end"] = st.app_a.recv(100) or "eof"
        except ConnectionResetError:
            got["end"] = "reset"
        except TimeoutError:
            got["end"] = "hang"
        got["after"] = time.monotonic() - t0

    stats = st.run(engine, script)
    assert got["ss"] == 0 and got["live"] == 0  # the dead state really was produced
    assert got["end"] == "reset", got
    assert got["after"] < 10, got
    assert not stats.clean and "subflow" in (stats.error or "")


def test_live_subflows_answers_only_for_mptcp():
    from mptun.common.mptcpinfo import live_subflows

    a, b = loopback_pair(IPPROTO_MPTCP)
    c, d = loopback_pair()
    try:
        assert live_subflows(a) == 1 and live_subflows(b) == 1
        assert live_subflows(c) is None
    finally:
        for s in (a, b, c, d):
            s.close()
