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

Check = tuple[str, bool | None, str]  # what (its issue's tag first), held? (None: n/a), numbers

# The issues whose targets the bench checks, by tag: each target line starts with its tag.
FIRST, GATEWAY, ROUTER, UDP = "#8", "#17", "#18", "#14"
ISSUES = {
    FIRST: "the first bench targets",
    UDP: "UDP from the LAN",
    GATEWAY: "splice in gateway mode",
    ROUTER: "a router's CPU budget",
}
SHAPED_SUM_MBIT = 200.0  # the shaped uplinks' sum when a run does not say (100/60/40)
# Issue 17's thresholds
SPLICE_VS_REFERENCE = 0.9
SPLICE_TCP_VS_ROUTE = 0.9
AEAD_VS_SS = 3.0
AEAD_CPU_VS_SS = 0.4
SHAPED_SHARE = 0.93
SHAPED_CPU_VS_SS = 0.5
# Issue 18's connection case: mptun's defaults (`--bulk auto` is aead over MPTCP) and plain
CONNRATE_CASES = (
    ("aead-mptcp", "mptun defaults (aead/MPTCP)"),
    ("splice-mptcp", "mptun --bulk plain (splice/MPTCP)"),
)
CONNRATE_VS_SS = 0.8
CONN_CPU_VS_SS = 2.0


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


def gateway_targets(rows: list[dict]) -> list[Check]:
    """Issue 17's gateway targets: splice >= 0.9x the reference relay and no stalls, splice
    at least as fast as aead with less CPU per GB (both ends); n/a on the raw links when the
    gateway cases did not run."""
    idx = {(r["link"], r["case"], r["direction"]): r for r in rows}
    checks: list[Check] = []
    if not any(r["case"] == GW_SPLICE and r.get("mbps") for r in rows):
        return [("raw gateway: splice vs reference relay", None, f"not measured ({GW_SPLICE})")]
    for link in sorted({r["link"] for r in rows if r["case"] == GW_SPLICE}):
        for d in ("up", "down"):
            sp, ref, ae = (idx.get((link, c, d)) for c in (GW_SPLICE, GW_REFERENCE, GW_AEAD))
            if not sp or not sp.get("mbps"):
                continue
            kern = idx.get((link, GW_KERNEL, d))
            if ref and ref.get("mbps"):
                x = sp["mbps"] / ref["mbps"]
                # issue 17: both against the kernel's MPTCP with no relay, as context
                context = (
                    f"; context: splice {sp['mbps'] / kern['mbps']:.2f}x, reference "
                    f"{ref['mbps'] / kern['mbps']:.2f}x mptcp-kernel"
                    if kern and kern.get("mbps")
                    else ""
                )
                checks.append(
                    (
                        f"{link} {d} gateway: splice vs reference relay",
                        x >= SPLICE_VS_REFERENCE,
                        f"{x:.2f}x (need >= {SPLICE_VS_REFERENCE:g}){context}",
                    )
                )
            else:
                checks.append(
                    (f"{link} {d} gateway: splice vs reference relay", None, "not measured")
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


def tag(issue: str, checks: list[Check]) -> list[Check]:
    """The same checks, each naming the issue whose target it is."""
    return [(f"{issue} {what}", ok, detail) for what, ok, detail in checks]


def _both_ends(row: dict) -> float:
    return row.get("cpu_client", 0.0) + row.get("cpu_server", 0.0)


def _measured(row: dict | None) -> bool:
    return bool(row and row.get("mbps"))


def targets(rows: list[dict], results: dict, shaped_sum: float | None = None) -> list[Check]:
    """Every target the bench's own cases measure (issues 8, 17 and 18's connection case), each
    (what, held?, the numbers), n/a when a case is missing; the budget, pages and UDP studies
    add theirs (`tag` them). `shaped_sum`: the shaped uplinks' Mbit/s together."""
    return (
        raw_targets(rows)
        + tag(GATEWAY, gateway_targets(rows))
        + shaped_targets(rows, shaped_sum or SHAPED_SUM_MBIT)
        + connrate_targets(results.get("connrate", []))
        + idle_targets(results.get("idle", []))
    )


def raw_targets(rows: list[dict]) -> list[Check]:
    """The unshaped links through SOCKS (the bench's generator): issue 17's splice and aead
    targets and issue 8's splice targets."""
    idx = {(r["link"], r["case"], r["direction"]): r for r in rows}
    checks: list[Check] = []

    def ratio(case: str, ref: str, d: str, need: float, what: str) -> None:
        a, b = idx.get(("raw", case, d)), idx.get(("raw", ref, d))
        if not _measured(a) or not _measured(b):
            checks.append((what, None, f"not measured ({case} and {ref} needed)"))
            return
        x = a["mbps"] / b["mbps"]
        checks.append((what, x >= need, f"{x:.2f}x (need >= {need:g})"))

    def cpu(case: str, ref: str, d: str, need: float | None, what: str) -> None:
        """Both ends' CPU per GB: at most `need` times the other's (None: strictly less)."""
        a, b = idx.get(("raw", case, d)), idx.get(("raw", ref, d))
        if not a or not b or a.get("cpu_client") is None or b.get("cpu_client") is None:
            checks.append((what, None, f"not measured ({case} and {ref} needed)"))
            return
        mine, theirs = _both_ends(a), _both_ends(b)
        x = mine / theirs if theirs else float("inf")
        held = x <= need if need is not None else mine < theirs
        bar = f"need <= {need:g}" if need is not None else "need < 1"
        checks.append((what, held, f"{mine:.2f} vs {theirs:.2f} s/GB = {x:.2f}x ({bar})"))

    for d in ("up", "down"):
        g = f"{GATEWAY} raw {d}"
        sp, kern = idx.get(("raw", "splice-mptcp", d)), idx.get(("raw", KERNEL_MPTCP, d))
        context = (
            f"; context: splice/MPTCP {sp['mbps'] / kern['mbps']:.2f}x mptcp-kernel"
            if _measured(sp) and _measured(kern)
            else ""
        )
        checks.append(
            (
                f"{g}: splice/MPTCP vs the reference relay through SOCKS",
                None,
                "no such case: the reference relay runs in the gateway cases only "
                f"(gw-reference, below){context}",
            )
        )
        if _measured(sp):
            worst = sp["mbps_min"] / sp["mbps"]
            checks.append(
                (
                    f"{g}: splice/MPTCP's worst run vs its median",
                    worst >= STALL_SHARE,
                    f"{worst:.2f}x over {sp['runs']} runs (need >= {STALL_SHARE:g})",
                )
            )
        else:
            checks.append((f"{g}: splice/MPTCP's worst run vs its median", None, "not measured"))
        ratio("splice-mptcp", "aead-mptcp", d, 1.0, f"{g}: splice/MPTCP vs aead/MPTCP")
        cpu("splice-mptcp", "aead-mptcp", d, None, f"{g}: splice/MPTCP CPU/GB (both ends) vs aead")
        ratio("splice-tcp", ROUTE, d, SPLICE_TCP_VS_ROUTE, f"{g}: splice/TCP vs route/NAT")
        ratio("aead-mptcp", INCUMBENT, d, AEAD_VS_SS, f"{g}: aead/MPTCP vs ss-libev")
        cpu(
            "aead-mptcp",
            INCUMBENT,
            d,
            AEAD_CPU_VS_SS,
            f"{g}: aead/MPTCP CPU/GB of both ends vs ss-libev",
        )
        f = f"{FIRST} raw {d}"
        ratio("splice-mptcp", ROUTE, d, 0.75, f"{f}: splice/MPTCP vs route/NAT")
        ratio("splice-mptcp", INCUMBENT, d, 5.0, f"{f}: splice/MPTCP vs ss-libev")
    return checks


def shaped_targets(rows: list[dict], total: float = SHAPED_SUM_MBIT) -> list[Check]:
    """The three shaped uplinks (WiFi rates; issue 17 repeats issue 8's targets here):
    aggregate against the links' sum, the receiving relay's CPU per GB against ss-libev's, and
    issue 8's RTT under load."""
    idx = {(r["link"], r["case"], r["direction"]): r for r in rows}
    checks: list[Check] = []
    for d in ("up", "down"):
        t = f"{GATEWAY}/{FIRST} shaped {d}"
        a, s = idx.get(("shaped", "splice-mptcp", d)), idx.get(("shaped", INCUMBENT, d))
        for case, what in (("splice-mptcp", "splice/MPTCP"), (GW_SPLICE, "gateway splice")):
            r = idx.get(("shaped", case, d))
            name = f"{t}: {what} aggregate vs the link sum"
            if not _measured(r):
                checks.append((name, None, f"not measured (shaped links, {case})"))
                continue
            x = r["mbps"] / total
            checks.append(
                (name, x >= SHAPED_SHARE, f"{x:.3f} of {total:g} Mbit (need >= {SHAPED_SHARE})")
            )
        name = f"{t}: receiving relay's CPU/GB vs ss-libev"
        if a and s and a.get("cpu_receiving") and s.get("cpu_receiving"):
            x = a["cpu_receiving"] / s["cpu_receiving"]
            checks.append(
                (
                    name,
                    x <= SHAPED_CPU_VS_SS,
                    f"{a['cpu_receiving']:.2f} vs {s['cpu_receiving']:.2f} s/GB = {x:.2f}x "
                    f"(need <= {SHAPED_CPU_VS_SS:g})",
                )
            )
        else:
            checks.append((name, None, "not measured (shaped links, splice-mptcp and ss-mptcp)"))
        name = f"{FIRST} shaped {d}: RTT under load vs ss-libev"
        if a and s and a.get("rtt_median") is not None and s.get("rtt_median") is not None:
            gap = a["rtt_median"] - s["rtt_median"]
            checks.append(
                (
                    name,
                    gap <= 2.0,
                    f"{a['rtt_median']:.2f} vs {s['rtt_median']:.2f} ms (need <= +2 ms)",
                )
            )
        else:
            checks.append((name, None, "not measured (shaped links, splice-mptcp and ss-mptcp)"))
    return checks


def connrate_targets(measurements: list[dict]) -> list[Check]:
    """Issue 18's connection case against shadowsocks-libev under mptcpize: at least 0.8x its
    connections per second, at most 2x its CPU per connection at each end."""
    by_case = {m["case"]: m for m in measurements if "per_s" in m}
    ss = by_case.get(INCUMBENT)
    checks: list[Check] = []
    for case, label in CONNRATE_CASES:
        what = f"{ROUTER} connections/s: {label} vs ss-libev"
        m = by_case.get(case)
        if not m or not ss or not ss["per_s"]:
            checks.append((what, None, f"not measured ({case} and {INCUMBENT} needed)"))
            continue
        x = m["per_s"] / ss["per_s"]
        errors = f"; errors {m['errors']}/{ss['errors']}" if m["errors"] or ss["errors"] else ""
        checks.append(
            (
                what,
                x >= CONNRATE_VS_SS,
                f"{m['per_s']:.0f} vs {ss['per_s']:.0f}/s = {x:.2f}x "
                f"(need >= {CONNRATE_VS_SS:g}){errors}",
            )
        )
        for end in ("client", "server"):
            what = f"{ROUTER} CPU per connection, {end}: {label} vs ss-libev"
            if end not in m["cpu"] or end not in ss["cpu"]:
                checks.append((what, None, f"not measured (no {end} CPU)"))
                continue
            mine = m["cpu"][end] / max(m["connections"], 1)
            theirs = ss["cpu"][end] / max(ss["connections"], 1)
            x = mine / theirs if theirs else float("inf")
            checks.append(
                (
                    what,
                    x <= CONN_CPU_VS_SS,
                    f"{mine * 1e3:.2f} vs {theirs * 1e3:.2f} ms = {x:.2f}x "
                    f"(need <= {CONN_CPU_VS_SS:g})",
                )
            )
    return checks


def idle_targets(measurements: list[dict]) -> list[Check]:
    """Issue 8's idle connections: at most 50 MiB per 1000 on either end."""
    checks: list[Check] = []
    for m in measurements:
        if m["case"] == "splice-mptcp" and "per_connection" in m:
            worst = max(m["per_connection"].values()) * m["connections"] / 2**20
            checks.append(
                (
                    f"{FIRST} {m['connections']} idle connections, RSS per mptun process",
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


def skipped_targets(skipped: dict[str, str]) -> list[Check]:
    """An n/a line for each study asked for that could not run here, saying why."""
    issue = {"budget": ROUTER, "pages": ROUTER, "udp": UDP}
    return [
        (f"{issue.get(sid, '')} {sid}".strip(), None, f"not measured: {why}")
        for sid, why in skipped.items()
    ]


def format_targets(checks: list[Check]) -> str:
    """The "== targets" section: per issue (most recent first), one PASS/FAIL/n/a line per
    target; a line's first tag says whose target it is."""
    out = ["", "== targets, ratios from this run"]
    order = {t: i for i, t in enumerate((GATEWAY, ROUTER, UDP, FIRST))}

    def issue(what: str) -> str:
        return what.split(" ", 1)[0].split("/", 1)[0]

    last = None
    for what, ok, detail in sorted(checks, key=lambda c: order.get(issue(c[0]), len(order))):
        tag_ = issue(what)
        if tag_ != last and tag_ in ISSUES:
            out.append(f"-- issue {tag_[1:]}: {ISSUES[tag_]}")
        last = tag_
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
