"""`mptun demo`: one TCP connection gets the sum of three shaped uplinks, live, then cleans up.

Everything happens in network namespaces this command creates (mptun.lab.testbed) with
documentation addresses only; nothing outside them changes. Ctrl-C (or SIGTERM) at any point
stops the processes and deletes the namespaces before exiting.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from mptun.commands.options import Number, option
from mptun.lab.netns import have_mptcp
from mptun.lab.rig import SERVER_PORT, Rig, mptun_argv
from mptun.lab.testbed import SERVER_V4, Testbed, diagram

NOT_ROOT = """\
mptun demo builds a small network inside this machine: four network namespaces, three virtual
uplinks shaped to {rates} Mbit/s, an mptun server and client between them. That needs root
(CAP_NET_ADMIN and CAP_SYS_ADMIN). Run it as root, e.g. `sudo make demo` or
`sudo .venv/bin/mptun demo`. Nothing was changed."""

NO_MPTCP = """\
This kernel has no Multipath TCP ({why}). mptun still tunnels without it, over one uplink as
plain TCP, but the demo is about adding uplinks up: it needs Linux 5.6 or later built with
CONFIG_MPTCP=y (the stock kernels of Debian 11+, Ubuntu 22.04+ and Fedora have it).
Nothing was changed."""


def _parse_rates(text: str, param: click.Parameter | None = None) -> tuple[float, ...]:
    """`100,60,40` -> (100.0, 60.0, 40.0): one to three uplinks, each 1-2000 Mbit/s."""
    try:
        rates = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give Mbit/s per uplink, e.g. 100,60,40", param=param
        ) from None
    if not 1 <= len(rates) <= 3 or any(not 1 <= r <= 2000 for r in rates):
        raise click.BadParameter("one to three uplinks, each 1-2000 Mbit/s", param=param)
    return rates


def _mbit(n_bytes: float, seconds: float) -> float:
    return n_bytes * 8 / seconds / 1e6 if seconds > 0 else 0.0


class _Reader(threading.Thread):
    """Collects the JSON rows a helper process prints (fetch progress, uplink counters)."""

    def __init__(self, rows: Iterator[dict]) -> None:
        super().__init__(daemon=True)
        self.source = rows
        self.rows: list[dict] = []

    def run(self) -> None:
        try:
            for row in self.source:
                self.rows.append(row)
        except (ValueError, OSError):
            pass


@contextmanager
def _teardown_guard() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (both end in the same cleanup)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@click.command()
@option(
    "seconds",
    type=Number(3, 120),
    default=10,
    help="How long the transfer runs.",
)
@option(
    "rates",
    default="100,60,40",
    callback=lambda ctx, param, value: _parse_rates(value, param),
    help="Mbit/s of each uplink (one to three), shaped with tbf both ways.",
)
def demo(seconds: float, rates: tuple[float, ...]) -> None:
    """The multipath demo: one TCP connection over three shaped uplinks, live, then cleanup.

    Needs root and a kernel with MPTCP; it says so, changing nothing, when either is missing.
    """
    link_rates = rates
    say = click.echo
    if os.geteuid() != 0:
        say(NOT_ROOT.format(rates=" / ".join(f"{r:g}" for r in link_rates)), err=True)
        raise SystemExit(2)
    ok, why = have_mptcp()
    if not ok:
        say(NO_MPTCP.format(why=why), err=True)
        raise SystemExit(2)
    missing = [t for t in ("ip", "tc", "ss") if shutil.which(t) is None]
    if missing:
        say(f"mptun demo needs {', '.join(missing)} (iproute2): apt-get install iproute2", err=True)
        raise SystemExit(2)
    from mptun.client.netlink import import_pyroute2

    import_pyroute2("mptun demo")
    total = sum(link_rates)
    tb = Testbed(rates_mbit=link_rates)
    rig: Rig | None = None
    workdir: Path | None = None
    code = 0
    with _teardown_guard():
        try:
            workdir = Path(tempfile.mkdtemp(prefix=f"mptun-demo-{tb.suffix}-"))
            rig = _run(tb, workdir, seconds, link_rates, total)
        except KeyboardInterrupt:
            say("\ninterrupted: stopping the processes and deleting the namespaces ...")
            code = 130
        except Exception as e:  # report, clean up, exit 1: never leave namespaces behind
            say(f"mptun demo failed: {type(e).__name__}: {e}", err=True)
            code = 1
        finally:
            # from here on neither Ctrl-C nor SIGTERM can cut the cleanup short
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            tb.destroy()
            if rig is not None:
                rig.close()
                if code == 1:
                    say(rig.dump_logs(), err=True)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            say(f"cleaned up: processes stopped, namespaces mpt-{tb.suffix}-* deleted.")
    if code:
        raise SystemExit(code)


def _run(
    tb: Testbed, workdir: Path, seconds: float, link_rates: tuple[float, ...], total: float
) -> Rig:
    say = click.echo
    names = [u.router_if for u in tb.uplinks]
    say(
        f"mptun demo: one TCP connection over {len(names)} uplinks shaped to "
        f"{' + '.join(f'{r:g}' for r in link_rates)} = {total:g} Mbit/s.\n"
    )
    say("The network it builds inside this machine (namespaces, deleted at the end):")
    say(diagram() + "\n")
    t = time.monotonic()
    say(f"[1/5] test bed: namespaces mpt-{tb.suffix}-lan/router/vps/inet, uplinks shaped ...")
    tb.build()
    say(f"      built in {time.monotonic() - t:.1f} s")
    rig = Rig(tb, workdir, uplinks=None)
    say(f"[2/5] vps: mptun server --listen [::]:{SERVER_PORT} (MPTCP; {SERVER_V4} on its lo)")
    say(f"[3/5] router: mptun client --server {SERVER_V4}:{SERVER_PORT} --socks 192.0.2.1:1080")
    rig.start()
    say(f"[4/5] router: mptun uplinks {' '.join(names)}  (a routing table, two rules and an")
    say("      MPTCP `subflow` endpoint per uplink address: each subflow leaves by its own link)")
    rig.uplinks = names
    out = rig.configure_uplinks()
    n = len(out.splitlines())
    say(f"      {n} changes; `mptun uplinks --show` now says:")
    assert tb.router is not None
    shown = tb.router.exec(*mptun_argv("uplinks", "--show")).stdout
    say("\n".join("        " + ln for ln in shown.splitlines() if "IPv6" not in ln))
    say(
        f"[5/5] lan host: one TCP connection through the tunnel (SOCKS5) for {seconds:g} s;"
        " download rate per uplink (Mbit/s):\n"
    )
    head = "  time " + "".join(
        f"{n + f' ({r:g})':>13}" for n, r in zip(names, link_rates, strict=True)
    )
    say(head + "    uplinks sum        one connection")
    sampler = rig.counters(0.5)
    counters = _Reader(_json_rows(sampler.stdout))
    counters.start()
    deadline = time.monotonic() + 10
    while not counters.rows and time.monotonic() < deadline:  # a first sample to count from
        time.sleep(0.05)
    f = rig.fetch(seconds, interval=0.5)
    fetch = _Reader(f.rows())
    fetch.start()
    start = time.monotonic()
    status_text = ""
    last: dict | None = counters.rows[-1] if counters.rows else None
    tick = 1
    while tick <= seconds:  # a row a second for the `seconds` it said; then wait for the end
        time.sleep(max(0.0, start + tick - time.monotonic()))
        rows = [r for r in counters.rows if r.get("event") == "counters"]
        prog = [
            {"mono": r["mono"], "bytes": r.get("bytes", 0)}
            for r in fetch.rows
            if r.get("event") in ("start", "progress", "done")
        ]
        if rows and last is not None and rows[-1]["mono"] - last["mono"] >= 0.5:
            now = rows[-1]
            dt = now["mono"] - last["mono"]
            per = [_mbit(now["rx"][n] - last["rx"][n], dt) for n in names]
            goodput = _window(prog, now["mono"] - 1, now["mono"])
            s = sum(per)
            say(
                f"  {tick:>3.0f} s"
                + "".join(f"{p:>13.1f}" for p in per)
                + f"    {s:6.1f} of {total:g} {s / total:4.0%}"
                + f"    {goodput:6.1f} Mbit/s"
            )
            last = now
        elif rows and last is None:
            last = rows[-1]
        if tick == max(2, int(seconds / 2)):
            status_text = tb.router.exec(*mptun_argv("status"), check=False).stdout
        tick += 1
    f.proc.wait(30)
    fetch.join(5)
    sampler.terminate()
    done = next((r for r in fetch.rows if r.get("event") == "done"), None)
    prog = [r for r in fetch.rows if r.get("event") in ("start", "progress", "done")]
    say("")
    if status_text:
        say("mid-transfer, `mptun status` in the router showed the connection's subflows:")
        keep = status_text.split("\nuplinks:")[0]
        say("\n".join("  " + ln for ln in keep.splitlines()) + "\n")
    if done is None or not prog:
        raise RuntimeError("the transfer did not finish")
    begin = prog[0]["mono"]
    window = (begin + 2, begin + seconds) if seconds >= 4 else (begin, begin + seconds)
    rate = _window(prog, *window)
    sent = rig.sent_totals()
    intact = done["ok"] and sent == [done["bytes"]]
    say(
        f"result: the one connection averaged {rate:.1f} Mbit/s over seconds "
        f"{window[0] - begin:.0f}-{window[1] - begin:.0f}: {rate / total:.0%} of the "
        f"{total:g} Mbit/s the uplinks add up to (the fastest alone: {max(link_rates):g})."
    )
    say(
        f"        {done['bytes'] / 1e6:.1f} MB, every byte checked against the sender's pattern: "
        + ("intact, nothing lost or duplicated." if intact else f"NOT intact: {done}")
    )
    return rig


def _window(rows: list[dict], t0: float, t1: float) -> float:
    inside = [r for r in rows if t0 <= r["mono"] <= t1 and "bytes" in r]
    if len(inside) < 2:
        return 0.0
    a, b = inside[0], inside[-1]
    return _mbit(b["bytes"] - a["bytes"], b["mono"] - a["mono"])


def _json_rows(stream) -> Iterator[dict]:
    import json

    for line in stream:
        if line.startswith("{"):
            yield json.loads(line)


if __name__ == "__main__":  # pragma: no cover
    demo(sys.argv[1:])
