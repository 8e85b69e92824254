"""No open doors: the real server and its real resolver, against a DNS server we control.

Runs in a private network and mount namespace (`unshare --net --mount`): `/etc/resolv.conf`
points at a tiny DNS server on that namespace's loopback whose answer for `flip.test` changes
between two lookups, and listeners on 198.51.100.1 (in a peer namespace behind a veth pair: not
the server's own address) and 127.0.0.1 (same port) count connections.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent / "tools" / "dns_flip.py"

# target name -> the server's answer; every refused one must never reach 127.0.0.1
EXPECT = [
    ("flip.test", "SUCCEEDED"),  # first lookup: 198.51.100.1, allowed by --allow-target
    ("flip.test", "NOT_ALLOWED"),  # second lookup: 127.0.0.1
    ("loop.test", "NOT_ALLOWED"),  # a name for 127.0.0.1
    ("private.test", "NOT_ALLOWED"),  # a name for 10.1.2.3
    ("cgnat.test", "NOT_ALLOWED"),  # a name for 100.64.0.1
    ("2130706433", "NOT_ALLOWED"),  # decimal 127.0.0.1, as a domain name
    ("0177.0.0.1", "NOT_ALLOWED"),  # octal
    ("0x7f.0.0.1", "NOT_ALLOWED"),  # hex
    ("127.1", "NOT_ALLOWED"),  # short form
    ("[::ffff:127.0.0.1]", "NOT_ALLOWED"),  # IPv4-mapped (ipaddress: not "loopback")
    ("[::127.0.0.1]", "NOT_ALLOWED"),  # IPv4-compatible
    ("[2002:7f00:1::]", "NOT_ALLOWED"),  # 6to4 carrying 127.0.0.1
    ("[64:ff9b::7f00:1]", "NOT_ALLOWED"),  # NAT64 carrying 127.0.0.1
    ("[::1]", "NOT_ALLOWED"),
    ("nxdomain.test", "DNS_FAILURE"),
]


@pytest.mark.root
@pytest.mark.netns
def test_policy_against_names_spellings_and_a_changing_answer(tmp_path: Path, key_file: Path):
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    cmd = [
        "unshare",
        "--net",
        "--mount",
        "--propagation",
        "private",
        sys.executable,
        str(TOOL),
        "--key-file",
        str(key_file),
        "--answers",
        "198.51.100.1",
        "127.0.0.1",
        "--name",
        "loop.test=127.0.0.1",
        "--name",
        "private.test=10.1.2.3",
        "--name",
        "cgnat.test=100.64.0.1",
        "--server-arg=--allow-target=198.51.100.0/24",
        "--log",
        str(tmp_path / "server.log"),
    ]
    for name, _ in EXPECT:
        cmd += ["--target", name]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "server.log").read_text() if (tmp_path / "server.log").exists() else ""
    assert r.returncode == 0, r.stderr[-3000:] + log[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [tuple(x) for x in out["results"]] == EXPECT, log[-3000:]
    assert out["hits"] == {"198.51.100.1": 1}  # nothing ever reached 127.0.0.1
    # The address connected to is the one checked: one A lookup per tunnel to flip.test.
    assert sum(1 for name, qtype in out["queries"] if name == "flip.test" and qtype == 1) == 2
    print(f"{len(EXPECT)} targets; DNS queries seen: {len(out['queries'])}")
