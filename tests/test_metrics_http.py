"""The `--metrics` endpoint (common/metrics_http.py): what it answers, what it refuses, and that
bad, slow or many scrapers neither stop it nor hurt the tunnels.

Real sockets on loopback: the endpoint inside an event loop of the test (small timeouts), and
`mptun server`/`mptun client` processes for the options, the refusal and SIGHUP.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from mptun.common.address import Address
from mptun.common.errors import ConfigError
from mptun.common.metrics import Metrics
from mptun.common.metrics_http import (
    MAX_REQUEST,
    MetricsServer,
    check_metrics_bind,
    parse_request_line,
)
from mptun.lab.wait import wait_until
from tests.helpers import MptunProcess, curl, need, run_mptun
from tests.peers import http_server, sha256_of_stream

GET = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n"


def _collect(m: Metrics) -> None:
    m.gauge("test_value", "A value of the test.", 42, who="me")


async def _ask(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data`, half-close, read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _run(test: Callable[[MetricsServer, int], object], **kw: object) -> None:
    """Run `test(server, port)` in a fresh loop with an endpoint on 127.0.0.1:0."""

    async def main() -> None:
        srv = MetricsServer(Address.parse("127.0.0.1:0", any_port=True), _collect, "test", **kw)
        bound = srv.start(asyncio.get_running_loop())
        try:
            await test(srv, bound.port)  # type: ignore[misc]
        finally:
            srv.close()

    asyncio.run(main())


def test_answers_and_counts_each_kind_of_request() -> None:
    """200 for GET and HEAD of /metrics (a query string ignored), 404 another path, 405 another
    method, 400 garbage, a broken request line or headers over the size limit; all counted."""

    async def test(srv: MetricsServer, port: int) -> None:
        ok = await _ask(port, GET)
        head, body = ok.split(b"\r\n\r\n", 1)
        assert _status(ok) == 200
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert b'test_value{who="me"} 42\n' in body
        assert b'mptun_build_info{role="test",version="' in body
        assert _status(await _ask(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")) == 200
        only_head = await _ask(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert _status(only_head) == 200 and only_head.endswith(b"\r\n\r\n")
        assert _status(await _ask(port, b"GET / HTTP/1.1\r\n\r\n")) == 404
        assert _status(await _ask(port, b"GET /metricsx HTTP/1.1\r\n\r\n")) == 404
        post = await _ask(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert _status(post) == 405 and b"Allow: GET, HEAD" in post
        for garbage in (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello
            b"GET /metrics\r\n\r\n",  # HTTP/0.9
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /m\xc3\xa9trics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST + b"\r\n\r\n",
            b"half a request",  # then EOF
        ):
            assert _status(await _ask(port, garbage)) == 400, garbage
        page = (await _ask(port, GET)).decode()
        for code, n in ((200, 3), (400, 8), (404, 2), (405, 1)):
            assert f'mptun_metrics_requests_total{{code="{code}"}} {n}\n' in page
        assert "mptun_metrics_connections_total 15\n" in page

    _run(test)


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (b"GET /metrics HTTP/1.1", 200),
        (b"HEAD /metrics HTTP/1.0", 200),
        (b"GET /metrics?a=b HTTP/1.1", 200),
        (b"DELETE /metrics HTTP/1.1", 405),
        (b"GET /metrics/ HTTP/1.1", 404),
        (b"GET http://x/metrics HTTP/1.1", 404),
        (b"GET /metrics HTTP/1.1x", 400),
        (b"GET /metrics FTP/1.1", 400),
        (b"", 400),
        (b"\xff\xfe /metrics HTTP/1.1", 400),
    ],
)
def test_request_line(line: bytes, want: int) -> None:
    assert parse_request_line(line + b"\r\nHost: x\r\n\r\n")[0] == want


def test_a_slow_request_gets_408_and_a_silent_connection_nothing() -> None:
    async def test(srv: MetricsServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert _status(answer) == 408
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing said
        writer.close()
        assert srv.answers == {408: 1}
        assert srv.connections == 2

    _run(test, read_timeout=0.3)


def test_scrapers_beyond_the_cap_wait_in_the_accept_queue() -> None:
    """With every slot held by a silent connection, a scrape is not answered (the endpoint
    does not accept it); as soon as one slot frees, it is."""

    async def test(srv: MetricsServer, port: int) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        assert await wait_for_true(lambda: srv.connections == 2)
        waiting = asyncio.ensure_future(_ask(port, GET, timeout=30))
        done, _ = await asyncio.wait([waiting], timeout=0.5)
        assert not done, "answered although every slot was taken"
        assert srv.connections == 2  # not even accepted
        _, writer = held.pop()
        writer.close()
        answer = await asyncio.wait_for(waiting, 10)
        assert _status(answer) == 200
        for _, w in held:
            w.close()

    _run(test, max_scrapes=2, read_timeout=60)


async def wait_for_true(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def test_a_failing_collector_answers_500_and_the_endpoint_goes_on() -> None:
    calls = []

    def collect(m: Metrics) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        _collect(m)

    async def main() -> None:
        srv = MetricsServer(Address.parse("127.0.0.1:0", any_port=True), collect, "test")
        port = srv.start(asyncio.get_running_loop()).port
        try:
            assert _status(await _ask(port, GET)) == 500
            answer = await _ask(port, GET)
            assert (
                _status(answer) == 200 and b'mptun_metrics_requests_total{code="500"} 1' in answer
            )
        finally:
            srv.close()

    asyncio.run(main())


def test_close_stops_accepting() -> None:
    async def test(srv: MetricsServer, port: int) -> None:
        srv.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    _run(test)


@pytest.mark.parametrize(
    ("bind", "ok"),
    [
        ("127.0.0.1:9100", True),
        ("127.8.9.10:9100", True),
        ("[::1]:9100", True),
        ("[::ffff:127.0.0.1]:9100", True),
        ("0.0.0.0:9100", False),
        ("[::]:9100", False),
        ("192.0.2.1:9100", False),
        ("[2001:db8::1]:9100", False),
        ("[::ffff:192.0.2.1]:9100", False),
    ],
)
def test_only_loopback_without_metrics_public(bind: str, ok: bool) -> None:
    addr = Address.parse(bind)
    check_metrics_bind(addr, public=True)  # with the flag, any address
    if ok:
        check_metrics_bind(addr, public=False)
    else:
        with pytest.raises(ConfigError, match="--metrics-public"):
            check_metrics_bind(addr, public=False)


@pytest.mark.parametrize("command", ["server", "client"])
def test_non_loopback_metrics_is_refused_with_one_line(command: str, key_file: Path) -> None:
    side = ["--listen", "127.0.0.1:0"] if command == "server" else ["--server", "127.0.0.1:1"]
    extra = [] if command == "server" else ["--socks", "127.0.0.1:0", "--control", "none"]
    r = run_mptun(command, *side, *extra, "--key-file", str(key_file), "--metrics", "0.0.0.0:0")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mptun: error: --metrics 0.0.0.0:0: not a loopback address")
    assert "--metrics-public" in lines[0]
    assert "listening on" not in r.stdout + r.stderr  # refused before anything started


def test_metrics_address_in_use_is_one_line(key_file: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run_mptun(
            "server", "--listen", "127.0.0.1:0", "--key-file", str(key_file),
            "--metrics", f"127.0.0.1:{port}",
        )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        f"mptun: error: cannot listen on 127.0.0.1:{port} (metrics): Address already in use"
    )


def _scrape(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(GET)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body.decode()


def _value(page: str, sample: str) -> float | None:
    m = re.search(rf"^{re.escape(sample)} (\S+)$", page, re.M)
    return float(m.group(1)) if m else None


def test_garbage_and_stuck_scrapers_do_not_hurt_the_tunnel(mptun_pair) -> None:
    """Every slot of the client's endpoint held by silent connections and garbage sent to the
    server's: a transfer through the tunnel still completes byte for byte, and both endpoints
    answer afterwards with the garbage counted."""
    need("curl")
    pair = mptun_pair(("--allow-private", "--metrics", "127.0.0.1:0"), ("--metrics", "[::1]:0"))
    (server_metrics,) = pair.server.ports("metrics")
    (client_metrics,) = pair.client.ports("metrics")
    held = [socket.create_connection(("::1", client_metrics)) for _ in range(8)]
    try:
        for junk in (b"\x00" * 100 + b"\r\n\r\n", b"GET /admin HTTP/1.1\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", server_metrics), timeout=10) as s:
                s.sendall(junk)
                assert s.recv(100).split(b" ")[1] in (b"400", b"404")
        size = 3_000_000
        with http_server() as (host, port):
            r = curl("--socks5", pair.socks, f"http://{host}:{port}/bytes/{size}/5", "-o", "-")
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(size, 5)
    finally:
        for s in held:
            s.close()
    page = _scrape(server_metrics)
    assert _value(page, 'mptun_metrics_requests_total{code="400"}') == 1
    assert _value(page, 'mptun_metrics_requests_total{code="404"}') == 1
    client_page = _scrape_v6(client_metrics)
    # the held connections sent nothing: closed unanswered once they let go, none counted
    assert _value(client_page, 'mptun_metrics_requests_total{code="200"}') == 0
    assert 'code="400"' not in client_page and 'code="408"' not in client_page
    assert _value(client_page, "mptun_metrics_connections_total") >= 5
    assert _value(client_page, 'mptun_connections_total{outcome="relayed"}') == 1
    assert _value(client_page, 'mptun_bytes_total{direction="down"}') >= size


def _scrape_v6(port: int) -> str:
    with socket.create_connection(("::1", port), timeout=10) as s:
        s.sendall(GET)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


@pytest.mark.parametrize("command", ["server", "client"])
def test_sighup_keeps_the_metrics_endpoint_and_says_a_restart_is_needed(
    command: str, tmp_path: Path, key_file: Path
) -> None:
    """A changed --metrics is not rebound on SIGHUP: the `reloaded:` line names it as needing a
    restart and the endpoint answers where it was."""
    config = tmp_path / "mptun.toml"
    side = 'listen = "127.0.0.1:0"' if command == "server" else 'server = "127.0.0.1:1"'
    if command == "client":
        side += '\nsocks = "127.0.0.1:0"\ncontrol = "none"'
    body = f'[{command}]\n{side}\nkey-file = "{key_file}"\n'
    config.write_text(body + 'metrics = "127.0.0.1:0"\n')
    proc = MptunProcess([command, "--config", str(config)], tmp_path / f"{command}.log")
    try:
        (port,) = proc.ports("metrics")
        config.write_text(body + 'metrics = "[::1]:0"\n')
        proc.proc.send_signal(signal.SIGHUP)
        line = wait_until(
            lambda: next((x for x in proc.log().splitlines() if "reloaded:" in x), None),
            10,
            "the reloaded: line",
            proc=proc.proc,
        )
        assert re.search(r"; (.*, )?metrics(, .*)? need a restart", line), line
        assert "mptun_build_info" in _scrape(port)
        assert len(re.findall("metrics listening on", proc.log())) == 1
    finally:
        assert proc.stop() == 0
