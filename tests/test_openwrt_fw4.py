"""The OpenWrt firewall include: `mptun nft` output loaded the way fw4 and the init script do.

fw4 renders its own table and then, for each readable file in
/usr/share/nftables.d/ruleset-post/, an `include "PATH"` line after it (firewall4's
templates/ruleset.uc; the package ships that file as a link to /var/run/mptun/fw4.nft). fw4 loads
the whole text with `nft -f` at every start and reload, and the init script loads the file on its
own after `nft -c`. So the file must pass `nft -c`, load inside fw4's ruleset, and replace (not
duplicate) itself however often it is loaded. Checked in a network namespace with the real nft.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_netns

pytestmark = [pytest.mark.root, pytest.mark.netns]

NFT_ARGS = ("--port", "1081", "--server", "203.0.113.100", "--lan", "br-lan", "--dns-port", "5353")
NFT_ARGS += ("--block-quic",)

# What fw4 renders, reduced to its shape: its own table replaced in place, then the includes.
FW4_RULESET = """\
table inet fw4
flush table inet fw4

table inet fw4 {{
	chain input {{
		type filter hook input priority filter; policy accept;
		ct state established,related accept
	}}
}}

include "{include}"
"""


def _have_nft_command() -> bool:
    r = subprocess.run([sys.executable, "-m", "mptun", "nft", "--help"], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def router() -> Iterator[Netns]:
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (make test installs nftables)")
    if not _have_nft_command():
        pytest.skip("`mptun nft` (issue 4) is not on this branch yet")
    ns = Netns("fw4")
    try:
        yield ns
    finally:
        ns.delete()


def _render(tmp: Path) -> Path:
    out = tmp / "fw4.nft"
    r = subprocess.run(
        [sys.executable, "-m", "mptun", "nft", *NFT_ARGS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out.write_text(r.stdout)
    return out


def _tables(ns: Netns) -> list[str]:
    return ns.exec("nft", "list", "tables").stdout.split("\n")


def test_include_loads_inside_fw4_and_replaces_itself(router: Netns, tmp_path: Path) -> None:
    rules = _render(tmp_path)
    link = tmp_path / "90-mptun.nft"  # the package's ruleset-post link
    link.symlink_to(rules)
    ruleset = tmp_path / "fw4-ruleset.nft"
    ruleset.write_text(FW4_RULESET.format(include=link))

    # the init script's gate, then fw4 start
    router.exec("nft", "-c", "-f", str(rules))
    router.exec("nft", "-c", "-f", str(ruleset))
    router.exec("nft", "-f", str(ruleset))
    tables = _tables(router)
    assert tables.count("table inet fw4") == 1 and tables.count("table inet mptun") == 1
    first = router.exec("nft", "list", "table", "inet", "mptun").stdout
    assert "redirect to :1081" in first

    # fw4 reload, and the init script loading the file on its own: same table, not a second copy
    router.exec("nft", "-f", str(ruleset))
    router.exec("nft", "-f", str(rules))
    assert _tables(router).count("table inet mptun") == 1
    assert router.exec("nft", "list", "table", "inet", "mptun").stdout == first

    # stop: the file goes (the link dangles, fw4 skips it) and the init script deletes the table
    rules.unlink()
    router.exec("nft", "delete", "table", "inet", "mptun")
    ruleset.write_text(FW4_RULESET.format(include=link).split("include")[0])
    router.exec("nft", "-f", str(ruleset))
    assert _tables(router).count("table inet mptun") == 0
    assert _tables(router).count("table inet fw4") == 1


def test_check_gate_refuses_a_broken_file(router: Netns, tmp_path: Path) -> None:
    """A file `nft -c` rejects is never loaded: the rules already in place stay."""
    rules = _render(tmp_path)
    router.exec("nft", "-f", str(rules))
    before = router.exec("nft", "list", "table", "inet", "mptun").stdout
    broken = tmp_path / "broken.nft"
    broken.write_text(rules.read_text().replace("redirect to :1081", "redirect to :port"))
    r = router.exec("nft", "-c", "-f", str(broken), check=False)
    assert r.returncode != 0
    assert router.exec("nft", "list", "table", "inet", "mptun").stdout == before


def test_uci_section_renders_the_same_rules(router: Netns, tmp_path: Path) -> None:
    """The init script's path (`mptun nft --uci`, `config nft`) gives what the options give."""
    conf = tmp_path / "mptun.uci"
    conf.write_text(
        "config nft 'nft'\n"
        "\toption port '1081'\n"
        "\tlist server '203.0.113.100'\n"
        "\tlist lan 'br-lan'\n"
        "\toption dns_port '5353'\n"
        "\toption block_quic '1'\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "mptun", "nft", "--uci", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == _render(tmp_path).read_text()
    (tmp_path / "uci.nft").write_text(r.stdout)
    router.exec("nft", "-c", "-f", str(tmp_path / "uci.nft"))
