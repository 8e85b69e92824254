"""The Prometheus text encoder (common/metrics.py): bytes, escaping, ordering, types, refusals.

The format's rules: https://prometheus.io/docs/instrumenting/exposition_formats/ ("Text format
details"). Where promtool (Debian's `prometheus` package) is installed, its own parser lints the
encoder's output too.
"""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest

from mptun.common.metrics import (
    COUNTER,
    GAUGE,
    Family,
    Metrics,
    add_stats_counters,
    encode,
    escape_help,
    escape_label,
    format_value,
)


def test_page_bytes_exactly() -> None:
    """HELP, then TYPE, then the samples; families sorted by name, samples by labels; a final
    line feed."""
    m = Metrics()
    m.gauge("mptun_b", "Second.", 2)
    traffic = m.counter("mptun_a_total", "First.")
    traffic.add(7, direction="up")
    traffic.add(5, direction="down")
    assert m.render() == (
        "# HELP mptun_a_total First.\n"
        "# TYPE mptun_a_total counter\n"
        'mptun_a_total{direction="down"} 5\n'
        'mptun_a_total{direction="up"} 7\n'
        "# HELP mptun_b Second.\n"
        "# TYPE mptun_b gauge\n"
        "mptun_b 2\n"
    )


def test_same_state_same_bytes_whatever_the_order_of_adding() -> None:
    def page(order: list[int]) -> str:
        m = Metrics()
        fams = [("z_total", COUNTER), ("a", GAUGE), ("m_total", COUNTER)]
        for i in order:
            name, kind = fams[i]
            f = m.counter(name, "h") if kind == COUNTER else m.gauge(name, "h")
            for lab in ("b", "a", "c"):
                f.add(1, x=lab, y="1")
        return m.render()

    assert page([0, 1, 2]) == page([2, 0, 1])
    lines = page([1, 2, 0]).splitlines()
    assert [ln.split()[2] for ln in lines if ln.startswith("# TYPE")] == ["a", "m_total", "z_total"]
    assert [ln for ln in lines if ln.startswith("a{")] == [
        'a{x="a",y="1"} 1',
        'a{x="b",y="1"} 1',
        'a{x="c",y="1"} 1',
    ]


def test_labels_sorted_by_name_within_a_sample() -> None:
    assert encode([Family("g", GAUGE, "h").add(1, zeta="1", alpha="2")]).splitlines()[2] == (
        'g{alpha="2",zeta="1"} 1'
    )


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain", "plain"),
        ('say "hi"', 'say \\"hi\\"'),
        ("C:\\dir", "C:\\\\dir"),
        ("two\nlines", "two\\nlines"),
        ('\\"\n', '\\\\\\"\\n'),
        ("tab\tand ünïcode", "tab\tand ünïcode"),  # only \, " and line feed are escaped
    ],
)
def test_label_value_escaping(raw: str, escaped: str) -> None:
    assert escape_label(raw) == escaped
    line = encode([Family("g", GAUGE, "h").add(1, v=raw)]).splitlines()[2]
    assert line == f'g{{v="{escaped}"}} 1'


def test_help_escapes_backslash_and_line_feed_not_quotes() -> None:
    assert escape_help('a\\b\nc "d"') == 'a\\\\b\\nc "d"'
    assert encode([Family("g", GAUGE, "x\ny")]).splitlines()[0] == "# HELP g x\\ny"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (12345678901234567890, "12345678901234567890"),
        (True, "1"),
        (2.0, "2"),
        (0.25, "0.25"),
        (1e300, "1e+300"),
        (-1.5, "-1.5"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_values_as_go_parses_them(value: float, text: str) -> None:
    assert format_value(value) == text


def test_family_without_samples_keeps_its_help_and_type() -> None:
    assert encode([Family("g", GAUGE, "h")]) == "# HELP g h\n# TYPE g gauge\n"
    assert encode([]) == ""


@pytest.mark.parametrize(
    ("family", "why"),
    [
        (Family("bytes", COUNTER, "h").add(1), "ends in _total"),
        (Family("9lives", GAUGE, "h"), "is not"),
        (Family("a-b", GAUGE, "h"), "is not"),
        (Family("g", "histogram", "h"), "type"),
        (Family("g", GAUGE, "h").add(1, **{"bad-name": "x"}), "label name"),
        (Family("g", GAUGE, "h").add(1, __reserved="x"), "label name"),
        (Family("g", GAUGE, "h").add(1, a="x").add(2, a="x"), "twice"),
        (Family("c_total", COUNTER, "h").add(-1), "not a count"),
        (Family("c_total", COUNTER, "h").add(math.nan), "not a count"),
    ],
)
def test_what_the_format_does_not_allow_is_refused(family: Family, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        encode([family])


def test_a_name_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        encode([Family("g", GAUGE, "h"), Family("g", GAUGE, "h")])
    m = Metrics()
    m.gauge("g", "h")
    with pytest.raises(ValueError, match="declared gauge, then counter"):
        m.counter("g", "h")


def test_stats_counters_become_outcomes_and_events() -> None:
    """Connections' outcomes in one family, `relayed` even at zero; dns-/udp- counters in
    theirs, labelled without the prefix; `own` counters in their own families."""
    m = Metrics()
    counters = {"auth": 3, "dns-cache-hit": 4, "udp-idle": 2, "tproxy-udp-replies": 6, "reload": 1}
    add_stats_counters(m, counters, {"reload": "mptun_reloads_total"})
    page = m.render().splitlines()
    assert 'mptun_connections_total{outcome="relayed"} 0' in page
    assert 'mptun_connections_total{outcome="auth"} 3' in page
    assert 'mptun_dns_queries_total{event="cache-hit"} 4' in page
    assert 'mptun_udp_events_total{event="idle"} 2' in page
    assert 'mptun_tproxy_udp_events_total{event="replies"} 6' in page
    assert "mptun_reloads_total 1" in page
    assert not [ln for ln in page if 'outcome="reload"' in ln or 'outcome="dns-' in ln]


def test_promtool_accepts_the_page() -> None:
    """Prometheus' own parser (promtool check metrics) reads the page without a complaint."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    m = Metrics()
    m.counter("mptun_x_total", 'Help with \\ and "quotes"\nand a second line.', 3, a='q"\\\n')
    m.gauge("mptun_y", "A gauge.", math.inf, b="ü")
    m.gauge("mptun_z", "Another.", 0.5)
    r = subprocess.run(
        [promtool, "check", "metrics"], input=m.render(), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "error" not in (r.stdout + r.stderr).lower()


def test_any_label_name_even_the_arguments_own() -> None:
    m = Metrics()
    m.gauge("g", "h", 1, name="n", help="x", value="v")
    m.counter("c_total", "h").add(2, value="v")
    assert 'g{help="x",name="n",value="v"} 1\n' in m.render()
    assert 'c_total{value="v"} 2\n' in m.render()


def test_client_page_shows_uplink_health_and_servers() -> None:
    """The client's page from its real objects (not started): each --uplink's state as a 1 in
    `mptun_uplink_health`, its loss and round trip, each server's state."""
    import ipaddress
    import time

    from mptun.client.app import ClientSettings, build_client, build_tunneler
    from mptun.common.address import Address

    s = ClientSettings(
        server=Address.parse("192.0.2.1:8443"),
        psk=b"k" * 32,
        socks=Address.parse("127.0.0.1:0", any_port=True),
        uplinks=("wan", "lte"),
        health_file=None,
        metrics=Address.parse("127.0.0.1:0", any_port=True),
    )
    built = build_client(s, build_tunneler(s))
    (monitor,) = built.app.background
    monitor.uplinks["wan"].addresses = [ipaddress.ip_address("192.0.2.10")]
    now = time.monotonic() + 10
    for i in range(3):
        monitor.uplinks["wan"].health.record(now + i * 0.1, True, 0.02)
        monitor.uplinks["lte"].health.record(now + i * 0.1, False, why="timed out")
    assert built.metrics is not None
    page = built.metrics.page().decode().splitlines()
    assert 'mptun_uplink_health{state="up",uplink="wan"} 1' in page
    assert 'mptun_uplink_health{state="dead",uplink="wan"} 0' in page
    assert 'mptun_uplink_health{state="dead",uplink="lte"} 1' in page
    assert 'mptun_uplink_loss_ratio{uplink="lte"} 1' in page
    assert 'mptun_uplink_loss_ratio{uplink="wan"} 0' in page
    assert 'mptun_uplink_rtt_seconds{uplink="wan"} 0.02' in page
    assert 'mptun_server_state{server="192.0.2.1:8443",state="unknown"} 1' in page
    assert 'mptun_build_info{role="client",version="' in "\n".join(page)
