"""The paths compared: kernel routing, mptun's engines and transports, shadowsocks-libev.

A case starts its relay processes (client end in the router, server end in the VPS) and says how
the traffic generator reaches the far host: directly (routing) or through a SOCKS5 address.
One reference case has no relay at all: the generator itself speaks MPTCP from the router to
the VPS over the uplinks, the ceiling of the tunnel's transport on this kernel.

The gateway cases (`gw-*`) run iperf3 from the lan host as a LAN user would, caught by an nft
redirect in the router into `mptun client --redir`; beside mptun's engines they run the bench's
reference relay (mptun/bench/reference.py) and iperf3 under mptcpize with no relay.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mptun.bench.env import BenchError, Environment
from mptun.common import ktls
from mptun.common.crypto import generate_key
from mptun.lab.netns import have_mptcp

SS_METHOD = "aes-256-gcm"


@dataclass
class Case:
    """One path. `kind`: route, direct, mptun, reference (mptun with the bench's reference
    relay) or sslibev; `args`: options for both relay ends."""

    id: str
    label: str
    kind: str
    args: tuple[str, ...] = ()
    mptcp: bool = True
    idle: bool = False  # measure RSS per idle connection for this case
    connrate: bool = True  # measure connections per second for this case
    skip: str | None = None  # why it cannot run here
    # "iperf3": iperf3 from the lan host, caught by an nft redirect into `mptun client --redir`
    # (the router's gateway mode); "bench": the bench's own generator (through SOCKS5)
    generator: str = "bench"


@dataclass
class Running:
    """A started case: where the generator runs and connects (SOCKS5 address, or None:
    directly), with which extra generator options, and the relay PIDs."""

    case: Case
    socks: tuple[str, int] | None = None
    origin: str = "lan"  # the role the generator's client side runs in
    target: tuple[str, int] | None = None  # its own far end (None: the bench's inet server)
    generator_args: tuple[str, ...] = ()
    pids: dict[str, int] = field(default_factory=dict)  # "client"/"server" -> PID
    redirect_port: int | None = None  # the iperf3 server's port that the router redirects
    redir: int | None = None  # the client's listener port
    procs: list[subprocess.Popen] = field(default_factory=list)


def all_cases() -> list[Case]:
    """Every case, in the order of the issue; unavailable ones carry the reason."""
    ss = shutil.which("ss-server") and shutil.which("ss-local")
    ss_skip = (
        None if ss else "shadowsocks-libev is not installed (apt-get install shadowsocks-libev)"
    )
    mptcpize_skip = ss_skip or (
        None if shutil.which("mptcpize") else "mptcpize is not installed (apt-get install mptcpize)"
    )
    ktls_skip = ktls.probe(mptcp=False)
    mptcp_ok, no_mptcp = have_mptcp()
    plain = ("--bulk", "plain")
    return [
        Case("route", "kernel route/NAT", "route"),
        Case(
            "mptcp-kernel",
            "kernel MPTCP router->VPS, no relay",
            "direct",
            connrate=False,
            skip=None if mptcp_ok else f"no MPTCP here: {no_mptcp}",
        ),
        Case(
            "splice-mptcp", "mptun splice MPTCP", "mptun", (*plain, "--relay", "splice"), idle=True
        ),
        Case("splice-tcp", "mptun splice TCP", "mptun", (*plain, "--relay", "splice"), mptcp=False),
        Case("copy-mptcp", "mptun copy MPTCP", "mptun", (*plain, "--relay", "copy"), idle=True),
        Case(
            "splice-mptcp-nobatch",
            "mptun splice MPTCP, no coalescing",
            "mptun",
            (*plain, "--relay", "splice", "--coalesce-ms", "0"),
        ),
        Case("aead-mptcp", "mptun aead MPTCP", "mptun", ("--bulk", "aead"), idle=True),
        Case(
            "ktls-tcp",
            "mptun ktls TCP",
            "mptun",
            ("--bulk", "ktls"),
            mptcp=False,
            skip=f"no kTLS here: {ktls_skip}" if ktls_skip else None,
        ),
        Case("ss-mptcp", "ss-libev mptcpize", "sslibev", idle=True, skip=mptcpize_skip),
        Case("ss-tcp", "ss-libev TCP", "sslibev", mptcp=False, skip=ss_skip),
        *gateway_cases(mptcp_ok, no_mptcp),
    ]


def gateway_cases(mptcp_ok: bool, no_mptcp: str) -> list[Case]:
    """iperf3 through the router's gateway mode (nft redirect -> `--redir`), the workload of a
    LAN user; the reference relay (mptun/bench/reference.py) and the kernel's own MPTCP with no
    relay (iperf3 under mptcpize, router -> VPS) as yardsticks."""
    iperf = shutil.which("iperf3")
    skip = None if iperf else "iperf3 is not installed (apt-get install iperf3)"
    nft_skip = skip or (None if shutil.which("nft") else "nft is not installed (nftables)")
    mp_skip = None if mptcp_ok else f"no MPTCP here: {no_mptcp}"
    plain = ("--bulk", "plain")
    gw = {"generator": "iperf3", "connrate": False}
    return [
        Case(
            "gw-splice",
            "iperf3 via --redir, splice MPTCP",
            "mptun",
            (*plain, "--relay", "splice"),
            skip=nft_skip,
            **gw,
        ),
        Case(
            "gw-aead",
            "iperf3 via --redir, aead MPTCP",
            "mptun",
            ("--bulk", "aead"),
            skip=nft_skip,
            **gw,
        ),
        Case(
            "gw-reference",
            "iperf3 via --redir, reference relay",
            "reference",
            plain,
            skip=nft_skip,
            **gw,
        ),
        Case(
            "gw-mptcp-kernel",
            "iperf3 mptcpize router->VPS, no relay",
            "direct",
            skip=skip
            or mp_skip
            or (
                None
                if shutil.which("mptcpize")
                else "mptcpize is not installed (apt-get install mptcpize)"
            ),
            **gw,
        ),
    ]


class Starter:
    """Starts cases in an environment; owns the key and password files."""

    def __init__(self, env: Environment, workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.key = workdir / "key"
        self.key.write_text(generate_key() + "\n")
        self.key.chmod(0o600)
        self.password = generate_key()

    def start(self, case: Case) -> Running:
        if case.kind == "route":
            return Running(case)
        if case.kind == "direct":
            return self._direct_iperf3(case) if case.generator == "iperf3" else self._direct(case)
        if case.kind in ("mptun", "reference"):
            r = self._mptun(case)
            if case.generator == "iperf3":
                self._gateway(r)
            return r
        return self._sslibev(case)

    def stop(self, running: Running) -> None:
        for p in running.procs:
            self.env.stop(p)

    def _log(self, name: str):
        return open(self.workdir / f"{name}.log", "ab")

    def _spawn(self, running: Running, end: str, role: str, cmd: list[str], port: int, host: str):
        with self._log(f"{running.case.id}-{end}") as log:
            p = self.env.popen(role, cmd, stdout=log, stderr=subprocess.STDOUT)
        running.procs.append(p)
        running.pids[end] = p.pid  # `ip netns exec` and `mptcpize run` exec: the same PID
        self.env.wait_listening(role, host, port, p)

    def _direct(self, case: Case) -> Running:
        """A generator server listening with MPTCP in the VPS; the client side runs in the
        router, whose per-uplink endpoints (`mptun uplinks`) add a subflow per uplink."""
        r = Running(case, origin="router", generator_args=("--mptcp",))
        port = self.env.port("vps")
        host = self.env.server_host
        cmd = [sys.executable, "-m", "mptun.bench.traffic", "serve", "--mptcp"]
        self._spawn(r, "far", "vps", [*cmd, "--host", host, "--port", str(port)], port, host)
        r.pids.clear()  # the generator is not a relay: no per-end CPU columns
        r.target = (host, port)
        return r

    def _iperf3_server(self, r: Running, role: str, host: str, wrap: tuple[str, ...] = ()) -> int:
        """An iperf3 server of this case alone in `role` (one test at a time, as the runs are)."""
        port = self.env.port(role)
        cmd = [*wrap, "iperf3", "-s", "-B", host, "-p", str(port)]
        self._spawn(r, "iperf3", role, cmd, port, host)
        r.pids.pop("iperf3")  # not a relay: no CPU column
        return port

    def _gateway(self, r: Running) -> None:
        """iperf3 in the inet host; the router redirects what the lan host sends to its port
        into the client's `--redir` listener, as `mptun nft` does for a LAN."""
        try:
            port = self._iperf3_server(r, "inet", self.env.target_host)
            assert r.redir is not None
            self.env.redirect(port, r.redir)
        except BaseException:
            self.stop(r)
            raise
        r.target, r.redirect_port, r.socks = (self.env.target_host, port), port, None

    def _direct_iperf3(self, case: Case) -> Running:
        """iperf3 under mptcpize at both ends, router -> VPS over the uplinks: no relay."""
        r = Running(case, origin="router", generator_args=("mptcpize", "run"))
        host = self.env.server_host
        try:
            port = self._iperf3_server(r, "vps", host, ("mptcpize", "run"))
        except BaseException:
            self.stop(r)
            raise
        r.target = (host, port)
        return r

    def _mptun(self, case: Case) -> Running:
        env = self.env
        r = Running(case)
        transport = ("--transport", "mptcp" if case.mptcp else "tcp")
        module = "mptun.bench.reference" if case.kind == "reference" else "mptun"
        mptun = [
            sys.executable,
            "-m",
            module,
            "--log-level",
            os.environ.get("MPTUN_BENCH_RELAY_LOG", "warning"),
        ]
        sport = env.port("vps")
        allow = "127.0.0.0/8" if env.target_host.startswith("127.") else f"{env.target_host}/32"
        server = [
            *mptun,
            "server",
            "--listen",
            f"{env.server_host}:{sport}",
            "--key-file",
            str(self.key),
            "--allow-target",
            allow,
            *transport,
            *case.args,
        ]
        try:
            self._spawn(r, "server", "vps", server, sport, env.server_host)
            cport = env.port("router")
            client = [
                *mptun,
                "client",
                "--server",
                f"{env.server_host}:{sport}",
                "--key-file",
                str(self.key),
                "--redir" if case.generator == "iperf3" else "--socks",
                f"{env.socks_host}:{cport}",
                # one LAN host opens every connection (the idle-RSS step holds 1000 at once)
                "--socks-per-client",
                "100000",
                "--max-connections",
                "100000",
                *transport,
                *case.args,
            ]
            self._spawn(r, "client", "router", client, cport, env.socks_host)
        except BaseException:
            self.stop(r)
            raise
        r.socks = (env.socks_host, cport)
        r.redir = cport
        return r

    def _sslibev(self, case: Case) -> Running:
        env = self.env
        r = Running(case)
        wrap = ["mptcpize", "run"] if case.mptcp else []
        common = ["-k", self.password, "-m", SS_METHOD, "-n", "20000", "--no-delay"]
        sport = env.port("vps")
        try:
            server = [*wrap, "ss-server", "-s", env.server_host, "-p", str(sport), *common]
            self._spawn(r, "server", "vps", server, sport, env.server_host)
            cport = env.port("router")
            local = [
                *wrap,
                "ss-local",
                "-s",
                env.server_host,
                "-p",
                str(sport),
                "-b",
                env.socks_host,
                "-l",
                str(cport),
                *common,
            ]
            self._spawn(r, "client", "router", local, cport, env.socks_host)
        except BenchError:
            self.stop(r)
            raise
        r.socks = (env.socks_host, cport)
        return r
