"""The climate service in the agent: real app and outbox, sim and Modbus sensors, rooms, alarms."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.cli import main as cli_main
from agent.config import AgentConfig
from agent.devices.climate import JOIN_S, ClimateService
from agent.devices.family import ServiceContext, config_issues
from agent.envelope import decode, encode, iso_ms
from agent.errors import DiskFull
from agent.outbox import Outbox
from agent.outbox.thinning import MinuteRun
from agent.pipeline.alarms import ALARMS_FILE
from agent.pipeline.schemas import validate
from agent.testing.localsite import write_toml
from agent.web.api import create_app
from agent.web.auth import Tokens
from agent.web.context import ApiContext
from drivers.sensor.reader import SensorSpec, build_reading
from drivers.sensor.reading import Sample
from tests.conftest import wait_for
from tests.test_sensor_modbus import XY, ModbusPeer

SITE = "co-denver-01"
TOKEN = "climate-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTRACT_KEYS = {"device", "room", "ts", "temperature_c", "rh_pct", "co2_ppm", "vpd_kpa",
                 "dew_point_c", "valid", "reason"}
T0 = 1_780_000_000.0   # a fixed epoch for the injected clock (2026-05-28)

# A room judged on temperature only around 25 C, lights always on, short delays.
WARM_ROOM: dict[str, Any] = {
    "name": "Flower 2", "stage": "flower", "lights_on": "00:00", "alarm_delay_s": 60,
    "bands": {"temperature_c": {"on": [20, 26], "hysteresis": 0.5},
              "vpd_kpa": {"on": [0.2, 3.0]}, "rh_pct": {"on": [30, 80]},
              "co2_ppm": {"on": [300, 2000]}},
}
VEG_ROOM: dict[str, Any] = {"name": "Veg 1", "stage": "veg", "leaf_temp_offset_c": -1.5}


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Agent:
    """The climate service started on a loop of its own, over a real outbox, behind the real app.

    Requests go through httpx's ASGI transport *in the service's loop*, as
    uvicorn would run them in the daemon, so the handlers see the loop's state.
    """

    def __init__(self, tmp: Path, devices: list[dict[str, Any]],
                 rooms: list[dict[str, Any]] | None = None, **svc_kwargs: Any) -> None:
        self.cfg = AgentConfig(site={"id": SITE}, outbox={"path": str(tmp / "outbox")},
                               devices=devices, rooms=rooms or [])
        self.outbox = Outbox(str(tmp / "outbox"), SITE, max_bytes=1 << 26)
        self.outbox.open()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.svc = ClimateService(self.cfg, **svc_kwargs)
        self.call(self.svc.start(ServiceContext(cfg=self.cfg, outbox=self.outbox,
                                                state_dir=tmp, loop=self.loop)))
        ctx = ApiContext(cfg=self.cfg, outbox=self.outbox, tokens=Tokens({"tablet": TOKEN}),
                         uplink_snapshot=lambda: {"state": "connected", "since": time.time()},
                         devices_snapshot=self.svc.devices, started_at=time.time(),
                         services=[self.svc])
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)),
                                        base_url="http://agent")
        self.stopped = False

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def get(self, path: str, auth: bool = True) -> httpx.Response:
        response: httpx.Response = self.call(self.client.get(path, headers=AUTH if auth else {}))
        return response

    def sensors(self) -> dict[str, dict[str, Any]]:
        return {s["device"]: s for s in self.get("/v1/sensors").json()["sensors"]}

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [decode(raw) for _, raw in self.outbox.read(kind, 0, 100_000)]

    def stop(self) -> float:
        """Stop the service as the daemon does; returns how long it took."""
        started = time.monotonic()
        if not self.stopped:
            self.stopped = True
            self.call(self.svc.stop())
        return time.monotonic() - started

    def close(self) -> None:
        self.stop()
        self.call(self.client.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.outbox.close()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[Agent]]:
    """Agents a test starts; stopped and closed after it."""
    made: list[Agent] = []
    yield made
    for agent in made:
        agent.close()


def _sim(device: str, room: str, query: str = "seed=1", **extra: Any) -> dict[str, Any]:
    return {"id": device, "type": "sensor", "model": "sim", "room": room,
            "url": f"sim://climate?{query}", "interval_s": 1, **extra}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- config --------------------------------------------------------------------------------


def _bad_config() -> AgentConfig:
    return AgentConfig(site={"id": SITE}, devices=[
        {"id": "counter-1-scanner", "type": "scanner", "url": "serial:///dev/ttyACM0"},
        {"id": "flower-2-climate", "type": "sensor", "model": "xy-md02", "room": "Flower 2",
         "url": "modbus-rtu:///dev/ttyUSB1?unit=1"},
        {"id": "veg-1-climate", "type": "sensor", "model": "sim", "room": "Veg 9",
         "url": "sim://climate"},
        {"id": "flower-2-co2", "type": "sensor", "model": "custom", "room": "Flower 2",
         "url": "modbus-rtu:///dev/ttyUSB1?unit=2",
         "registers": {"co2_ppm": {"address": 3, "scale": 0}}},
        {"id": "dry-1-climate", "type": "sensor", "model": "xy-md02", "room": "Flower 2",
         "url": "modbus-rtu:///dev/ttyUSB1?unit=0"},
    ], rooms=[
        WARM_ROOM,
        {"name": "Flower 3", "stage": "flower", "bands": {"rh_pct": {"on": [70, 40]}}},
    ])


def test_config_issues_name_the_key_path() -> None:
    """Bad rooms and sensors come back as ConfigIssues with dotted paths, through services too."""
    found = {i.path: i.message for i in config_issues(_bad_config())}
    assert "rooms.1.bands.rh_pct" in found and "below" in found["rooms.1.bands.rh_pct"]
    assert "devices[flower-2-co2].registers.co2_ppm.scale" in found
    assert "non-zero" in found["devices[flower-2-co2].registers.co2_ppm.scale"]
    assert "'Veg 9'" in found["devices[veg-1-climate].room"]
    assert "devices[dry-1-climate].url.unit" in found
    assert "1..247" in found["devices[dry-1-climate].url.unit"]
    assert not any(p.startswith(("devices[counter-1-scanner]", "devices[flower-2-climate]"))
                   for p in found)


def test_check_config_prints_the_paths_and_exits_2(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """edge-agent check-config reports sensor and room issues with their paths, exit 2."""
    cfg = _bad_config()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"tablet {TOKEN}\n", encoding="utf-8")
    write_toml(tmp_path / "agent.toml", {
        "site": {"id": SITE}, "api": {"tokens_file": str(tokens)},
        "devices": [d.model_dump() for d in cfg.devices], "rooms": cfg.rooms})
    assert cli_main(["check-config", "--config", str(tmp_path / "agent.toml")]) == 2
    err = capsys.readouterr().err
    assert "rooms.1.bands.rh_pct:" in err
    assert "devices[flower-2-co2].registers.co2_ppm.scale:" in err


def test_a_sensor_with_bad_config_is_down_and_the_rest_run(tmp_path: Path,
                                                          agents: list[Agent]) -> None:
    """If the daemon starts anyway, a misconfigured sensor is listed down naming its key."""
    agent = Agent(tmp_path, [_sim("good", "Flower 2"),
                             _sim("bad", "Flower 2", "seed=1&fault=melted")], [WARM_ROOM])
    agents.append(agent)
    wait_for(lambda: agent.sensors()["good"]["ts"], 10, what="the good sensor's reading")
    bad = agent.sensors()["bad"]
    assert bad["valid"] is False and "url.fault" in bad["reason"]
    devices = {d["id"]: d for d in agent.svc.devices()}
    assert devices["bad"]["state"] == "down" and "devices[bad].url.fault" in devices["bad"]["error"]
    status = agent.get("/v1/status").json()
    assert any(r.startswith("device_down: bad") for r in status["reasons"])


# -- readings through the app -----------------------------------------------------------------


def test_sim_sensors_reach_the_outbox_and_the_api(tmp_path: Path, agents: list[Agent]) -> None:
    """Readings are committed as sensor events and GET /v1/sensors has the CONTRACT 5 shape."""
    agent = Agent(tmp_path, [_sim("flower-2-a", "Flower 2"), _sim("flower-2-b", "Flower 2"),
                             _sim("veg-1-a", "Veg 1", "seed=2&co2=0")], [WARM_ROOM, VEG_ROOM])
    agents.append(agent)
    sensors = wait_for(lambda: (s := agent.sensors()) and all(v["valid"] for v in s.values())
                       and s, 15, what="three valid readings")
    for device, s in sensors.items():
        assert set(s) >= CONTRACT_KEYS, device
        assert s["vpd_kpa"] > 0 and s["dew_point_c"] < s["temperature_c"] and s["reason"] is None
        assert s["ts"].endswith("Z")
    assert sensors["veg-1-a"]["room"] == "Veg 1"
    events = wait_for(lambda: len(e := agent.events("sensor")) >= 6 and e, 10,
                      what="sensor events in the outbox")
    assert {e["source"] for e in events} == set(sensors)
    first = events[0]
    assert first["data"]["device"] == first["source"] and "vpd_kpa" in first["data"]
    assert validate("sensor", first["data"]) == first["data"]
    assert agent.get("/v1/sensors", auth=False).status_code == 401


def test_rooms_show_stage_bands_values_and_open_alarms(tmp_path: Path,
                                                       agents: list[Agent]) -> None:
    """GET /v1/rooms: stage, configured and default bands, median values, no alarms."""
    agent = Agent(tmp_path, [_sim("flower-2-a", "Flower 2"), _sim("veg-1-a", "Veg 1")],
                  [WARM_ROOM, VEG_ROOM])
    agents.append(agent)
    wait_for(lambda: all(s["valid"] for s in agent.sensors().values()), 15,
             what="valid readings")
    rooms = {r["name"]: r for r in agent.get("/v1/rooms").json()["rooms"]}
    flower = rooms["Flower 2"]
    assert flower["stage"] == "flower" and flower["configured"] and flower["lights"] == "on"
    assert flower["bands"]["temperature_c"]["on"] == {"low": 20, "high": 26}
    assert flower["bands"]["temperature_c"]["hysteresis"] == 0.5
    assert flower["sensors"] == ["flower-2-a"] and flower["alarms"] == []
    assert flower["values"]["temperature_c"] == pytest.approx(
        agent.sensors()["flower-2-a"]["temperature_c"], abs=1.0)
    veg = rooms["Veg 1"]
    assert veg["stage"] == "veg" and veg["leaf_temp_offset_c"] == -1.5
    assert veg["bands"]["rh_pct"]["on"] == {"low": 55.0, "high": 70.0}   # the stage default
    leaf = agent.sensors()["veg-1-a"]["leaf_vpd_kpa"]
    assert leaf < agent.sensors()["veg-1-a"]["vpd_kpa"]   # a cooler leaf: a smaller deficit


def test_without_rooms_sensors_get_a_safety_only_room(tmp_path: Path,
                                                      agents: list[Agent]) -> None:
    """No [[rooms]] at all: each sensor's room exists with only the 5,000 ppm CO2 alarm."""
    agent = Agent(tmp_path, [_sim("veg-1-a", "Veg 1")])
    agents.append(agent)
    wait_for(lambda: agent.sensors()["veg-1-a"]["valid"], 10, what="a valid reading")
    (veg,) = agent.get("/v1/rooms").json()["rooms"]
    assert veg["name"] == "Veg 1" and veg["configured"] is False and veg["bands"] == {}
    assert veg["co2_safety_ppm"] == 5000 and veg["values"]["co2_ppm"] > 0


def test_history_endpoint_serves_minutes_and_refuses_bad_input(tmp_path: Path,
                                                               agents: list[Agent]) -> None:
    """The history has the minute in progress; bad hours are 422, an unknown device 404."""
    agent = Agent(tmp_path, [_sim("flower-2-a", "Flower 2")], [WARM_ROOM])
    agents.append(agent)
    wait_for(lambda: agent.svc.sensors["flower-2-a"].readings >= 2, 10, what="two readings")
    body = agent.get("/v1/sensors/flower-2-a/history?hours=1").json()
    assert body["device"] == "flower-2-a" and body["room"] == "Flower 2" and body["hours"] == 1
    assert body["points"] and body["points"][-1]["readings"] >= 1
    assert set(body["points"][-1]["temperature_c"]) == {"mean", "min", "max"}
    for bad in ("0", "25", "abc", "nan"):
        answer = agent.get(f"/v1/sensors/flower-2-a/history?hours={bad}")
        assert answer.status_code == 422 and answer.json()["field"] == "hours", bad
    missing = agent.get("/v1/sensors/nope/history")
    assert missing.status_code == 404 and "'nope'" in missing.json()["error"]
    assert "flower-2-a" in missing.json()["error"]


def test_metrics_have_gauges_per_sensor_and_invalid_by_reason(tmp_path: Path,
                                                              agents: list[Agent]) -> None:
    """/metrics: values of valid readings per sensor, readings and invalid counts by fault code."""
    agent = Agent(tmp_path, [_sim("ok", "Flower 2"),
                             _sim("gone", "Flower 2", "seed=1&fault=offline")], [WARM_ROOM])
    agents.append(agent)
    wait_for(lambda: agent.sensors()["ok"]["valid"]
             and agent.svc.sensors["gone"].invalid["no_answer"] >= 2, 15, what="readings")
    text = agent.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    ok = (("device", "ok"), ("room", "Flower 2"))
    gone = (("device", "gone"), ("room", "Flower 2"))
    assert 10 < samples[("edge_sensor_temperature_celsius", ok)] < 40
    assert 0 < samples[("edge_sensor_vpd_pascals", ok)] < 5000   # pascals, not kPa
    assert 0 < samples[("edge_sensor_relative_humidity_ratio", ok)] <= 1
    assert ("edge_sensor_co2_ppm", ok) in samples
    assert samples[("edge_sensor_valid", ok)] == 1 and samples[("edge_sensor_valid", gone)] == 0
    assert ("edge_sensor_temperature_celsius", gone) not in samples
    assert samples[("edge_sensor_readings_total", ok)] >= 1
    no_answer = tuple(sorted((*gone, ("reason", "no_answer"))))
    assert samples[("edge_sensor_invalid_total", no_answer)] >= 2


def test_modbus_sensor_goes_down_and_comes_back_through_the_service(
        tmp_path: Path, agents: list[Agent]) -> None:
    """pymodbus's server: XY-MD02 with VPD; a silent unit is down naming it, then recovers."""
    peer = ModbusPeer()
    try:
        port = _free_port()
        peer.start_tcp(port)
        device = {"id": "flower-2-climate", "type": "sensor", "model": "xy-md02",
                  "room": "Flower 2", "interval_s": 1,
                  "url": f"modbus-rtu+socket://127.0.0.1:{port}?unit={XY}&timeout=0.3&retries=0"}
        agent = Agent(tmp_path, [device], [WARM_ROOM])
        agents.append(agent)
        reading = wait_for(lambda: (s := agent.sensors()["flower-2-climate"])["valid"] and s,
                           10, what="a valid Modbus reading")
        assert reading["temperature_c"] == pytest.approx(25.1)
        assert reading["rh_pct"] == pytest.approx(60.3)
        assert reading["vpd_kpa"] == pytest.approx(1.266, abs=0.01)
        peer.muted.add(XY)
        down = wait_for(lambda: (d := agent.svc.devices()[0])["state"] == "down" and d, 10,
                        what="the sensor down")
        assert f"unit {XY}" in down["last_fault"] and str(port) in down["last_fault"]
        status = agent.get("/v1/status").json()
        assert status["state"] == "degraded"
        assert any(r.startswith("device_down: flower-2-climate") for r in status["reasons"])
        assert agent.sensors()["flower-2-climate"]["valid"] is False
        peer.muted.clear()
        wait_for(lambda: agent.svc.devices()[0]["state"] == "up", 10, what="recovery")
        assert agent.svc.devices()[0]["invalid_by_reason"]["no_answer"] >= 1
        silent = [e["data"] for e in agent.events("sensor") if "no_answer" in e["data"]["faults"]]
        assert silent and not silent[0]["valid"] and f"unit {XY}" in silent[0]["reason"]
        took = agent.stop()
        assert took < 1.0   # the daemon gives each service a slice of its 8 s budget
    finally:
        peer.close()


# -- rooms and alarms with an injected clock -------------------------------------------------


SPEC = SensorSpec(device="flower-2-a", room="Flower 2", model="sim", url="sim://climate",
                  interval_s=10)


def _feed(agent: Agent, clock: Clock, temperature: float, *, backfill: bool = False,
          age_s: float = 0.0) -> None:
    reading = build_reading(SPEC, Sample(temperature_c=temperature, rh_pct=55.0, co2_ppm=900.0),
                            clock.t - age_s)
    agent.call(agent.svc.accept(reading, backfill=backfill))


def _alarms(agent: Agent) -> list[tuple[str, str]]:
    return [(e["data"]["code"], e["data"]["state"]) for e in agent.events("alarm")]


def _tick(agent: Agent, clock: Clock, seconds: float, temperature: float, step: float = 10.0
          ) -> None:
    """Readings every ``step`` s for ``seconds`` of injected time, with a timer round each."""
    end = clock.t + seconds
    while clock.t < end:
        clock.t += step
        _feed(agent, clock, temperature)
        agent.call(agent.svc.evaluate())


def test_out_of_band_room_raises_one_alarm_and_clears_once(tmp_path: Path,
                                                           agents: list[Agent]) -> None:
    """Out of band past the delay: one raised alarm event; back in band: one cleared event."""
    clock = Clock(T0)
    agent = Agent(tmp_path, [], [WARM_ROOM], clock=clock)
    agents.append(agent)
    _tick(agent, clock, 60, 25.0)
    _tick(agent, clock, 50, 28.0)
    assert _alarms(agent) == []                          # still inside the 60 s delay
    _tick(agent, clock, 300, 28.0)
    assert _alarms(agent) == [("climate_temperature_high", "raised")]
    raised = agent.events("alarm")[0]
    assert raised["source"] == "climate" and raised["data"]["room"] == "Flower 2"
    assert raised["data"]["severity"] == "warning" and raised["data"]["high"] == 26
    validate("alarm", raised["data"])
    room = next(r for r in agent.get("/v1/rooms").json()["rooms"] if r["name"] == "Flower 2")
    assert [a["code"] for a in room["alarms"]] == ["climate_temperature_high"]
    _tick(agent, clock, 60, 25.8)                        # in band, not by the hysteresis
    assert len(_alarms(agent)) == 1
    _tick(agent, clock, 120, 25.0)
    assert _alarms(agent) == [("climate_temperature_high", "raised"),
                              ("climate_temperature_high", "cleared")]
    assert agent.events("alarm")[1]["data"]["severity"] == "info"
    text = agent.get("/metrics").text
    assert 'edge_climate_alarms_total{code="climate_temperature_high",room="Flower 2",' \
           'state="raised"} 1.0' in text


def test_concurrent_readings_send_an_alarm_once(tmp_path: Path, agents: list[Agent]) -> None:
    """Many sensors of one room committing at once still give exactly one raised event."""
    clock = Clock(T0)
    agent = Agent(tmp_path, [], [WARM_ROOM], clock=clock)
    agents.append(agent)
    specs = [SensorSpec(device=f"flower-2-{i}", room="Flower 2", model="sim",
                        url="sim://climate", interval_s=10) for i in range(8)]

    async def round_of_readings(temperature: float) -> None:
        sample = Sample(temperature_c=temperature, rh_pct=55.0, co2_ppm=900.0)
        await asyncio.gather(*(agent.svc.accept(build_reading(spec, sample, clock.t))
                               for spec in specs))

    for _ in range(12):
        clock.t += 10
        agent.call(round_of_readings(28.0))
    assert _alarms(agent) == [("climate_temperature_high", "raised")]


def test_refused_alarm_is_retried_and_recorded_only_once_committed(
        tmp_path: Path, agents: list[Agent]) -> None:
    """An alarm the outbox refuses (disk full) waits, is sent once, recorded once committed."""
    clock = Clock(T0)
    agent = Agent(tmp_path, [], [WARM_ROOM], clock=clock)
    agents.append(agent)
    ctx = agent.svc.ctx
    real_emit = ctx.emit

    async def disk_full_for_alarms(kind: str, data: dict[str, Any], source: str) -> Any:
        if kind == "alarm":
            raise DiskFull(str(tmp_path / "outbox"))
        return await real_emit(kind, data, source)

    ctx.emit = disk_full_for_alarms  # type: ignore[method-assign]
    _tick(agent, clock, 120, 28.0)
    assert _alarms(agent) == []
    assert not (tmp_path / ALARMS_FILE).exists()     # not at HQ, so not recorded as open
    rooms = agent.get("/v1/rooms").json()["rooms"]
    assert [a["code"] for a in rooms[0]["alarms"]] == ["climate_temperature_high"]
    ctx.emit = real_emit  # type: ignore[method-assign]
    _tick(agent, clock, 30, 28.0)
    assert _alarms(agent) == [("climate_temperature_high", "raised")]
    assert "climate_temperature_high" in (tmp_path / ALARMS_FILE).read_text()


def test_backfilled_readings_never_raise(tmp_path: Path, agents: list[Agent]) -> None:
    """Flagged or late readings are shipped (marked) but raise nothing, however far out."""
    clock = Clock(T0)
    agent = Agent(tmp_path, [], [WARM_ROOM], clock=clock)
    agents.append(agent)
    for _ in range(40):
        clock.t += 10
        _feed(agent, clock, 35.0, backfill=True)
        _feed(agent, clock, 35.0, age_s=3600)   # recorded an hour ago, arriving now
        agent.call(agent.svc.evaluate())
    assert _alarms(agent) == []
    shipped = agent.events("sensor")
    assert len(shipped) == 80 and sum(1 for e in shipped if e["data"].get("backfill")) == 40


def test_open_alarm_survives_a_restart_without_a_second_raise(tmp_path: Path,
                                                              agents: list[Agent]) -> None:
    """After a restart a still-open alarm is not raised again, and clears once when in band."""
    clock = Clock(T0)
    first = Agent(tmp_path, [], [WARM_ROOM], clock=clock)
    agents.append(first)
    _tick(first, clock, 120, 28.0)
    assert _alarms(first) == [("climate_temperature_high", "raised")]
    first.close()
    agents.remove(first)
    assert "climate_temperature_high" in (tmp_path / ALARMS_FILE).read_text()

    second = Agent(tmp_path, [], [WARM_ROOM], clock=clock)
    agents.append(second)
    _tick(second, clock, 300, 28.0)                      # re-raised by the monitor: adopted
    assert _alarms(second) == [("climate_temperature_high", "raised")]
    room = next(r for r in second.get("/v1/rooms").json()["rooms"] if r["name"] == "Flower 2")
    assert len(room["alarms"]) == 1
    _tick(second, clock, 30, 25.0)
    assert _alarms(second) == [("climate_temperature_high", "raised"),
                               ("climate_temperature_high", "cleared")]


def test_alarm_that_recovered_while_down_is_cleared_once(tmp_path: Path,
                                                        agents: list[Agent]) -> None:
    """An alarm open at shutdown whose room is in band after the restart gets one cleared event."""
    clock = Clock(T0)
    first = Agent(tmp_path, [], [WARM_ROOM], clock=clock)
    agents.append(first)
    _tick(first, clock, 120, 28.0)
    first.close()
    agents.remove(first)
    second = Agent(tmp_path, [], [WARM_ROOM], clock=clock)
    agents.append(second)
    _tick(second, clock, 120, 25.0)
    cleared = [e["data"] for e in second.events("alarm")[1:]]
    assert [(a["code"], a["state"]) for a in cleared] == [("climate_temperature_high", "cleared")]
    assert "before the agent restarted" in cleared[0]["message"]
    assert json.loads((tmp_path / ALARMS_FILE).read_text()) == {}


def test_outbox_thinning_keeps_each_sensor_apart() -> None:
    """The outbox's per-minute aggregate names each series by the reading's device."""
    envelopes = []
    for seq, (device, t) in enumerate([("a", 24.0), ("b", 30.0), ("a", 26.0)], start=1):
        data = build_reading(SensorSpec(device=device, room="Flower 2", model="sim",
                                        url="sim://climate"),
                             Sample(temperature_c=t, rh_pct=50.0), T0 + seq).as_dict()
        raw = encode(site=SITE, kind="sensor", seq=seq, ts=iso_ms(T0 + seq), source=device,
                     data_json=json.dumps(data), event_id=f"id-{seq}")
        envelopes.append((seq, decode(raw), len(raw)))
    run = MinuteRun(*envelopes[0])
    for seq, envelope, size in envelopes[1:]:
        run.add(seq, envelope, size)
    series = run.data()["series"]
    assert set(series) == {"a", "b"}
    assert series["a"]["temperature_c"] == {"mean": 25.0, "min": 24.0, "max": 26.0, "count": 2}


def test_stop_with_nothing_configured_leaves_no_files(tmp_path: Path,
                                                      agents: list[Agent]) -> None:
    """A site without sensors or rooms starts and stops the service without touching disk."""
    agent = Agent(tmp_path, [])
    agents.append(agent)
    assert agent.get("/v1/sensors").json() == {"sensors": []}
    assert agent.get("/v1/rooms").json() == {"rooms": []}
    assert agent.stop() < JOIN_S + 0.5
    assert not (tmp_path / ALARMS_FILE).exists()
