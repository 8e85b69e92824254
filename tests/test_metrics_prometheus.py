"""The real Prometheus server scrapes a live `mptun client` and `mptun server` (`--metrics`)
that carried a tunnelled transfer, and its HTTP API (`/api/v1/query`) gives the values back.

Everything on loopback: mptun listens on port 0 and logs its ports; Prometheus, which must be
told its port, gets one through `start_listener` (started again elsewhere if the port was
taken). Prometheus (Debian package `prometheus`) runs with a 1 s scrape interval, its storage in
a temporary directory removed afterwards, and is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mptun.common.address import Address
from mptun.common.metrics import Metrics
from mptun.common.metrics_http import MetricsServer
from mptun.lab.wait import start_listener, wait_until
from tests.helpers import curl, need
from tests.peers import http_server, sha256_of_stream, socks_open

SIZE = 4_000_000  # bytes downloaded through the tunnel
# Label values that need every escape of the text format, and some that need none.
AWKWARD = {
    "quote": 'say "hi"',
    "backslash": "C:\\dir\\",
    "newline": "two\nlines",
    "all": '\\"\n\\n',
    "unicode": "ünïcode ✓",
}


@contextmanager
def endpoint_in_thread(collect) -> Iterator[int]:
    """A `MetricsServer` on 127.0.0.1:0 in an event loop of its own thread; yields its port."""
    loop = asyncio.new_event_loop()
    srv = MetricsServer(Address.parse("127.0.0.1:0", any_port=True), collect, "test")
    port = srv.start(loop).port
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(srv.close)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


class Prometheus:
    """`prometheus` scraping `targets` ({job: [(host:port, {label: value})]}) every second."""

    def __init__(self, workdir: Path, targets: dict[str, list[tuple[str, dict[str, str]]]]):
        config = workdir / "prometheus.yml"
        jobs = [
            {
                "job_name": job,
                "static_configs": [{"targets": [t], "labels": labels} for t, labels in ts],
            }
            for job, ts in targets.items()
        ]
        # JSON is YAML: no YAML writer needed.
        cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": jobs}
        config.write_text(json.dumps(cfg))
        self.log_path = workdir / "prometheus.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 (closed below)

        def start(port: int) -> subprocess.Popen:
            return subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        try:
            self.proc, self.port = start_listener(start, timeout=30)
        finally:
            log.close()
        wait_until(self._ready, 30, "Prometheus ready", proc=self.proc)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: each series' labels and value."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        assert doc["status"] == "success", doc
        return [(s["metric"], float(s["value"][1])) for s in doc["data"]["result"]]

    def value(self, promql: str) -> float | None:
        """The value of a query that selects one series (None while it selects none)."""
        found = self.query(promql)
        assert len(found) <= 1, found
        return found[0][1] if found else None

    def wait(self, promql: str, ok, what: str, timeout: float = 30.0) -> float:
        """Poll until the query's one value satisfies `ok`; that value."""
        return wait_until(
            lambda: (v := self.value(promql)) is not None and ok(v) and (v,),
            timeout,
            f"{what} ({promql}); Prometheus log: {self.log_path.read_text()[-2000:]}",
        )[0]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_prometheus_reads_a_live_client_and_server(mptun_pair) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    need("curl")
    pair = mptun_pair(("--allow-private", "--metrics", "127.0.0.1:0"), ("--metrics", "127.0.0.1:0"))
    (server_port,) = pair.server.ports("metrics")
    (client_port,) = pair.client.ports("metrics")

    def awkward(m: Metrics) -> None:
        fam = m.gauge("test_awkward", "Label values with every escape.")
        for i, (name, value) in enumerate(sorted(AWKWARD.items())):
            fam.add(i, case=name, value=value)

    with (
        tempfile.TemporaryDirectory(prefix="mptun-prometheus-") as tmp,
        endpoint_in_thread(awkward) as awkward_port,
        http_server() as (host, port),
    ):
        prom = Prometheus(
            Path(tmp),
            {
                "mptun": [
                    (f"127.0.0.1:{server_port}", {"side": "server"}),
                    (f"127.0.0.1:{client_port}", {"side": "client"}),
                ],
                "awkward": [(f"127.0.0.1:{awkward_port}", {})],
            },
        )
        try:
            for side in ("server", "client"):
                prom.wait(f'up{{job="mptun",side="{side}"}}', lambda v: v == 1, f"{side} up")

            r = curl("--socks5", pair.socks, f"http://{host}:{port}/bytes/{SIZE}/9", "-o", "-")
            assert r.returncode == 0, r.stderr
            assert hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(SIZE, 9)

            def one(side: str, metric: str, **labels: str) -> str:
                sel = ",".join([f'side="{side}"', *(f'{k}="{v}"' for k, v in labels.items())])
                return f"{metric}{{{sel}}}"

            for side in ("client", "server"):
                relayed = one(side, "mptun_connections_total", outcome="relayed")
                prom.wait(relayed, lambda v: v >= 1, f"the {side}'s relayed tunnel")
                assert prom.value(relayed) == 1
                assert prom.value(one(side, "mptun_bytes_total", direction="down")) >= SIZE
                assert prom.value(one(side, "mptun_bytes_total", direction="up")) > 0
                assert prom.value(one(side, "mptun_tunnels_active")) == 0
                build = one(side, "mptun_build_info", role=side)
                assert prom.value(build) == 1
                assert prom.value(one(side, "mptun_metrics_requests_total", code="200")) >= 1
            # the server: the replay cache holds the tunnel's salt (and the client's checks')
            assert prom.value(one("server", "mptun_replay_cache_salts")) >= 1
            assert prom.value(one("server", "mptun_handshakes_open")) == 0
            assert prom.value(one("server", "mptun_handshakes_evicted_total")) == 0
            # the client: its server is up, by its checks
            assert prom.value(one("client", "mptun_server_state", state="up")) == 1

            # A tunnel held open: counted active on both sides, its subflow on the client.
            sock, rep = socks_open(pair.socks_port, Address.parse(f"{host}:{port}"))
            try:
                assert rep == 0
                for side in ("client", "server"):
                    prom.wait(one(side, "mptun_tunnels_active"), lambda v: v == 1, "a live tunnel")
                prom.wait(
                    one("client", "mptun_uplink_subflows", local="127.0.0.1"),
                    lambda v: v >= 1,
                    "the live tunnel's subflow",
                )
                down = one("client", "mptun_uplink_bytes", local="127.0.0.1", direction="down")
                assert prom.value(down) is not None
            finally:
                sock.close()
            prom.wait(
                one("client", "mptun_connections_total", outcome="relayed"),
                lambda v: v == 2,
                "the second tunnel ended",
            )

            # Every escape came through Prometheus' parser unchanged.
            got = {s["case"]: s["value"] for s, _ in prom.query("test_awkward")}
            assert got == AWKWARD
        finally:
            prom.stop()
