"""vps/install.sh run for real in an isolated root, and the server it set up reached by a client.

The installer runs unmodified inside new mount and network namespaces with overlays over /etc,
/opt and /var (tests/isolated.py): it builds its venv in /opt/mptun, writes /etc/mptun, the sysctl
drop-in and the systemd unit at their real paths, and applies the sysctls to the namespace only.
systemd is not PID 1 on these machines, so the test does what the unit tells systemd to do: it runs
the unit's own ExecStartPre and ExecStart lines, ExecStart as an unprivileged user with the key
handed over the way LoadCredential does (a private copy, mode 0400, in $CREDENTIALS_DIRECTORY).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, wait_listening
from tests.isolated import IsolatedRoot
from tests.peers import sha256_of_stream

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

INSTALL = ROOT / "vps" / "install.sh"
UNIT = "/etc/systemd/system/mptun-server.service"
SYSCTL = "/etc/sysctl.d/90-mptun.conf"
# uid/gid for the emulated DynamicUser (systemd allocates from 61184-65519).
DYNAMIC_UID = 61234
SYSTEM_PYTHON = "/usr/bin/python3"
BUILD_REQUIRES = ("setuptools>=77",)  # pyproject's [build-system], for the checkout install


def _installer_python() -> str:
    """The Python a Debian 12 VPS has (/usr/bin/python3) when it can make a venv; else ours."""
    probe = "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))"
    if (
        Path(SYSTEM_PYTHON).exists()
        and subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True).returncode == 0
    ):
        return SYSTEM_PYTHON
    return sys.executable


@dataclass
class Installed:
    root: IsolatedRoot
    port: int
    first_output: str
    wheelhouse: Path
    python: str
    tmp: Path

    def install(self, *args: str) -> subprocess.CompletedProcess:
        """Run install.sh inside, offline: pip sees only the wheelhouse built on the host."""
        env = {
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(self.wheelhouse),
        }
        return self.root.run(["bash", str(INSTALL), *args], env=env, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    for tool in ("unshare", "nsenter", "setpriv", "ip", "curl", "systemd-analyze"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, overlays)")
    tmp = tmp_path_factory.mktemp("vps")
    tmp.chmod(0o755)  # the emulated service user must reach the credentials dir
    wheelhouse = tmp / "wheels"
    # On the host (which reaches the package index): the mptun wheel and its dependencies, plus
    # what building from a source tree needs, so the installer can run offline inside.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "-w", str(wheelhouse)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "-d", str(wheelhouse), *BUILD_REQUIRES],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(wheelhouse.glob("mptun-*.whl"))
    root = IsolatedRoot()
    try:
        port = 28443  # the isolated root's network namespace is this test's alone
        inst = Installed(root, port, "", wheelhouse, _installer_python(), tmp)
        r = inst.install(
            "--from", str(wheel), "--python", inst.python, "--listen", f"127.0.0.1:{port}"
        )
        inst.first_output = r.stdout
        assert f"installing mptun from the file {wheel} " in r.stdout, r.stdout + r.stderr
        assert "not from a package index" in r.stdout
        yield inst
    finally:
        root.close()


def test_writes_files_with_safe_modes(installed: Installed) -> None:
    root = installed.root
    st = root.run(["stat", "-c", "%a %U %G", "/etc/mptun/key"]).stdout.split()
    assert st == ["600", "root", "root"]
    conf = root.read("/etc/mptun/server.toml")
    assert f'listen = "127.0.0.1:{installed.port}"' in conf
    assert "key" not in conf.split("[server]")[1].split("=")[0]  # no key inside the config
    unit = root.read(UNIT)
    for line in (
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "Restart=on-failure",
        "LoadCredential=key:/etc/mptun/key",
        f"LimitNOFILE={4096 * 6 + 1024}",
    ):
        assert line in unit.splitlines()
    # the printed router settings carry the server address and the key line to copy
    key = root.read("/etc/mptun/key").strip()
    out = installed.first_output
    assert "option server '" in out and f":{installed.port}'" in out
    assert key in out
    # nothing leaked onto the host
    assert not Path("/opt/mptun").exists() and not Path(UNIT).exists()


def test_unit_passes_systemd_analyze_verify(installed: Installed) -> None:
    r = installed.root.run(["systemd-analyze", "verify", UNIT], check=False)
    assert r.returncode == 0, r.stderr
    # verify prints problems as warnings without failing on some; demand a clean report
    assert "mptun-server.service" not in r.stderr, r.stderr


def test_sysctl_dropin_loads(installed: Installed) -> None:
    root = installed.root
    root.run(["sysctl", "-q", "-p", SYSCTL])
    assert root.read("/proc/sys/net/mptcp/enabled").strip() == "1"
    assert root.read("/proc/sys/net/ipv4/tcp_rmem").split() == ["4096", "131072", "33554432"]
    assert root.read("/proc/sys/net/ipv4/tcp_wmem").split() == ["4096", "16384", "33554432"]


def _unit_lines(unit: str, key: str) -> list[list[str]]:
    """The unit's KEY= command lines, split as systemd does (a leading + or - is a flag)."""
    out = []
    for line in unit.splitlines():
        if line.startswith(f"{key}="):
            out.append(shlex.split(line.split("=", 1)[1].lstrip("+-")))
    return out


def test_server_from_unit_reaches_client(installed: Installed, tmp_path: Path) -> None:
    root = installed.root
    unit = root.read(UNIT)
    (pre,) = _unit_lines(unit, "ExecStartPre")
    (start,) = _unit_lines(unit, "ExecStart")
    root.run(pre)  # as root, like systemd's "+" prefix
    assert "subflows 8" in root.run(["ip", "mptcp", "limits", "show"]).stdout

    # LoadCredential: a private copy of the key, owned by the service user, mode 0400, in a
    # directory only that user can read (systemd uses /run/credentials/UNIT).
    creds = "/var/lib/mptun-test-credentials"
    ids = ["-o", str(DYNAMIC_UID), "-g", str(DYNAMIC_UID)]
    root.run(["install", "-d", "-m", "0500", *ids, creds])
    root.run(["install", "-m", "0400", *ids, "/etc/mptun/key", f"{creds}/key"])
    argv = [a.replace("${CREDENTIALS_DIRECTORY}", str(creds)) for a in start]
    assert argv[0] == "/opt/mptun/venv/bin/mptun"
    as_service_user = [
        "setpriv",
        f"--reuid={DYNAMIC_UID}",
        f"--regid={DYNAMIC_UID}",
        "--clear-groups",
        "--no-new-privs",
    ]
    # The HTTP peer is on loopback, which the server's default target policy refuses.
    env = {"MPTUN_ALLOW_PRIVATE": "1"}
    procs: list[subprocess.Popen] = []
    try:
        server = root.popen([*as_service_user, *argv], tmp_path / "server.log", env)
        procs.append(server)
        wait_listening("127.0.0.1", installed.port, 20, prefix=root.prefix())
        peer = root.popen(
            [
                sys.executable,
                "-c",
                "import sys, time; from tests.peers import http_server\n"
                "with http_server() as (h, p):\n"
                "    print(p, flush=True); time.sleep(600)",
            ],
            tmp_path / "peer.log",
            {"PYTHONPATH": str(ROOT)},
            pipe_stdout=True,
        )
        procs.append(peer)
        assert peer.stdout is not None
        http_port = int(peer.stdout.readline())
        socks = 21080  # the isolated root's network namespace is this test's alone
        key_copy = tmp_path / "client.key"
        key_copy.write_text(root.read("/etc/mptun/key"))
        key_copy.chmod(0o600)
        client = root.popen(
            [
                sys.executable,
                "-m",
                "mptun",
                "client",
                "--server",
                f"127.0.0.1:{installed.port}",
                "--key-file",
                str(key_copy),
                "--socks",
                f"127.0.0.1:{socks}",
            ],
            tmp_path / "client.log",
            {"PYTHONPATH": str(ROOT)},
        )
        procs.append(client)
        wait_listening("127.0.0.1", socks, 20, prefix=root.prefix())
        size = 3_000_000
        r = root.run(
            [
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                "60",
                "--socks5-hostname",
                f"127.0.0.1:{socks}",
                f"http://127.0.0.1:{http_port}/bytes/{size}/7",
                "-o",
                str(tmp_path / "body"),
            ],
            check=False,
        )
        logs = "".join(
            f"\n--- {n}\n{(tmp_path / n).read_text(errors='replace')}"
            for n in ("server.log", "client.log")
        )
        assert r.returncode == 0, r.stderr + logs
        body = (tmp_path / "body").read_bytes()
        assert hashlib.sha256(body).hexdigest() == sha256_of_stream(size, 7)
        # the server really runs as the unprivileged service user
        status = Path(f"/proc/{server.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(DYNAMIC_UID)] * 4
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def test_second_run_upgrades_and_keeps_key(installed: Installed) -> None:
    root = installed.root
    key = root.read("/etc/mptun/key")
    conf = root.read("/etc/mptun/server.toml")
    # this time without --from: the checkout the script is in; the key and config must survive
    r = installed.install("--python", installed.python)
    assert f"installing mptun from the checkout {ROOT} " in r.stdout, r.stdout + r.stderr
    assert "keeping the existing key" in r.stdout
    assert root.read("/etc/mptun/key") == key
    assert root.read("/etc/mptun/server.toml") == conf
    assert root.run(["/opt/mptun/venv/bin/mptun", "--version"]).stdout.startswith("mptun")
    mode = root.run(["stat", "-c", "%a", "/etc/mptun/key"]).stdout.strip()
    assert stat.S_IMODE(int(mode, 8)) == 0o600


def test_bad_arguments_fail_cleanly(installed: Installed) -> None:
    r = installed.root.run(["bash", str(INSTALL), "--max-connections", "lots"], check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("install.sh: error: --max-connections")
    r = installed.root.run(["bash", str(INSTALL), "--purge"], check=False)
    assert r.returncode == 1 and "--purge goes with --uninstall" in r.stderr


def test_never_installs_mptun_by_name(installed: Installed, tmp_path: Path) -> None:
    """A name would be looked up on an index: --version is refused, and so is a --from that is
    neither a checkout nor an mptun wheel/sdist file."""
    r = installed.root.run(["bash", str(INSTALL), "--version", "0.1.0"], check=False)
    assert r.returncode == 1 and "never fetched from a package index" in r.stderr, r.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_text('[project]\nname = "mptun-evil"\n')
    stray = tmp_path / "requirements.txt"
    stray.write_text("mptun\n")
    for path, why in ((other, "not an mptun checkout"), (stray, "not an mptun wheel or sdist")):
        r = installed.root.run(["bash", str(INSTALL), "--from", str(path)], check=False)
        assert r.returncode == 1, r.stdout
        assert r.stderr.strip().splitlines()[-1].startswith("install.sh: error: --from"), r.stderr
        assert why in r.stderr
    # nothing was touched: the earlier install is still there
    assert installed.root.exists("/opt/mptun/venv/bin/mptun")


def test_uninstall_removes_what_it_added(installed: Installed) -> None:
    root = installed.root
    installed.install("--uninstall")
    for path in (UNIT, SYSCTL, "/opt/mptun"):
        assert not root.exists(path), path
    assert root.exists("/etc/mptun/key")  # kept without --purge
    installed.install("--uninstall", "--purge")
    assert not root.exists("/etc/mptun")
