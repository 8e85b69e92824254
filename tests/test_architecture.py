"""The shape of the code: which part may import which (docs/DEVELOPING.md, "Layout").

`common/` is what both ends share, `client/` and `server/` are the two sides, and `mptun/` is the
command line and the tools (demo, bench, the lab). The sides must stay usable without the command
line (a router package, an embedding program) and the lab must never ship inside them, so:

- common imports neither side, nor the command line, the lab or the tools;
- a side imports neither the other side, nor the command line, the lab or the tools;
- none of the three imports click (the command line's library).

Imports are read from the source (every `import`, also those inside functions), so a lazy import
cannot slip past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

# Modules of the command line and the tools: never imported by common/, client/ or server/.
COMMAND_LINE_AND_TOOLS = (
    "click",
    "mptun.cli",
    "mptun.commands",
    "mptun.options",
    "mptun.uci",
    "mptun.lab",
    "mptun.bench",
    "mptun.demo",
    "mptun.__main__",
)

RULES: dict[str, tuple[str, ...]] = {
    "common": ("mptun.client", "mptun.server", *COMMAND_LINE_AND_TOOLS),
    "client": ("mptun.server", *COMMAND_LINE_AND_TOOLS),
    "server": ("mptun.client", *COMMAND_LINE_AND_TOOLS),
}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, module) for every import in `source`; `module` resolves relative imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            # `from mptun import uci` imports mptun.uci: name the submodule too.
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(source: str, module: str, forbidden: tuple[str, ...]) -> list[str]:
    out: dict[int, str] = {}  # one line each: `from x import a, b` names x once
    for line, name in imported_modules(source, module):
        for bad in forbidden:
            if line not in out and (name == bad or name.startswith(bad + ".")):
                out[line] = f"{module}:{line} imports {name}"
    return [out[line] for line in sorted(out)]


def modules_of(folder: str) -> list[tuple[str, Path]]:
    root = ROOT / folder
    return [
        (".".join(("mptun", folder, *p.relative_to(root).with_suffix("").parts)), p)
        for p in sorted(root.rglob("*.py"))
    ]


@pytest.mark.parametrize("folder", sorted(RULES))
def test_import_rules(folder: str) -> None:
    modules = modules_of(folder)
    assert modules, f"no modules found under {folder}/"
    bad = []
    for module, path in modules:
        bad += violations(path.read_text(), module, RULES[folder])
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "source",
    [
        "import click",
        "from mptun.server.service import Server",
        "from mptun import options",
        "from mptun.lab.netns import Netns",
        "def f():\n    from mptun.commands import client\n",
        "from ..server import policy",
    ],
)
def test_the_rule_reader_catches_each_kind_of_import(source: str) -> None:
    """The checker itself: a forbidden import in any of its spellings is reported."""
    assert violations(source, "mptun.client.tunnel", RULES["client"])


def test_the_rule_reader_lets_allowed_imports_through() -> None:
    ok = "import socket\nfrom mptun.common.address import Address\nfrom . import socks5\n"
    assert violations(ok, "mptun.client.socks", RULES["client"]) == []


@pytest.mark.parametrize("folder", ["common", "common/relay", "client", "server", "mptun/lab"])
def test_the_layout_table_names_every_module(folder: str) -> None:
    """docs/DEVELOPING.md's layout row of each folder names every module in it."""
    rows = [
        line
        for line in (ROOT / "docs" / "DEVELOPING.md").read_text().splitlines()
        if line.startswith(f"| `mptun.{folder.replace('mptun/', '').replace('/', '.')}` |")
    ]
    assert len(rows) == 1, f"no single layout row for {folder}/"
    missing = [
        p.name
        for p in sorted((ROOT / folder).glob("*.py"))
        if p.name != "__init__.py" and f"`{p.name}`" not in rows[0]
    ]
    assert not missing, f"docs/DEVELOPING.md's row for {folder}/ does not name {missing}"
