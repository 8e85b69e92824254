"""Time to the first response byte of a new tunneled connection, over a link with a real delay:
mptun's defaults against `--fast-open` and `--pool`, and shadowsocks-libev without and with its
own `--fast-open`.

Two namespaces, router and VPS, joined by `mptun.lab.delayline` (TUN devices and a process that
holds each packet `--delay-ms` one way: this host's kernel has no netem); the VPS namespace runs
the server with `net.ipv4.tcp_fastopen=3` and an HTTP target beside it, the router the client
and curl through its SOCKS port. Without either option a new connection costs two round trips
before its first response byte (the TCP/MPTCP handshake, then first flight and answer); with
either, one. Each case starts fresh, makes one connection first (Fast Open's cookie; the pool
filling), then times `--runs` new connections. Needs root.

    sudo .venv/bin/python benchmarks/first_byte.py --delay-ms 50 --runs 5
    sudo .venv/bin/python benchmarks/first_byte.py --delay-ms 100 --json   # what a test reads
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mptun.common.crypto import generate_key
from mptun.lab.netns import Netns, run
from mptun.lab.wait import wait_listening, wait_until

ROOT = Path(__file__).resolve().parent.parent
ROUTER, VPS = "192.0.2.1", "192.0.2.2"
CASES = {
    "default": (),
    "fast-open": ("--fast-open",),
    "pool": ("--pool", "2"),
    "tcp": ("--transport", "tcp"),
    "tcp-fast-open": ("--transport", "tcp", "--fast-open"),
    # shadowsocks-libev (ss-server and ss-local, aes-256-gcm, TCP), without and with its own
    # --fast-open at both ends: what a shadowsocks user compares with
    "ss": (),
    "ss-fast-open": ("--fast-open",),
}


def _fastopen_counters(ns: Netns) -> dict[str, int]:
    """The namespace's nonzero TcpExtTCPFastOpen* counters."""
    kernel = json.loads(ns.exec("nstat", "-az", "--json").stdout)["kernel"]
    return {k: v for k, v in kernel.items() if "FastOpen" in k and v}


# The target: 100 bytes for any GET, after `think` seconds (the target's own time to answer).
TARGET = """
import sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(float(sys.argv[2]))
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        self.wfile.write(b"x" * 100)
    def log_message(self, *a):
        pass
print("ready", flush=True)
HTTPServer((sys.argv[1], 8080), H).serve_forever()
"""


def _link(router: Netns, vps: Netns, delay_ms: float, kind: str) -> subprocess.Popen | None:
    """Join the namespaces with `delay_ms` each way: the delay line (its process, running), or
    a veth pair with netem on both ends (None)."""
    if kind == "delayline":
        line = subprocess.Popen(
            [sys.executable, "-m", "mptun.lab.delayline", router.name, ROUTER, vps.name, VPS,
             "--delay-ms", str(delay_ms)],
            stdout=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        if line.stdout is None or line.stdout.readline().strip() != b"ready":
            line.terminate()
            raise RuntimeError("the delay line did not start")
        return line
    run(["ip", "link", "add", "fbr", "netns", router.name, "type", "veth",
         "peer", "name", "fbv", "netns", vps.name])  # fmt: skip
    for ns, dev, addr in ((router, "fbr", ROUTER), (vps, "fbv", VPS)):
        ns.ip("addr", "add", f"{addr}/24", "dev", dev)
        ns.ip("link", "set", dev, "up")
        ns.exec("tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{delay_ms}ms")
    return None


def one_case(
    name: str,
    extra: tuple[str, ...],
    delay_ms: float,
    runs: int,
    tmp: Path,
    think_ms: float,
    link: str = "delayline",
    sysctl: int = 3,
    log_level: str = "info",
    keep_logs: Path | None = None,
) -> dict:
    key = tmp / "key"
    key.write_text(generate_key() + "\n")
    key.chmod(0o600)
    py = sys.executable
    with Netns("fbr") as router, Netns("fbv") as vps:
        vps.sysctl("net.ipv4.tcp_fastopen", sysctl)
        line = _link(router, vps, delay_ms, link)
        try:
            log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 (closed below)
            out = {"stdout": log, "stderr": subprocess.STDOUT, "cwd": ROOT}
            www = vps.popen(
                [py, "-c", TARGET, VPS, str(think_ms / 1000)],
                **out,
            )
            wait_listening(VPS, 8080, proc=www, prefix=vps.prefix())
            if name.startswith("ss"):
                password = ["-k", generate_key(), "-m", "aes-256-gcm", *extra]
                server = vps.popen(["ss-server", "-s", VPS, "-p", "8443", *password], **out)
                wait_listening(VPS, 8443, proc=server, prefix=vps.prefix())
                client = router.popen(
                    ["ss-local", "-s", VPS, "-p", "8443", "-b", "127.0.0.1", "-l", "1080",
                     *password],
                    **out,
                )  # fmt: skip
            else:
                mptun = [py, "-m", "mptun", "--log-level", log_level]
                server = vps.popen(
                    [*mptun, "server", "--listen", f"{VPS}:8443", "--key-file", str(key),
                     "--allow-private"],  # the target is the server's own address
                    **out,
                )  # fmt: skip
                wait_listening(VPS, 8443, proc=server, prefix=vps.prefix())
                client = router.popen(
                    [*mptun, "client", "--server", f"{VPS}:8443", "--key-file", str(key),
                     "--socks", "127.0.0.1:1080", *extra],
                    **out,
                )  # fmt: skip
            wait_listening("127.0.0.1", 1080, proc=client, prefix=router.prefix())

            def fetch() -> float | None:
                """Seconds to the first response byte of one new connection; None (and the
                log's end on stderr) when it failed."""
                r = router.exec(
                    "curl", "--silent", "--output", "/dev/null", "--max-time", "20",
                    "--write-out", "%{time_starttransfer} %{http_code}",
                    "--socks5-hostname", "127.0.0.1:1080", f"http://{VPS}:8080/",
                    check=False,
                )  # fmt: skip
                first, code = r.stdout.split()
                if code != "200":
                    print(Path(log.name).read_text()[-4000:], file=sys.stderr)
                    return None
                return float(first)

            if not name.startswith("ss"):  # mptun's client has checked its server
                wait_until(lambda: b" is up" in Path(log.name).read_bytes(), 20.0, "server up")
            warm = fetch()
            times, failed = [], 0
            for _ in range(runs):
                time.sleep(0.3)  # the pool refills in the background (one round trip each)
                t = fetch()
                if t is None:
                    failed += 1
                else:
                    times.append(t)
            log.close()
            lost = Path(log.name).read_text().count("was lost and sent again")
            tfo = {side: _fastopen_counters(ns) for side, ns in (("router", router), ("vps", vps))}
        finally:
            if line is not None:
                line.terminate()
                line.wait()
            if keep_logs is not None:
                keep_logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp / f"{name}.log", keep_logs / f"{name}.log")
    rtt = 2 * delay_ms / 1000.0
    return {
        "case": name,
        "rtt": rtt,
        "warm_up": warm,
        "times": times,
        "failed": failed,
        "median": statistics.median(times) if times else None,
        "median_rtts": statistics.median(times) / rtt if times else None,
        "nstat": tfo,
        "syn_data_lost": lost,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--delay-ms", type=float, default=50.0, help="one way (RTT twice it)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--think-ms", type=float, default=0.0, help="the target's time to answer")
    ap.add_argument(
        "--link",
        choices=("delayline", "netem"),
        default="delayline",
        help="how the delay is made: mptun.lab.delayline, or netem where the kernel has it",
    )
    ap.add_argument("--sysctl", type=int, default=3, help="the VPS's net.ipv4.tcp_fastopen")
    ap.add_argument("--log-level", default="info", help="of both mptun processes")
    ap.add_argument("--keep-logs", type=Path, help="copy each case's log into this directory")
    ap.add_argument("--cases", default=",".join(CASES), help="of " + ", ".join(CASES))
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout")
    a = ap.parse_args()
    if bad := [c for c in a.cases.split(",") if c not in CASES]:
        ap.error(f"unknown cases {', '.join(bad)}: choose from {', '.join(CASES)}")
    if any(c.startswith("ss") for c in a.cases.split(",")) and not shutil.which("ss-local"):
        ap.error("the ss cases need shadowsocks-libev (apt-get install shadowsocks-libev)")
    results = []
    for name in a.cases.split(","):
        with tempfile.TemporaryDirectory(prefix="mptun-fb.") as tmp:
            results.append(
                one_case(
                    name,
                    CASES[name],
                    a.delay_ms,
                    a.runs,
                    Path(tmp),
                    a.think_ms,
                    a.link,
                    a.sysctl,
                    a.log_level,
                    a.keep_logs,
                )
            )
    if a.json:
        print(json.dumps(results))
        return 0
    print(
        f"RTT {2 * a.delay_ms:g} ms, target answers after {a.think_ms:g} ms; time to the first "
        "response byte of a new connection"
    )
    for r in results:
        ms = ", ".join(f"{t * 1000:.0f}" for t in r["times"])
        first = "failed" if r["warm_up"] is None else f"{r['warm_up'] * 1000:.0f} ms"
        failed = f", {r['failed']} failed" if r["failed"] else ""
        median = (
            "(none)"
            if r["median"] is None
            else (f"{r['median'] * 1000:6.0f} ms = {r['median_rtts']:.2f} RTT")
        )
        print(f"{r['case']:13} median {median}  (first {first}; runs {ms}{failed})")
    return 1 if any(r["failed"] or r["warm_up"] is None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
