r"""The multipath test bed: four network namespaces and three shaped uplinks.

Modelled on the kernel's MPTCP selftests (tools/testing/selftests/net/mptcp/): random namespace
suffixes so runs never collide, documentation address ranges only, cleanup even on failure or
Ctrl-C. Used by the tests, `mptun demo` and `mptun bench`.

    lan host                router                       vps                   inet host
  +-----------+         +-----------+   wan1 ==== cli1  +-------------+        +-----------+
  | eth0      |---------| lan0      |   wan2 ==== cli2  | lo (server) |        | eth0      |
  | 192.0.2.2 |         | 192.0.2.1 |   wan3 ==== cli3  | inet0       |--------| 203.0.113.2
  | fd00:1::2 |         | fd00:1::1 |=================  | 203.0.113.1 |        | fd00:3::2 |
  +-----------+         +-----------+                   +-------------+        +-----------+
   default via router    default via wan1                server 203.0.113.100, fd00:ff::100
                                                         (on lo, reached over every uplink)

  uplink N: router wanN 198.51.100.(16N+1)/28, fd00:10:N::1/64
            vps    cliN 198.51.100.(16N+2)/28, fd00:10:N::2/64

Uplink N is shaped with tbf in both directions (router egress = upload, vps egress = download).
The router's main table has a default route through every uplink, as netifd makes them on a
multi-WAN router: wan1 without metric, uplink N >= 2 with metric 10*N (so wan1 carries what is
not policy-routed). The router gets no per-uplink policy routing here: that is what
`mptun uplinks` configures.

With `middlebox=True` every uplink crosses a fifth namespace, `mbox`, that bridges the two veth
halves (router wanN -- mbox rN [bridge bN] vN -- vps cliN; addresses unchanged), so nftables
there (`strip_mptcp()`) acts on the path like a middlebox.
Congestion control is reno in every namespace (bbr with MPTCP on veth was erratic here) and
rp_filter is off (subflows arrive from other source addresses).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field

from mptun.lab.netns import Netns, run

SERVER_V4 = ipaddress.IPv4Address("203.0.113.100")
SERVER_V6 = ipaddress.IPv6Address("fd00:ff::100")
LAN_ROUTER_V4 = ipaddress.IPv4Address("192.0.2.1")
LAN_HOST_V4 = ipaddress.IPv4Address("192.0.2.2")
LAN_ROUTER_V6 = ipaddress.IPv6Address("fd00:1::1")
LAN_HOST_V6 = ipaddress.IPv6Address("fd00:1::2")
VPS_INET_V4 = ipaddress.IPv4Address("203.0.113.1")
INET_HOST_V4 = ipaddress.IPv4Address("203.0.113.2")
VPS_INET_V6 = ipaddress.IPv6Address("fd00:3::1")
INET_HOST_V6 = ipaddress.IPv6Address("fd00:3::2")


@dataclass
class Uplink:
    """One router<->VPS link (a veth pair), shaped to `rate_mbit` each way (None: unshaped)."""

    index: int  # 1-based
    rate_mbit: float | None
    router_if: str = ""
    vps_if: str = ""
    router_v4: ipaddress.IPv4Address = field(init=False)
    vps_v4: ipaddress.IPv4Address = field(init=False)
    router_v6: ipaddress.IPv6Address = field(init=False)
    vps_v6: ipaddress.IPv6Address = field(init=False)

    def __post_init__(self) -> None:
        base = 16 * self.index
        self.router_if = self.router_if or f"wan{self.index}"
        self.vps_if = self.vps_if or f"cli{self.index}"
        self.router_v4 = ipaddress.IPv4Address(f"198.51.100.{base + 1}")
        self.vps_v4 = ipaddress.IPv4Address(f"198.51.100.{base + 2}")
        self.router_v6 = ipaddress.IPv6Address(f"fd00:10:{self.index}::1")
        self.vps_v6 = ipaddress.IPv6Address(f"fd00:10:{self.index}::2")


class Testbed:
    """Builds the topology on `__enter__`/`build()`, deletes it on `__exit__`/`destroy()`."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        rates_mbit: tuple[float | None, ...] = (100, 60, 40),
        ipv6: bool = True,
        mtu: int = 1500,
        tbf_latency_ms: int = 50,
        middlebox: bool = False,
    ) -> None:
        self.suffix = secrets.token_hex(3)
        self.uplinks = [Uplink(i + 1, r) for i, r in enumerate(rates_mbit)]
        self.ipv6 = ipv6
        self.mtu = mtu
        self.tbf_latency_ms = tbf_latency_ms
        self.middlebox = middlebox
        self.mbox: Netns | None = None
        self.lan: Netns | None = None
        self.router: Netns | None = None
        self.vps: Netns | None = None
        self.inet: Netns | None = None

    @property
    def namespaces(self) -> list[Netns]:
        return [n for n in (self.lan, self.router, self.vps, self.inet, self.mbox) if n is not None]

    def __enter__(self) -> Testbed:
        try:
            self.build()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def destroy(self) -> None:
        """Stop every process started in the namespaces and delete them (idempotent)."""
        for ns in self.namespaces:
            ns.delete()
        self.lan = self.router = self.vps = self.inet = self.mbox = None

    # -- construction -----------------------------------------------------------------------------
    def build(self) -> None:
        self.lan = Netns("lan", self.suffix)
        self.router = Netns("router", self.suffix)
        self.vps = Netns("vps", self.suffix)
        self.inet = Netns("inet", self.suffix)
        if self.middlebox:
            self.mbox = Netns("mbox", self.suffix)
        for ns in self.namespaces:
            self._base_sysctls(ns)
        self._veth(self.lan, "eth0", self.router, "lan0")
        self._addr(self.lan, "eth0", LAN_HOST_V4, 24, LAN_HOST_V6)
        self._addr(self.router, "lan0", LAN_ROUTER_V4, 24, LAN_ROUTER_V6)
        for up in self.uplinks:
            self._uplink_wire(up)
            self._addr(self.router, up.router_if, up.router_v4, 28, up.router_v6)
            self._addr(self.vps, up.vps_if, up.vps_v4, 28, up.vps_v6)
            if up.rate_mbit:
                self.shape(up, up.rate_mbit)
        self._veth(self.vps, "inet0", self.inet, "eth0")
        self._addr(self.vps, "inet0", VPS_INET_V4, 28, VPS_INET_V6)
        self._addr(self.inet, "eth0", INET_HOST_V4, 28, INET_HOST_V6)
        # The server's public address sits on the VPS's loopback (this kernel has no dummy
        # driver), so every uplink reaches it.
        self.vps.ip("addr", "add", f"{SERVER_V4}/32", "dev", "lo")
        if self.ipv6:
            self.vps.ip("-6", "addr", "add", f"{SERVER_V6}/128", "dev", "lo", "nodad")
        self._routes()
        for ns in (self.router, self.vps):
            ns.exec("ip", "mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "8")

    def _uplink_wire(self, up: Uplink) -> None:
        assert self.router and self.vps
        if self.mbox is None:
            self._veth(self.router, up.router_if, self.vps, up.vps_if)
            return
        r, v, br = f"r{up.index}", f"v{up.index}", f"b{up.index}"
        self._veth(self.router, up.router_if, self.mbox, r)
        self._veth(self.mbox, v, self.vps, up.vps_if)
        self.mbox.ip("link", "add", "name", br, "type", "bridge")
        for port in (r, v):
            self.mbox.ip("link", "set", port, "master", br)
        self.mbox.ip("link", "set", br, "up")

    def _base_sysctls(self, ns: Netns) -> None:
        for key, value in [
            ("net.ipv4.ip_forward", 1),
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.default.rp_filter", 0),
            ("net.ipv4.tcp_congestion_control", "reno"),
            ("net.mptcp.enabled", 1),
            ("net.ipv6.conf.all.forwarding", 1),
            ("net.ipv6.conf.all.accept_dad", 0),
            ("net.ipv6.conf.default.accept_dad", 0),
        ]:
            ns.sysctl(key, value)
        # Kernel 6.12+ turns MPTCP off for an hour after a suspected blackhole, which trips when
        # a blackholed uplink recovers (Documentation/networking/mptcp-sysctl.rst,
        # blackhole_timeout; 0 disables it). Per namespace, so each one of the bed.
        if os.path.exists("/proc/sys/net/mptcp/blackhole_timeout"):
            ns.sysctl("net.mptcp.blackhole_timeout", 0)

    def _veth(self, a: Netns, a_if: str, b: Netns, b_if: str) -> None:
        # Created inside `a` with the peer placed straight into `b`: no names in the root
        # namespace, so parallel runs never collide. `name` is explicit: `ip link add a type
        # veth ...` fails, ip(8) parses a bare `a` as the `address` keyword.
        a.ip(
            "link",
            "add",
            "name",
            a_if,
            "mtu",
            str(self.mtu),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "mtu",
            str(self.mtu),
            "netns",
            b.name,
        )
        a.ip("link", "set", a_if, "up")
        b.ip("link", "set", b_if, "up")

    def _addr(self, ns: Netns, dev: str, v4, plen4: int, v6) -> None:
        ns.ip("addr", "add", f"{v4}/{plen4}", "dev", dev)
        if self.ipv6:
            ns.ip("-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")

    def _routes(self) -> None:
        assert self.lan and self.router and self.vps and self.inet
        up1 = self.uplinks[0]
        self.lan.ip("route", "add", "default", "via", str(LAN_ROUTER_V4))
        self.router.ip("route", "add", "default", "via", str(up1.vps_v4), "dev", up1.router_if)
        for up in self.uplinks[1:]:
            self.router.ip(
                "route", "add", "default", "via", str(up.vps_v4), "dev", up.router_if,
                "metric", str(10 * up.index),
            )  # fmt: skip
        self.vps.ip("route", "add", "192.0.2.0/24", "via", str(up1.router_v4))
        self.inet.ip("route", "add", "default", "via", str(VPS_INET_V4))
        if self.ipv6:
            self.lan.ip("-6", "route", "add", "default", "via", str(LAN_ROUTER_V6))
            self.router.ip(
                "-6", "route", "add", "default", "via", str(up1.vps_v6), "dev", up1.router_if
            )
            for up in self.uplinks[1:]:
                self.router.ip(
                    "-6", "route", "add", "default", "via", str(up.vps_v6), "dev", up.router_if,
                    "metric", str(10 * up.index),
                )  # fmt: skip
            self.vps.ip("-6", "route", "add", "fd00:1::/64", "via", str(up1.router_v6))
            self.inet.ip("-6", "route", "add", "default", "via", str(VPS_INET_V6))

    # -- operations -------------------------------------------------------------------------------
    def shape(self, up: Uplink, rate_mbit: float) -> None:
        """tbf both ways: router egress (upload) and VPS egress (download)."""
        # burst: at least 10 ms of the rate, so tbf can reach its rate at HZ granularity
        burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 * 0.01))
        for ns, dev in ((self.router, up.router_if), (self.vps, up.vps_if)):
            assert ns is not None
            ns.exec(
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                f"{rate_mbit}mbit",
                "burst",
                str(burst),
                "latency",
                f"{self.tbf_latency_ms}ms",
            )
        up.rate_mbit = rate_mbit

    def set_link(self, up: Uplink, state: str) -> None:
        """`down` or `up` on both ends (down deletes the link's routes, as on a real router)."""
        assert self.router and self.vps
        self.router.ip("link", "set", up.router_if, state)
        self.vps.ip("link", "set", up.vps_if, state)

    def uplink(self, name: str) -> Uplink:
        """The uplink whose router-side interface is `name` (e.g. "wan2")."""
        for up in self.uplinks:
            if up.router_if == name:
                return up
        raise KeyError(name)

    def strip_mptcp(self) -> None:
        """Make the middlebox remove the MPTCP option from every SYN (needs `middlebox=True`).

        Connections then fall back to plain TCP (RFC 8684 3.7). A bridge-family forward chain:
        the middlebox has no addresses. (`fwd` is an nft keyword: the chain is named `strip`.)
        """
        if self.mbox is None:
            raise RuntimeError("strip_mptcp() needs Testbed(middlebox=True)")
        ruleset = (
            "table bridge mptun_mbox {\n"
            "  chain strip {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            "    tcp flags syn reset tcp option mptcp\n"
            "  }\n"
            "}\n"
        )
        self.mbox.exec("nft", "-f", "-", input=ruleset)

    def counters(self, up: Uplink) -> tuple[int, int]:
        """(tx_bytes, rx_bytes) of the router's side of an uplink."""
        assert self.router is not None
        r = self.router.exec(
            "cat",
            f"/sys/class/net/{up.router_if}/statistics/tx_bytes",
            f"/sys/class/net/{up.router_if}/statistics/rx_bytes",
        )
        tx, rx = r.stdout.split()
        return int(tx), int(rx)


def describe() -> str:
    """The topology diagram (this module's docstring), for `mptun demo`."""
    return __doc__ or ""


def diagram() -> str:
    """Just the picture and the uplink addressing, from the docstring."""
    return "\n\n".join((__doc__ or "").split("\n\n")[2:4]).rstrip()


def netns_names_in_use() -> set[str]:
    return set(run(["ip", "netns", "list"]).stdout.split())
