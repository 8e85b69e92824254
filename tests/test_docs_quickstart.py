"""The README's quick start, run as written: its shell lines, verbatim, in namespaces.

    router ns                       vps ns                            inet ns
    mptun client, curl  --veth--  mptun server  --veth--  https://example.com (test CA)
    198.51.100.1              198.51.100.2 | 203.0.113.1                  203.0.113.2

What differs from a real machine is only the world around the commands: /etc/mptun is a tmp
directory, `vps.example.net` and `example.com` come from /etc/netns/NS/hosts (bind-mounted over
/etc/hosts by `ip netns exec`), curl trusts a test CA (CURL_CA_BUNDLE), and the server gets
MPTUN_ALLOW_TARGET for the test bed's documentation range (its default policy refuses it, as it
should). Each line runs through bash, so its quoting and globbing are what a user's shell does.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_netns
from tests.helpers import wait_listening

pytestmark = [pytest.mark.root, pytest.mark.netns]

README = Path(__file__).resolve().parent.parent / "README.md"
BODY = os.urandom(200_000)
HTTPS_SERVER = """\
import http.server, ssl, sys
body = open(sys.argv[1], "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("203.0.113.2", 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


def quick_start() -> dict[str, list[str]]:
    """The quick start's shell lines by where they run: setup, vps, router."""
    text = README.read_text()
    m = re.search(r"## Quick start\s+```sh\n(.*?)```", text, re.S)
    assert m, "README.md: no ```sh block under ## Quick start"
    parts: dict[str, list[str]] = {"setup": [], "vps": [], "router": []}
    where = "setup"
    for line in m.group(1).splitlines():
        if re.match(r"#\s*on the VPS", line):
            where = "vps"
        elif re.match(r"#\s*on the router", line):
            where = "router"
        elif line.strip() and not line.lstrip().startswith("#"):
            parts[where].append(line.strip())
    return parts


def test_quick_start_block_is_what_this_test_runs() -> None:
    """The lines this test skips are the venv ones (the test runs inside that venv)."""
    parts = quick_start()
    skipped = [ln for ln in parts["setup"] if ln.startswith(("make ", ". "))]
    assert [ln.split()[0] for ln in skipped] == ["make", "."], parts["setup"]
    assert any(ln.startswith("mptun server") for ln in parts["vps"])
    assert any(ln.startswith("mptun client") for ln in parts["router"])
    assert any(ln.startswith("curl") for ln in parts["router"])


def make_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """A test CA and a certificate for example.com signed by it: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: str, key, signer, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            )
        return b.sign(signer, hashes.SHA256())

    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = build("mptun test CA", "mptun test CA", ca_key, ca_key, True)
    leaf = build("example.com", "mptun test CA", leaf_key, ca_key, False)
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "cert.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict]:
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    router, vps, inet = Netns("router"), Netns("vps"), Netns("inet")
    etc_dirs = []
    try:
        s = router.suffix
        vps_suffix = vps.suffix
        subprocess.run(
            ["ip", "link", "add", f"r{s}", "netns", router.name, "type", "veth", "peer", "name",
             f"v{s}", "netns", vps.name],
            check=True,
        )  # fmt: skip
        subprocess.run(
            ["ip", "link", "add", f"w{vps_suffix}", "netns", vps.name, "type", "veth", "peer",
             "name", f"i{vps_suffix}", "netns", inet.name],
            check=True,
        )  # fmt: skip
        for ns, dev, addr in [
            (router, f"r{s}", "198.51.100.1/24"),
            (vps, f"v{s}", "198.51.100.2/24"),
            (vps, f"w{vps_suffix}", "203.0.113.1/24"),
            (inet, f"i{vps_suffix}", "203.0.113.2/24"),
        ]:
            ns.ip("addr", "add", addr, "dev", dev)
            ns.ip("link", "set", dev, "up")
        for ns, hosts in [
            (router, "198.51.100.2 vps.example.net\n"),
            (vps, "203.0.113.2 example.com\n"),
        ]:
            d = Path("/etc/netns") / ns.name
            d.mkdir(parents=True)
            etc_dirs.append(d)
            (d / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{hosts}")
        yield {"router": router, "vps": vps, "inet": inet, "tmp": tmp_path}
    finally:
        for ns in (router, vps, inet):
            ns.delete()
        for d in etc_dirs:
            shutil.rmtree(d, ignore_errors=True)


def shell(line: str, tmp: Path, etc: Path) -> list[str]:
    """bash -c LINE, with /etc/mptun moved to the test's directory."""
    return ["bash", "-c", line.replace("/etc/mptun", str(etc))]


def test_readme_quick_start_runs_as_written(world: dict) -> None:
    tmp: Path = world["tmp"]
    etc = tmp / "etc-mptun"
    parts = quick_start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MPTUN_")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    for line in parts["setup"]:
        if line.startswith(("make ", ". ")):
            continue
        r = subprocess.run(
            shell(line, tmp, etc), cwd=tmp, env=env, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, (line, r.stderr)
    key_line = (etc / "key").read_text().strip()
    assert (etc / "key").stat().st_mode & 0o777 == 0o600

    (tmp / "body").write_bytes(BODY)
    ca, cert, key = make_ca(tmp)
    (tmp / "https.py").write_text(HTTPS_SERVER)
    https = world["inet"].popen([sys.executable, str(tmp / "https.py"), str(tmp / "body"),
                                 str(cert), str(key)])  # fmt: skip
    wait_listening("[::]", 443, 15.0, https, prefix=world["inet"].prefix())

    logs = {}
    # --log-connections: the server's line naming example.com shows the bytes went through it
    vps_env = {**env, "MPTUN_ALLOW_TARGET": "203.0.113.0/24", "MPTUN_LOG_CONNECTIONS": "1"}
    for where, ns, run_env in [("vps", world["vps"], vps_env), ("router", world["router"], env)]:
        for i, line in enumerate(parts[where]):
            if line.startswith(("mptun server", "mptun client")):
                log = tmp / f"{where}{i}.log"
                logs[where] = log
                proc = ns.popen(
                    shell(line, tmp, etc),
                    cwd=tmp,
                    env=run_env,
                    stdout=subprocess.DEVNULL,
                    stderr=log.open("wb"),
                )
                port = int(re.search(r"(?:listen|socks) \S*?:(\d+)", line).group(1))
                wait_listening("[::]", port, 15.0, proc, prefix=ns.prefix())
            elif line.startswith("curl"):
                r = subprocess.run(
                    [*ns.prefix(), *shell(line, tmp, etc)],
                    cwd=tmp,
                    env={**run_env, "CURL_CA_BUNDLE": str(ca)},
                    capture_output=True,
                    timeout=60,
                )
                assert r.returncode == 0, (r.stderr.decode(), logs)
                assert r.stdout == BODY
            else:
                raise AssertionError(f"the quick start has a line this test does not know: {line}")
    for where, log in logs.items():
        text = log.read_text()
        assert key_line not in text, f"{where} logged the key"
    assert "example.com" in logs["vps"].read_text()
