"""`--metrics HOST:PORT`: `GET /metrics` over HTTP/1.1 for Prometheus, on the service's own loop.

Small on purpose: one request per connection (`Connection: close`), `GET` or `HEAD` of
`/metrics` (a query string is ignored), 404 for any other path, 405 for any other method, 400 for
what is not an HTTP/1.x request line or is larger than `MAX_REQUEST` bytes, 408 when the request
has not arrived `READ_TIMEOUT` seconds after the accept. At most `MAX_SCRAPES` connections are
served at once; more wait in the kernel's accept queue (common/listener.py stops accepting at the
limit), so slow or many scrapers cost the relay a few sockets, never a busy loop. Every answer
is counted by status code (`mptun_metrics_requests_total`).

The page is built when asked (`collect` fills a `Metrics`): nothing is kept between scrapes.
A non-loopback address is refused unless the operator says so (`check_metrics_bind`): the
counters name uplink addresses and servers, and the endpoint has no authentication.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from mptun import __version__
from mptun.common.address import Address
from mptun.common.errors import ConfigError
from mptun.common.listener import AcceptLoop, listen_hint
from mptun.common.logutil import BurstLog
from mptun.common.metrics import CONTENT_TYPE, Metrics
from mptun.common.sockets import Transport, listen_socket

log = logging.getLogger("mptun.metrics")

PATH = "/metrics"
MAX_REQUEST = 8192  # bytes of request line and headers; Prometheus sends about 300
READ_TIMEOUT = 5.0  # seconds from accept to the end of the request's headers
WRITE_TIMEOUT = 10.0  # seconds for the answer to leave; a reader that stalls longer is dropped
LINGER = 1.0  # seconds to wait for the scraper's close after answering (bytes read and dropped)
MAX_SCRAPES = 4  # connections served at once
BACKLOG = 16  # connections the kernel holds while MAX_SCRAPES are served

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
}

Collect = Callable[[Metrics], None]


def check_metrics_bind(bind: Address, public: bool) -> None:
    """Refuse a metrics address other than loopback unless `public` (--metrics-public)."""
    host = bind.host
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped  # the kernel binds the IPv4 address
    if public or (not isinstance(host, str) and host.is_loopback):
        return
    raise ConfigError(
        f"--metrics {bind}: not a loopback address, and the metrics page has no authentication "
        "(it names servers and uplink addresses): bind 127.0.0.1:PORT or [::1]:PORT, or add "
        "--metrics-public and keep the port behind a firewall"
    )


def parse_request_line(head: bytes) -> tuple[int, str, str]:
    """(status, method, path) of a request's head: 200 for GET/HEAD of /metrics, else the error
    status to answer (400 garbage, 404 another path, 405 another method)."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or len(parts[2]) != 8:
        return 400, "", ""
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return 400, "", ""
    if not method.isalpha() or not method.isupper() or not target:
        return 400, "", ""
    path = target.split("?", 1)[0]
    if path != PATH:
        return 404, method, path
    if method not in ("GET", "HEAD"):
        return 405, method, path
    return 200, method, path


def head_end(buf: bytes | bytearray) -> int | None:
    """Where the request's head ends (after its blank line; a bare LF too), None before."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(ends) if ends else None


def response(status: int, body: bytes, head_only: bool = False) -> bytes:
    """An HTTP/1.1 answer that closes the connection."""
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {CONTENT_TYPE if status == 200 else 'text/plain; charset=utf-8'}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 405:
        headers.append("Allow: GET, HEAD")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + (b"" if head_only else body)


class MetricsServer:
    """Serves `collect`'s metrics at http://BIND/metrics inside a service's event loop."""

    def __init__(
        self,
        bind: Address,
        collect: Collect,
        role: str,
        max_scrapes: int = MAX_SCRAPES,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.bind = bind
        self.collect = collect
        self.role = role
        self.max_scrapes = max_scrapes
        self.read_timeout = read_timeout
        self.started = time.time()
        self.address: Address | None = None
        self.answers: Counter[int] = Counter()  # by status code
        self.connections = 0
        self._accept: AcceptLoop | None = None
        self._error_log = BurstLog(log, logging.ERROR, interval=60.0)

    def start(self, loop: asyncio.AbstractEventLoop) -> Address:
        """Bind and listen; ConfigError with a one-line reason when the address is refused."""
        try:
            sock, _ = listen_socket(self.bind, Transport(want_mptcp=False), BACKLOG)
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {self.bind} (metrics): {e.strerror}{listen_hint(self.bind, e)}"
            ) from None
        self._accept = AcceptLoop(loop, sock, self._handle, log, self.max_scrapes)
        self._accept.start()
        host, port = sock.getsockname()[:2]
        self.address = Address.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        log.info("metrics listening on %s (GET %s)", self.address, PATH)
        return self.address

    def close(self) -> None:
        """Stop accepting and drop scrapes under way (nothing of the relay depends on them)."""
        if self._accept is None:
            return
        self._accept.close()
        for task in list(self._accept.tasks):
            task.cancel()

    def page(self) -> bytes:
        """The exposition page now: the service's metrics and the endpoint's own."""
        m = Metrics()
        self.collect(m)
        m.gauge(
            "mptun_build_info", "Always 1; the labels say which mptun runs in which role.", 1,
            version=__version__, role=self.role,
        )  # fmt: skip
        m.gauge(
            "mptun_start_time_seconds",
            "When the process started serving metrics (Unix time).",
            round(self.started, 3),
        )
        requests = m.counter(
            "mptun_metrics_requests_total",
            "Requests the metrics endpoint answered, by HTTP status code (this scrape not yet).",
        )
        for code in sorted({200, *self.answers}):
            requests.add(self.answers[code], code=code)
        m.counter(
            "mptun_metrics_connections_total",
            "Connections the metrics endpoint accepted (also those that sent nothing).",
            self.connections,
        )
        return m.render().encode()

    async def _handle(self, sock: socket.socket, peer: tuple) -> None:
        self.connections += 1
        loop = asyncio.get_running_loop()
        try:
            answer = await self._answer(loop, sock)
            if answer is not None:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await loop.sock_sendall(sock, answer)
                sock.shutdown(socket.SHUT_WR)
                # Read what the scraper may still send until it closes, so that our close sends
                # a FIN after the answer and not a reset that could destroy it (RFC 9112 9.6).
                async with asyncio.timeout(LINGER):
                    while await loop.sock_recv(sock, 4096):
                        pass
        except (OSError, TimeoutError):
            pass
        finally:
            sock.close()

    async def _answer(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes | None:
        """What to send back (None: nothing came, nothing to answer); counts it."""
        buf = bytearray()
        status = 400
        try:
            async with asyncio.timeout(self.read_timeout):
                while (end := head_end(buf)) is None and len(buf) <= MAX_REQUEST:
                    data = await loop.sock_recv(sock, 4096)
                    if not data:
                        if not buf:
                            return None
                        break
                    buf += data
                if end is not None and end <= MAX_REQUEST:
                    status = 0
        except TimeoutError:
            if not buf:
                return None
            status = 408
        method = ""
        if status == 0:
            status, method, _ = parse_request_line(bytes(buf))
        body = b""
        if status == 200:
            try:
                body = self.page()
            except Exception as e:  # a bug in a collector: answer 500, keep serving
                self._error_log("metrics: collecting failed: %r", e)
                log.debug("traceback", exc_info=e)
                status = 500
        if status != 200:
            body = f"{status} {_REASONS[status]}\n".encode()
        self.answers[status] += 1
        return response(status, body, head_only=method == "HEAD")


def serve_metrics(
    metrics: MetricsServer | None,
    start: Callable[[asyncio.AbstractEventLoop], object],
    stop: Callable[[float], Awaitable[int]],
) -> tuple[Callable[[asyncio.AbstractEventLoop], None], Callable[[float], Awaitable[int]]]:
    """A service's start/stop with the metrics endpoint opened before it and closed before the
    drain (a bad --metrics fails before any listener starts)."""
    if metrics is None:
        return start, stop  # type: ignore[return-value]

    def start_all(loop: asyncio.AbstractEventLoop) -> None:
        metrics.start(loop)
        try:
            start(loop)
        except BaseException:
            metrics.close()
            raise

    async def stop_all(drain_timeout: float) -> int:
        metrics.close()
        return await stop(drain_timeout)

    return start_all, stop_all
