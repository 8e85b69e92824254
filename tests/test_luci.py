"""luci-app-mptun (openwrt/luci/applications/luci-app-mptun): the rpcd plugin's `list`/`call`
contract against a live client, the ACL and menu against the views and the plugin, the views
compiled as LuCI's loader compiles them (node), the settings page's options against `mptun uci`,
and the status page rendered in headless Chromium from a live client's status.

LuCI, rpcd and a packaged ucode are not installable here: the plugin runs under a `ucode` found
on PATH (skipped, with the reason, without one), the views under tests/luci_standin.js (what it
keeps of LuCI's loader is said at its top). openwrt/README.md lists what is not verified.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mptun.client import control
from tests.helpers import ROOT, ClientProcess, ServerProcess, need, run_mptun
from tests.peers import StreamTarget, socks_open

APP = ROOT / "openwrt/luci/applications/luci-app-mptun"
PLUGIN = APP / "root/usr/libexec/rpcd/luci.mptun"
VIEWS = APP / "htdocs/luci-static/resources/view"
MENU = APP / "root/usr/share/luci/menu.d/luci-app-mptun.json"
ACL = APP / "root/usr/share/rpcd/acl.d/luci-app-mptun.json"
UCI_DEFAULTS = APP / "root/etc/uci-defaults/40_luci-mptun"
STANDIN = ROOT / "tests/luci_standin.js"
NODE = shutil.which("node")
UCODE = shutil.which("ucode")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLUGIN_TIMEOUT_S = 3.0  # the plugin's TIMEOUT_MS


def need_ucode() -> str:
    if UCODE is None:
        pytest.skip("ucode is not installed (not packaged for Debian; build it from its source)")
    return UCODE


def need_node() -> str:
    if NODE is None:
        pytest.skip("node is not installed (Debian package nodejs)")
    return NODE


def plugin(*args: str, stdin: str = "{}", control_path: Path | None = None, timeout: float = 20):
    """Run the plugin as rpcd does (`luci.mptun list`, `luci.mptun call METHOD`, JSON on
    stdin); its stdout must be exactly one JSON object (rpcd plugin.c reads nothing else)."""
    env = {k: v for k, v in os.environ.items() if k != "MPTUN_CONTROL"}
    if control_path is not None:
        env["MPTUN_CONTROL"] = str(control_path)
    r = subprocess.run(
        [need_ucode(), str(PLUGIN), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert r.stderr == "", r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict), r.stdout
    return doc


@pytest.fixture
def live_client(tmp_path: Path, key_file: Path) -> Iterator[tuple[ClientProcess, Path, int]]:
    """A server and a client whose control socket is a path, one tunnel streaming through it;
    (client, control socket, the target's port)."""
    srv = ServerProcess(tmp_path, key_file, "--allow-target", "127.0.0.0/8", stats=False)
    ctl = tmp_path / "control.sock"
    cli = ClientProcess(
        tmp_path,
        key_file,
        srv.port,
        "--control",
        str(ctl),
        "--uplink",
        "lo",
        "--health-file",
        "",
        stats=False,
    )
    target = StreamTarget(chunk=16384, interval=0.01)
    sock, rep = socks_open(cli.socks_port, target.address)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                if not sock.recv(65536):
                    return
            except OSError:
                return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert rep == 0, cli.log()[-2000:]
        deadline = time.monotonic() + 10
        while True:  # the tunnel relays and the uplink has been probed
            doc = control.query(str(ctl))
            conns = doc.get("connections") or []
            if conns and conns[0].get("bytes_received") and doc.get("uplink_health"):
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        yield cli, ctl, target.port
    finally:
        stop.set()
        sock.close()
        target.close()
        cli.stop()
        srv.stop()


# -- the rpcd plugin ----------------------------------------------------------------------------


def test_plugin_lists_its_methods_as_rpcd_reads_them() -> None:
    listed = plugin("list", stdin="")
    assert listed == {"status": {}}  # method -> argument signature (no arguments)


def test_plugin_call_status_of_a_live_client(live_client) -> None:
    cli, ctl, target_port = live_client
    started = time.monotonic()
    # rpcd adds the caller's session to every call's arguments
    reply = plugin("call", "status", stdin='{"ubus_rpc_session": "abc"}', control_path=ctl)
    assert reply["running"] is True, reply
    assert reply["control"] == str(ctl)
    assert isinstance(reply["at"], float) and abs(reply["at"] - started) < 60  # CLOCK_MONOTONIC
    doc = control.check_document(reply["client"])  # the shape `mptun status` reads
    assert doc["pid"] == cli.pid
    (conn,) = doc["connections"]
    assert conn["target"] == f"127.0.0.1:{target_port}"
    assert conn["bytes_received"] > 0 and conn["subflows"], conn
    assert [u["name"] for u in doc["uplink_health"]] == ["lo"]


def test_plugin_call_refuses_bad_calls_with_one_json_object(live_client) -> None:
    _, ctl, _ = live_client
    assert "unknown method" in plugin("call", "nope", control_path=ctl)["error"]
    assert "no argument" in plugin("call", "status", stdin='{"x": 1}', control_path=ctl)["error"]
    for bad in ("not json", "[1, 2]", '"text"'):
        assert "not a JSON object" in plugin("call", "status", stdin=bad, control_path=ctl)["error"]
    assert "usage" in plugin(stdin="")["error"]
    assert plugin("call", "status", stdin="", control_path=ctl)["running"] is True


def test_plugin_says_why_when_no_client_answers(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    reply = plugin("call", "status", control_path=missing)
    assert reply["running"] is False and reply["control"] == str(missing)
    assert f"no control socket at {missing}" in reply["error"]
    assert "option control" in reply["error"]

    (tmp_path / "file").write_text("")
    assert "is not a socket" in plugin("call", "status", control_path=tmp_path / "file")["error"]

    # a socket file nobody listens on (a client killed by SIGKILL leaves one)
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    assert "cannot connect" in plugin("call", "status", control_path=stale)["error"]


@contextmanager
def fake_client(path: Path, answer: bytes | None, user: list[str] | None = None) -> Iterator[None]:
    """A process listening on `path` that sends `answer` to each connection and closes it (or,
    with None, sends nothing and keeps it open)."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)\n"
        "print('ready', flush=True)\n"
        "answer = sys.stdin.buffer.read()\n"
        "keep = []\n"
        "while True:\n"
        "    c, _ = s.accept()\n"
        "    if sys.argv[2] == 'hang':\n"
        "        keep.append(c); continue\n"
        "    c.sendall(answer); c.close()\n"
    )
    mode = "hang" if answer is None else "answer"
    proc = subprocess.Popen(
        [*(user or []), sys.executable, "-c", code, str(path), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=False,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        proc.stdin.write(answer or b"")
        proc.stdin.close()
        yield
    finally:
        proc.kill()
        proc.wait()


def test_plugin_reads_only_a_status_document(tmp_path: Path) -> None:
    ctl = tmp_path / "c.sock"
    with fake_client(ctl, b"<html>not json"):
        assert "not a JSON object" in plugin("call", "status", control_path=ctl)["error"]
    ctl.unlink()
    with fake_client(ctl, b""):
        assert "closed without an answer" in plugin("call", "status", control_path=ctl)["error"]
    ctl.unlink()
    with fake_client(ctl, b'{"pid": 7, "connections": []}\n'):
        reply = plugin("call", "status", control_path=ctl)
        assert reply["running"] is True and reply["client"]["pid"] == 7


@pytest.mark.timing
def test_plugin_gives_up_on_a_client_that_does_not_answer(tmp_path: Path) -> None:
    """A client that accepts and never answers costs one call its TIMEOUT_MS, not a hang."""
    ctl = tmp_path / "c.sock"
    with fake_client(ctl, None):
        started = time.monotonic()
        reply = plugin("call", "status", control_path=ctl, timeout=30)
        elapsed = time.monotonic() - started
    assert "no complete answer" in reply["error"], reply
    assert PLUGIN_TIMEOUT_S <= elapsed < 25, elapsed  # bounded by the timeout, not by rpcd's


@pytest.mark.root
def test_plugin_reads_no_socket_another_user_listens_on(tmp_path: Path) -> None:
    need("setpriv")
    shared = Path(tempfile.mkdtemp(prefix="mptun-luci-"))  # pytest's tmp_path is root-only
    try:
        shared.chmod(0o777)
        ctl = shared / "c.sock"
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        with fake_client(ctl, b'{"pid": 7}', user=nobody):
            reply = plugin("call", "status", control_path=ctl)
    finally:
        shutil.rmtree(shared)
    assert reply["running"] is False and "not served by root" in reply["error"], reply


# -- package files: ACL, menu, Makefile, uci-defaults ---------------------------------------------


def declared_calls() -> set[tuple[str, str]]:
    """The (object, method) pairs the views declare with rpc.declare."""
    found = set()
    for js in VIEWS.rglob("*.js"):
        for block in re.findall(r"rpc\.declare\(\{(.*?)\}\)", js.read_text(), re.S):
            obj = re.search(r"object:\s*'([^']+)'", block)
            method = re.search(r"method:\s*'([^']+)'", block)
            assert obj and method, block
            found.add((obj.group(1), method.group(1)))
    return found


def test_acl_grants_exactly_what_the_views_call() -> None:
    acl = json.loads(ACL.read_text())
    assert list(acl) == ["luci-app-mptun"]
    grant = acl["luci-app-mptun"]
    granted = {(o, m) for o, ms in grant["read"]["ubus"].items() for m in ms}
    assert granted == declared_calls() == {("luci.mptun", "status")}
    # the settings page is a form.Map over /etc/config/mptun: read and write that config only
    assert grant["read"]["uci"] == ["mptun"] and grant["write"] == {"uci": ["mptun"]}
    assert "form.Map('mptun'" in (VIEWS / "mptun/settings.js").read_text()
    # the plugin serves every granted method under the object's name (its file name)
    assert {o for o, _ in granted} == {PLUGIN.name}
    if UCODE is not None:
        assert {m for _, m in granted} == set(plugin("list", stdin=""))


def test_menu_points_at_the_views() -> None:
    menu = json.loads(MENU.read_text())
    acl = json.loads(ACL.read_text())
    top = menu["admin/services/mptun"]
    assert set(top["depends"]["acl"]) <= set(acl)
    assert top["depends"]["uci"] == {"mptun": True}
    paths = [e["action"]["path"] for e in menu.values() if e["action"]["type"] == "view"]
    views = sorted(p.relative_to(VIEWS).with_suffix("").as_posix() for p in VIEWS.rglob("*.js"))
    assert sorted(paths) == views == ["mptun/settings", "mptun/status"]
    for key in menu:
        assert key == "admin/services/mptun" or key.startswith("admin/services/mptun/")


def test_package_files() -> None:
    mk = (APP / "Makefile").read_text()
    deps = re.search(r"^LUCI_DEPENDS:=(.*)$", mk, re.M)
    assert deps and "+mptun" in deps.group(1).split()
    assert {"+ucode", "+ucode-mod-socket", "+ucode-mod-fs"} <= set(deps.group(1).split())
    assert "luci.mk" in mk and "# call BuildPackage - OpenWrt buildroot signature" in mk
    for f in (PLUGIN, UCI_DEFAULTS):
        assert os.access(f, os.X_OK), f  # rpcd runs only executable plugins (plugin.c)
    assert PLUGIN.read_text().startswith("#!/usr/bin/ucode\n")
    default = re.search(r"control=(\S+?)\"", UCI_DEFAULTS.read_text())
    assert default and default.group(1) in PLUGIN.read_text()  # one path in both


# -- the views under node -------------------------------------------------------------------------

NODE_RUNNER = r"""
const fs = require('fs'), vm = require('vm');
const [standin, name, file] = process.argv.slice(2);
const source = fs.readFileSync(file, 'utf8');
// LuCI compiles a view as the body of a function (luci.js, require): a syntax error shows here.
new vm.Script('(function(window, document, L) {' + source + '\n})', { filename: file });
const ctx = vm.createContext({ console, setInterval, clearInterval, setTimeout });
vm.runInContext(fs.readFileSync(standin, 'utf8'), ctx, { filename: standin });
const view = ctx.LuciStandin.load(name, source);
const directives = ctx.LuciStandin.directives(source);
Promise.resolve(view.done).then(() => {
  const log = ctx.LuciStandin.log;
  process.stdout.write(JSON.stringify({ declared: log.declared, errors: log.errors, directives }));
  process.exit(0);
});
"""


def node_view(tmp_path: Path, view: str) -> dict:
    runner = tmp_path / "runner.js"
    runner.write_text(NODE_RUNNER)
    r = subprocess.run(
        [need_node(), str(runner), str(STANDIN), view, str(VIEWS / f"{view}.js")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_views_compile_as_luci_compiles_them(tmp_path: Path) -> None:
    need_node()
    for js in sorted(VIEWS.rglob("*.js")):
        r = subprocess.run(
            [
                NODE or "node",
                "-e",
                "new (require('vm').Script)('(function(window, document, L) {' + "
                "require('fs').readFileSync(process.argv[1], 'utf8') + '\\n})', "
                "{ filename: process.argv[1] })",
                str(js),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
    # and the check can fail: a stray brace is a SyntaxError
    broken = tmp_path / "broken.js"
    broken.write_text((VIEWS / "mptun/status.js").read_text() + "\n}\n")
    r = subprocess.run(
        [
            NODE or "node",
            "-e",
            "new (require('vm').Script)('(function(){' + require('fs').readFileSync("
            "process.argv[1], 'utf8') + '\\n})')",
            str(broken),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "SyntaxError" in r.stderr


def test_settings_page_options_are_what_mptun_uci_reads(tmp_path: Path, key_file: Path) -> None:
    """Every option the settings page writes is a key of its section type that `mptun uci`
    accepts, with the page's own placeholder, default or first choice as the value."""
    out = node_view(tmp_path, "mptun/settings")
    assert out["errors"] == []
    assert "require form" in out["directives"]
    declared = out["declared"]
    assert {d["config"] for d in declared} == {"mptun"}
    by_type: dict[str, list[dict]] = {}
    for d in declared:
        by_type.setdefault(d["section"], []).append(d)
    assert set(by_type) == {"client", "uplinks", "uplink", "nft"}
    listed = {"DynamicList", "DeviceSelect"}

    def uci_file(extra: str = "") -> Path:
        lines = []
        for stype, options in by_type.items():
            lines.append(f"config {stype} '{stype}'")
            for d in options:
                if d["option"] == "key_file":
                    value = str(key_file)
                elif d["kind"] == "Flag":
                    value = "1"
                else:
                    value = d.get("placeholder") or d.get("default") or (d["choices"] or [None])[0]
                assert value, d
                word = "list" if d["kind"] in listed else "option"
                lines.append(f"\t{word} {d['option']} '{value}'")
            if stype == "client":
                lines.append(extra)
        path = tmp_path / "mptun"
        path.write_text("\n".join(lines) + "\n")
        return path

    ok = run_mptun("uci", str(uci_file("\toption control '/var/run/mptun-control.sock'")))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split("\n")[0] == "client client"
    # and the check can fail: a key `mptun client` does not know
    bad = run_mptun("uci", str(uci_file("\toption bulkiness 'auto'")))
    assert bad.returncode == 2 and "unknown key 'bulkiness'" in bad.stderr


# -- the status page in headless Chromium ---------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>mptun</title></head>
<body><div id="maincontent"><div id="view"></div></div><pre id="standin-log"></pre>
<script>%(standin)s</script>
<script>
LuciStandin.reply('luci.mptun.status', %(replies)s);
var view = LuciStandin.load(%(name)s, %(source)s);
// after the first poll (POLL_SECONDS, in Chromium's virtual time): what the stand-in saw
setTimeout(function() {
  document.getElementById('standin-log').textContent = JSON.stringify(LuciStandin.log);
}, %(after_ms)d);
</script></body></html>
"""


class _Text(HTMLParser):
    """The visible text of a dumped page (no script bodies) and the ids of its elements."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.ids: list[str] = []
        self.tags: list[str] = []
        self.rows: list[list[str]] = []  # each table row's cells' text
        self._cell = False
        self._skip = 0
        self.log = ""
        self._in_log = False

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th") and self.rows:
            self.rows[-1].append("")
            self._cell = True
        self.ids += [v for k, v in attrs if k == "id" and v]
        self._skip += tag == "script"
        self._in_log = ("id", "standin-log") in attrs

    def handle_endtag(self, tag) -> None:
        self._cell = self._cell and tag not in ("td", "th")
        self._skip -= tag == "script"
        self._in_log = False

    def handle_data(self, data) -> None:
        if self._in_log:
            self.log += data
        elif not self._skip:
            self.parts.append(data)
            if self._cell:
                self.rows[-1][-1] += data

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.parts).split())


def render_in_chromium(tmp_path: Path, view: str, replies: list[dict]) -> _Text:
    """Load `view` with `replies` as luci.mptun status answers in headless Chromium; the DOM
    after the first poll, parsed."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = tmp_path / "page.html"
    page.write_text(
        PAGE
        % {
            "standin": STANDIN.read_text(),
            "replies": json.dumps(replies).replace("</", "<\\/"),
            "name": json.dumps(view),
            "source": json.dumps((VIEWS / f"{view}.js").read_text()).replace("</", "<\\/"),
            "after_ms": 6000,
        }
    )
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # root, and no user namespaces for Chromium's own sandbox here
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=8000",  # the first poll at 5 s, without waiting 5 s
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: Chromium and its helpers
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    parsed = _Text()
    parsed.feed(out)
    return parsed


def plugin_replies(ctl: Path, count: int, gap: float) -> list[dict]:
    """`count` status replies `gap` seconds apart: from the plugin with ucode, else the client's
    document wrapped as the plugin wraps it."""
    out = []
    for i in range(count):
        if i:
            time.sleep(gap)
        if UCODE is not None:
            out.append(plugin("call", "status", control_path=ctl))
        else:
            doc = control.query(str(ctl))
            at = time.monotonic()
            out.append({"control": str(ctl), "running": True, "at": at, "client": doc})
    return out


def test_status_page_renders_a_live_client(tmp_path: Path, live_client) -> None:
    cli, ctl, target_port = live_client
    replies = plugin_replies(ctl, 2, 1.0)
    page = render_in_chromium(tmp_path, "mptun/status", replies)
    log = json.loads(page.log)
    assert log["errors"] == []
    assert log["polls"] == [5]  # polls every 5 s
    assert log["calls"] == ["luci.mptun.status"] * 2  # load, then the first poll
    doc = replies[1]["client"]
    rows = {r[0]: r for r in page.rows if r}
    assert "mptun-up" in page.ids
    assert rows["Tunnel"][1] == "up"
    assert rows["Server"][1] == doc["server"]
    assert rows["Client process"][1] == str(cli.pid)
    assert rows["Tunnels relaying"][1] == "1"
    # the tunnel: source, target, kind, subflows
    (tunnel,) = [r for r in page.rows if r[1:2] == [f"127.0.0.1:{target_port}"]]
    assert tunnel[0].startswith("socks 127.0.0.1:") and tunnel[2] in ("MPTCP", "TCP"), tunnel
    # the uplinks table: the probed uplink by name, with its state
    (uplink,) = doc["uplink_health"]
    assert rows["lo"][1].startswith(uplink["state"]), rows["lo"]
    # throughput from the two replies' byte counts: a number, not "measuring"
    down = re.fullmatch(r"([0-9.]+) (B|KiB|MiB|GiB)/s", rows["Download"][1])
    assert down and float(down.group(1)) > 0, rows["Download"]


def test_status_page_shows_why_the_client_is_not_running(tmp_path: Path) -> None:
    if UCODE is not None:
        reply = plugin("call", "status", control_path=tmp_path / "none.sock")
    else:
        reply = {"control": "x", "running": False, "at": 1.0, "error": "no control socket at x"}
    page = render_in_chromium(tmp_path, "mptun/status", [reply])
    assert "mptun-down" in page.ids and "mptun-up" not in page.ids
    assert "not running" in page.text and reply["error"] in page.text


def test_status_page_shows_client_text_as_text(tmp_path: Path) -> None:
    """Targets and peers come from the LAN: markup in them stays text, no element appears."""
    evil = '<img id="injected" src="x"><b id="bold">x</b>'
    doc = {
        "pid": 1,
        "server": evil,
        "servers": [{"server": evil, "state": "down", "reason": evil}],
        "listeners": [evil],
        "connections": [
            {
                "id": evil,
                "source": evil,
                "target": evil,
                "kind": evil,
                "seconds": 1,
                "subflows": [{"id": 1, "local": evil, "local_ip": evil}],
            }
        ],
        "uplink_health": [{"name": evil, "state": evil, "reason": evil, "addresses": [evil]}],
        "counters": {evil: 1},
        "udp": [{evil: evil}],
    }
    reply = {"control": "x", "running": True, "at": 1.0, "client": doc}
    page = render_in_chromium(tmp_path, "mptun/status", [reply])
    assert "injected" not in page.ids and "bold" not in page.ids and "img" not in page.tags
    assert page.text.count('<img id="injected"') >= 8


def test_settings_page_loads_in_chromium(tmp_path: Path) -> None:
    page = render_in_chromium(tmp_path, "mptun/settings", [{}])
    assert json.loads(page.log)["errors"] == []
    for title in ("Client", "Uplink routing", "Uplinks", "Firewall (gateway mode)", "Server"):
        assert title in page.text


# -- uci-defaults ----------------------------------------------------------------------------------

FAKE_UCI = r"""#!/bin/sh
# `uci` for the uci-defaults test: `show` prints what the test put in $UCI_SHOW, `get` answers
# from it, `set` and `commit` are appended to $UCI_LOG.
[ "$1" = -q ] && shift
case "$1" in
show) cat "$UCI_SHOW" ;;
get) sed -n "s/^$2='\(.*\)'$/\1/p" "$UCI_SHOW" | grep . ;;
set | commit) echo "$*" >>"$UCI_LOG" ;;
*) exit 1 ;;
esac
"""


@pytest.mark.parametrize(
    ("show", "expected"),
    [
        # libuci's `uci show` lines for a named and an anonymous client section
        ("mptun.main=client\nmptun.main.enabled='1'\n", "main"),
        ("mptun.cfg01a2b3=client\nmptun.cfg01a2b3.control='auto'\n", "cfg01a2b3"),
        ("mptun.main=client\nmptun.main.control='/run/mine.sock'\n", None),  # the user's own
        ("mptun.wan=uplink\n", None),  # no client section: nothing to set
    ],
)
def test_uci_defaults_sets_the_control_path(tmp_path: Path, show: str, expected) -> None:
    (tmp_path / "bin").mkdir()
    uci = tmp_path / "bin/uci"
    uci.write_text(FAKE_UCI)
    uci.chmod(0o755)
    (tmp_path / "show").write_text(show)
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "UCI_SHOW": str(tmp_path / "show"),
        "UCI_LOG": str(tmp_path / "log"),
    }
    r = subprocess.run(["sh", str(UCI_DEFAULTS)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # uci-defaults scripts that exit 0 are removed
    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
    path = re.search(r"CONTROL = getenv\('MPTUN_CONTROL'\) \|\| '([^']+)'", PLUGIN.read_text())
    assert path
    if expected is None:
        assert log == ""
    else:
        assert log == f"set mptun.{expected}.control={path.group(1)}\ncommit mptun\n"


# -- several uplinks: the multipath test bed -------------------------------------------------------


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.usefixtures("needs_mptcp_testbed")
def test_status_page_shows_each_uplink_of_a_multipath_tunnel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three uplinks (mptun uplinks), a client probing each and one tunnel streaming over all:
    the page has a row per uplink with its health and its one subflow."""
    from mptun.lab.rig import Rig
    from mptun.lab.testbed import Testbed
    from mptun.lab.wait import wait_until

    uplinks = ("wan1", "wan2", "wan3")
    monkeypatch.setenv("MPTUN_HEALTH_FILE", str(tmp_path / "health.json"))
    ctl = tmp_path / "control.sock"
    probe = [a for name in uplinks for a in ("--uplink", name)]
    tb = Testbed(rates_mbit=(20, 20, 20), ipv6=False)
    tb.__enter__()
    rig = Rig(tb, tmp_path, uplinks=uplinks, client_args=["--control", str(ctl), *probe])
    fetch = None
    try:
        rig.start()

        def client() -> dict:
            return control.query(str(ctl))

        def all_up() -> bool:
            return {u["name"]: u["state"] for u in client()["uplink_health"]} == dict.fromkeys(
                uplinks, "up"
            )

        wait_until(all_up, 30, "every uplink up")
        fetch = rig.fetch(seconds=15)

        def three_subflows() -> bool:
            conns = client()["connections"]
            return bool(conns) and len(conns[0]["subflows"]) == len(uplinks)

        wait_until(three_subflows, 15, "a tunnel with a subflow per uplink")
        replies = plugin_replies(ctl, 2, 1.0)
        page = render_in_chromium(tmp_path, "mptun/status", replies)
    finally:
        if fetch is not None and fetch.proc.poll() is None:
            fetch.proc.kill()
            fetch.proc.wait()
        tb.destroy()
        rig.close()
    assert json.loads(page.log)["errors"] == []
    rows = {r[0]: r for r in page.rows if r}
    for name in uplinks:
        # Uplink, Health, Loss, Round trip, Subflows (one each), Download, Upload
        _, health, loss, rtt, subflows, down, up = rows[name]
        assert health.startswith("up") and loss.endswith("%") and rtt.endswith("ms"), rows[name]
        assert subflows == "1" and down.endswith("/s") and up.endswith("/s"), rows[name]
    assert re.fullmatch(r"[0-9.]+ (B|KiB|MiB|GiB)/s", rows["Download"][1]), rows["Download"]
    assert float(rows["Download"][1].split()[0]) > 0, rows["Download"]
    assert rows["Tunnels relaying"][1] == "1"
