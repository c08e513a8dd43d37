"""The Metrc forwarder inside ``edge-agent hq`` (``[metrc] enabled = true``).

``workers`` threads share one loop: take new events in (one thread at a time),
claim due work in the store (a batch of one site's sales, or one plant event),
and settle it. One claim is one attempt:

1. rows marked ``posted`` (a POST left and its answer was lost, or the process
   died) are first looked up by external number; found means reported;
2. the rest are posted as one request of up to ``batch_size`` receipts, with
   ``posted`` committed before it leaves;
3. Metrc's answer settles them: 200 reported; 400 refused the whole request,
   so it is split in halves until the bad receipt stands alone and fails with
   Metrc's message (the others are reported); 429 waits for Retry-After;
   5xx, timeouts and dropped connections go back to the queue with capped,
   jittered backoff (``posted`` kept when the request may have landed); 401/403
   likewise, logged as the configuration problem it is.

Pacing is per facility (licence) and per key (:class:`~.client.Pacer`), in
this process; a 429 holds the facility until its Retry-After.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from agent.config import HqSiteConfig
from agent.errors import AgentError
from hq.backends import open_report_store
from hq.config import HqReceiverConfig
from hq.metrc.client import (
    MetrcAuthFailed,
    MetrcClient,
    MetrcError,
    MetrcRateLimited,
    MetrcRefused,
    Pacer,
)
from hq.metrc.mapping import MappingError, local_time, plant_call, receipt
from hq.metrc.reports import Claim, Intake, Report, ReportStore
from hq.store import StoreError, parse_time

log = logging.getLogger(__name__)

COUNTS_INTERVAL_S = 5.0     # how often the per-site gauges (and the overdue alarm) refresh
LOG_INTERVAL_S = 60.0       # at most one WARNING per site and kind of trouble in this long


class ForwarderError(AgentError):
    """The forwarder cannot start (keys unreadable, store not supported)."""


def backoff(attempts: int, low: float, high: float, rand: Callable[[], float]) -> float:
    """Capped exponential backoff with jitter (a fleet must not retry in step)."""
    delay: float = min(high, low * (2 ** min(max(attempts - 1, 0), 30)))
    return delay * (0.5 + rand() / 2)


def owner_id() -> str:
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:40]
    return f"{host or 'hq'}-{secrets.token_hex(4)}"


class Forwarder:
    """Reports stored events to Metrc; ``start()`` / ``stop()`` from ``edge-agent hq``."""

    def __init__(self, cfg: HqReceiverConfig, *, store: ReportStore | None = None,
                 registry: Any = None, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random, transport: Any = None,
                 sender: Any = None) -> None:
        self.cfg = cfg
        self.m = cfg.metrc
        if self.m.lease_s <= 2 * self.m.timeout_s:
            raise ForwarderError(f"metrc.lease_s ({self.m.lease_s:g}) must be more than twice "
                                 f"metrc.timeout_s ({self.m.timeout_s:g}): a batch's lease "
                                 "must outlast its call")
        try:
            self._keys = self.m.keys()
        except OSError as exc:
            raise ForwarderError(f"metrc.vendor_key_file / user_key_file cannot be read: "
                                 f"{exc.strerror or exc}: {getattr(exc, 'filename', '')}"
                                 ) from None
        except ValueError as exc:
            raise ForwarderError(str(exc)) from None
        self._owns_store = store is None
        self.store: ReportStore = store if store is not None else open_report_store(
            cfg.hq.store)
        self.sites: dict[str, HqSiteConfig] = {s.id: s for s in cfg.hq.sites}
        self.owner = owner_id()
        self._clock = clock
        self._rand = rand
        self._transport = transport
        self._sender = sender
        # The forwarder's clock (wall time, or a test's): a 429's hold is compared with
        # next_at, which is on that clock too.
        self.pacer = Pacer(self.m.calls_per_s_per_facility, self.m.calls_per_s_per_key,
                           clock=clock)
        self._clients: dict[str, MetrcClient] = {}
        self._clients_lock = threading.Lock()
        self._intake_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.counters: dict[str, int] = dict.fromkeys(
            ("taken_in", "posts", "reported", "lookups", "found_by_lookup", "refused",
             "rate_limited", "unavailable", "auth_failed", "plant_calls", "failed",
             "catalog_syncs", "catalog_failures"), 0)
        self._counter_lock = threading.Lock()
        self.site_counts: dict[str, dict[str, int]] = {}
        self._overdue_alarmed: set[str] = set()
        self._logged: dict[tuple[str, str], float] = {}
        if registry is not None:
            from hq.metrc.metrics import register

            register(registry, self)

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per call
        for n in range(self.m.workers):
            self._threads.append(threading.Thread(target=self._work, args=(n,),
                                                  name=f"metrc-{n}", daemon=True))
        if self.m.catalog_sync_interval_s > 0:
            from hq.metrc.catalog_sync import CatalogSync

            sync = CatalogSync(self)
            self._threads.append(threading.Thread(target=sync.run, args=(self._stop,),
                                                  name="metrc-catalog", daemon=True))
        for t in self._threads:
            t.start()
        log.info("metrc: forwarding %s to Metrc (%d worker(s), batches of %d, owner %s)",
                 "/".join(self.m.kinds), self.m.workers, self.m.batch_size, self.owner)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        with self._clients_lock:
            for client in self._clients.values():
                client.close()
        if self._owns_store:
            self.store.close()

    def count(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += n

    def client(self, state: str) -> MetrcClient:
        url = self.m.url_for(state or "xx")
        with self._clients_lock:
            found = self._clients.get(url)
            if found is None:
                found = self._clients[url] = MetrcClient(
                    url, *self._keys, timeout_s=self.m.timeout_s, pacer=self.pacer,
                    retry_after_max_s=self.m.retry_after_max_s, transport=self._transport)
            return found

    # -- the loop --------------------------------------------------------------

    def _work(self, n: int) -> None:
        next_counts = 0.0
        while not self._stop.is_set():
            try:
                now = self._clock()
                if n == 0 and time.monotonic() >= next_counts:
                    next_counts = time.monotonic() + COUNTS_INTERVAL_S
                    self._refresh_counts(now)
                self.intake(now)
                claim = self.store.claim(self.owner, now, self.m.lease_s, self.m.batch_size)
                if claim is None:
                    self._stop.wait(self.m.poll_interval_s)
                    continue
                self.process(claim)
            except StoreError as exc:
                self._warn("store", "store", f"metrc: {exc}; retrying")
                self._stop.wait(self.m.poll_interval_s)
            except Exception:  # one bad batch must never stop reporting
                log.exception("metrc: unexpected error; the batch's lease runs out and it is "
                              "retried")
                self._stop.wait(self.m.poll_interval_s)

    def run_once(self) -> bool:
        """One intake and one claim, settled (for tests and benches); whether work was done."""
        now = self._clock()
        self.intake(now)
        claim = self.store.claim(self.owner, now, self.m.lease_s, self.m.batch_size)
        if claim is None:
            return False
        self.process(claim)
        return True

    def intake(self, now: float) -> int:
        if not self._intake_lock.acquire(blocking=False):
            return 0   # another worker of ours is at it
        try:
            taken = self.store.intake(self.m.kinds, self.describe, now)
        finally:
            self._intake_lock.release()
        if taken:
            self.count("taken_in", taken)
        return taken

    def _refresh_counts(self, now: float) -> None:
        self.site_counts = counts = self.store.counts(now)
        for site, row in counts.items():
            if row["overdue"] and site not in self._overdue_alarmed:
                self._overdue_alarmed.add(site)
                log.error("metrc: ALARM site %s has %d event(s) not reported to Metrc within "
                          "the deadline (overdue); see 'edge-agent hq metrc status --site %s'",
                          site, row["overdue"], site)
            elif not row["overdue"] and site in self._overdue_alarmed:
                self._overdue_alarmed.discard(site)
                log.info("metrc: site %s has nothing overdue any more", site)

    def _warn(self, site: str, what: str, message: str, level: int = logging.WARNING) -> None:
        """One line per (site, trouble) per LOG_INTERVAL_S; repeats at DEBUG."""
        now = time.monotonic()
        key = (site, what)
        if now - self._logged.get(key, -LOG_INTERVAL_S) >= LOG_INTERVAL_S:
            self._logged[key] = now
            log.log(level, message)
        else:
            log.debug(message)

    # -- intake: the fixed facts of a new event ---------------------------------

    def describe(self, site: str, kind: str, payload: str, ts: str) -> Intake:
        entry = self.sites.get(site)
        tz = entry.timezone if entry else "UTC"
        state = entry.state if entry else ""
        deadline_s = self.cfg.compliance.deadline_h(state) * 3600
        happened = parse_time(ts).timestamp()
        error = None
        number = None
        skip = False
        try:
            env = json.loads(payload)
            data = env.get("data") if isinstance(env, dict) else None
            if not isinstance(data, dict):
                raise MappingError("the stored envelope has no data object")
            if kind == "sale":
                number = str(data.get("receipt_number") or "")[:64] or None
                sold = data.get("sold_at")
                if isinstance(sold, str):
                    happened = _epoch(sold, happened)
                receipt(data, tz)   # a sale that cannot be mapped fails now, for a person
            else:
                skip = plant_call(data, ts, tz) is None
        except (MappingError, ValueError) as exc:
            error = str(exc)
        if error is None and not skip and (entry is None or not entry.license_number):
            error = (f"site {site} has no license_number in [[hq.sites]]: add it, then "
                     f"'edge-agent hq metrc retry --site {site} --failed'")
        day = datetime.fromtimestamp(happened, ZoneInfo(tz)).date().isoformat()
        return Intake(number, day, happened, happened + deadline_s, error, skip)

    # -- one attempt -----------------------------------------------------------

    def process(self, claim: Claim) -> None:
        entry = self.sites.get(claim.site)
        ids = [r.event_id for r in claim.reports]
        now = self._clock()
        if entry is None or not entry.license_number:
            self.store.failed(self.owner, ids, f"site {claim.site} has no license_number in "
                                               "[[hq.sites]]", now)
            self.count("failed", len(ids))
            return
        wait = self.pacer.blocked_for(entry.license_number)
        if wait > 0:   # a 429 holds this facility: do not queue up behind it
            self.store.release(self.owner, ids, now + wait, None)
            return
        attempt = _Attempt(self, claim, entry)
        try:
            if claim.kind == "sale":
                attempt.sales()
            else:
                attempt.plant()
        except MetrcError as exc:
            attempt.give_back(exc)


class _Attempt:
    """One claim being settled; ``settled`` holds the ids already written back."""

    def __init__(self, fw: Forwarder, claim: Claim, entry: HqSiteConfig) -> None:
        self.fw = fw
        self.claim = claim
        self.entry = entry
        self.license = entry.license_number
        self.client = fw.client(entry.state)
        self.settled: set[str] = set()
        self.store = fw.store
        self.owner = fw.owner

    def _renew(self) -> None:
        rest = [r.event_id for r in self.claim.reports if r.event_id not in self.settled]
        self.store.renew(self.owner, rest, self.fw._clock() + self.fw.m.lease_s)

    def _data(self, report: Report) -> tuple[dict[str, Any], str]:
        env = json.loads(self.claim.envelopes[report.event_id])
        return env["data"], env["ts"]

    def _fail(self, ids: list[str], message: str) -> None:
        self.store.failed(self.owner, ids, message, self.fw._clock())
        self.settled.update(ids)
        self.fw.count("failed", len(ids))
        log.warning("metrc: %s %s refused: %s (kept for a person; 'edge-agent hq metrc "
                    "retry' once fixed)", self.claim.site, ", ".join(ids), message)

    def _done(self, done: dict[str, str | None]) -> None:
        self.store.reported(self.owner, done, self.fw._clock())
        self.settled.update(done)
        self.fw.count("reported", len(done))

    # -- sales -------------------------------------------------------------------

    def sales(self) -> None:
        todo: list[tuple[Report, dict[str, Any]]] = []
        for report in self.claim.reports:
            if report.posted and report.number:
                self._renew()
                self.fw.count("lookups")
                found = self.client.find_receipt(self.license, report.number)
                if found is not None:
                    self.fw.count("found_by_lookup")
                    self._done({report.event_id: _text(found.get("Id"))})
                    continue
            try:
                data, _ = self._data(report)
                todo.append((report, receipt(data, self.entry.timezone)))
            except (MappingError, KeyError, ValueError) as exc:
                self._fail([report.event_id], str(exc))
        self._post(todo)

    def _post(self, group: list[tuple[Report, dict[str, Any]]]) -> None:
        if not group:
            return
        self._renew()
        ids = [r.event_id for r, _ in group]
        self.store.set_posted(self.owner, ids)
        self.fw.count("posts")
        try:
            metrc_ids = self.client.post_receipts(self.license, [b for _, b in group])
        except MetrcRefused as exc:
            self.store.set_posted(self.owner, ids, False)   # refused: nothing recorded
            if len(group) == 1:
                self.fw.count("refused")
                self._fail(ids, exc.message)
                return
            # Metrc refuses the whole request for one bad receipt: halves until it
            # stands alone, so the good ones are reported.
            half = len(group) // 2
            self._post(group[:half])
            self._post(group[half:])
            return
        except MetrcError as exc:
            if not exc.sent:
                self.store.set_posted(self.owner, ids, False)
            raise
        self._done({eid: _text(metrc_ids[i]) if i < len(metrc_ids) else None
                    for i, eid in enumerate(ids)})

    # -- plants ------------------------------------------------------------------

    def plant(self) -> None:
        report = self.claim.reports[0]
        try:
            data, ts = self._data(report)
            call = plant_call(data, ts, self.entry.timezone)
        except (MappingError, KeyError, ValueError) as exc:
            self._fail([report.event_id], str(exc))
            return
        if call is None:
            self._done({report.event_id: None})
            return
        if report.posted and not call.repeatable:
            self._fail([report.event_id], f"{call.method} {call.path} may have reached Metrc "
                       "(its answer was lost) and sending it again could record it twice: "
                       "check the plants in Metrc, then 'edge-agent hq metrc retry --event "
                       f"{report.event_id}' if it is not there")
            return
        self._renew()
        self.store.set_posted(self.owner, [report.event_id])
        self.fw.count("plant_calls")
        try:
            self.client.plant_call(self.license, call)
        except MetrcRefused as exc:
            self.store.set_posted(self.owner, [report.event_id], False)
            self.fw.count("refused")
            self._fail([report.event_id], exc.message)
            return
        except MetrcError as exc:
            if not exc.sent:
                self.store.set_posted(self.owner, [report.event_id], False)
            raise
        self._done({report.event_id: None})

    # -- giving back what is not settled ---------------------------------------------

    def give_back(self, exc: MetrcError) -> None:
        rest = [r for r in self.claim.reports if r.event_id not in self.settled]
        if not rest:
            return
        now = self.fw._clock()
        m = self.fw.m
        site = self.claim.site
        if isinstance(exc, MetrcRateLimited):
            self.fw.count("rate_limited")
            delay = exc.retry_after
            self.fw._warn(site, "429", f"metrc: {site}: {exc}")
        else:
            attempts = max(r.attempts for r in rest)
            delay = backoff(attempts, m.backoff_min_s, m.backoff_max_s, self.fw._rand)
            if isinstance(exc, MetrcAuthFailed):
                self.fw.count("auth_failed")
                self.fw._warn(site, "auth", f"metrc: {site}: {exc}", logging.ERROR)
            else:
                self.fw.count("unavailable")
                self.fw._warn(site, "unavailable", f"metrc: {site}: {exc}; retrying in "
                              f"{delay:.1f}s")
        self.store.release(self.owner, [r.event_id for r in rest], now + delay, exc.message)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:64]


def _epoch(text: str, default: float) -> float:
    try:
        return parse_time(text).timestamp()
    except ValueError:
        return default


__all__ = ["Forwarder", "ForwarderError", "backoff", "local_time"]
