"""The scanners family (issue 3): devices of type scanner, and the package catalog.

Wiring only; reading and understanding scans is ``drivers/scanner``. For each
enabled ``[[devices]]`` entry of type ``scanner`` one
:class:`~drivers.scanner.reader.ScannerReader` runs in its own thread. In
that thread each scan is judged against the local package catalog
(:mod:`agent.devices.catalog`): a ``package_tag`` scan, or a ``retail_id`` whose
package tag decodes, carries ``known: true|false`` (``null`` for codes that
name no package, or while the catalog cannot be read). Then it hops to the
event loop, where, in arrival order:

1. it is committed as a ``scan`` event (source = the device id;
   ``data`` = ``Scan.as_event_data()`` + ``device``, ``package_tag``,
   ``known``), many scans sharing one group commit;
2. once committed, its envelope, exactly as HQ will receive it, goes to every
   ``/v1/scans`` WebSocket client (:mod:`agent.web.scanning_routes`). A scan the
   outbox refuses (full, disk full) still reaches the POS, with ``id`` and
   ``seq`` null and ``refused`` saying why, so the counter knows the scanner
   works while the sale itself will be refused too.

Repeated reads within the debounce window are dropped by the reader. A reader
state edge (``up``/``down``) becomes one ``device`` event and, for ``down``,
one ``alarm`` (``scanner_down``), cleared once the scanner is back; the reader
logs the edge itself (one ERROR, one INFO), so nothing here logs it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, device_where
from agent.devices.catalog import CATALOG_FILE, Catalog, CatalogError, parse_tags
from agent.devices.catalog import PUT_KEYS as CATALOG_PUT_KEYS
from agent.devices.catalog import REMOVE_KEYS as CATALOG_REMOVE_KEYS
from agent.devices.family import (
    BaseService,
    CommandHandler,
    ServiceContext,
    current_command_id,
    idle_device,
)
from agent.devices.scan_feed import ScanFeed
from agent.envelope import encode, iso_ms
from agent.errors import ConfigIssue, OutboxError
from drivers.scanner.errors import BadScannerConfig
from drivers.scanner.parse import Scan
from drivers.scanner.reader import ScannerReader
from drivers.scanner.transport import open_transport, scanner_setup

log = logging.getLogger(__name__)

READER_STOP_S = 0.5   # stop(): how long reader threads get to finish (they wake every 50 ms)
DRAIN_S = 0.3         # stop(): how long scans already read get to commit and go out
ALARM_CODE = "scanner_down"


# -- config ------------------------------------------------------------------------------


@dataclass
class ScannerEntry:
    """One configured scanner: its reader (or why it has none) and its counts."""

    device: str
    url: str
    enabled: bool
    options: dict[str, Any]
    problem: str | None = None
    reader: ScannerReader | None = None
    # (classification, valid) -> scans, counted in the loop
    by_class: dict[tuple[str, bool], int] = field(default_factory=dict)
    known: int = 0
    unknown: int = 0
    refused: int = 0
    alarm_open: bool = False


def _validate(index: int, device_id: str, device_url: str, options: dict[str, Any]) -> None:
    where = device_where(index, device_id)
    stripped, parsed = scanner_setup(device_url, options, where=where)
    open_transport(stripped, parsed, where=where)  # builds, never opens


def plan_scanners(cfg: AgentConfig) -> tuple[list[ScannerEntry], list[ConfigIssue]]:
    """Every ``[[devices]]`` scanner, with the problems of each by key path."""
    entries: list[ScannerEntry] = []
    issues: list[ConfigIssue] = []
    for index, device in enumerate(cfg.devices):
        if device.type != "scanner":
            continue
        options = device.model_dump()
        entry = ScannerEntry(device=device.id, url=device.url, enabled=device.enabled,
                             options=options)
        try:
            _validate(index, device.id, device.url, options)
        except BadScannerConfig as exc:
            issues.append(ConfigIssue(exc.key, exc.message))
            entry.problem = f"config: {exc}"
        entries.append(entry)
    return entries, issues


def scan_event_data(device: str, scan: Scan, catalog: Catalog | None) -> dict[str, Any]:
    """The ``data`` of a ``scan`` event: the scan, which device, which package, known."""
    data: dict[str, Any] = {"device": device, **scan.as_event_data()}
    tag: str | None = None
    if scan.valid and scan.classification == "package_tag":
        tag = scan.code
    elif scan.valid and scan.classification == "retail_id" and scan.retail_id:
        value = scan.retail_id.get("package_tag")
        tag = value if isinstance(value, str) else None
    data["package_tag"] = tag
    data["known"] = None if tag is None or catalog is None else catalog.known(tag)
    return data


def _json(data: dict[str, Any]) -> str:
    # The same bytes ServiceContext.emit commits, so the WebSocket shows what HQ gets.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


@dataclass
class _Pending:
    kind: str
    data: dict[str, Any]
    source: str
    commit: asyncio.Task[Any]


# -- the service -------------------------------------------------------------------------


class ScannerService(BaseService):
    """Scanners read in threads; scans committed, then pushed to WebSocket clients, in order."""

    name = "scanners"

    def __init__(self, cfg: AgentConfig) -> None:
        super().__init__(cfg)
        self.scanners: dict[str, ScannerEntry] = {}
        self.catalog: Catalog | None = None
        self.feed = ScanFeed()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self._refusing: str | None = None
        self._stopping = False

    @classmethod
    def config_issues(cls, cfg: AgentConfig) -> list[ConfigIssue]:
        return plan_scanners(cfg)[1]

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        entries, issues = plan_scanners(self.cfg)
        for issue in issues:
            log.error("scanners: config %s; that scanner is not started", issue)
        self.scanners = {e.device: e for e in entries}
        # The catalog is the site's, not a scanner's: HQ's catalog commands work (and
        # printers may read it) with no scanner configured.
        catalog = Catalog(Path(ctx.state_dir) / CATALOG_FILE)
        await asyncio.to_thread(catalog.open)
        self.catalog = catalog
        self._pump = asyncio.create_task(self._deliver_loop(), name="scans-deliver")
        for entry in self.scanners.values():
            if entry.enabled and entry.problem is None:
                self._start_reader(entry)
        running = sum(1 for e in self.scanners.values() if e.reader is not None)
        if self.scanners:
            log.info("scanners: %d of %d reading; catalog of %d package tags", running,
                     len(self.scanners), catalog.count())

    def _start_reader(self, entry: ScannerEntry) -> None:
        try:
            entry.reader = ScannerReader(entry.device, entry.url, entry.options,
                                         on_scan=functools.partial(self._on_scan, entry),
                                         on_state=functools.partial(self._on_state, entry))
            entry.reader.start()
        except BadScannerConfig as exc:
            entry.reader, entry.problem = None, f"config: {exc}"
            log.error("scanner %s: %s; not started", entry.device, exc)
        except Exception as exc:  # a driver that cannot even be built: report, go on
            entry.reader, entry.problem = None, f"cannot start {entry.url}: {exc}"
            log.exception("scanner %s: cannot start %s", entry.device, entry.url)

    async def stop(self) -> None:
        """Bounded: readers get READER_STOP_S, scans already read DRAIN_S, then clients close."""
        self._stopping = True
        readers = [e.reader for e in self.scanners.values() if e.reader is not None]
        if readers:
            await asyncio.gather(*(asyncio.to_thread(r.stop, READER_STOP_S) for r in readers))
        await asyncio.sleep(0)  # run the hops the readers scheduled before they stopped
        if self._pump is not None:
            try:
                await asyncio.wait_for(self._queue.join(), DRAIN_S)
            except TimeoutError:
                log.warning("scanners: %d scans not committed within %.1f s of stopping",
                            self._queue.qsize(), DRAIN_S)
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        self.feed.close()
        if self.catalog is not None:
            await asyncio.to_thread(self.catalog.close)

    # -- reader threads --------------------------------------------------------------------

    def _on_scan(self, entry: ScannerEntry, scan: Scan) -> None:
        """In the reader thread: judge the scan here (a SQLite read), then hop to the loop."""
        data = scan_event_data(entry.device, scan, self.catalog)
        self._hop(self._scan_arrived, entry, data)

    def _on_state(self, entry: ScannerEntry, state: str, reason: str | None) -> None:
        where = entry.reader.where if entry.reader is not None else entry.url
        self._hop(self._state_changed, entry, state, reason, where)

    def _hop(self, fn: Any, *args: Any) -> None:
        try:
            self.ctx.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the daemon is gone, nothing to tell
            log.debug("scanners: event after the loop closed dropped")

    # -- the loop --------------------------------------------------------------------------

    def _scan_arrived(self, entry: ScannerEntry, data: dict[str, Any]) -> None:
        key = (str(data["classification"]), bool(data["valid"]))
        entry.by_class[key] = entry.by_class.get(key, 0) + 1
        if data["known"] is True:
            entry.known += 1
        elif data["known"] is False:
            entry.unknown += 1
        self._commit("scan", data, entry.device)

    def _state_changed(self, entry: ScannerEntry, state: str, reason: str | None,
                       where: str) -> None:
        self._commit("device", {"device": entry.device, "type": "scanner", "state": state,
                                "reason": reason, "where": where}, entry.device)
        if state == "down" and not entry.alarm_open:
            entry.alarm_open = True
            self._commit("alarm", {
                "code": ALARM_CODE, "severity": "warning", "state": "raised",
                "device": entry.device, "reason": reason,
                "message": f"scanner {entry.device}: {where} is down ({reason}); waiting for "
                           "it to come back"}, entry.device)
        elif state == "up" and entry.alarm_open:
            entry.alarm_open = False
            self._commit("alarm", {
                "code": ALARM_CODE, "severity": "info", "state": "cleared",
                "device": entry.device, "reason": None,
                "message": f"scanner {entry.device}: {where} is back"}, entry.device)

    def _commit(self, kind: str, data: dict[str, Any], source: str) -> None:
        if self._pump is None:  # stopped: a reader that outlived stop() has nothing to add
            log.debug("scanners: %s event from %s after stop dropped", kind, source)
            return
        # The commit starts now (tasks run in creation order, so seqs follow arrival
        # order and many scans share a group commit); _deliver_loop takes them in order.
        task = self.ctx.loop.create_task(self.ctx.emit(kind, data, source))
        self._queue.put_nowait(_Pending(kind, data, source, task))

    async def _deliver_loop(self) -> None:
        while True:
            pending = await self._queue.get()
            try:
                await self._deliver(pending)
            except Exception:  # a bug with one event must not end delivery for good
                log.exception("scanners: delivering a %s event failed", pending.kind)
            finally:
                self._queue.task_done()

    async def _deliver(self, pending: _Pending) -> None:
        accepted = None
        refused: str | None = None
        try:
            accepted = await pending.commit
        except OutboxError as exc:
            refused = str(exc)
            entry = self.scanners.get(pending.source)
            if entry is not None and pending.kind == "scan":
                entry.refused += 1
            if self._refusing is None:
                log.error("scanners: the outbox refused a %s event from %s: %s", pending.kind,
                          pending.source, exc)
            self._refusing = refused
        else:
            if self._refusing is not None:
                log.info("scanners: events are committed again")
                self._refusing = None
        if pending.kind != "scan" or not self.feed.clients:
            return
        data_json = _json(pending.data)
        if accepted is not None:
            text = encode(event_id=accepted.id, site=self.cfg.site.id, kind="scan",
                          seq=accepted.seq, ts=accepted.ts, source=pending.source,
                          data_json=data_json).decode()
        else:
            text = (f'{{"v":1,"id":null,"site":{json.dumps(self.cfg.site.id)},"kind":"scan",'
                    f'"seq":null,"ts":{json.dumps(iso_ms(time.time()))},'
                    f'"source":{json.dumps(pending.source)},"data":{data_json},'
                    f'"refused":{json.dumps(refused)}}}')
        self.feed.publish(text)
        # Let the clients' senders run before the next scan: a group commit can finish
        # hundreds of scans at once, and published in one go they would overflow the
        # queue of a client that keeps up perfectly well.
        await asyncio.sleep(0)

    # -- HQ commands (command worker threads) ----------------------------------------------

    def commands(self) -> dict[str, CommandHandler]:
        return {"catalog-put": self._catalog_put, "catalog-remove": self._catalog_remove}

    def _catalog(self, command: str) -> Catalog:
        if self.catalog is None:
            raise CatalogError(f"{command}: the scanners service is not started")
        return self.catalog

    def _catalog_put(self, args: dict[str, Any]) -> dict[str, Any]:
        tags = parse_tags(args, "catalog-put", CATALOG_PUT_KEYS)
        replace = args.get("replace", False)
        if not isinstance(replace, bool):
            raise CatalogError("catalog-put: replace: must be true or false; nothing was "
                               "changed", "replace")
        allow_empty = args.get("allow_empty", False)
        if not isinstance(allow_empty, bool):
            raise CatalogError("catalog-put: allow_empty: must be true or false; nothing was "
                               "changed", "allow_empty")
        if replace and not tags and not allow_empty:
            # Issue 9: one empty list (a bug at HQ, a truncated export) wiped the catalog.
            raise CatalogError("catalog-put: tags: empty with \"replace\": true would empty "
                               "the catalog; send \"allow_empty\": true to mean it. Nothing "
                               "was changed", "tags")
        return self._catalog("catalog-put").put(tags, replace=replace,
                                                command_id=current_command_id.get())

    def _catalog_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        tags = parse_tags(args, "catalog-remove", CATALOG_REMOVE_KEYS)
        return self._catalog("catalog-remove").remove(tags, command_id=current_command_id.get())

    # -- what the rest of the agent sees -----------------------------------------------------

    def devices(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for entry in self.scanners.values():
            base: dict[str, Any] = {"id": entry.device, "type": "scanner", "url": entry.url}
            if not entry.enabled or entry.reader is None:
                out.append(idle_device(base, enabled=entry.enabled, problem=entry.problem,
                                       scans=0))
                continue
            snap = entry.reader.snapshot()
            by_class: dict[str, dict[str, int]] = {}
            for (classification, valid), n in list(entry.by_class.items()):
                by_class.setdefault(classification, {"valid": 0, "invalid": 0})[
                    "valid" if valid else "invalid"] += n
            snap.update(last_fault=snap.get("reason"), error=None, by_classification=by_class,
                        known=entry.known, unknown=entry.unknown, refused=entry.refused,
                        alarm_open=entry.alarm_open)
            out.append(snap)
        return out


