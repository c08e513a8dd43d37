"""Sensor pipeline benchmark: 200 simulated sensors at 1 Hz; prints one JSON object.

Every reading goes through the whole driver-side pipeline: the sim transport
(``sim://climate``), calibration and plausibility (``Checker``), derived values
(VPD, leaf VPD, dew point, absolute humidity), the room's bands and alarms
(``RoomMonitor``), the 24-hour history fold (``History.add``, flushed once a
minute) and the ``sensor`` event body (``Reading.as_dict`` + ``json.dumps``).
200 sensors in 20 rooms; one in ten is faulty (stuck or spiking), so the
suspect paths are exercised too.

Three figures:

- ``capacity``: the pipeline as fast as it goes on one thread, with an injected
  clock stepping 1 s per round of 200 readings: readings/s and CPU us per reading.
- ``realtime_thread``: one scheduler thread polling each sensor every second
  for ``--seconds`` of wall time: readings/s sustained, lateness of each poll
  against its deadline, CPU use (``time.process_time``, ``getrusage``).
- ``realtime_asyncio``: the same from an asyncio loop, each poll through
  ``asyncio.to_thread`` (how the daemon runs blocking drivers).

Usage: python bench/sensor_bench.py [--sensors 200] [--seconds 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.devices.climate_history import History
from drivers.sensor.plausibility import PlausibilityConfig
from drivers.sensor.reader import SensorPoller, SensorSpec
from drivers.sensor.reading import Reading
from drivers.sensor.rooms import RoomMonitor, RoomSpec

ROOM_SIZE = 10


class Site:
    """200 sensors, their rooms and the history: the pipeline under test."""

    def __init__(self, n: int, clock: Any, history_path: str) -> None:
        self.clock = clock
        self.rooms: dict[str, RoomMonitor] = {}
        self.pollers: list[SensorPoller] = []
        for i in range(n):
            room = f"Room {i // ROOM_SIZE + 1}"
            if room not in self.rooms:
                stage = ("veg", "flower")[(i // ROOM_SIZE) % 2]
                self.rooms[room] = RoomMonitor(RoomSpec.for_stage(room, stage))
            # One sensor in ten is faulty: stuck after a minute, or spiking.
            fault = {3: "&fault=stuck&fault_after_s=60", 7: "&fault=spike&spike_p=0.05"}.get(
                i % 20, "")
            spec = SensorSpec(device=f"sensor-{i:03d}", room=room, model="sim",
                              url=f"sim://climate?seed={i}{fault}", interval_s=1.0,
                              plausibility=PlausibilityConfig(warmup_s=0.0),
                              leaf_temp_offset_c=-2.0)
            self.pollers.append(SensorPoller(spec, clock=clock))
        self.history = History(history_path, clock=clock)
        self.readings = 0
        self.invalid = 0
        self.alarms = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def consume(self, reading: Reading) -> None:
        """What the daemon does with a reading, minus the outbox write."""
        body = json.dumps(reading.as_dict(), separators=(",", ":"))
        with self._lock:
            edges = self.rooms[reading.room].observe(reading, reading.ts)
            self.history.add(reading)
            self.readings += 1
            self.invalid += not reading.valid
            self.alarms += len(edges)
            self.bytes += len(body)

    def step(self, poller: SensorPoller) -> None:
        reading = poller.poll()
        if reading is not None:
            self.consume(reading)

    def close(self) -> None:
        self.history.close()


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _cpu() -> tuple[float, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.process_time(), r.ru_utime, r.ru_stime


def _cpu_report(before: tuple[float, float, float], wall: float, readings: int
                ) -> dict[str, Any]:
    after = _cpu()
    cpu = after[0] - before[0]
    return {
        "cpu_s": round(cpu, 3),
        "user_s": round(after[1] - before[1], 3),
        "system_s": round(after[2] - before[2], 3),
        "cpu_pct_of_one_core": round(100.0 * cpu / wall, 1),
        "cpu_us_per_reading": round(1e6 * cpu / readings, 1) if readings else None,
    }


def bench_capacity(n: int, rounds: int, tmp: str) -> dict[str, Any]:
    clock = FakeClock(1_780_000_000.0)
    site = Site(n, clock, os.path.join(tmp, "capacity.db"))
    for p in site.pollers:  # warm the sims up outside the timing
        site.step(p)
    site.readings = site.invalid = site.alarms = site.bytes = 0
    before, t0 = _cpu(), time.perf_counter()
    for _ in range(rounds):
        clock.t += 1.0
        for p in site.pollers:
            site.step(p)
        if int(clock.t) % 60 == 0:
            site.history.flush()
    wall = time.perf_counter() - t0
    out = {"sensors": n, "simulated_s": rounds, "readings": site.readings,
           "wall_s": round(wall, 3), "readings_per_s": round(site.readings / wall),
           "invalid": site.invalid, "alarm_edges": site.alarms,
           "event_bytes_per_reading": round(site.bytes / max(site.readings, 1)),
           **_cpu_report(before, wall, site.readings)}
    site.close()
    return out


def _lateness(late: list[float]) -> dict[str, Any]:
    late.sort()
    if not late:
        return {}
    return {"p50_ms": round(1e3 * late[len(late) // 2], 2),
            "p99_ms": round(1e3 * late[int(len(late) * 0.99)], 2),
            "max_ms": round(1e3 * late[-1], 2)}


def bench_thread(n: int, seconds: float, tmp: str) -> dict[str, Any]:
    site = Site(n, time.time, os.path.join(tmp, "thread.db"))
    start = time.monotonic() + 0.1
    # Spread the sensors over the second, as independent pollers drift apart anyway.
    heap = [(start + i / n, i) for i in range(n)]
    heapq.heapify(heap)
    late: list[float] = []
    end = start + seconds
    next_flush = start + 60
    before = _cpu()
    while True:
        due, i = heap[0]
        now = time.monotonic()
        if due > end:
            break
        if due > now:
            time.sleep(due - now)  # the scheduler's wait; a bench, not a test
            now = time.monotonic()
        heapq.heapreplace(heap, (due + 1.0, i))
        late.append(now - due)
        site.step(site.pollers[i])
        if now >= next_flush:
            site.history.flush()
            next_flush += 60
    wall = time.monotonic() - start
    out = {"sensors": n, "interval_s": 1.0, "wall_s": round(wall, 2), "readings": site.readings,
           "readings_per_s": round(site.readings / wall, 1), "target_per_s": n,
           "lateness": _lateness(late), **_cpu_report(before, wall, site.readings)}
    site.close()
    return out


def bench_asyncio(n: int, seconds: float, tmp: str) -> dict[str, Any]:
    site = Site(n, time.time, os.path.join(tmp, "asyncio.db"))
    late: list[float] = []

    async def sensor(i: int, start: float, end: float) -> None:
        loop = asyncio.get_running_loop()
        due = start + i / n
        while due <= end:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            late.append(loop.time() - due)
            reading = await asyncio.to_thread(site.pollers[i].poll)
            if reading is not None:
                site.consume(reading)
            due += 1.0

    async def main() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.1
        async with asyncio.TaskGroup() as tg:
            for i in range(n):
                tg.create_task(sensor(i, start, start + seconds))
        return loop.time() - start

    before = _cpu()
    wall = asyncio.run(main())
    out = {"sensors": n, "interval_s": 1.0, "wall_s": round(wall, 2), "readings": site.readings,
           "readings_per_s": round(site.readings / wall, 1), "target_per_s": n,
           "lateness": _lateness(late), **_cpu_report(before, wall, site.readings)}
    site.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sensors", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=60, help="capacity: simulated seconds")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    # The faulty sensors log their edges; the bench's output is the JSON.
    logging.getLogger("drivers.sensor").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="sensor-bench-") as tmp:
        result = {
            "bench": "sensor_pipeline",
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "platform": platform.platform()},
            "pipeline": ["sim read", "calibration+plausibility", "derive (VPD, leaf VPD, dew "
                         "point, abs humidity)", "room bands+alarms", "history fold",
                         "event JSON"],
            "capacity": bench_capacity(args.sensors, args.rounds, tmp),
            "realtime_thread": bench_thread(args.sensors, args.seconds, tmp),
            "realtime_asyncio": bench_asyncio(args.sensors, args.seconds, tmp),
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
