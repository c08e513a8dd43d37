"""The forwarder's Prometheus metrics on HQ's registry (read at scrape time).

``edge_hq_metrc_overdue{site}`` is the alarm: sales (and plant events) not
reported to Metrc within the deadline. The per-site gauges come from the
forwarder's last count of the store (every few seconds), never from a query
run by the scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STATES = ("pending", "reported", "failed", "skipped")
COUNTERS = (
    ("edge_hq_metrc_posts", "posts", "POST /sales/v2/receipts requests sent"),
    ("edge_hq_metrc_reported", "reported", "Events Metrc has from us"),
    ("edge_hq_metrc_lookups", "lookups", "Receipts looked up by external number before "
     "posting again"),
    ("edge_hq_metrc_found_by_lookup", "found_by_lookup", "Look-ups that found the receipt "
     "(a POST whose answer was lost had landed)"),
    ("edge_hq_metrc_refused", "refused", "Requests Metrc refused (400): kept for a person"),
    ("edge_hq_metrc_rate_limited", "rate_limited", "429 answers"),
    ("edge_hq_metrc_unavailable", "unavailable", "5xx, timeouts and dropped connections"),
    ("edge_hq_metrc_auth_failed", "auth_failed", "401/403 answers"),
    ("edge_hq_metrc_plant_calls", "plant_calls", "v2 plant calls sent"),
    ("edge_hq_metrc_catalog_syncs", "catalog_syncs", "Catalog syncs of a site done"),
    ("edge_hq_metrc_catalog_failures", "catalog_failures", "Catalog syncs that failed"),
)


class _MetrcCollector(Collector):
    def __init__(self, forwarder: Any) -> None:
        self.fw = forwarder

    def collect(self) -> Iterator[Metric]:
        counters = dict(self.fw.counters)
        for name, key, doc in COUNTERS:
            yield CounterMetricFamily(name, doc, value=counters.get(key, 0))
        events = GaugeMetricFamily("edge_hq_metrc_events", "Sales and plant events at HQ by "
                                   "Metrc state", labels=["site", "state"])
        overdue = GaugeMetricFamily("edge_hq_metrc_overdue", "ALARM: events not reported to "
                                    "Metrc within [compliance] report_within_h",
                                    labels=["site"])
        for site, row in sorted(dict(self.fw.site_counts).items()):
            for state in STATES:
                events.add_metric([site, state], row.get(state, 0))
            overdue.add_metric([site], row.get("overdue", 0))
        yield events
        yield overdue


def register(registry: Any, forwarder: Any) -> None:
    registry.register(_MetrcCollector(forwarder))
