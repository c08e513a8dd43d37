"""Metric names by Prometheus's conventions: promtool's `check metrics` lint rules, in Python.

The rules follow client_golang's promlint (what `promtool check metrics` runs): help
text on every family, snake_case names without reserved ':' or a type in the name,
counters ending in `_total`, no non-base units (milli-/kilo- prefixes, abbreviations
such as `_ms`, `_kpa`, `_pct`, `_percent`), and `_count`/`_sum`/`_bucket` only on
histograms and summaries. They run on a real /metrics scrape of the site API and on
the HQ registry.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.ops.device_metrics import GAUGES
from hq.metrics import HqMetrics
from tests.test_api import AUTH, Site, site  # noqa: F401  (the fixture)

NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
# promlint's unit check: a base unit with an SI prefix, or an abbreviation.
BAD_UNITS = re.compile(r"(^|_)(milli|micro|nano|kilo|mega|giga|centi)[a-z]*(_|$)"
                       r"|(^|_)(ms|us|ns|sec|secs|mins|hrs|kpa|hpa|pct|percent|kb|mb|gb)(_|$)")
TYPE_IN_NAME = re.compile(r"(^|_)(counter|gauge|histogram|summary)(_|$)")


def problems(text: str) -> list[str]:
    found = []
    for family in text_string_to_metric_families(text):
        name = family.name
        if not family.documentation:
            found.append(f"{name}: no help text")
        if not NAME_RE.match(name):
            found.append(f"{name}: not snake_case (or uses the reserved ':')")
        if BAD_UNITS.search(name):
            found.append(f"{name}: use base units (seconds, bytes, pascals, ratios)")
        if TYPE_IN_NAME.search(name):
            found.append(f"{name}: the metric type does not belong in its name")
        if family.type == "gauge" and name.endswith(("_total", "_created")):
            found.append(f"{name}: a gauge named like a counter sample")
        if family.type not in ("histogram", "summary") and \
                name.endswith(("_count", "_sum", "_bucket")):
            found.append(f"{name}: _count/_sum/_bucket are reserved for histograms")
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith(("_total", "_created")):
                found.append(f"{sample.name}: a counter sample must end in _total")
            if sample.name.endswith("_created"):
                found.append(f"{sample.name}: *_created series exported")
    return found


def test_site_metrics_follow_the_conventions(site: Site) -> None:  # noqa: F811
    """A real scrape of the site API (after traffic) passes the lint rules."""
    site.post("sale", {"receipt_number": "R-1", "sold_at": "2026-11-22T10:03:11-07:00",
                       "customer_type": "Consumer", "register": "pos-1",
                       "lines": [{"package_tag": "1A4FF0100000022000000123", "quantity": "1",
                                  "unit": "Grams", "price": "1.00", "total": "1.00"}],
                       "total": "1.00"})
    text = site.client.get("/metrics", headers=AUTH).text
    assert problems(text) == []


def test_site_metrics_carry_build_info_process_and_latency(site: Site) -> None:  # noqa: F811
    """edge_build_info, process_* metrics and the request latency histogram are there."""
    site.client.get("/v1/status", headers=AUTH)
    text = site.client.get("/metrics", headers=AUTH).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    from agent import __version__

    info = families["edge_build_info"].samples[0]
    assert info.value == 1 and info.labels["version"] == __version__
    assert "process_resident_memory_bytes" in families
    assert "process_start_time_seconds" in families
    latency = families["edge_http_request_duration_seconds"]
    assert latency.type == "histogram"
    count = [s for s in latency.samples if s.name.endswith("_count")
             and s.labels.get("route") == "/v1/status"]
    assert count and count[0].value >= 1


def test_hq_metrics_follow_the_conventions() -> None:
    """The HQ receiver's registry passes the same lint rules."""
    metrics = HqMetrics()
    assert problems(generate_latest(metrics.registry).decode()) == []


def test_sensor_gauges_use_base_units() -> None:
    """Climate gauges are in pascals and 0-1 ratios, scaled from the readings' kPa and %."""
    names = {key: (name, scale) for key, (name, _, scale) in GAUGES.items()}
    assert names["vpd_kpa"] == ("edge_sensor_vpd_pascals", 1000.0)
    assert names["rh_pct"] == ("edge_sensor_relative_humidity_ratio", 0.01)
    assert not [n for n, _ in names.values() if BAD_UNITS.search(n)]


def test_outbox_commit_latency_is_a_histogram_observed_per_group_commit(
        site: Site) -> None:  # noqa: F811
    """edge_outbox_commit_duration_seconds counts one observation per group commit."""
    assert site.post("scan", {"code": "1A4FF0100000022000000123"}).status_code == 202
    text = site.client.get("/metrics", headers=AUTH).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    commit = families["edge_outbox_commit_duration_seconds"]
    assert commit.type == "histogram"
    samples = {s.name: s for s in commit.samples if not s.labels}
    commits = families["edge_outbox_commits"].samples[0].value
    assert samples["edge_outbox_commit_duration_seconds_count"].value == commits >= 1
    assert 0 < samples["edge_outbox_commit_duration_seconds_sum"].value < 60
    assert problems(text) == []


def test_printer_job_outcomes_are_disjoint_and_sum_to_the_jobs() -> None:
    """sum by device of edge_printer_jobs_total over outcome, plus pending, is the jobs
    submitted: held, retried and expired-within-failed no longer count a job twice."""
    from agent.ops.device_metrics import PrinterCollector

    counts = {"submitted": 10, "printed": 5, "sent": 1, "held": 3, "retried": 2,
              "retries": 4, "expired": 1, "failed": 3, "pending": 1}
    service = type("Service", (), {"devices": lambda self: [
        {"id": "counter-1-receipt", "type": "receipt_printer", "state": "up",
         "faults": {}, "jobs": counts}]})()
    registry = CollectorRegistry()
    registry.register(PrinterCollector(service))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert problems(text) == []
    families = {f.name: f for f in text_string_to_metric_families(text)}
    outcomes = {s.labels["outcome"]: s.value for s in families["edge_printer_jobs"].samples}
    assert outcomes == {"printed": 5, "sent": 1, "expired": 1, "failed": 2}
    pending = families["edge_printer_jobs_pending"].samples[0].value
    submitted = families["edge_printer_jobs_submitted"].samples[0].value
    assert sum(outcomes.values()) + pending == submitted == 10
    assert families["edge_printer_jobs_held"].samples[0].value == 3
    assert families["edge_printer_jobs_retried"].samples[0].value == 2


def test_metrics_are_open_on_loopback_and_token_guarded_otherwise(site: Site) -> None:  # noqa: F811
    """A scraper on 127.0.0.1 or ::1 needs no token; from the LAN (or through a proxy on
    the box, or with a wrong token) /metrics is 401 without a good one and 200 with one."""
    from starlette.testclient import TestClient

    # No `with`: entering a TestClient runs the app's lifespan again under the fixture.
    assert site.client.get("/metrics").status_code == 401          # "testclient": not loopback
    assert site.client.get("/metrics", headers=AUTH).status_code == 200
    for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        local = TestClient(site.app, client=(host, 40000))
        answer = local.get("/metrics")
        assert answer.status_code == 200, answer.text
        assert "edge_outbox_depth" in answer.text
        assert local.get("/v1/status").status_code == 401           # only /metrics is open
        assert local.get("/metrics", headers={"X-Forwarded-For": "10.0.0.7"}).status_code == 401
        assert local.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    lan = TestClient(site.app, client=("10.0.0.7", 40000))
    assert lan.get("/metrics").status_code == 401
    assert lan.get("/metrics", headers=AUTH).status_code == 200


def test_loopback_addresses() -> None:
    """127/8, ::1 and IPv4-mapped 127.x are this box; LAN addresses and names are not."""
    from agent.web.caller import is_loopback

    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1")))
    assert not any(map(is_loopback, ("10.0.0.7", "::ffff:10.0.0.7", "fe80::1", "testclient",
                                     "")))
