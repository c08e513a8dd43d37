"""Agent-level climate bench: the real ``edge-agent``, 200 ``sim://climate`` sensors at 1 Hz.

A whole site on loopback (``agent.testing.localsite``: private mosquitto, HQ receiver,
the daemon) with ``--sensors`` simulated sensors in rooms of 10, one in ten
spiking, every sensor at ``interval_s = 1``. After a warm-up, for
``--seconds`` of wall time it measures:

- ``committed_per_s``: sensor events committed to the outbox per second (the
  ``sensor`` kind's ``last_seq`` in ``GET /v1/status``), against the offered
  ``sensors / interval`` readings per second;
- ``hq_stored_per_s``: sensor events HQ stored in the same window;
- ``agent_cpu_pct``: the agent process's CPU (utime + stime from
  ``/proc/PID/stat``) over the window, in percent of one core; the HQ
  receiver's the same way;
- the agent's RSS and thread count at the end.

Prints one JSON object. Usage:
python bench/climate_bench.py [--sensors 200] [--seconds 20] [--warmup 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.testing.localsite import LocalSite

ROOM_SIZE = 10


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_status(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip()
    return "?"


def _sensor_seq(site: LocalSite) -> int:
    status, body = site.request("GET", "/v1/status")
    if status != 200:
        raise RuntimeError(f"status answered {status}: {body}")
    return int(body["outbox"]["kinds"]["sensor"]["last_seq"] or 0)


def _hq_count(site: LocalSite) -> int:
    import sqlite3

    if not site.hq_db.exists():
        return 0
    con = sqlite3.connect(f"file:{site.hq_db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT count(*) FROM events WHERE site=? AND kind='sensor'",
                          (site.site_id,)).fetchone()
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()
    return int(row[0])


def build_site(workdir: Path, sensors: int, interval_s: float) -> LocalSite:
    devices = []
    for i in range(sensors):
        room = f"Room {i // ROOM_SIZE + 1}"
        fault = "&fault=spike&spike_p=0.05" if i % 10 == 9 else ""
        devices.append({"id": f"room-{i // ROOM_SIZE + 1}-s{i % ROOM_SIZE}", "type": "sensor",
                        "model": "sim", "room": room, "interval_s": interval_s,
                        "url": f"sim://climate?seed={i}{fault}"})
    rooms = [{"name": f"Room {r + 1}", "stage": "flower" if r % 2 else "veg",
              "alarm_delay_s": 600}
             for r in range((sensors + ROOM_SIZE - 1) // ROOM_SIZE)]
    return LocalSite(workdir, devices=devices, rooms=rooms,
                     agent_overrides={"api": {"advertise": False}})


def run(sensors: int, seconds: float, warmup: float, interval_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="climate-bench-") as tmp:
        site = build_site(Path(tmp), sensors, interval_s)
        try:
            site.start()
            assert site.agent is not None and site.agent.popen is not None
            assert site.hq is not None and site.hq.popen is not None
            agent_pid, hq_pid = site.agent.popen.pid, site.hq.popen.pid
            deadline = time.monotonic() + 30
            while _sensor_seq(site) == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no sensor events in 30 s:\n{site.agent.log_tail()}")
                time.sleep(0.2)
            time.sleep(warmup)   # threads started, history open, uplink connected
            t0, seq0, hq0 = time.monotonic(), _sensor_seq(site), _hq_count(site)
            cpu0, hq_cpu0 = _cpu_s(agent_pid), _cpu_s(hq_pid)
            time.sleep(seconds)
            t1, seq1, hq1 = time.monotonic(), _sensor_seq(site), _hq_count(site)
            cpu1, hq_cpu1 = _cpu_s(agent_pid), _cpu_s(hq_pid)
            elapsed = t1 - t0
            status, body = site.request("GET", "/v1/status")
            devices = body.get("devices", []) if status == 200 else []
            states: dict[str, int] = {}
            for d in devices:
                states[str(d.get("state"))] = states.get(str(d.get("state")), 0) + 1
            return {
                "sensors": sensors,
                "interval_s": interval_s,
                "seconds": round(elapsed, 2),
                "offered_per_s": round(sensors / interval_s, 1),
                "committed_per_s": round((seq1 - seq0) / elapsed, 1),
                "hq_stored_per_s": round((hq1 - hq0) / elapsed, 1),
                "agent_cpu_pct": round(100 * (cpu1 - cpu0) / elapsed, 1),
                "agent_cpu_us_per_reading": round(1e6 * (cpu1 - cpu0) / max(seq1 - seq0, 1), 1),
                "hq_cpu_pct": round(100 * (hq_cpu1 - hq_cpu0) / elapsed, 1),
                "agent_rss": _proc_status(agent_pid, "VmRSS"),
                "agent_threads": int(_proc_status(agent_pid, "Threads")),
                "device_states": states,
                "sensor_backlog": body["outbox"]["kinds"]["sensor"]["depth"]
                if status == 200 else None,
            }
        finally:
            site.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = {
        "bench": "climate_agent",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_before": os.getloadavg()[0]},
        "result": run(args.sensors, args.seconds, args.warmup, args.interval),
    }
    result["machine"]["loadavg_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
