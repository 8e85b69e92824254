"""The OpenWrt package's Makefile: built from this checkout, and DEPENDS matching what runs.

The python3-* split packages of openwrt/packages (lang/python/python3/files/python3-package-*.mk)
each take stdlib modules out of python3-light; OPENWRT_SPLIT is their module list as
lang/python/python3-find-stdlib-depends.sh states it (the build's own check). The test derives the
stdlib modules mptun's router code imports from the source and asks that DEPENDS name exactly the
split packages holding them, so an import added later cannot go unnoticed.
"""

from __future__ import annotations

import ast
import re
import stat
import subprocess
import sys
from pathlib import Path

import mptun
from tests.helpers import ROOT, need

MAKEFILE = ROOT / "openwrt" / "net" / "mptun" / "Makefile"

# stdlib module -> the OpenWrt package holding it, when not python3-light.
OPENWRT_SPLIT = {
    "asyncio": "python3-asyncio",
    "unicodedata": "python3-codecs",
    "ctypes": "python3-ctypes",
    "dbm": "python3-dbm",
    "decimal": "python3-decimal",
    "logging": "python3-logging",
    "lzma": "python3-lzma",
    "multiprocessing": "python3-multiprocessing",
    "curses": "python3-ncurses",
    "ssl": "python3-openssl",
    "doctest": "python3-pydoc",
    "pydoc": "python3-pydoc",
    "readline": "python3-readline",
    "sqlite3": "python3-sqlite3",
    "unittest": "python3-unittest",
    "urllib": "python3-urllib",
    "email": "python3-urllib",
    "uuid": "python3-uuid",
    "xml": "python3-xml",
    "xmlrpc": "python3-xml",
}
# Third-party imports -> their OpenWrt package; None: optional, imported only when present or
# only by a command the service does not run (`mptun uplinks` needs python3-pyroute2).
THIRD_PARTY = {
    "cryptography": "python3-cryptography",
    "click": "python3-click",
    "pyroute2": None,
    "uvloop": None,
}
# What the router runs: the client, the shared code and the command line; not the server, the
# lab (test bed), the bench or the demo.
ROUTER_CODE = ("client", "common", "mptun")
NOT_ON_ROUTER = ("mptun/lab", "mptun/bench", "mptun/demo.py", "mptun/commands/server.py")


def router_imports() -> set[str]:
    """Top-level names of every absolute import in the router's code (lazy ones included)."""
    names: set[str] = set()
    for top in ROUTER_CODE:
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if any(rel == n or rel.startswith(n + "/") for n in NOT_ON_ROUTER):
                continue
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def makefile_var(text: str, name: str) -> str:
    m = re.search(rf"^{name}:=((?:.*\\\n)*.*)$", text, re.M)
    assert m, name
    return m.group(1).replace("\\\n", " ")


def makefile_version(text: str) -> str:
    """PKG_VERSION as make computes it, with MPTUN_SRC this checkout."""
    need("make")
    line = next(ln for ln in text.splitlines() if ln.startswith("PKG_VERSION:="))
    r = subprocess.run(
        ["make", "-s", "-f", "-", f"MPTUN_SRC={ROOT}"],
        input=f"{line}\nall:\n\t@echo '[$(PKG_VERSION)]'\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().removeprefix("[").removesuffix("]")


def depends() -> set[str]:
    block = re.search(r"define Package/mptun\n(.*?)endef", MAKEFILE.read_text(), re.S)
    assert block
    deps = makefile_var(block.group(1).replace("  DEPENDS", "DEPENDS"), "DEPENDS")
    return {d.lstrip("+") for d in deps.split()}


def test_depends_match_the_imports() -> None:
    imports = router_imports()
    stdlib = {n for n in imports if n in sys.stdlib_module_names}
    others = imports - stdlib - {"mptun", "__future__"}
    assert others <= set(THIRD_PARTY), f"imports with no OpenWrt package known: {others}"
    want = {"python3-light"} | {OPENWRT_SPLIT[n] for n in stdlib if n in OPENWRT_SPLIT}
    want |= {THIRD_PARTY[n] for n in others if THIRD_PARTY[n]}
    have = {d for d in depends() if d.startswith("python3")}
    assert have == want, f"DEPENDS has {sorted(have)}, the imports need {sorted(want)}"
    # the full python3 (every split package) is exactly what this avoids
    assert "python3" not in depends()


def test_depends_for_tproxy_and_mptcp() -> None:
    deps = depends()
    assert {"kmod-nft-tproxy", "kmod-nft-socket", "ip-full"} <= deps
    # in every image with firewall4 already: naming them would add nothing
    assert not deps & {"firewall4", "nftables", "kmod-nft-nat", "python3-pyroute2"}


def test_builds_from_this_checkout() -> None:
    text = MAKEFILE.read_text()
    assert "PKG_HASH:=skip" not in text and "PYPI_NAME" not in text and "pypi.mk" not in text
    # nothing downloaded: Build/Prepare copies the checkout
    assert not re.search(r"^PKG_SOURCE", text, re.M)
    # the version has one home: PKG_VERSION reads it from mptun/__init__.py
    assert mptun.__version__ not in text
    assert makefile_version(text) == mptun.__version__
    # MPTUN_SRC, three folders up from openwrt/net/mptun, is this checkout
    assert (MAKEFILE.parent / "../../..").resolve() == ROOT.resolve()
    copied = re.search(r"define Build/Prepare\n(.*?)endef", text, re.S)
    assert copied
    for name in ("pyproject.toml", "LICENSE", "README.md", "client", "common", "mptun"):
        assert f"$(MPTUN_SRC)/{name}" in copied.group(1)
        assert (ROOT / name).exists(), name


def test_installs_every_service_file() -> None:
    text = MAKEFILE.read_text()
    files = MAKEFILE.parent / "files"
    for f in files.iterdir():
        assert f"./files/{f.name}" in text, f"{f.name} is not installed"


def test_uci_defaults_prepares_the_first_install(tmp_path: Path) -> None:
    """The first-install script makes the key folder root-only and names protocol 247, twice
    over without complaint (uci-defaults scripts run again after a sysupgrade)."""
    script = MAKEFILE.parent / "files" / "mptun.uci-defaults"
    for _ in range(2):
        r = subprocess.run(
            ["/bin/sh", str(script)],
            env={"MPTUN_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr  # exit 0: /etc/init.d/boot then deletes it
    assert stat.S_IMODE((tmp_path / "etc" / "mptun").stat().st_mode) == 0o700
    protos = tmp_path / "etc" / "iproute2" / "rt_protos.d" / "mptun.conf"
    assert protos.read_text().split() == ["247", "mptun"]
