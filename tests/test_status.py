"""`mptun status` and the client's control socket against other local users: a name nobody can
take first, peers checked both ways, answers bounded in size and time and cleaned before they
are printed; and the status wording (what it says when it reads nothing, which counters are the
client's, no advice on a plain host)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mptun.client import control
from mptun.client.status import Report, counter_notes, render, uplink_problems
from mptun.client.uplinks import MAIN_TABLE, Addr, Limits, Link, Route, State
from tests.helpers import ClientProcess, ServerProcess
from tests.helpers import run_mptun as mptun
from tests.test_cli import assert_one_line_error

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
IS_ROOT = os.geteuid() == 0
ESC = "\x1b"

# A fake control socket: listens on argv[1] and answers every connection with argv[2]'s mode.
FAKE = textwrap.dedent(
    """
    import json, socket, sys, time
    name, mode = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_UNIX)
    s.bind("\\0" + name[1:])
    s.listen(8)
    print("ready", flush=True)
    evil = "\\x1b]0;pwned\\x07\\x1b[2J\\u202eevil\\nclient pid 1 (fake)"
    doc = {"pid": 4242, "server": evil, "transport": "mptcp", "listeners": [evil],
           "counters": {}, "connections": [{"id": evil, "source": evil, "target": evil,
           "seconds": 1, "kind": evil, "subflows": [{"id": 1, "local": evil, "remote": evil,
           "local_ip": evil}]}]}
    while True:
        c, _ = s.accept()
        try:
            if mode == "doc":
                c.sendall(json.dumps(doc).encode())
            elif mode == "huge":
                chunk = b"[" * (1 << 20)
                for _ in range(300):
                    c.sendall(chunk)
            elif mode == "trickle":
                for _ in range(120):
                    c.sendall(b" ")
                    time.sleep(1)
            elif mode == "badtype":
                c.sendall(json.dumps({"pid": "x", "connections": "nope"}).encode())
        except OSError:
            pass
        c.close()
    """
)


@contextmanager
def fake_control(name: str, mode: str, as_nobody: bool = False) -> Iterator[subprocess.Popen]:
    """A process listening on `name` as a fake client would (as nobody with `as_nobody`)."""
    cmd = [*(AS_NOBODY if as_nobody else []), sys.executable, "-c", FAKE, name, mode]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def status(*args: str, as_nobody: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [*(AS_NOBODY if as_nobody else []), sys.executable, "-m", "mptun", "status", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def unique(tag: str) -> str:
    return f"@mptun/client/{os.getpid()}-test-{tag}-{os.urandom(4).hex()}"


# --- a name no one can take first ------------------------------------------------------------


def test_default_control_names_are_unguessable():
    names = {control.default_name() for _ in range(100)}
    assert len(names) == 100
    for n in names:
        assert re.fullmatch(rf"@mptun/client/{os.getpid()}-[0-9a-f]{{16}}", n), n


@pytest.mark.root
def test_a_name_bound_in_advance_by_another_user_does_not_stop_the_client(
    tmp_path: Path, key_file: Path
):
    """nobody binds `@mptun/client/PID` for the PID the client will have (a shell that execs
    mptun keeps its PID): the client still starts and answers status on its own name."""
    squat = (
        "import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
        "s.bind(chr(0) + sys.argv[1][1:]); s.listen(); time.sleep(120)"
    )
    wrapper = (
        f'{" ".join(AS_NOBODY)} {sys.executable} -c "{squat}" "@mptun/client/$$" & '
        f"echo $! > {tmp_path / 'squatter'}; "
        'while ! grep -q " @mptun/client/$$$" /proc/net/unix; do sleep 0.05; done; '
        'exec "$@"'
    )
    try:
        with ClientProcess(tmp_path, key_file, 1, prefix=["sh", "-c", wrapper, "sh"]) as c:
            squatted = f"@mptun/client/{c.pid}"
            r = status("--json")
            doc = json.loads(r.stdout)
            mine = [x for x in doc["clients"] if x["pid"] == c.pid]
            assert mine and mine[0]["control"].startswith(f"{squatted}-"), doc
            assert any(u.startswith(squatted + ":") for u in doc["unreachable"]), doc
    finally:
        pid = (tmp_path / "squatter").read_text().strip()
        os.kill(int(pid), 9)


# --- peers checked both ways -----------------------------------------------------------------


@pytest.mark.root
def test_another_users_fake_client_is_not_read_and_nothing_raw_is_printed():
    name = unique("planted")
    with fake_control(name, "doc", as_nobody=True):
        r = status("--control", name)
        assert r.returncode == 1
        assert ESC not in r.stdout + r.stderr
        assert "4242" not in r.stdout
        assert "not read" in r.stdout and "uid 65534" in r.stdout
        auto = status()
        assert "pid 4242" not in auto.stdout and ESC not in auto.stdout


def test_a_same_user_answer_is_cleaned_before_printing():
    """Even an answer status may read (its own user's) cannot drive the terminal: escape
    sequences, bidi overrides and newlines are shown escaped."""
    name = unique("escapes")
    with fake_control(name, "doc"):
        r = status("--control", name)
    assert r.returncode == 0, r.stderr
    assert ESC not in r.stdout and "\u202e" not in r.stdout and "\x07" not in r.stdout
    assert "\\x1b]0;pwned" in r.stdout
    assert not any(line.startswith("client pid 1 (fake)") for line in r.stdout.splitlines())


def test_an_answer_of_the_wrong_shape_is_one_line_not_a_traceback():
    name = unique("badtype")
    with fake_control(name, "badtype"):
        r = status("--control", name)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{name}: not a status document" in r.stdout


@pytest.mark.root
def test_the_client_answers_only_root_and_its_own_user(tmp_path: Path, key_file: Path):
    """As nobody, status says no client answered and why, then names the socket (not "no client
    answers" followed by a list); the client logs the refusal."""
    with ClientProcess(tmp_path, key_file, 1) as c:
        name = next(n for n in control.discover() if n.startswith(f"@mptun/client/{c.pid}-"))
        r = status("--control", name, as_nobody=True)
        assert r.returncode == 1
        first, second = r.stdout.splitlines()[:2]
        assert first.startswith("no mptun client answered: 1 control socket(s)"), r.stdout
        assert name in second and "runs as root" in second and "as root" in second
        # and the client itself refuses to answer uid 65534, if asked anyway
        probe = (
            "import socket,sys; s=socket.socket(socket.AF_UNIX); "
            "s.connect('\\0'+sys.argv[1][1:]); print(len(s.recv(100)))"
        )
        asked = subprocess.run([*AS_NOBODY, sys.executable, "-c", probe, name],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert asked.stdout.strip() == "0", asked
        assert "refused status to uid 65534" in c.log()


# --- bounded in size and time ----------------------------------------------------------------


def test_a_huge_answer_is_cut_off_and_status_stays_small():
    """300 MB of JSON-looking bytes: status stops at 16 MiB; its peak RSS stays far below it."""
    name = unique("huge")
    measure = (
        "import resource, subprocess, sys; "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "print(r.stdout)"
    )
    with fake_control(name, "huge"):
        r = subprocess.run(
            [sys.executable, "-c", measure, sys.executable, "-m", "mptun", "status",
             "--control", name],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    head, _, out = r.stdout.partition("\n")
    code, rss_kb = map(int, head.split())
    assert code == 1, r.stdout
    assert "answer longer than 16777216 bytes" in out
    print(f"status peak RSS with a 300 MB answer: {rss_kb / 1024:.0f} MiB")
    assert rss_kb < 200 * 1024


@pytest.mark.timing
def test_a_trickling_answer_is_given_up_after_the_deadline():
    name = unique("trickle")
    with fake_control(name, "trickle"):
        start = time.monotonic()
        r = status("--control", name)
        took = time.monotonic() - start
    assert r.returncode == 1 and "no complete answer within 5 s" in r.stdout, r.stdout
    assert took < control.ANSWER_TIMEOUT + 10, took  # the deadline is for the whole answer


def test_the_client_trims_an_answer_too_big_to_send():
    conns = [{"id": f"c{i}", "pad": "x" * 1000} for i in range(1000)]
    data = control.encode_answer({"pid": 1, "connections": conns}, limit=200_000)
    assert len(data) <= 200_000
    doc = json.loads(data)
    assert doc["connections_omitted"] == 1000 - len(doc["connections"]) > 0
    assert doc["connections"][0]["id"] == "c0"


# --- wording ---------------------------------------------------------------------------------


def test_status_does_not_offer_control_none():
    assert "none" not in mptun("status", "--help").stdout.split("--control", 1)[1].split("\n")[0]
    assert_one_line_error(mptun("status", "--control", "none"), "--control", "mptun client")


def test_a_socket_nobody_listens_on_is_named_once():
    name = unique("nobody-listens")
    r = status("--control", name)
    assert r.returncode == 1
    assert r.stdout.count("control socket") == 1, r.stdout
    assert f"  {name}: Connection refused" in r.stdout, r.stdout


def test_namespace_counters_are_not_called_the_tunnels():
    notes = counter_notes({"MPCapableFallbackSYNACK": 7, "MPJoinSynTx": 5, "MPJoinSynAckRx": 2})
    rep = Report(clients=[{"pid": 9, "connections": []}], notes=notes)
    text = "\n".join(render(rep))
    assert "7 MPTCP connection(s) fell back" in text
    assert "every program's MPTCP connections since it was created" in text
    assert "why speeds may not add up" not in text  # nothing of the client's own


@pytest.mark.root
def test_the_clients_own_fallbacks_are_counted(tmp_path: Path, key_file: Path):
    """A plain-TCP server: the client's MPTCP tunnel falls back; status counts it as the
    client's (counter mptcp-fallback), apart from the namespace's kernel counters."""
    srv = ServerProcess(tmp_path, key_file, "--transport", "tcp", stats=False)
    with srv, ClientProcess(tmp_path, key_file, srv.port) as c:
        with socket.create_connection(("127.0.0.1", c.socks_port), timeout=10) as s:
            s.sendall(b"\x05\x01\x00\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00")
            s.recv(100)
        deadline = time.monotonic() + 10
        while c.stats()["counters"].get("mptcp-fallback", 0) < 1:
            assert time.monotonic() < deadline, c.log()[-2000:]
            time.sleep(0.1)
        doc = json.loads(status("--json").stdout)
        mine = [p for p in doc["problems"] if f"client pid {c.pid} since it started" in p]
        assert mine and mine[0].startswith("1 tunnel(s)"), doc["problems"]


def _host(*links: str) -> State:
    """A host with these interfaces, each with an address and a default route in main."""
    v4 = socket.AF_INET
    ls = {"lo": Link(1, "lo", True, True)}
    addrs, routes = [], []
    for i, name in enumerate(links, start=2):
        ls[name] = Link(i, name, True, True)
        addrs.append(Addr(i, ipaddress.ip_address(f"198.51.100.{i * 16 + 1}")))
        routes.append(Route(v4, MAIN_TABLE, ipaddress.ip_address(f"198.51.100.{i * 16 + 2}"), i))
    return State(ls, addrs, [], routes, {254, 255}, [], Limits(2, 0))


def test_a_plain_host_gets_no_uplink_advice():
    assert uplink_problems(_host("eth0")) == []
    two = uplink_problems(_host("wan1", "wan2"))
    assert any("`mptun uplinks wan1`" in p for p in two), two


def test_many_planted_sockets_are_summed_up_not_listed():
    rep = Report(unreachable=[f"@mptun/client/{i}-x: listened on by uid 65534" for i in range(500)])
    lines = render(rep)
    assert len(lines) < 40
    assert any("and 480 more" in line for line in lines)
