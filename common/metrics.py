"""Prometheus text exposition (format 0.0.4): metric families in, the page a scraper reads out.

Pure: no I/O, no clock. The rules are those of the format's specification
(https://prometheus.io/docs/instrumenting/exposition_formats/, "Text format details"):
- a metric name matches `[a-zA-Z_:][a-zA-Z0-9_:]*`, a label name `[a-zA-Z_][a-zA-Z0-9_]*`, and
  label names starting with `__` are reserved;
- `# HELP name text` escapes `\\` and line feed as `\\\\` and `\\n`; a label value escapes those
  two and `"` (as `\\"`);
- one `# TYPE` line per family, before its first sample; all samples of a family together, each
  label set once;
- values are Go floats: `+Inf`, `-Inf`, `NaN` spelled so;
- lines end with a line feed, the last one too.
A counter's name ends in `_total` here (Prometheus' naming convention, and what OpenMetrics
requires of a counter's samples), so a typo cannot make one that `rate()` users would misread.
Families are written sorted by name and samples by label values, so two scrapes of the same
state give the same bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
COUNTER = "counter"
GAUGE = "gauge"
_TYPES = (COUNTER, GAUGE)
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass
class Family:
    """One metric: its name, type, help text, and samples (a label set and a value each)."""

    name: str
    type: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, /, **labels: object) -> Family:
        """One more sample; label values are turned into text (any label name, even `value`)."""
        self.samples.append(({k: str(v) for k, v in labels.items()}, value))
        return self


class Metrics:
    """The families of one scrape, collected by name (adding to a name twice extends it)."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def _family(self, name: str, kind: str, help: str) -> Family:
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = Family(name, kind, help)
        elif fam.type != kind:
            raise ValueError(f"metric {name}: declared {fam.type}, then {kind}")
        return fam

    def counter(
        self, name: str, help: str, value: float | None = None, /, **labels: object
    ) -> Family:
        """The counter `name` (ending `_total`), with one sample when `value` is given."""
        fam = self._family(name, COUNTER, help)
        if value is not None:
            fam.add(value, **labels)
        return fam

    def gauge(
        self, name: str, help: str, value: float | None = None, /, **labels: object
    ) -> Family:
        """The gauge `name`, with one sample when `value` is given."""
        fam = self._family(name, GAUGE, help)
        if value is not None:
            fam.add(value, **labels)
        return fam

    def render(self) -> str:
        return encode(self.families.values())


def escape_help(text: str) -> str:
    """HELP text: backslash and line feed escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label(value: str) -> str:
    """A label value: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as Go's ParseFloat reads it: integers without a fraction."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _check(fam: Family) -> None:
    if not _METRIC_NAME.fullmatch(fam.name):
        raise ValueError(f"metric name {fam.name!r} is not [a-zA-Z_:][a-zA-Z0-9_:]*")
    if fam.type not in _TYPES:
        raise ValueError(f"metric {fam.name}: type {fam.type!r} is not one of {_TYPES}")
    if fam.type == COUNTER and not fam.name.endswith("_total"):
        raise ValueError(f"counter {fam.name}: a counter's name ends in _total")
    seen: set[tuple[tuple[str, str], ...]] = set()
    for labels, value in fam.samples:
        for name in labels:
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise ValueError(f"metric {fam.name}: label name {name!r} is not allowed")
        key = tuple(sorted(labels.items()))
        if key in seen:
            raise ValueError(f"metric {fam.name}: label set {dict(key)} given twice")
        seen.add(key)
        if fam.type == COUNTER and not value >= 0:  # also refuses NaN
            raise ValueError(f"counter {fam.name}{dict(key)}: {value} is not a count")


def _sample_line(name: str, labels: Mapping[str, str], value: float) -> str:
    if not labels:
        return f"{name} {format_value(value)}"
    inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}} {format_value(value)}"


def encode(families: Iterable[Family]) -> str:
    """The exposition page of `families` (ValueError for a name, type or label set the format
    does not allow); a family without samples still gets its HELP and TYPE lines."""
    fams = sorted(families, key=lambda f: f.name)
    names = [f.name for f in fams]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"metric {dup} given twice")
    lines: list[str] = []
    for fam in fams:
        _check(fam)
        lines.append(f"# HELP {fam.name} {escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        samples = sorted(fam.samples, key=lambda s: sorted(s[0].items()))
        lines += [_sample_line(fam.name, labels, value) for labels, value in samples]
    return "\n".join(lines) + "\n" if lines else ""


# Stats counters (common/stats.py) named with these prefixes count DNS queries or UDP events,
# not connections: each prefix has its family, labelled `event` (the name without the prefix).
STATS_PREFIXES = {
    "tproxy-udp-": (
        "mptun_tproxy_udp_events_total",
        "Datagrams of the client's --tproxy-udp, by event.",
    ),
    "dns-": (
        "mptun_dns_queries_total",
        "DNS queries of the client's --dns, by what became of them.",
    ),
    "udp-": ("mptun_udp_events_total", "UDP associations and datagrams, by event."),
}


def add_stats_counters(m: Metrics, counters: Mapping[str, int], own: Mapping[str, str]) -> None:
    """A service's stats counters (its `--stats-file` `counters`) as families: `own` maps a
    counter to a family of its own, the prefixed ones go to theirs (`STATS_PREFIXES`), every
    other is a connection's outcome in `mptun_connections_total` (`relayed` always present)."""
    outcomes = m.counter(
        "mptun_connections_total",
        "Connections by outcome: relayed (a tunnel relayed and ended) or why one failed (the "
        "counters of --stats-file).",
    )
    outcomes.add(counters.get("relayed", 0), outcome="relayed")
    for name, family in own.items():
        m.counter(family, f"The {name} counter of --stats-file.", counters.get(name, 0))
    for name, value in sorted(counters.items()):
        if name == "relayed" or name in own:
            continue
        prefix = next((p for p in STATS_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            outcomes.add(value, outcome=name)
            continue
        family, help = STATS_PREFIXES[prefix]
        m.counter(family, help, value, event=name.removeprefix(prefix))
