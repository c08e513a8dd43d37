"""HQ's Prometheus metrics, served at ``/metrics`` on the HQ page's server.

Base units and ``_total`` counters (Prometheus naming conventions). The
receiver's and the store's own counters are read at scrape time (a collector
over their dicts), so nothing on the hot path but one histogram observation
per batch; the per-site gauges come from the fleet store at scrape time too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hq.fleet import FleetPolicy, SiteState, site_status

log = logging.getLogger(__name__)

STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUS_VALUES = ("online", "offline", "silent", "never-seen")


# No `*_created` gauge beside every counter (see agent/ops/metrics.py).
disable_created_metrics()  # type: ignore[no-untyped-call]


class HqMetrics:
    """One registry per HQ process: the receiver observes, the web server exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.store_seconds = Histogram(
            "edge_hq_store_batch_seconds", "Time to store one batch of events (committed)",
            buckets=STORE_BUCKETS, registry=self.registry)

    def watch(self, receiver: Any, states: Callable[[], Mapping[str, SiteState]],
              registered: list[str], policy: FleetPolicy,
              clock: Callable[[], float] = time.time) -> None:
        """Expose ``receiver``'s counters and the fleet's per-site gauges."""
        self.registry.register(_HqCollector(receiver, states, registered, policy, clock))


class _HqCollector(Collector):
    def __init__(self, receiver: Any, states: Callable[[], Mapping[str, SiteState]],
                 registered: list[str], policy: FleetPolicy,
                 clock: Callable[[], float]) -> None:
        self.receiver = receiver
        self.states = states
        self.registered = registered
        self.policy = policy
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        rx = self.receiver
        counters: dict[str, int] = dict(rx.counters)
        store_counters: dict[str, Any] = dict(getattr(rx.store, "counters", {}))
        by_kind: dict[str, int] = dict(getattr(rx.store, "stored_by_kind", {}))
        stored = CounterMetricFamily("edge_hq_events_stored", "Distinct events stored, by kind",
                                     labels=["kind"])
        for kind, n in sorted(by_kind.items()):
            stored.add_metric([kind], n)
        yield stored
        for name, key, doc in (
                ("edge_hq_events_received", "received", "Event messages received"),
                ("edge_hq_duplicates", "duplicates", "Redeliveries of stored events dropped"),
                ("edge_hq_acks_sent", "acks_sent", "Acks published on P/acks"),
                ("edge_hq_store_failures", "store_failures", "Batches the store refused"),
                ("edge_hq_mqtt_connects", "connects", "Connections to the broker"),
                ("edge_hq_session_taken_over", "taken_over",
                 "Disconnects because another client used this receiver's client id"),
                ("edge_hq_fleet_messages", "fleet_messages", "P/status and P/health received"),
                ("edge_hq_fleet_failures", "fleet_failures", "Fleet writes the store refused")):
            yield CounterMetricFamily(name, doc, value=counters.get(key, 0))
        rejected = CounterMetricFamily(
            "edge_hq_rejected", "Messages that could not be stored, by topic kind",
            labels=["topic"])
        rejected.add_metric(["events"], counters.get("malformed", 0))
        rejected.add_metric(["fleet"], counters.get("fleet_malformed", 0))
        yield rejected
        yield CounterMetricFamily("edge_hq_conflicts", "Events whose (site, kind, seq) was "
                                  "already stored under another id",
                                  value=int(store_counters.get("conflicts", 0)))
        yield from self._sites()

    def _sites(self) -> Iterator[Metric]:
        online = GaugeMetricFamily("edge_hq_site_online", "1 while the site is online",
                                   labels=["site"])
        status = GaugeMetricFamily("edge_hq_site_status", "1 for the site's current status",
                                   labels=["site", "status"])
        lag = GaugeMetricFamily("edge_hq_site_oldest_unsent_seconds",
                                "Age of the oldest event the site has not got acked, by kind "
                                "(from its last P/health)", labels=["site", "kind"])
        seen = GaugeMetricFamily("edge_hq_site_last_seen_timestamp_seconds",
                                 "When HQ last heard the site's status or health",
                                 labels=["site"])
        try:
            states = dict(self.states())
        except Exception as exc:  # a scrape must answer even when the store does not
            log.warning("metrics: fleet state unreadable: %s", exc)
            states = {}
        now = self.clock()
        from hq.store import parse_time

        for site in sorted(set(states) | set(self.registered)):
            state = states.get(site)
            current = site_status(state, now, self.policy)
            online.add_metric([site], 1.0 if current == "online" else 0.0)
            for value in STATUS_VALUES:
                status.add_metric([site, value], 1.0 if value == current else 0.0)
            if state is not None and state.last_seen:
                seen.add_metric([site], parse_time(state.last_seen).timestamp())
            if state is not None and state.health is not None:
                for kind, age in sorted(state.health.oldest_unsent_s.items()):
                    lag.add_metric([site, kind], age)
        yield online
        yield status
        yield lag
        yield seen
