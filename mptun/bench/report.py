"""Turns raw measurements into summaries, the terminal table, the target checks and a chart."""

from __future__ import annotations

import statistics
from pathlib import Path

from mptun.bench.cases import Case

ROUTE, INCUMBENT, KERNEL_MPTCP = "route", "ss-mptcp", "mptcp-kernel"
# the gateway cases (iperf3 through the router's redirect): the product's engines, the
# reference relay and the kernel's MPTCP with no relay
GW_SPLICE, GW_AEAD, GW_REFERENCE, GW_KERNEL = (
    "gw-splice",
    "gw-aead",
    "gw-reference",
    "gw-mptcp-kernel",
)
GW_CASES = (GW_SPLICE, GW_AEAD, GW_REFERENCE, GW_KERNEL)
STALL_SHARE = 0.5  # a run below this share of its case's median is a stall


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def summarize(results: dict) -> list[dict]:
    """One row per (link, case, direction): medians and spreads over the runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["link"], r["case"], r["direction"]), []).append(r)
    rows = []
    for (link, case, direction), runs in groups.items():
        ok = [r for r in runs if "mbps" in r]
        row: dict = {"link": link, "case": case, "direction": direction, "runs": len(ok)}
        row["errors"] = [r["error"] for r in runs if "error" in r]
        if ok:
            mbps = [r["mbps"] for r in ok]
            row.update(mbps=statistics.median(mbps), mbps_min=min(mbps), mbps_max=max(mbps))
            for end in ("client", "server", "machine"):
                per_gb = [r["cpu"][end] / (r["bytes"] / 1e9) for r in ok if end in r["cpu"]]
                if per_gb:
                    row[f"cpu_{end}"] = statistics.median(per_gb)
            receiving = "server" if direction == "up" else "client"
            row["cpu_receiving"] = row.get(f"cpu_{receiving}")
            rtts = [x for r in ok for x in r["rtt_ms"]]
            row["rtt_median"], row["rtt_p90"] = _pct(rtts, 0.5), _pct(rtts, 0.9)
            joins = [r["mp_joins"] for r in ok if "mp_joins" in r]
            if joins:
                row["mp_joins"] = statistics.median(joins)
            row["stalls"] = sum(m < STALL_SHARE * row["mbps"] for m in mbps)
            retrans = [sum(r["mptcp_retrans"].values()) for r in ok if "mptcp_retrans" in r]
            if retrans:
                row["retrans"] = statistics.median(retrans)
                row["retrans_max"] = max(retrans)
        rows.append(row)
    index = {(r["link"], r["case"], r["direction"]): r for r in rows}
    for row in rows:
        for ref, key in ((ROUTE, "x_route"), (INCUMBENT, "x_ss")):
            other = index.get((row["link"], ref, row["direction"]))
            if other and other.get("mbps") and row.get("mbps"):
                row[key] = row["mbps"] / other["mbps"]
        if row["case"] in GW_CASES:
            for ref, key in ((GW_REFERENCE, "x_reference"), (GW_KERNEL, "x_kernel")):
                other = index.get((row["link"], ref, row["direction"]))
                if other and other.get("mbps") and row.get("mbps"):
                    row[key] = row["mbps"] / other["mbps"]
    return rows


def gateway_table(rows: list[dict], cases: list[Case]) -> str:
    """The gateway cases side by side: against the reference relay and the kernel's MPTCP,
    stalls (runs below half the median) and MPTCP-level retransmissions per run."""
    sel = [r for r in rows if r["case"] in GW_CASES and r.get("mbps")]
    if not sel:
        return ""
    label = {c.id: c.label for c in cases}
    order = {c: i for i, c in enumerate(GW_CASES)}
    head = (
        f"{'case':38} {'dir':4} {'Mbit/s median [min-max]':>25} {'x ref':>6} {'x kern':>6} "
        f"{'stalls':>6} {'retrans p50/max':>15} {'client':>6} {'server':>6}"
    )
    out = ["", "== gateway: iperf3 through an nft redirect into --redir; CPU: s per GB", head]
    out.append("-" * len(head))
    for r in sorted(sel, key=lambda r: (r["link"], order[r["case"]], r["direction"] != "up")):
        spread = f"{r['mbps']:.0f} [{r['mbps_min']:.0f}-{r['mbps_max']:.0f}]"
        retrans = f"{_f(r.get('retrans'), '.0f')}/{_f(r.get('retrans_max'), '.0f')}"
        out.append(
            f"{label.get(r['case'], r['case']):38} {r['direction']:4} {spread:>25} "
            f"{_f(r.get('x_reference'), '.2f'):>6} {_f(r.get('x_kernel'), '.2f'):>6} "
            f"{r['stalls']:>3}/{r['runs']:<2} {retrans:>15} "
            f"{_f(r.get('cpu_client'), '.2f'):>6} {_f(r.get('cpu_server'), '.2f'):>6}"
        )
    return "\n".join(out)


def gateway_targets(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """Issue 17's gateway targets: splice >= 0.9x the reference relay and no stalls, splice
    at least as fast as aead with less CPU per GB (both ends)."""
    idx = {(r["link"], r["case"], r["direction"]): r for r in rows}
    checks: list[tuple[str, bool | None, str]] = []
    for link in sorted({r["link"] for r in rows if r["case"] == GW_SPLICE}):
        for d in ("up", "down"):
            sp, ref, ae = (idx.get((link, c, d)) for c in (GW_SPLICE, GW_REFERENCE, GW_AEAD))
            if not sp or not sp.get("mbps"):
                continue
            if ref and ref.get("mbps"):
                x = sp["mbps"] / ref["mbps"]
                checks.append(
                    (
                        f"{link} {d} gateway: splice vs reference relay",
                        x >= 0.9,
                        f"{x:.2f}x (need >= 0.9)",
                    )
                )
            worst = sp["mbps_min"] / sp["mbps"]
            # the reference's own worst run says whether a stall is the relay's or the kernel's
            theirs = (
                f"; reference relay {ref['mbps_min'] / ref['mbps']:.2f}x"
                if ref and ref.get("mbps")
                else ""
            )
            checks.append(
                (
                    f"{link} {d} gateway: splice's worst run vs its median",
                    worst >= STALL_SHARE,
                    f"{worst:.2f}x over {sp['runs']} runs (need >= {STALL_SHARE}){theirs}",
                )
            )
            if ae and ae.get("mbps"):
                x = sp["mbps"] / ae["mbps"]
                checks.append(
                    (f"{link} {d} gateway: splice vs aead", x >= 1.0, f"{x:.2f}x (need >= 1)")
                )
                mine = sp.get("cpu_client", 0.0) + sp.get("cpu_server", 0.0)
                theirs = ae.get("cpu_client", 0.0) + ae.get("cpu_server", 0.0)
                checks.append(
                    (
                        f"{link} {d} gateway: splice CPU/GB (both ends) vs aead",
                        mine < theirs,
                        f"{mine:.2f} vs {theirs:.2f} s/GB",
                    )
                )
    return checks


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def table(rows: list[dict], cases: list[Case], results: dict, meta: dict) -> str:
    """The terminal table: per link, one line per case and direction."""
    order = {c.id: i for i, c in enumerate(cases)}
    label = {c.id: c.label for c in cases}
    out = []
    head = (
        f"{'case':34} {'dir':4} {'Mbit/s median [min-max]':>27} {'x route':>7} {'x ss':>6} "
        f"{'client':>6} {'server':>6} {'machine':>7} {'RTT ms p50/p90':>15}"
    )
    for link in meta["links"]:
        rates = meta.get("shaped_mbit") if link == "shaped" else None
        title = f"{link} links" + (f" (tbf {'/'.join(map(str, rates))} Mbit)" if rates else "")
        out += ["", f"== {title}; CPU columns: seconds per GB relayed", head, "-" * len(head)]
        sel = sorted(
            (r for r in rows if r["link"] == link),
            key=lambda r: (order.get(r["case"], 99), r["direction"] != "up"),
        )
        for r in sel:
            if "mbps" not in r:
                out.append(
                    f"{label.get(r['case'], r['case']):34} {r['direction']:4} failed: "
                    + "; ".join(r["errors"])[:80]
                )
                continue
            spread = f"{r['mbps']:.0f} [{r['mbps_min']:.0f}-{r['mbps_max']:.0f}]"
            out.append(
                f"{label.get(r['case'], r['case']):34} {r['direction']:4} {spread:>27} "
                f"{_f(r.get('x_route'), '.2f'):>7} {_f(r.get('x_ss'), '.2f'):>6} "
                f"{_f(r.get('cpu_client'), '.2f'):>6} {_f(r.get('cpu_server'), '.2f'):>6} "
                f"{_f(r.get('cpu_machine'), '.2f'):>7} "
                f"{_f(r.get('rtt_median'), '.2f') + '/' + _f(r.get('rtt_p90'), '.1f'):>15}"
            )
    if results.get("connrate"):
        out += ["", "== connections opened and closed per second (SOCKS5 CONNECT + 4-byte echo)"]
        for m in sorted(results["connrate"], key=lambda m: order.get(m["case"], 99)):
            if "per_s" not in m:
                out.append(f"{label.get(m['case'], m['case']):34} failed: {m.get('error')}")
                continue
            n = max(m["connections"], 1)
            cpu = ", ".join(
                f"{k} {v / n * 1e3:.2f} ms" for k, v in m["cpu"].items() if k != "machine"
            )
            out.append(
                f"{label.get(m['case'], m['case']):34} {m['per_s']:8.0f}/s  "
                f"errors {m['errors']}  CPU per connection: {cpu or '-'}"
            )
    if results.get("idle"):
        out += ["", "== RSS added by idle tunneled connections"]
        for m in results["idle"]:
            if "per_connection" not in m:
                out.append(f"{label.get(m['case'], m['case']):34} failed: {m.get('error')}")
                continue
            per = ", ".join(
                f"{e} {v / 1024:.1f} KiB/conn (+{v * m['connections'] / 2**20:.1f} MiB)"
                for e, v in m["per_connection"].items()
            )
            out.append(f"{label.get(m['case'], m['case']):34} {m['connections']} conns: {per}")
    return "\n".join(out)


def targets(rows: list[dict], results: dict) -> list[tuple[str, bool | None, str]]:
    """The issue's targets, each (what, held?, the numbers); None when a case is missing."""
    idx = {(r["link"], r["case"], r["direction"]): r for r in rows}
    checks: list[tuple[str, bool | None, str]] = []

    def ratio(link, case, ref, direction, need, what):
        a, b = idx.get((link, case, direction)), idx.get((link, ref, direction))
        if not a or not b or not a.get("mbps") or not b.get("mbps"):
            checks.append((what, None, "not measured"))
            return
        x = a["mbps"] / b["mbps"]
        checks.append((what, x >= need, f"{x:.2f}x (need >= {need})"))

    for d in ("up", "down"):
        ratio("raw", "splice-mptcp", ROUTE, d, 0.75, f"raw {d}: splice/MPTCP vs route/NAT")
        ratio("raw", "splice-mptcp", INCUMBENT, d, 5.0, f"raw {d}: splice/MPTCP vs ss-libev")
        ratio("raw", "splice-tcp", ROUTE, d, 0.85, f"raw {d}: splice/TCP vs route/NAT")
        a = idx.get(("shaped", "splice-mptcp", d))
        s = idx.get(("shaped", INCUMBENT, d))
        if a and a.get("mbps"):
            x = a["mbps"] / 200.0
            checks.append((f"shaped {d}: aggregate vs link sum", x >= 0.93, f"{x:.3f} of 200 Mbit"))
        if a and s and a.get("cpu_receiving") and s.get("cpu_receiving"):
            x = a["cpu_receiving"] / s["cpu_receiving"]
            checks.append(
                (
                    f"shaped {d}: receiving-end CPU/GB vs ss-libev",
                    x <= 0.5,
                    f"{a['cpu_receiving']:.2f} vs {s['cpu_receiving']:.2f} s/GB = {x:.2f}x "
                    "(need <= 0.5)",
                )
            )
        if a and s and a.get("rtt_median") is not None and s.get("rtt_median") is not None:
            gap = a["rtt_median"] - s["rtt_median"]
            checks.append(
                (
                    f"shaped {d}: RTT under load vs ss-libev",
                    gap <= 2.0,
                    f"{a['rtt_median']:.2f} vs {s['rtt_median']:.2f} ms (need <= +2 ms)",
                )
            )
        # Issue 5: encrypted bulk data in user space over MPTCP against the incumbent (both
        # encrypt with AES-256-GCM): at least twice the throughput, at most half the CPU per GB
        # of both ends together.
        ratio("raw", "aead-mptcp", INCUMBENT, d, 2.0, f"raw {d}: aead/MPTCP vs ss-libev")
        a, s = idx.get(("raw", "aead-mptcp", d)), idx.get(("raw", INCUMBENT, d))
        if a and s and a.get("cpu_client") is not None and s.get("cpu_client") is not None:
            mine = a["cpu_client"] + a.get("cpu_server", 0.0)
            theirs = s["cpu_client"] + s.get("cpu_server", 0.0)
            x = mine / theirs if theirs else float("inf")
            checks.append(
                (
                    f"raw {d}: aead/MPTCP CPU/GB of both ends vs ss-libev",
                    x <= 0.5,
                    f"{mine:.2f} vs {theirs:.2f} s/GB = {x:.2f}x (need <= 0.5)",
                )
            )
    for m in results.get("idle", []):
        if m["case"] == "splice-mptcp" and "per_connection" in m:
            worst = max(m["per_connection"].values()) * m["connections"] / 2**20
            checks.append(
                (
                    f"{m['connections']} idle connections, RSS per mptun process",
                    worst <= 50 * m["connections"] / 1000,
                    f"+{worst:.1f} MiB worst end (need <= 50 MiB per 1000)",
                )
            )
    return checks


def context(rows: list[dict]) -> list[str]:
    """No gate: how the raw MPTCP cases compare with the kernel's MPTCP alone (no relay), which
    bounds what any relay over this kernel's MPTCP can reach."""
    idx = {(r["link"], r["case"], r["direction"]): r for r in rows}
    out = []
    for d in ("up", "down"):
        k, route = idx.get(("raw", KERNEL_MPTCP, d)), idx.get(("raw", ROUTE, d))
        if not k or not k.get("mbps"):
            continue
        parts = []
        if route and route.get("mbps"):
            parts.append(f"kernel MPTCP alone {k['mbps'] / route['mbps']:.2f}x route/NAT")
        for case in ("splice-mptcp", "copy-mptcp", "aead-mptcp", INCUMBENT):
            c = idx.get(("raw", case, d))
            if c and c.get("mbps"):
                parts.append(f"{case} {c['mbps'] / k['mbps']:.2f}x kernel MPTCP")
        out.append(f"raw {d}: " + "; ".join(parts))
    return out


def format_context(lines: list[str]) -> str:
    if not lines:
        return ""
    return "\n".join(
        ["", "== context (no target): against the kernel's MPTCP with no relay", *lines]
    )


def format_targets(checks: list[tuple[str, bool | None, str]]) -> str:
    out = ["", "== targets, ratios from this run"]
    for what, ok, detail in checks:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[ok]
        out.append(f"{mark}  {what}: {detail}")
    return "\n".join(out)


def chart(rows: list[dict], cases: list[Case], path: Path) -> str:
    """A PNG: throughput and receiving-end CPU per GB, per link; needs matplotlib (`chart`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install 'mptun[chart]')"
    links = sorted({r["link"] for r in rows}, key=lambda link: link != "raw")
    if not links:  # every case skipped: matplotlib refuses a figure of no columns
        return "chart skipped: nothing measured"
    ids = [c.id for c in cases if any(r["case"] == c.id for r in rows)]
    fig, axes = plt.subplots(2, len(links), figsize=(6 * len(links), 8), squeeze=False)
    for col, link in enumerate(links):
        for rowi, (key, title) in enumerate(
            (("mbps", "throughput, Mbit/s"), ("cpu_receiving", "receiving-end CPU s/GB"))
        ):
            ax = axes[rowi][col]
            width = 0.4
            for k, d in enumerate(("up", "down")):
                vals = []
                for cid in ids:
                    r = next(
                        (
                            x
                            for x in rows
                            if (x["link"], x["case"], x["direction"]) == (link, cid, d)
                        ),
                        None,
                    )
                    vals.append((r or {}).get(key) or 0)
                ax.bar([i + (k - 0.5) * width for i in range(len(ids))], vals, width, label=d)
            ax.set_xticks(range(len(ids)), ids, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{link}: {title}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"chart: {path}"
