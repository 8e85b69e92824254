"""Netlink I/O for uplinks and status: read a `State`, apply `Action`s (pyroute2, lazily imported).

pyroute2 (>= 0.9) is the `router` extra. Its MPTCP class types the endpoint interface index as
`hex` and cannot add an endpoint with `dev`, so the MPTCP path-manager family (`mptcp_pm`,
include/uapi/linux/mptcp.h) is spoken here with its own message class; rules and routes go
through pyroute2's IPRoute.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

from mptun.client.uplinks import (
    MPTUN_PROTO,
    Action,
    Addr,
    Endpoint,
    Limits,
    Link,
    Route,
    Rule,
    State,
)
from mptun.common.errors import ConfigError, MptunError

IFF_UP = 0x1
IFF_POINTOPOINT = 0x10
IFF_RUNNING = 0x40
IFA_F_TEMPORARY = 0x01  # RFC 4941 privacy address: changes, and is for outgoing clients
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20  # preferred lifetime over: no new connections from it
IFA_F_TENTATIVE = 0x40
SKIPPED_ADDRS = IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1

# MPTCP path manager (generic netlink), include/uapi/linux/mptcp.h
PM_CMD_ADD_ADDR = 1
PM_CMD_DEL_ADDR = 2
PM_CMD_GET_ADDR = 3
PM_CMD_SET_LIMITS = 5
PM_CMD_GET_LIMITS = 6

PYROUTE2_HINT = (
    "needs pyroute2 >= 0.9 (pip install 'mptun[router]'; OpenWrt: opkg install python3-pyroute2)"
)


def import_pyroute2(what: str = "mptun uplinks") -> Any:
    """The pyroute2 module, or a ConfigError saying how to install it."""
    try:
        import pyroute2
        from pyroute2.netlink.exceptions import NetlinkError  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} {PYROUTE2_HINT}") from None
    version = getattr(pyroute2, "__version__", "0")
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        major, minor = 0, 9  # a development build: let it try
    if (major, minor) < (0, 9):
        raise ConfigError(f"{what} {PYROUTE2_HINT}; found {version}")
    return pyroute2


def _pm_message_class() -> type:
    from pyroute2.netlink import genlmsg, nla

    class pm_msg(genlmsg):
        prefix = "MPTCP_PM_ATTR_"
        nla_map = (
            ("MPTCP_PM_ATTR_UNSPEC", "none"),
            ("MPTCP_PM_ATTR_ADDR", "pm_addr"),
            ("MPTCP_PM_ATTR_RCV_ADD_ADDRS", "uint32"),
            ("MPTCP_PM_ATTR_SUBFLOWS", "uint32"),
        )

        class pm_addr(nla):
            prefix = "MPTCP_PM_ADDR_ATTR_"
            nla_map = (
                ("MPTCP_PM_ADDR_ATTR_UNSPEC", "none"),
                ("MPTCP_PM_ADDR_ATTR_FAMILY", "uint16"),
                ("MPTCP_PM_ADDR_ATTR_ID", "uint8"),
                ("MPTCP_PM_ADDR_ATTR_ADDR4", "ip4addr"),
                ("MPTCP_PM_ADDR_ATTR_ADDR6", "ip6addr"),
                ("MPTCP_PM_ADDR_ATTR_PORT", "uint16"),
                ("MPTCP_PM_ADDR_ATTR_FLAGS", "uint32"),
                ("MPTCP_PM_ADDR_ATTR_IF_IDX", "int32"),
            )

    return pm_msg


def describe_netlink_error(e: Exception, doing: str) -> MptunError:
    code = getattr(e, "code", None)
    if code in (errno.EPERM, errno.EACCES):
        return ConfigError(f"{doing}: permission denied (needs root or CAP_NET_ADMIN)")
    if code == errno.ERANGE and "endpoint" in doing:
        return MptunError(f"{doing}: the kernel allows at most 8 MPTCP endpoints per namespace")
    reason = errno.errorcode.get(code or 0, "") if code else ""
    text = f"{e.args[1] if len(e.args) > 1 else e}"
    return MptunError(f"{doing}: {text}" + (f" ({reason})" if reason else ""))


class Netlink:
    """rtnetlink + the MPTCP path manager in the current network namespace."""

    def __init__(self) -> None:
        pr = import_pyroute2()
        from pyroute2.netlink.generic import GenericNetlinkSocket

        self._pr = pr
        self.ipr = pr.IPRoute(groups=0)
        self.pm: Any | None = None
        self._pm_msg = _pm_message_class()
        pm = GenericNetlinkSocket()
        try:
            pm.bind("mptcp_pm", self._pm_msg)
        except Exception:  # no mptcp_pm family: a kernel without MPTCP
            pm.close()
        else:
            self.pm = pm

    def close(self) -> None:
        self.ipr.close()
        if self.pm is not None:
            self.pm.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------
    def state(self) -> State:
        links = {}
        for m in self.ipr.get_links():
            flags = m["flags"]
            name = m.get("IFLA_IFNAME")
            links[name] = Link(
                m["index"],
                name,
                bool(flags & IFF_UP),
                bool(flags & IFF_RUNNING),
                bool(flags & IFF_POINTOPOINT),
            )
        addrs = []
        for m in self.ipr.get_addr():
            if m["family"] not in (socket.AF_INET, socket.AF_INET6):
                continue
            flags = m.get("IFA_FLAGS") or m["flags"]
            # the kernel allows 8 endpoints per namespace: only stable global addresses
            if m["scope"] != RT_SCOPE_UNIVERSE or flags & SKIPPED_ADDRS:
                continue
            text = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
            if text:
                addrs.append(Addr(m["index"], ipaddress.ip_address(text)))
        rules = []
        for m in self.ipr.get_rules():
            if m["family"] not in (socket.AF_INET, socket.AF_INET6) or m["action"] != 1:
                continue
            src = m.get("FRA_SRC")
            sup = m.get("FRA_SUPPRESS_PREFIXLEN")
            rules.append(
                Rule(
                    m["family"],
                    m.get("FRA_PRIORITY") or 0,
                    ipaddress.ip_address(src) if src else None,
                    m.get("FRA_TABLE") or m["table"],
                    None if sup in (None, 0xFFFFFFFF) else sup,
                    m.get("FRA_PROTOCOL") or 0,
                )
            )
        routes, used = [], set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in self.ipr.get_routes(family=family):
                table = m.get("RTA_TABLE") or m["table"]
                used.add(table)
                if m["dst_len"] != 0 or m["type"] != RTN_UNICAST:
                    continue
                gw = m.get("RTA_GATEWAY")
                routes.append(
                    Route(
                        family,
                        table,
                        ipaddress.ip_address(gw) if gw else None,
                        m.get("RTA_OIF"),
                        m["proto"],
                        m.get("RTA_PRIORITY") or 0,
                    )
                )
        endpoints, limits = self._pm_state()
        return State(links, addrs, rules, routes, used, endpoints, limits)

    def _pm_state(self) -> tuple[list[Endpoint], Limits | None]:
        if self.pm is None:
            return [], None
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST

        eps = []
        for m in self._pm(PM_CMD_GET_ADDR, [], NLM_F_REQUEST | NLM_F_DUMP):
            a = m.get_attr("MPTCP_PM_ATTR_ADDR")
            if a is None:
                continue
            ip = a.get_attr("MPTCP_PM_ADDR_ATTR_ADDR4") or a.get_attr("MPTCP_PM_ADDR_ATTR_ADDR6")
            eps.append(
                Endpoint(
                    a.get_attr("MPTCP_PM_ADDR_ATTR_ID"),
                    ipaddress.ip_address(ip),
                    a.get_attr("MPTCP_PM_ADDR_ATTR_FLAGS") or 0,
                    a.get_attr("MPTCP_PM_ADDR_ATTR_IF_IDX") or None,
                    a.get_attr("MPTCP_PM_ADDR_ATTR_PORT") or 0,
                )
            )
        (m,) = self._pm(PM_CMD_GET_LIMITS, [], NLM_F_REQUEST)
        limits = Limits(
            m.get_attr("MPTCP_PM_ATTR_SUBFLOWS") or 0,
            m.get_attr("MPTCP_PM_ATTR_RCV_ADD_ADDRS") or 0,
        )
        return eps, limits

    def _pm(self, cmd: int, attrs: list, flags: int) -> list:
        assert self.pm is not None
        msg = self._pm_msg()
        msg["cmd"] = cmd
        msg["version"] = 1
        msg["attrs"] = attrs
        return list(self.pm.nlm_request(msg, msg_type=self.pm.prid, msg_flags=flags))

    # -- changing ------------------------------------------------------------------------------
    def apply(self, action: Action, names: dict[int, str] | None = None) -> None:
        """Carry out one action; MptunError (one line) when the kernel refuses."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self._apply(action)
        except NetlinkError as e:
            if action.verb == "del" and e.code in (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL):
                return  # already gone (the kernel deleted a route with its link)
            raise describe_netlink_error(e, action.describe(names)) from None

    def _apply(self, action: Action) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

        o = action.obj
        if isinstance(o, Limits):
            self._pm(
                PM_CMD_SET_LIMITS,
                [
                    ("MPTCP_PM_ATTR_RCV_ADD_ADDRS", o.add_addr_accepted),
                    ("MPTCP_PM_ATTR_SUBFLOWS", o.subflows),
                ],
                NLM_F_REQUEST | NLM_F_ACK,
            )
        elif isinstance(o, Endpoint):
            v6 = o.ip.version == 6
            addr = [
                ("MPTCP_PM_ADDR_ATTR_FAMILY", socket.AF_INET6 if v6 else socket.AF_INET),
                ("MPTCP_PM_ADDR_ATTR_ID", o.id),
                ("MPTCP_PM_ADDR_ATTR_ADDR6" if v6 else "MPTCP_PM_ADDR_ATTR_ADDR4", str(o.ip)),
            ]
            if action.verb == "add":
                addr.append(("MPTCP_PM_ADDR_ATTR_FLAGS", o.flags))
                if o.ifindex:
                    addr.append(("MPTCP_PM_ADDR_ATTR_IF_IDX", o.ifindex))
            cmd = PM_CMD_ADD_ADDR if action.verb == "add" else PM_CMD_DEL_ADDR
            # 0x8000: NLA_F_NESTED, required by the kernel's policy for the nested address
            self._pm(
                cmd, [("MPTCP_PM_ATTR_ADDR", {"attrs": addr}, 0x8000)], NLM_F_REQUEST | NLM_F_ACK
            )
        elif isinstance(o, Rule):
            kw: dict[str, Any] = {
                "family": o.family,
                "priority": o.priority,
                "table": o.table,
                "protocol": MPTUN_PROTO,
            }
            if o.src is not None:
                kw.update(src=str(o.src), src_len=o.src.max_prefixlen)
            if o.suppress_prefixlen is not None:
                kw["suppress_prefixlen"] = o.suppress_prefixlen
            self.ipr.rule(action.verb, **kw)
        elif isinstance(o, Route):
            kw = {
                "family": o.family,
                "dst": "0.0.0.0/0" if o.family == socket.AF_INET else "::/0",
                "table": o.table,
                "proto": MPTUN_PROTO,
                "oif": o.oif,
            }
            if o.gateway is not None:
                kw["gateway"] = str(o.gateway)
            else:
                kw["scope"] = 253  # RT_SCOPE_LINK: a device route
            self.ipr.route(action.verb, **kw)

    def route_get(self, dst: str, src: str) -> int | None:
        """The interface index the kernel would send `src` -> `dst` through (None: no route)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            (m,) = self.ipr.route("get", dst=dst, src=src)
        except NetlinkError:
            return None
        return m.get("RTA_OIF")


BLACKHOLE_SYSCTL = "/proc/sys/net/mptcp/blackhole_timeout"


def disable_blackhole_detection(path: str = BLACKHOLE_SYSCTL) -> str | None:
    """Set net.mptcp.blackhole_timeout to 0 where the kernel has it (6.12+); what was done.

    Documentation/networking/mptcp-sysctl.rst: after a suspected firewall blackhole the kernel
    turns MPTCP off for new outgoing connections of the namespace for blackhole_timeout
    seconds (3600 by default, growing when it trips again; 0 disables the detection). On a
    multi-uplink router it trips exactly when a blackholed uplink recovers, and would leave every
    new tunnel without MPTCP for an hour; mptun's uplink health handles dead uplinks instead.
    None when there is nothing to do (no such sysctl, or already 0).
    """
    try:
        with open(path) as f:
            if f.read().strip() == "0":
                return None
        with open(path, "w") as f:
            f.write("0\n")
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot set net.mptcp.blackhole_timeout to 0: {e.strerror}"
    return "set net.mptcp.blackhole_timeout 0 (no hour without MPTCP after a blackholed uplink)"
