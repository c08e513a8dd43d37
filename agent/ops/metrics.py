"""Prometheus metrics for ``GET /metrics``.

The outbox and the uplink already count everything worth exporting, so rather
than mirror their numbers into prometheus-client objects on every event (a lock
per increment on the hot path), :class:`AgentCollector` reads
``outbox.stats()``, ``outbox.counters`` and the uplink snapshot when Prometheus
scrapes. Only the HTTP request counter is a live ``Counter``: nothing else
knows about requests.

Each app gets its own :class:`CollectorRegistry`, so tests (and a process
that builds two apps) never collide on the global registry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.kinds import KINDS

if TYPE_CHECKING:
    from agent.outbox import Outbox

log = logging.getLogger(__name__)

# prometheus-client exports a `*_created` sample beside every live Counter, which the text
# format shows as a separate gauge family: noise for every dashboard. Off, process-wide.
disable_created_metrics()  # type: ignore[no-untyped-call]
# Request latency buckets (seconds): a commit-bound POST takes a few ms; a print waits
# for the printer for up to seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# outbox.counters key -> edge_refusals_total{reason}
REFUSAL_COUNTERS = {"refused_full": "outbox_full", "refused_disk": "disk_full"}
# uplink snapshot key -> counter family (name without _total, help)
UPLINK_COUNTERS = {
    "acks": ("edge_acks", "Cumulative acks received from HQ (or PUBACKs with broker-ack)"),
    "resends": ("edge_resends", "Events sent again after an ack timeout or a reconnect"),
    "reconnects": ("edge_reconnects", "Connections to a broker after the first one"),
    "publish_failures": ("edge_publish_failures", "MQTT publishes that failed"),
    "forged_acks": ("edge_forged_acks", "Acks ignored for want of valid proof from HQ"),
    "forged_commands": ("edge_forged_commands",
                        "Commands ignored for want of valid proof from HQ"),
    "retained_commands": ("edge_retained_commands", "Retained commands ignored"),
}


class AgentCollector(Collector):
    """Reads the outbox and the uplink at scrape time; never raises into the scrape."""

    def __init__(self, outbox: Outbox, uplink_snapshot: Callable[[], dict[str, Any]],
                 clock: Callable[[], float] = time.time,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self._outbox = outbox
        self._uplink_snapshot = uplink_snapshot
        self._clock = clock
        self._status = status

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._outbox_metrics()
        except Exception:  # a scrape must not fail because one source did
            log.exception("metrics: reading the outbox failed")
        try:
            snapshot = self._uplink_snapshot() or {}
        except Exception:  # as above: the uplink snapshot is one source
            log.exception("metrics: the uplink snapshot failed")
            snapshot = {}
        yield from self._uplink_metrics(snapshot)
        if self._status is not None:
            try:
                status = self._status()
            except Exception:  # as above: the status snapshot is one source
                log.exception("metrics: the status snapshot failed")
            else:
                yield from self._status_metrics(status)

    def _status_metrics(self, status: dict[str, Any]) -> Iterator[Metric]:
        """What ``edge-agent status`` decides, for alerting: degraded, and why (by code)."""
        from agent.ops.status import REASON_CODES

        reasons = [str(r).split(":", 1)[0] for r in status.get("reasons") or []]
        yield GaugeMetricFamily("edge_status_degraded",
                                "1 while GET /v1/status (and edge-agent status) says degraded",
                                value=1.0 if status.get("state") == "degraded" else 0.0)
        by_code = GaugeMetricFamily("edge_status_reasons",
                                    "Degraded reasons of GET /v1/status, by code", labels=["code"])
        for code in REASON_CODES:
            by_code.add_metric([code], float(reasons.count(code)))
        yield by_code
        uplink = status.get("uplink") or {}
        down_since = uplink.get("down_since")
        down_s = (max(0.0, self._clock() - down_since)
                  if isinstance(down_since, int | float) and uplink.get("state") != "connected"
                  else 0.0)
        yield GaugeMetricFamily("edge_uplink_down_seconds",
                                "Seconds since the first failure of the current uplink outage "
                                "(0 while connected)", value=down_s)

    def _outbox_metrics(self) -> Iterator[Metric]:
        now = self._clock()
        stats = self._outbox.stats()
        depth = GaugeMetricFamily("edge_outbox_depth", "Events in the outbox not yet acked by HQ",
                                  labels=["kind"])
        size = GaugeMetricFamily("edge_outbox_bytes", "Bytes of events in the outbox",
                                 labels=["kind"])
        age = GaugeMetricFamily("edge_outbox_oldest_age_seconds",
                                "Age of the oldest event in the outbox (0 when empty)",
                                labels=["kind"])
        last_seq = GaugeMetricFamily("edge_outbox_last_seq", "Last seq assigned", labels=["kind"])
        for kind in KINDS:
            st = stats.get(kind)
            if st is None:
                continue
            depth.add_metric([kind], st.depth)
            size.add_metric([kind], st.bytes)
            age.add_metric([kind], 0.0 if st.oldest_ts is None else max(0.0, now - st.oldest_ts))
            last_seq.add_metric([kind], st.last_seq)
        yield from (depth, size, age, last_seq)
        yield GaugeMetricFamily("edge_outbox_total_bytes", "Bytes held by the outbox",
                                value=self._outbox.total_bytes)
        yield GaugeMetricFamily("edge_outbox_max_bytes", "outbox.max_bytes",
                                value=self._outbox.max_bytes)
        state = self._outbox.state
        states = GaugeMetricFamily("edge_outbox_state", "1 for the outbox's current state",
                                   labels=["state"])
        for name in ("ok", "full", "disk_full"):
            states.add_metric([name], 1.0 if state == name else 0.0)
        yield states
        counters = dict(self._outbox.counters)
        refusals = CounterMetricFamily("edge_refusals", "Events refused by the outbox",
                                       labels=["reason"])
        for key, reason in REFUSAL_COUNTERS.items():
            refusals.add_metric([reason], counters.get(key, 0))
        yield refusals
        yield CounterMetricFamily("edge_outbox_commits", "Group commits (SQLite transactions)",
                                  value=counters.get("commits", 0))
        histogram = getattr(self._outbox, "commit_seconds", None)
        if histogram is not None:
            yield from histogram.collect()
        yield CounterMetricFamily("edge_outbox_thinned_events",
                                  "Sensor readings folded into aggregates at max_bytes",
                                  value=counters.get("thinned_events", 0))
        yield CounterMetricFamily("edge_outbox_corrupt_moved",
                                  "Corrupt outbox files moved aside",
                                  value=counters.get("corrupt_moved", 0))

    def _uplink_metrics(self, snapshot: dict[str, Any]) -> Iterator[Metric]:
        yield GaugeMetricFamily("edge_uplink_connected", "1 while connected to a broker",
                                value=1.0 if snapshot.get("state") == "connected" else 0.0)
        unacked = GaugeMetricFamily("edge_outbox_unacked",
                                    "Events published and not yet acked", labels=["kind"])
        per_kind = snapshot.get("unacked") or {}
        for kind in KINDS:
            value = per_kind.get(kind, 0) if isinstance(per_kind, dict) else 0
            unacked.add_metric([kind], _number(value))
        yield unacked
        for key, (name, doc) in UPLINK_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=_number(snapshot.get(key, 0)))
        refused = CounterMetricFamily("edge_acks_refused",
                                      "Acks from HQ the agent refused (beyond what it sent, "
                                      "or without valid proof)", labels=["kind"])
        per_kind = snapshot.get("acks_refused") or {}
        for kind in KINDS:
            value = per_kind.get(kind, 0) if isinstance(per_kind, dict) else 0
            refused.add_metric([kind], _number(value))
        yield refused


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


class BuildInfo(Collector):
    """``edge_build_info{version, python} 1``: join it to any series to know the release."""

    def __init__(self, version: str) -> None:
        import platform

        self.labels = [version, platform.python_version()]

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("edge_build_info", "The running edge-agent's version",
                                 labels=["version", "python"])
        info.add_metric(self.labels, 1.0)
        yield info


class ApiMetrics:
    """The per-app registry: the collector plus the HTTP request counter."""

    def __init__(self, outbox: Outbox, uplink_snapshot: Callable[[], dict[str, Any]],
                 clock: Callable[[], float] = time.time,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        from agent import __version__

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(outbox, uplink_snapshot, clock, status))
        # process_* (CPU, memory, open fds, start time), python_gc_*, python_info: the
        # standard collectors, read at scrape time from /proc.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.registry.register(BuildInfo(__version__))
        self.http_requests = Counter("edge_http_requests", "HTTP requests answered by the API",
                                     ["route", "status"], registry=self.registry)
        self.http_duration = Histogram("edge_http_request_duration_seconds",
                                       "Time to answer an HTTP request, by route",
                                       ["route"], buckets=LATENCY_BUCKETS,
                                       registry=self.registry)
