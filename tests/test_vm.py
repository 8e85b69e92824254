"""Other kernels for real: pytest runs inside a QEMU guest booting a stock Debian kernel.

- 6.12 (kTLS as module `tls`): a kTLS end against a user-space aead end both ways, splice in and
  out of the kTLS socket, the closing record, every failure seen by kTLS RX, and `auto` taking
  kTLS on TCP but falling back to aead on MPTCP sockets (tests/test_ktls.py and the ktls cases of
  tests/test_relay_aead.py, which skip on this machine's kTLS-less kernel).
- 6.1 (the oldest kernel mptun supports): the MPTCP functional tests (relay engines over MPTCP,
  a real MPTCP tunnel between processes, the namespace test bed with TCP fallback) and the MPTCP
  refusal of kTLS. Throughput is never measured in a guest (software emulation).

tests/qemu_guest.py installs what it needs on first use (qemu, busybox-static, kmod, the kernel
package); without root or without the packages these skip with the reason.
"""

from __future__ import annotations

import sys

import pytest

from tests import qemu_guest
from tests.helpers import ROOT

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(1800)]

# The guest runs everything ~10x slower (software CPU): helpers.wait_listening scales by this.
GUEST_ENV = {"MPTUN_TEST_SLOWDOWN": "10"}


def run_pytest_in_guest(series: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args]
    try:
        r = qemu_guest.run(cmd, series, timeout=1500, env=GUEST_ENV, cwd=str(ROOT))
    except qemu_guest.GuestUnavailable as e:
        pytest.skip(f"no {series} guest: {e}")
    tail = "\n".join(r.console.splitlines()[-20:])
    assert r.returncode == 0, f"{r.output[-8000:]}\n--- guest kernel log ---\n{tail}"
    summary = r.output.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, r.output[-4000:]
    return r.output


def test_ktls_in_a_debian_6_12_guest() -> None:
    out = run_pytest_in_guest(
        "6.12", "tests/test_ktls.py", "tests/test_relay_aead.py", "-k", "ktls"
    )
    print(out.strip().splitlines()[-1])


def test_mptcp_and_ktls_in_a_debian_6_1_guest() -> None:
    out = run_pytest_in_guest(
        "6.1",
        "tests/test_relay.py",
        "tests/test_netns_basics.py",
        "tests/test_e2e_loopback.py::test_tunnel_really_is_mptcp",
        "tests/test_ktls.py::test_mptcp_sockets_refuse_ktls_and_auto_falls_back_to_aead",
        "tests/test_ktls.py::test_kernel_end_and_user_space_end_interoperate",
    )
    print(out.strip().splitlines()[-1])
