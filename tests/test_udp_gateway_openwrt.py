"""The OpenWrt service with UDP capture on: `config nft`'s udp_port brings the tproxy policy
routing while the service runs and leaves block_quic unapplied; without it QUIC stays refused.

The service scripts run as in tests/test_openwrt_service.py (its `router` fixture: a namespace,
a root tree with the package's files, real ip and nft).
"""

from __future__ import annotations

import pytest

from tests.test_openwrt_service import Router, router  # noqa: F401 - the fixture

pytestmark = [pytest.mark.root, pytest.mark.netns]

UDP_NFT = "\toption udp_port '1082'\n\tlist bypass_udp_port '3074'\n\toption block_quic '1'\n"


def _rules(r: Router) -> str:
    return r.ns.exec("nft", "list", "table", "inet", "mptun", check=False).stdout


def test_udp_capture_routing_and_quic_follow_the_config(router: Router) -> None:  # noqa: F811
    conf = router.configure(nft="1", client_extra="\toption tproxy_udp '[::]:1082'")
    base = conf.read_text()
    conf.write_text(base.replace("\tlist lan 'br-lan'\n", "\tlist lan 'br-lan'\n" + UDP_NFT))
    r = router.service("start_service")
    assert r.returncode == 0, r.stderr
    for fam in ("-4", "-6"):  # TCP is redirected, but UDP's tproxy needs the routing
        assert "fwmark 0x10000 lookup 100" in router.ip(fam, "rule", "show")
        assert "local default dev lo" in router.ip(fam, "route", "show", "table", "100")
    rules = _rules(router)
    assert "tproxy to :1082" in rules and "redirect to :1081" in rules
    assert "3074" in rules
    assert "lan_block_quic" not in rules, "with UDP capture QUIC is carried, not refused"
    # the client accepts the same file (tproxy_udp among its options)
    prog = str(router.root / "usr" / "bin" / "mptun")
    check = router.ns.exec(prog, "uci", str(conf), check=False)
    assert check.returncode == 0, check.stderr

    assert router.service("stop_service").returncode == 0
    for fam in ("-4", "-6"):
        assert "fwmark" not in router.ip(fam, "rule", "show")
    assert _rules(router) == ""

    # UDP capture off: block_quic applies again, and redirect mode needs no policy routing
    conf.write_text(
        base.replace("\tlist lan 'br-lan'\n", "\tlist lan 'br-lan'\n\toption block_quic '1'\n")
    )
    r = router.service("start_service")
    assert r.returncode == 0, r.stderr
    rules = _rules(router)
    assert "lan_block_quic" in rules and "tproxy" not in rules
    assert "fwmark" not in router.ip("-4", "rule", "show")
    assert router.service("stop_service").returncode == 0
