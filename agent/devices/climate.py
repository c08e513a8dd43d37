"""The climate family (issue 5): devices of type sensor, and the grow rooms they hang in.

Wiring only; the sensor logic lives in ``drivers/sensor``. For each enabled
sensor a :class:`~drivers.sensor.reader.SensorPoller` runs in a thread of its
own (transports block; one slow RS-485 unit must not hold up the others), and
every reading comes back to the event loop, where :meth:`ClimateService.accept`

1. commits it as a ``sensor`` event (``data`` = ``Reading.as_dict()``, source =
   the device id) and the poller waits for that commit before its next poll
   (CONTRACT 6: the driver moves on once the event is on disk);
2. folds it into the 24-hour per-minute :class:`~agent.devices.climate_history.History`
   (written once a minute from a thread, under ``state_dir``);
3. shows it to its room's :class:`~drivers.sensor.rooms.RoomMonitor`, whose
   alarm edges become ``alarm`` events (source ``climate``). Rooms are also
   re-judged on a timer, since an alarm delay can expire between readings.
   Backfilled readings (flagged, or too old on arrival) never raise or clear.

Open alarms survive a restart (``agent/pipeline/alarms.py``, a small file beside
the outbox): a room still out of band is not raised a second time, and one
that recovered while the agent was down is cleared once it is seen back in band.

The routes (``/v1/sensors``, ``/v1/sensors/{device}/history``, ``/v1/rooms``)
are in ``agent/web/climate_routes.py``, the Prometheus collector in
``agent/ops/device_metrics.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, device_where
from agent.devices.climate_history import History
from agent.devices.family import BaseService, ServiceContext, idle_device
from agent.errors import ConfigIssue, OutboxError
from agent.pipeline.alarms import ALARMS_FILE, AlarmBook
from drivers.sensor.config import parse_rooms, parse_sensor, room_for
from drivers.sensor.errors import SensorConfigError
from drivers.sensor.reader import SensorPoller, SensorSource, SensorSpec
from drivers.sensor.reading import Reading
from drivers.sensor.rooms import AlarmCleared, AlarmEdge, RoomMonitor, RoomSpec

log = logging.getLogger(__name__)

EVALUATE_S = 5.0          # rooms re-judged this often between readings
HISTORY_FLUSH_S = 60.0    # finished minutes written this often
COMMIT_WAIT_S = 10.0      # a poller waits this long for its reading's commit, then moves on
JOIN_S = 0.5              # stop(): how long poller threads get to finish their poll
HISTORY_FILE = "sensor-history.sqlite"
ALARM_SOURCE = "climate"


# -- config ------------------------------------------------------------------------------


@dataclass
class SensorEntry:
    """One configured sensor: its spec (or why it has none), its poller and its counts."""

    device: str
    room: str
    model: str
    url: str
    enabled: bool
    spec: SensorSpec | None
    problem: str | None = None        # a config or open error: never polled
    poller: SensorPoller | None = None
    thread: threading.Thread | None = None
    readings: int = 0
    invalid: Counter[str] = field(default_factory=Counter)   # by fault code
    commit_slow: bool = False         # its last reading outlived COMMIT_WAIT_S (log once)


@dataclass
class ClimatePlan:
    """The climate part of a config: rooms, sensors, and every problem with its key path."""

    rooms: dict[str, RoomSpec]
    sensors: list[SensorEntry]
    issues: list[ConfigIssue]


def _dotted(path: str) -> str:
    """``rooms[1].bands`` -> ``rooms.1.bands``: the path style of agent/config.py."""
    return re.sub(r"\[(\d+)\]", r".\1", path)


def plan_climate(cfg: AgentConfig) -> ClimatePlan:
    """Validate ``[[rooms]]`` and every ``[[devices]]`` sensor; never raises for bad config."""
    issues: list[ConfigIssue] = []
    tz = cfg.site.timezone
    rooms: dict[str, RoomSpec] = {}
    # Every named room, good or not: a sensor in a room whose table has a mistake is
    # not reported a second time as "not a [[rooms]] name".
    named: dict[str, RoomSpec] = {}
    for index, raw_room in enumerate(cfg.rooms):
        # One at a time, so one bad room does not take the others' alarms with it.
        name = raw_room.get("name")
        try:
            (spec_room,) = parse_rooms([raw_room], tz).values()
        except SensorConfigError as exc:
            issues.extend(ConfigIssue(_dotted(i.path.replace("rooms[0]", f"rooms[{index}]")),
                                      i.message) for i in exc.issues)
            if isinstance(name, str) and name:
                named.setdefault(name, room_for(name, {}, tz))
            continue
        if spec_room.name in rooms:
            issues.append(ConfigIssue(f"rooms.{index}.name",
                                      f"{spec_room.name!r} is used twice"))
            continue
        rooms[spec_room.name] = named[spec_room.name] = spec_room
    sensors: list[SensorEntry] = []
    for index, device in enumerate(cfg.devices):
        if device.type != "sensor":
            continue
        raw = device.model_dump()
        prefix = device_where(index, device.id)
        spec: SensorSpec | None = None
        problem = None
        try:
            spec = parse_sensor(raw, named)
        except SensorConfigError as exc:
            found = [ConfigIssue(f"{prefix}.{_dotted(i.path)}" if i.path else prefix, i.message)
                     for i in exc.issues]
            issues.extend(found)
            problem = "config: " + "; ".join(str(i) for i in found)
        sensors.append(SensorEntry(
            device=device.id, room=str(raw.get("room") or "?"), model=str(raw.get("model", "?")),
            url=device.url, enabled=device.enabled, spec=spec, problem=problem))
    return ClimatePlan(rooms=rooms, sensors=sensors, issues=issues)


# -- the service -------------------------------------------------------------------------


class ClimateService(BaseService):
    """Sensors polled in threads; readings, history, rooms and alarms in the loop."""

    name = "climate"

    def __init__(self, cfg: AgentConfig, *, clock: Callable[[], float] = time.time,
                 sources: Mapping[str, SensorSource] | None = None) -> None:
        super().__init__(cfg)
        self.clock = clock
        self._sources = dict(sources or {})     # device id -> transport (tests, bench)
        self.sensors: dict[str, SensorEntry] = {}
        self.rooms: dict[str, RoomSpec] = {}
        self.monitors: dict[str, RoomMonitor] = {}
        self.history: History | None = None
        self.history_error: str | None = None
        self.alarms = AlarmBook(None)
        self.alarm_counts: Counter[tuple[str, str, str]] = Counter()   # (room, code, state)
        self._pending_alarms: deque[dict[str, Any]] = deque()
        # Many readings are committed at once; one sender at a time keeps each alarm
        # sent once and in order (the head stays queued until its commit returns).
        self._sending = asyncio.Lock()
        self._stop = threading.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._emit_error: str | None = None
        self._started = False
        # devices() also runs in the uplink thread (P/health) while the loop counts.
        self._counts_lock = threading.Lock()

    @classmethod
    def config_issues(cls, cfg: AgentConfig) -> list[ConfigIssue]:
        return plan_climate(cfg).issues

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        plan = plan_climate(self.cfg)
        for issue in plan.issues:
            log.error("climate: config %s; that part is not started", issue)
        self.rooms = plan.rooms
        self.sensors = {s.device: s for s in plan.sensors}
        tz = self.cfg.site.timezone
        for name, spec in self.rooms.items():
            self.monitors[name] = RoomMonitor(spec)
        for entry in plan.sensors:
            if entry.room not in self.monitors and entry.spec is not None:
                # A room without a [[rooms]] table still gets the CO2 safety alarm.
                self.monitors[entry.room] = RoomMonitor(room_for(entry.room, {}, tz))
        if not any(s.enabled for s in plan.sensors) and not self.rooms:
            return   # nothing to run; leave no files behind
        state_dir = Path(ctx.state_dir)
        self.alarms = await asyncio.to_thread(AlarmBook, state_dir / ALARMS_FILE)
        self.history = await asyncio.to_thread(self._open_history, state_dir / HISTORY_FILE)
        await asyncio.to_thread(self._open_pollers)
        self._started = True
        for entry in self.sensors.values():
            if entry.poller is None:
                continue
            entry.thread = threading.Thread(target=self._run_poller, args=(entry,),
                                            name=f"sensor-{entry.device}", daemon=True)
            entry.thread.start()
        self._tasks = [asyncio.create_task(self._evaluate_loop(), name="climate-evaluate"),
                       asyncio.create_task(self._flush_loop(), name="climate-history")]
        running = sum(1 for s in self.sensors.values() if s.poller is not None)
        log.info("climate: %d sensors polling in %d rooms", running, len(self.monitors))

    async def stop(self) -> None:
        """Bounded: threads get ``JOIN_S``; one stuck in a read is left (a daemon thread)."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._started:
            await asyncio.to_thread(self._join_and_close, JOIN_S)
            await self.evaluate()    # edges of the last readings; the outbox is still open
        history, self.history = self.history, None
        if history is not None:
            try:
                await asyncio.to_thread(history.close)
            except (sqlite3.Error, OSError) as exc:
                log.error("climate: writing the sensor history at shutdown failed: %s", exc)

    def _open_history(self, path: Path) -> History | None:
        """The history file; a corrupt one is set aside (chart data, not compliance data)."""
        for attempt in (1, 2):
            try:
                return History(str(path), clock=self.clock)
            except sqlite3.DatabaseError as exc:
                if attempt == 2 or not path.exists():
                    self.history_error = f"cannot open {path}: {exc}"
                    break
                aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
                log.error("climate: sensor history %s is unreadable (%s); moved aside to %s",
                          path, exc, aside)
                with contextlib.suppress(OSError):
                    os.replace(path, aside)
                    for suffix in ("-wal", "-shm"):
                        Path(f"{path}{suffix}").unlink(missing_ok=True)
            except OSError as exc:
                self.history_error = f"cannot open {path}: {exc}"
                break
        log.error("climate: %s; running without the 24-hour history", self.history_error)
        return None

    def _open_pollers(self) -> None:
        for entry in self.sensors.values():
            if not entry.enabled or entry.spec is None:
                continue
            try:
                entry.poller = SensorPoller(entry.spec, self._sources.get(entry.device),
                                            clock=self.clock)
            except SensorConfigError as exc:
                entry.problem = f"config: {exc}"
                log.error("sensor %s: %s; not polled", entry.device, exc)
            except Exception as exc:  # a driver that cannot even be built: report, go on
                entry.problem = f"cannot open {entry.url}: {exc}"
                log.exception("sensor %s: cannot open %s; not polled", entry.device, entry.url)

    def _run_poller(self, entry: SensorEntry) -> None:
        assert entry.poller is not None
        entry.poller.run(self._stop, lambda reading: self._deliver(entry, reading))

    def _deliver(self, entry: SensorEntry, reading: Reading) -> None:
        """In the poller's thread: hand the reading to the loop and wait for its commit."""
        if self._stop.is_set():
            return
        future = asyncio.run_coroutine_threadsafe(self.accept(reading), self.ctx.loop)
        try:
            future.result(COMMIT_WAIT_S)
        except TimeoutError:
            if not entry.commit_slow:
                log.warning("sensor %s: reading not committed within %g s; polling on",
                            entry.device, COMMIT_WAIT_S)
            entry.commit_slow = True
        else:
            entry.commit_slow = False

    def _join_and_close(self, budget_s: float) -> None:
        deadline = time.monotonic() + budget_s
        for entry in self.sensors.values():
            if entry.thread is not None:
                entry.thread.join(max(0.0, deadline - time.monotonic()))
        for entry in self.sensors.values():
            if entry.poller is None:
                continue
            if entry.thread is not None and entry.thread.is_alive():
                log.warning("sensor %s: still inside a read at shutdown; not waiting for it",
                            entry.device)
                continue
            try:
                entry.poller.close()
            except Exception:  # closing one port must not keep the others open
                log.exception("sensor %s: closing %s failed", entry.device, entry.url)

    # -- readings and alarms (in the loop) ---------------------------------------------

    async def accept(self, reading: Reading, *, backfill: bool = False) -> None:
        """One reading: commit it, fold it into the history, show it to its room.

        ``backfill``: a reading recorded earlier (a buffering sensor, an import);
        it is stored and shipped, marked, and never raises or clears an alarm.
        """
        entry = self.sensors.get(reading.device)
        if entry is not None:
            with self._counts_lock:
                entry.readings += 1
                entry.invalid.update(f.code for f in reading.faults)
        if self.history is not None:
            self.history.add(reading)
        monitor = self.monitors.get(reading.room)
        if monitor is not None:
            self._take_edges(monitor.observe(reading, self.clock(), backfill=backfill))
        data = reading.as_dict()
        if backfill:
            data["backfill"] = True
        try:
            await self.ctx.emit("sensor", data, reading.device)
        except OutboxError as exc:
            self._emit_failed(exc)
        else:
            if self._emit_error is not None:
                log.info("climate: sensor readings are committed again")
                self._emit_error = None
        if self._pending_alarms:
            await self._send_alarms()

    async def evaluate(self) -> None:
        """Re-judge every room now (a delay may have expired without a new reading)."""
        now = self.clock()
        for monitor in self.monitors.values():
            self._take_edges(monitor.evaluate(now))
        self._pending_alarms.extend(self.alarms.resolve_carried(self.monitors, now))
        await self._send_alarms()

    def _take_edges(self, edges: list[AlarmEdge]) -> None:
        for edge in edges:
            payload = self.alarms.on_edge(edge)
            if payload is None:
                log.info("climate: %s still open from before the restart", edge.code)
                continue
            if isinstance(edge, AlarmCleared):
                log.info("climate alarm cleared: %s", edge.message)
            elif edge.severity == "critical":
                log.error("climate alarm: %s", edge.message)
            else:
                log.warning("climate alarm: %s", edge.message)
            self._pending_alarms.append(payload)

    async def _send_alarms(self) -> None:
        # In order; one the outbox cannot take now (disk full) waits for the next try.
        async with self._sending:
            while self._pending_alarms:
                payload = self._pending_alarms[0]
                try:
                    await self.ctx.emit("alarm", payload, ALARM_SOURCE)
                except OutboxError as exc:
                    self._emit_failed(exc)
                    return
                self._pending_alarms.popleft()
                self.alarm_counts[(str(payload.get("room")), str(payload.get("code")),
                                   str(payload.get("state")))] += 1
                # Writes and fsyncs the open-alarm file: off the loop. Only this sender
                # (under ``_sending``) touches the committed record, one call at a time.
                await asyncio.to_thread(self.alarms.committed, payload)

    def _emit_failed(self, exc: OutboxError) -> None:
        message = str(exc)
        if self._emit_error is None:
            log.error("climate: the outbox refused a reading or alarm: %s", message)
        self._emit_error = message

    async def _evaluate_loop(self) -> None:
        while True:
            await asyncio.sleep(EVALUATE_S)
            try:
                await self.evaluate()
            except Exception:  # a bug in one round must not end the alarms for good
                log.exception("climate: evaluating the rooms failed")

    async def _flush_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(HISTORY_FLUSH_S)
            history = self.history
            if history is None:
                continue
            try:
                await asyncio.to_thread(history.flush)
            except (sqlite3.Error, OSError) as exc:
                if not failing:
                    log.error("climate: writing the sensor history failed (%s); the minutes "
                              "are kept in memory and retried", exc)
                failing = True
            else:
                if failing:
                    log.info("climate: sensor history writes again")
                failing = False

    # -- what the rest of the agent sees -----------------------------------------------

    def devices(self) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for entry in self.sensors.values():
            base: dict[str, Any] = {"id": entry.device, "type": "sensor",
                                    "model": entry.model, "room": entry.room, "url": entry.url}
            if not entry.enabled or entry.poller is None:
                out.append(idle_device(base, enabled=entry.enabled, problem=entry.problem,
                                       readings=0, invalid=0))
                continue
            snap = entry.poller.snapshot(now)
            with self._counts_lock:
                readings, invalid = entry.readings, dict(entry.invalid)
            snap.update(last_fault=snap.get("error"), readings=readings,
                        invalid=sum(invalid.values()), invalid_by_reason=invalid,
                        polls=entry.poller.polls,
                        interval_s=entry.poller.interval_s)
            out.append(snap)
        return out

    def latest(self, now: float | None = None) -> list[dict[str, Any]]:
        """GET /v1/sensors: the newest reading of every enabled sensor (CONTRACT 5)."""
        now = self.clock() if now is None else now
        out = []
        for entry in self.sensors.values():
            if not entry.enabled:
                continue
            reading = entry.poller.latest(now) if entry.poller is not None else None
            if reading is not None:
                out.append(reading.as_dict())
                continue
            reason = entry.problem or "no reading yet"
            out.append({"device": entry.device, "room": entry.room, "ts": None,
                        "temperature_c": None, "rh_pct": None, "co2_ppm": None,
                        "vpd_kpa": None, "dew_point_c": None, "valid": False,
                        "reason": reason, "leaf_vpd_kpa": None, "abs_humidity_g_m3": None,
                        "faults": []})
        return out


