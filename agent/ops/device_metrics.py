"""Prometheus collectors for the device families, read at scrape time.

One collector per family (scanners, printers, climate) reads the family's own
snapshot; :func:`family_collectors` picks them for the services the daemon runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.devices.family import Service

if TYPE_CHECKING:
    from agent.devices.climate import ClimateService
    from agent.devices.printing import PrinterService
    from agent.devices.scanning import ScannerService

log = logging.getLogger(__name__)


class ScannerCollector(Collector):
    """Per-scanner counts and states, read at scrape time; never raises into the scrape."""

    def __init__(self, service: ScannerService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._metrics()
        except Exception:  # a scrape must not fail because one family's snapshot did
            log.exception("metrics: reading the scanners failed")

    def _metrics(self) -> Iterator[Metric]:
        scans = CounterMetricFamily("edge_scans", "Scans read (after debouncing)",
                                    labels=["device", "classification", "valid"])
        unknown = CounterMetricFamily("edge_scans_unknown_package",
                                      "Package scans whose tag is not in the catalog",
                                      labels=["device"])
        debounced = CounterMetricFamily("edge_scans_debounced",
                                        "Repeated reads within the debounce window, not counted",
                                        labels=["device"])
        refused = CounterMetricFamily("edge_scans_refused", "Scans the outbox refused",
                                      labels=["device"])
        reopens = CounterMetricFamily("edge_scanner_reopens",
                                      "Times a scanner came back after being down",
                                      labels=["device"])
        up = GaugeMetricFamily("edge_scanner_up", "1 while the scanner is open, 0 when down",
                               labels=["device"])
        for entry in list(self.service.scanners.values()):
            if not entry.enabled:
                continue
            device = entry.device
            for (classification, valid), n in list(entry.by_class.items()):
                scans.add_metric([device, classification, "true" if valid else "false"], n)
            unknown.add_metric([device], entry.unknown)
            refused.add_metric([device], entry.refused)
            reader = entry.reader
            debounced.add_metric([device], reader.counts["debounced"] if reader else 0)
            reopens.add_metric([device], reader.counts["reopens"] if reader else 0)
            up.add_metric([device], 1.0 if reader is not None and reader.state == "up" else 0.0)
        yield from (scans, unknown, debounced, refused, reopens, up)
        feed = self.service.feed
        yield GaugeMetricFamily("edge_scan_clients", "Connected /v1/scans WebSocket clients",
                                value=len(feed.clients))
        yield CounterMetricFamily("edge_scan_clients_dropped",
                                  "Scans dropped for /v1/scans clients that fell behind",
                                  value=feed.dropped)
        catalog = self.service.catalog
        yield GaugeMetricFamily("edge_catalog_tags", "Package tags in the local catalog",
                                value=catalog.count() if catalog else 0)


# Reading key -> (metric name, help). Values of the newest *valid* reading only: a
# spike must not draw a line on a dashboard; edge_sensor_valid says why it is absent.
# reading key -> (metric, help, scale to the Prometheus base unit): pascals, not kPa, and
# relative humidity as a 0-1 ratio (the API and the events keep kPa and percent).
GAUGES = {
    "temperature_c": ("edge_sensor_temperature_celsius", "Air temperature", 1.0),
    "rh_pct": ("edge_sensor_relative_humidity_ratio", "Relative humidity (0-1)", 0.01),
    "co2_ppm": ("edge_sensor_co2_ppm", "CO2 concentration (parts per million)", 1.0),
    "vpd_kpa": ("edge_sensor_vpd_pascals", "Air vapour pressure deficit", 1000.0),
    "leaf_vpd_kpa": ("edge_sensor_leaf_vpd_pascals", "Leaf vapour pressure deficit", 1000.0),
    "dew_point_c": ("edge_sensor_dew_point_celsius", "Dew point", 1.0),
}


class ClimateCollector(Collector):
    """Reads the service at scrape time; never raises into the scrape."""

    def __init__(self, svc: ClimateService) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must not fail because the climate part did
            log.exception("metrics: reading the climate service failed")

    def _collect(self) -> Iterator[Metric]:
        svc = self.svc
        now = svc.clock()
        labels = ["device", "room"]
        gauges = {key: GaugeMetricFamily(name, text, labels=labels)
                  for key, (name, text, _) in GAUGES.items()}
        valid = GaugeMetricFamily("edge_sensor_valid",
                                  "1 when the newest reading is valid, 0 when suspect, stale "
                                  "or missing", labels=labels)
        readings = CounterMetricFamily("edge_sensor_readings", "Readings taken",
                                       labels=labels)
        invalid = CounterMetricFamily("edge_sensor_invalid",
                                      "Readings marked invalid, by fault code",
                                      labels=["device", "room", "reason"])
        for entry in svc.sensors.values():
            if not entry.enabled:
                continue
            ids = [entry.device, entry.room]
            reading = entry.poller.latest(now) if entry.poller is not None else None
            valid.add_metric(ids, 1.0 if reading is not None and reading.valid else 0.0)
            if reading is not None and reading.valid:
                for key, gauge in gauges.items():
                    value = reading.value(key)
                    if value is not None:
                        gauge.add_metric(ids, value * GAUGES[key][2])
            readings.add_metric(ids, entry.readings)
            for reason, n in sorted(entry.invalid.items()):
                invalid.add_metric([*ids, reason], n)
        alarms = CounterMetricFamily("edge_climate_alarms", "Climate alarm events sent",
                                     labels=["room", "code", "state"])
        for (room, code, state), n in sorted(svc.alarm_counts.items()):
            alarms.add_metric([room, code, state], n)
        open_alarms = GaugeMetricFamily("edge_climate_alarms_open", "Climate alarms now open",
                                        labels=["room"])
        for room in svc.monitors:
            open_alarms.add_metric([room], len(svc.alarms.for_room(room)))
        yield from gauges.values()
        yield from (valid, readings, invalid, alarms, open_alarms)


def job_outcomes(counts: dict[str, int]) -> dict[str, int]:
    """A printer's finished jobs by final outcome, each job in exactly one: ``failed``
    in the status counts every job never printed, ``expired`` among them."""
    expired = counts.get("expired", 0)
    return {"printed": counts.get("printed", 0), "sent": counts.get("sent", 0),
            "expired": expired, "failed": max(0, counts.get("failed", 0) - expired)}


class PrinterCollector(Collector):
    """Per printer: up, fault episodes by kind, jobs by outcome; read at scrape time."""

    def __init__(self, service: PrinterService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("edge_printer_up", "1 when the printer can print (up or "
                               "degraded), else 0", labels=["device", "type"])
        faults = CounterMetricFamily("edge_printer_faults", "Fault episodes by kind (counted "
                                     "when a fault begins)", labels=["device", "fault"])
        # One final outcome per job, so sum by (device) of edge_printer_jobs_total plus
        # edge_printer_jobs_pending is edge_printer_jobs_submitted_total; being held or
        # retried on the way is not an outcome and has counters of its own.
        jobs = CounterMetricFamily("edge_printer_jobs", "Finished print jobs by final outcome "
                                   "(printed, sent unconfirmed, expired, failed otherwise); "
                                   "disjoint, so they sum", labels=["device", "outcome"])
        submitted = CounterMetricFamily("edge_printer_jobs_submitted", "Print jobs submitted",
                                        labels=["device"])
        held = CounterMetricFamily("edge_printer_jobs_held", "Jobs held (at least once) for "
                                   "a printer fault", labels=["device"])
        retried = CounterMetricFamily("edge_printer_jobs_retried", "Jobs that took more than "
                                      "one attempt", labels=["device"])
        pending = GaugeMetricFamily("edge_printer_jobs_pending", "Jobs queued or held",
                                    labels=["device"])
        retries = CounterMetricFamily("edge_printer_retries", "Attempts after a job's first",
                                      labels=["device"])
        try:
            entries = self._service.devices()
        except Exception:  # a scrape must not fail because one source did
            log.exception("metrics: the printer snapshot failed")
            entries = []
        discovered = 0
        for entry in entries:
            if entry.get("discovered"):
                discovered += 1
                continue
            device = entry["id"]
            up.add_metric([device, entry["type"]],
                          1.0 if entry["state"] in ("up", "degraded") else 0.0)
            for fault, count in entry.get("faults", {}).items():
                faults.add_metric([device, fault], count)
            counts = entry.get("jobs", {})
            for outcome, value in job_outcomes(counts).items():
                jobs.add_metric([device, outcome], value)
            for family, key in ((submitted, "submitted"), (held, "held"), (retried, "retried"),
                                (retries, "retries"), (pending, "pending")):
                family.add_metric([device], counts.get(key, 0))
        yield from (up, faults, jobs, submitted, held, retried, retries, pending)
        yield GaugeMetricFamily("edge_printers_discovered",
                                "Network printers advertised over mDNS", value=discovered)


COLLECTORS: dict[str, Callable[[Any], Collector]] = {
    "scanners": ScannerCollector,
    "printers": PrinterCollector,
    "climate": ClimateCollector,
}


def family_collectors(services: Iterable[Service]) -> list[Collector]:
    """One collector per family running here that has metrics, in the services' order."""
    return [COLLECTORS[s.name](s) for s in services if s.name in COLLECTORS]
