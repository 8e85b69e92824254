"""Where the benchmark runs: the namespace test bed, or loopback where namespaces are not possible.

Both give the same four roles (lan host, router, vps, inet host) as command prefixes and
addresses, so a case is written once. On loopback every role is this host and 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

from mptun.lab.netns import NetnsError, have_mptcp, have_netns, run
from mptun.lab.testbed import INET_HOST_V4, LAN_ROUTER_V4, SERVER_V4, Testbed
from mptun.lab.wait import ReservedPort, wait_listening, wait_owned

SHAPED_MBIT = (100, 60, 40)
_NAT_RULES = """
table ip mptun_bench_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan*" masquerade
    }
}
"""
# the gateway cases' redirects (`mptun nft` makes the like for a LAN: docs/CLI.md)
_REDIRECT_TABLE = """
table ip mptun_bench_redir {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
    }
}
"""


# TcpExt counters of receive-side drops, kept with the MPTcpExt ones (include/uapi/linux/snmp.h)
_TCP_DROPS = frozenset(
    (
        "TcpExtTCPRcvQDrop",
        "TcpExtPruneCalled",
        "TcpExtRcvPruned",
        "TcpExtTCPZeroWindowDrop",
        "TcpExtTCPBacklogDrop",
        "TcpExtTCPWantZeroWindowAdv",
        "TcpExtTCPToZeroWindowAdv",
    )
)


class BenchError(RuntimeError):
    """The benchmark could not set up or run a case; the message says which and why."""


class Environment:
    """Roles -> command prefixes and addresses; processes started here are stopped by PID."""

    name = "base"
    target_host = "127.0.0.1"
    socks_host = "127.0.0.1"
    server_host = "127.0.0.1"
    shaped_rates: tuple[float, ...] | None = None

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self._next_port = 20000
        self._reserved: dict[int, ReservedPort] = {}

    def prefix(self, role: str) -> list[str]:
        return []

    def port(self, role: str) -> int:
        """A port for a listener in `role`: held for it (`ReservedPort`) until `wait_listening`
        has seen the listener's own process listen on it, so nothing else can take it meanwhile."""
        held = ReservedPort()
        self._reserved[held.port] = held
        return held.port

    def popen(self, role: str, cmd: Sequence[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen([*self.prefix(role), *cmd], **kw)
        self.procs.append(p)
        return p

    def run(self, role: str, cmd: Sequence[str], timeout: float) -> str:
        """Run to completion in `role`; its stdout (a BenchError if it fails)."""
        p = self.popen(role, cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            raise BenchError(f"{' '.join(cmd[:4])}...: no result after {timeout:.0f} s") from None
        finally:
            self.forget(p)
        if p.returncode != 0:
            raise BenchError(f"{' '.join(cmd[:4])}...: {(out.strip() or err.strip())[-300:]}")
        return out

    def stop(self, p: subprocess.Popen, timeout: float = 5.0) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.forget(p)

    def forget(self, p: subprocess.Popen) -> None:
        if p in self.procs:
            self.procs.remove(p)

    def wait_listening(self, role: str, host: str, port: int, proc: subprocess.Popen) -> None:
        """Until `port` listens in `role`: by `proc` itself where the port was reserved (on
        loopback), by anything (`ss`) in a namespace of the test bed's own."""
        held = self._reserved.pop(port, None)
        try:
            if held is not None:
                wait_owned(proc, port, 15)
            else:
                wait_listening(host, port, 15, proc, prefix=self.prefix(role))
        except RuntimeError:
            name = proc.args[len(self.prefix(role))]
            raise BenchError(f"{name} exited with {proc.returncode}") from None
        except TimeoutError:
            raise BenchError(f"nothing listens on {host}:{port} in {role} after 15 s") from None
        finally:
            if held is not None:
                held.release()  # the listener holds the port now (or it failed)

    def set_shaped(self, shaped: bool) -> None:
        if shaped:
            raise BenchError(f"{self.name}: no shaped links here")

    gateway = False  # can redirect the lan host's connections into a `--redir` listener

    def redirect(self, port: int, to_port: int) -> None:
        """Redirect the lan host's TCP connections to `port` into the router's `to_port`."""
        raise BenchError(f"{self.name}: no router to redirect in (the gateway cases need netns)")

    def close(self) -> None:
        for p in list(self.procs):
            self.stop(p)
        for held in self._reserved.values():
            held.release()
        self._reserved.clear()

    def describe(self) -> str:
        return self.name


class LoopbackEnv(Environment):
    """Everything on 127.0.0.1: the route case is a direct loopback connection."""

    name = "loopback"


class NetnsEnv(Environment):
    """The test bed of mptun/lab/testbed.py, with per-uplink routing and NAT on the router."""

    name = "netns"
    target_host = str(INET_HOST_V4)
    socks_host = str(LAN_ROUTER_V4)
    server_host = str(SERVER_V4)
    shaped_rates = SHAPED_MBIT

    gateway = True

    def __init__(self, uplinks: int = 3) -> None:
        super().__init__()
        self.bed = Testbed(rates_mbit=(None,) * uplinks, ipv6=False)
        self.nat = False
        self._redirect_table = False
        try:
            self.bed.build()
            self._uplink_routing()
            self.nat = self._nat()
            assert self.bed.lan is not None
            # the connection-rate run opens tens of thousands of connections from the lan host
            self.bed.lan.sysctl("net.ipv4.tcp_tw_reuse", 1)
            self.bed.lan.sysctl("net.ipv4.ip_local_port_range", "10000 65000")
        except BaseException:
            self.bed.destroy()
            raise

    def _uplink_routing(self) -> None:
        """`mptun uplinks wan1 wan2 wan3` in the router: a table, rules and an MPTCP endpoint
        per uplink (docs/MULTIPATH.md: without them every extra subflow leaves by the default
        route)."""
        r = self.bed.router
        assert r is not None
        names = [up.router_if for up in self.bed.uplinks]
        out = r.exec(sys.executable, "-m", "mptun", "uplinks", *names, check=False)
        if out.returncode != 0:
            raise BenchError(f"mptun uplinks failed: {(out.stderr or out.stdout).strip()[-300:]}")

    def _nat(self) -> bool:
        assert self.bed.router is not None
        try:
            self.bed.router.exec("nft", "-f", "-", input=_NAT_RULES)
        except (NetnsError, FileNotFoundError):
            return False  # no nftables: the route case is routing only
        return True

    def prefix(self, role: str) -> list[str]:
        ns = getattr(self.bed, role)
        assert ns is not None
        return ns.prefix()

    def port(self, role: str) -> int:
        self._next_port += 1  # the namespaces are ours alone: no other listener can collide
        return self._next_port

    def redirect(self, port: int, to_port: int) -> None:
        r = self.bed.router
        assert r is not None
        if not self._redirect_table:
            r.exec("nft", "-f", "-", input=_REDIRECT_TABLE)
            self._redirect_table = True
        r.exec(
            "nft",
            "add",
            "rule",
            "ip",
            "mptun_bench_redir",
            "prerouting",
            "iifname",
            "lan0",
            "tcp",
            "dport",
            str(port),
            "redirect",
            "to",
            f":{to_port}",
        )

    def set_shaped(self, shaped: bool) -> None:
        if shaped and len(self.bed.uplinks) != len(SHAPED_MBIT):
            raise BenchError(f"shaped links need {len(SHAPED_MBIT)} uplinks")
        for up, rate in zip(self.bed.uplinks, SHAPED_MBIT, strict=shaped):
            if shaped:
                self.bed.shape(up, rate)
            else:
                for ns, dev in ((self.bed.router, up.router_if), (self.bed.vps, up.vps_if)):
                    assert ns is not None
                    ns.exec("tc", "qdisc", "del", "dev", dev, "root", check=False)
                up.rate_mbit = None

    def mptcp_counters(self, role: str = "router") -> dict[str, int]:
        """MPTcpExt MIB counters of a role (nstat): subflows joined, MPTCP-level
        retransmissions."""
        r = run([*self.prefix(role), "nstat", "-az", "-j"], check=False)
        try:
            data = json.loads(r.stdout)
        except ValueError:
            return {}
        out: dict[str, int] = {}
        for table in data.values():
            for k, v in table.items():
                if k.startswith("MPTcpExt") or k in _TCP_DROPS:
                    out[k] = v
        return out

    def close(self) -> None:
        super().close()
        self.bed.destroy()

    def describe(self) -> str:
        return (
            f"netns {self.bed.suffix}, {len(self.bed.uplinks)} uplink(s) "
            f"(nat: {'nft masquerade' if self.nat else 'none'})"
        )


def open_environment(mode: str, uplinks: int = 3) -> Environment:
    """`auto`: namespaces when this process can build them (root, iproute2), else loopback."""
    if mode in ("auto", "netns"):
        ok, why = have_netns()
        if ok:
            ok, why = have_mptcp()
        if ok:
            return NetnsEnv(uplinks)
        if mode == "netns":
            raise BenchError(f"cannot build the test bed: {why}")
    return LoopbackEnv()
