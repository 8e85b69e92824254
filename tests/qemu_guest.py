"""Run a command inside a throw-away QEMU guest booting a stock Debian kernel.

Why: kTLS and other kernels' MPTCP can only be tested for real on a kernel that has them, and the
build machine's own kernel (6.18, no CONFIG_TLS) does not. The guest boots Debian's signed
`linux-image-*-amd64` (kTLS as module `tls`, MPTCP built in) under software emulation (KVM does
not work on the build machines), sees this machine's whole filesystem read-only through 9p with a
tmpfs overlay on top (writes are allowed and discarded), runs one command in the current
directory, and reports its exit status and output. Boot takes ~5 s; everything in the guest is
several times slower than here, so guest tests are functional checks, never throughput.

    python3 tests/qemu_guest.py --setup [--kernel 6.1]
    python3 tests/qemu_guest.py [--kernel 6.12] [--timeout S] -- CMD ARGS...

The first run installs what it needs (as root): qemu-system-x86, busybox-static, kmod, and the
kernel package (downloaded and unpacked into /var/cache/mptun-vm, never installed). The guest has
no network but its own loopback (and the namespaces a test makes inside it).
"""

from __future__ import annotations

import argparse
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("MPTUN_VM_CACHE", "/var/cache/mptun-vm"))
PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "depmod": "kmod"}
# Modules the initrd loads to mount the host's filesystem (the rest load from the 9p root).
INITRD_MODULES = ["virtio_pci", "netfs", "9pnet_virtio", "9p", "overlay"]
KERNEL_SERIES = {"6.12": r"6\.12\.[0-9]+\+deb12-amd64", "6.1": r"6\.1\.0-[0-9]+-amd64"}


class GuestUnavailable(RuntimeError):
    """This machine cannot run the guest (not root, no package, no kernel): a skip reason."""


@dataclass
class Kernel:
    version: str  # e.g. 6.12.117+deb12-amd64
    root: Path  # the unpacked package (boot/vmlinuz-*, lib/modules/*)
    initrd: Path

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"


def _log(msg: str) -> None:
    print(f"qemu-guest: {msg}", file=sys.stderr, flush=True)


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env)


def _busybox() -> Path | None:
    for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if p.exists():
            out = subprocess.run(["file", "-L", str(p)], capture_output=True, text=True).stdout
            if "static" in out or not shutil.which("file"):
                return p
    return None


def install_tools() -> None:
    """qemu, a static busybox and kmod, from the distribution (root only)."""
    need = [pkg for tool, pkg in PACKAGES.items() if not shutil.which(tool)]
    if _busybox() is None:
        need.append("busybox-static")
    if not shutil.which("file"):
        need.append("file")
    if not need:
        return
    if os.geteuid() != 0:
        raise GuestUnavailable(f"needs root to install {' '.join(need)}")
    _log(f"installing {' '.join(need)}")
    r = _apt("install", "-y", "-q", "--no-install-recommends", *need)
    if r.returncode != 0:
        _apt("update", "-q")
        r = _apt("install", "-y", "-q", "--no-install-recommends", *need)
    if r.returncode != 0:
        raise GuestUnavailable(
            f"apt-get install {' '.join(need)} failed: {r.stderr.strip()[-300:]}"
        )


def _newest_kernel(series: str) -> str | None:
    pattern = KERNEL_SERIES[series]
    for attempt in range(2):
        out = subprocess.run(
            ["apt-cache", "search", "--names-only", f"^linux-image-{pattern}$"],
            capture_output=True,
            text=True,
        ).stdout
        found = re.findall(rf"^linux-image-({pattern}) ", out, re.M)
        if found:
            return sorted(found, key=lambda v: [int(x) for x in re.findall(r"\d+", v)])[-1]
        if attempt == 0 and os.geteuid() == 0:
            _apt("update", "-q")
    return None


def kernel(series: str = "6.12") -> Kernel:
    """The newest Debian kernel of a series, unpacked in the cache with its initrd built."""
    if series not in KERNEL_SERIES:
        raise GuestUnavailable(f"unknown kernel series {series} (know {', '.join(KERNEL_SERIES)})")
    install_tools()
    version = os.environ.get(f"MPTUN_VM_KVER_{series.replace('.', '_')}") or _newest_kernel(series)
    if not version:
        raise GuestUnavailable(f"no linux-image {series} package known to apt")
    root = CACHE / f"root-{version}"
    if not (root / ".done").exists():
        if os.geteuid() != 0:
            raise GuestUnavailable("needs root to fetch the kernel package")
        _log(f"fetching linux-image-{version}")
        debs = CACHE / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["apt-get", "download", "-q", f"linux-image-{version}"],
            cwd=debs,
            capture_output=True,
            text=True,
        )
        deb = next(debs.glob(f"linux-image-{version}_*.deb"), None)
        if r.returncode != 0 or deb is None:
            raise GuestUnavailable(f"apt-get download linux-image-{version}: {r.stderr.strip()}")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        subprocess.run(["depmod", "-b", str(root), version], check=True)
        deb.unlink()
        (root / ".done").touch()
    initrd = CACHE / f"initrd-{version}.img"
    if not initrd.exists() or initrd.stat().st_mtime < Path(__file__).stat().st_mtime:
        _build_initrd(root, version, initrd)
    return Kernel(version, root, initrd)


# The initrd's /init: load the 9p/overlay modules, mount the host's root read-only under a tmpfs
# overlay, mount the exchange folder, and switch to the host's system to run stage 2.
INIT = r"""#!/bin/busybox sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $(cat /mods/order); do insmod /mods/$m 2>/dev/null; done
io=; for x in $(cat /proc/cmdline); do case $x in mptun.io=*) io=${x#mptun.io=};; esac; done
die() { echo "guest: $*"; echo o > /proc/sysrq-trigger; sleep 5; }
o=trans=virtio,version=9p2000.L,msize=512000,access=any
mount -t 9p -o $o,ro hostroot /lower || die "cannot mount the host's root"
mount -t tmpfs -o mode=755 tmpfs /upper && mkdir /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot \
  || die "overlay failed"
mount -t 9p -o $o exchange /newroot$io || die "cannot mount the exchange folder"
umount /proc /sys /dev 2>/dev/null
exec switch_root /newroot /bin/sh $io/stage2.sh
"""

# Stage 2, PID 1 on the host's system: a minimal /dev, /proc, /run, the kernel's modules, then
# the command; its status goes to the exchange folder and the guest powers off.
STAGE2 = """#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run; mkdir -p /run/lock /run/netns
mkdir -p /lib/modules && ln -sfn {modules} /lib/modules/{version}
ip link set lo up
/bin/sh {io}/cmd.sh > {io}/output 2>&1 < /dev/null
echo $? > {io}/rc
sync; echo o > /proc/sysrq-trigger; sleep 10
"""


def _build_initrd(root: Path, version: str, out: Path) -> None:
    """A cpio (newc) archive: static busybox, the modules in INITRD_MODULES (and deps), /init."""
    moddir = root / "lib" / "modules" / version
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    byname = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def add(p: str) -> None:
        if p not in order:
            for d in deps[p]:
                add(d)
            order.append(p)

    for name in INITRD_MODULES:
        if name in byname:  # else built in
            add(byname[name])
    busybox = _busybox()
    if busybox is None:
        raise GuestUnavailable("no static busybox")
    files: list[tuple[str, int, bytes]] = [
        (d, 0o40755, b"") for d in ("dev", "proc", "sys", "bin", "mods", "lower", "upper")
    ]
    files.append(("newroot", 0o40755, b""))
    files.append(("bin/busybox", 0o100755, busybox.read_bytes()))
    names = []
    for p in order:
        data = (moddir / p).read_bytes()
        if p.endswith(".xz"):
            data = lzma.decompress(data)
        elif p.endswith(".zst"):
            raise GuestUnavailable("zstd-compressed kernel modules are not supported")
        name = Path(p).name.split(".ko")[0] + ".ko"
        files.append((f"mods/{name}", 0o100644, data))
        names.append(name)
    files.append(("mods/order", 0o100644, ("\n".join(names) + "\n").encode()))
    files.append(("init", 0o100755, INIT.encode()))
    buf = bytearray()
    for ino, (name, mode, data) in enumerate(files, 1):
        _cpio_entry(buf, ino, name, mode, data)
    _cpio_entry(buf, len(files) + 1, "dev/console", 0o20600, b"", rdev=(5, 1))
    _cpio_entry(buf, 0, "TRAILER!!!", 0, b"")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(bytes(buf))
    tmp.replace(out)
    _log(f"initrd {out.name}: {' '.join(names) or 'no modules (built in)'}")


def _cpio_entry(
    buf: bytearray, ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)
) -> None:
    raw = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
    buf += b"070701" + "".join(f"{v:08X}" for v in fields).encode() + raw
    buf += b"\0" * (-len(buf) % 4)
    buf += data
    buf += b"\0" * (-len(buf) % 4)


@dataclass
class GuestResult:
    returncode: int  # the command's; 125 when the guest never reported one
    output: str  # the command's stdout and stderr
    console: str  # the guest kernel's log (for boot failures)


def run(
    cmd: list[str],
    series: str = "6.12",
    timeout: float = 900,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> GuestResult:
    """Boot the guest, run `cmd` in `cwd` (default: here) with this environment, power off."""
    if os.geteuid() != 0:
        raise GuestUnavailable("needs root (9p export of /, kernel package)")
    k = kernel(series)
    with tempfile.TemporaryDirectory(prefix="mptun-vm.") as io:
        environ = {**os.environ, **(env or {})}
        lines = ["set +e"]
        for name, value in environ.items():
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name not in ("PWD", "OLDPWD"):
                lines.append(f"export {name}={shlex.quote(value)}")
        lines.append(f"cd {shlex.quote(cwd or os.getcwd())} || exit 126")
        lines.append(shlex.join(cmd))
        Path(io, "cmd.sh").write_text("\n".join(lines) + "\n")
        modules = k.root / "lib" / "modules" / k.version
        Path(io, "stage2.sh").write_text(STAGE2.format(modules=modules, version=k.version, io=io))
        console = Path(io, "console.log")
        qemu = [
            "qemu-system-x86_64", "-name", "mptun-guest", "-machine", "q35",
            # Single-threaded TCG: multi-threaded TCG oopsed in text_poke with -smp 2 here.
            "-accel", "tcg,thread=single", "-cpu", "max", "-smp", "2", "-m", "1536",
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-nic", "none", "-no-reboot",
            "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=exchange,path={io},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=exchange,mount_tag=exchange",
            "-kernel", str(k.image), "-initrd", str(k.initrd),
            "-append", f"console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off mptun.io={io}",
        ]  # fmt: skip
        try:
            subprocess.run(qemu, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # subprocess.run killed qemu; the result says the guest never finished
        rc_file, out_file = Path(io, "rc"), Path(io, "output")
        output = out_file.read_text(errors="replace") if out_file.exists() else ""
        text = console.read_text(errors="replace") if console.exists() else ""
        rc = int(rc_file.read_text().strip() or 125) if rc_file.exists() else 125
        return GuestResult(rc, output, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="6.12", choices=sorted(KERNEL_SERIES))
    ap.add_argument("--setup", action="store_true", help="install and unpack only")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("cmd", nargs="*")
    a = ap.parse_args()
    try:
        if a.setup:
            k = kernel(a.kernel)
            _log(f"ready: {k.version}")
            return 0
        if not a.cmd:
            ap.error("give a command after --")
        r = run(a.cmd, a.kernel, a.timeout)
    except GuestUnavailable as e:
        _log(str(e))
        return 2
    sys.stdout.write(r.output)
    if r.returncode == 125:
        _log("the guest reported no exit status; kernel log tail:")
        sys.stderr.write("\n".join(r.console.splitlines()[-30:]) + "\n")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
