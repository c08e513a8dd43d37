"""Modbus RTU sensors against pymodbus's own server: over a socat pty pair and over TCP."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from drivers.sensor.errors import SensorConfigError
from drivers.sensor.modbus import LINES, ModbusSensor, ModbusUrl
from drivers.sensor.reader import SensorPoller, SensorSpec
from drivers.sensor.registers import (
    GMP252,
    SENSEAIR_S8,
    XY_MD02,
    DataType,
    FieldSpec,
    RegisterMap,
    RegisterType,
    WordOrder,
    encode_raw,
)
from tests.conftest import wait_for

# Short enough that a silent unit costs little test time, long enough for a
# loaded CI box to answer over a pty.
TIMEOUT = "timeout=0.3&retries=0"
XY, S8, GMP = 1, 2, 3


class ModbusPeer:
    """pymodbus's server in a thread of its own, serving three preset sensors on one line.

    Register values live in :attr:`values` and are copied into the server's
    registers by the device ``action`` on every request, so a test changes what
    the "sensor" measures by assigning a dict entry. A unit in :attr:`muted` is
    present on the line but never answers (its reply is dropped by the trace hook).
    """

    def __init__(self) -> None:
        self.values: dict[int, dict[str, dict[int, int]]] = {
            XY: {"input": {1: 251, 2: 603}},
            S8: {"input": {0: 0, 3: 1180}},
            GMP: {"holding": dict(enumerate(encode_raw(DataType.FLOAT32, WordOrder.LITTLE,
                                                       465.65997)))
                  | {0x0800: 0, 0x0801: 0}},
        }
        self.muted: set[int] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="modbus-peer",
                                        daemon=True)
        self._thread.start()
        self.server: ModbusSerialServer | ModbusTcpServer | None = None

    async def _action(self, unit: int, function_code: int, start: int, address: int, count: int,
                      registers: list[int], set_values: object) -> None:
        table = self.values.get(unit, {}).get("holding" if function_code == 3 else "input", {})
        for addr, value in table.items():
            if 0 <= addr - start < len(registers):
                registers[addr - start] = value

    def _device(self, unit: int) -> SimDevice:
        def regs(*starts: int) -> list[SimData]:
            return [SimData(s, count=16, values=0, datatype=SimType.REGISTERS) for s in starts]

        bits = [SimData(0, values=False, datatype=SimType.BITS)]
        return SimDevice(id=unit, simdata=(bits, bits, regs(0, 0x0800), regs(0)),
                         action=functools.partial(self._action, unit))

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if sending and data and data[0] in self.muted:
            return b""  # the unit heard the request and stays silent
        return data

    def _run(self, make: object) -> None:
        async def start() -> ModbusSerialServer | ModbusTcpServer:
            server = make()  # type: ignore[operator]
            await server.serve_forever(background=True)
            return server  # type: ignore[no-any-return]

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def start_serial(self, port: str) -> None:
        devices = [self._device(u) for u in (XY, S8, GMP)]
        self._run(lambda: ModbusSerialServer(devices, port=port, framer=FramerType.RTU,
                                             baudrate=9600, trace_packet=self._trace))

    def start_tcp(self, port: int) -> None:
        devices = [self._device(u) for u in (XY, S8, GMP)]
        self._run(lambda: ModbusTcpServer(devices, framer=FramerType.RTU,
                                          address=("127.0.0.1", port), trace_packet=self._trace))

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(10)
            self.server = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked pseudo-terminals from socat: (server side, client side)."""
    socat = shutil.which("socat")
    assert socat, "socat is needed for the pty tests (apt-get install socat)"
    server, client = str(tmp_path / "rs485-server"), str(tmp_path / "rs485-client")
    proc = subprocess.Popen([socat, "-d", "-d", f"pty,raw,echo=0,link={server}",
                             f"pty,raw,echo=0,link={client}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(server) and os.path.exists(client), 10,
                 what="socat ptys")
        yield server, client
    finally:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def peer() -> Iterator[ModbusPeer]:
    """The pymodbus server, stopped and its loop closed after the test."""
    p = ModbusPeer()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def sensors() -> Iterator[list[ModbusSensor]]:
    """Sensors made by a test; closed after it so no port stays open."""
    made: list[ModbusSensor] = []
    yield made
    for s in made:
        s.close()


def _open(made: list[ModbusSensor], url: str, register_map: RegisterMap) -> ModbusSensor:
    sensor = ModbusSensor.from_url(url, register_map)
    made.append(sensor)
    return sensor


def test_three_presets_on_one_rs485_line(pty_pair: tuple[str, str], peer: ModbusPeer,
                                         sensors: list[ModbusSensor]) -> None:
    """XY-MD02, S8 and GMP252 on one line decode right and share one open port."""
    server, client = pty_pair
    peer.start_serial(server)
    xy = _open(sensors, f"modbus-rtu://{client}?unit={XY}&baudrate=9600&{TIMEOUT}", XY_MD02)
    s8 = _open(sensors, f"modbus-rtu://{client}?unit={S8}&{TIMEOUT}", SENSEAIR_S8)
    gmp = _open(sensors, f"modbus-rtu://{client}?unit={GMP}&{TIMEOUT}", GMP252)
    a, b, c = xy.read(0.0), s8.read(0.0), gmp.read(0.0)
    assert (a.temperature_c, a.rh_pct, a.faults) == (pytest.approx(25.1), pytest.approx(60.3), ())
    assert (b.co2_ppm, b.faults) == (1180.0, ())
    assert c.co2_ppm == pytest.approx(465.66, abs=0.01) and c.faults == ()
    assert xy._line is s8._line is gmp._line


def test_silent_unit_times_out_and_comes_back(pty_pair: tuple[str, str], peer: ModbusPeer,
                                              sensors: list[ModbusSensor],
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A silent unit reads invalid with the reason, logs one ERROR then one INFO on recovery."""
    server, client = pty_pair
    peer.start_serial(server)
    s8 = _open(sensors, f"modbus-rtu://{client}?unit={S8}&{TIMEOUT}", SENSEAIR_S8)
    xy = _open(sensors, f"modbus-rtu://{client}?unit={XY}&{TIMEOUT}", XY_MD02)
    spec = SensorSpec(device="flower-2-co2", room="Flower 2", model="senseair-s8",
                      url=f"modbus-rtu://{client}?unit={S8}", interval_s=10)
    poller = SensorPoller(spec, s8)
    assert poller.poll().valid  # type: ignore[union-attr]
    peer.muted.add(S8)
    caplog.set_level(logging.DEBUG, logger="drivers.sensor.reader")
    for _ in range(3):
        reading = poller.poll()
        assert reading is not None and not reading.valid
        assert reading.co2_ppm is None and reading.codes == {"no_answer"}
        assert f"unit {S8}" in (reading.reason or "") and client in (reading.reason or "")
        assert "0.3 s" in (reading.reason or "")
        assert xy.read(0.0).faults == ()  # the rest of the line still answers
    assert poller.state == "down"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "flower-2-co2" in errors[0].getMessage()
    peer.muted.clear()
    reading = poller.poll()
    assert reading is not None and reading.valid and reading.co2_ppm == 1180.0
    assert poller.state == "up"
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "recovered" in infos[0].getMessage()


def test_failure_values_served_by_the_device(pty_pair: tuple[str, str], peer: ModbusPeer,
                                             sensors: list[ModbusSensor]) -> None:
    """Failure values on the wire (XY-MD02 0x8000, GMP252 NaN, S8 status bits) become faults."""
    server, client = pty_pair
    peer.start_serial(server)
    xy = _open(sensors, f"modbus-rtu://{client}?unit={XY}&{TIMEOUT}", XY_MD02)
    gmp = _open(sensors, f"modbus-rtu://{client}?unit={GMP}&{TIMEOUT}", GMP252)
    s8 = _open(sensors, f"modbus-rtu://{client}?unit={S8}&{TIMEOUT}", SENSEAIR_S8)
    peer.values[XY]["input"][1] = 0x8000
    nan = encode_raw(DataType.FLOAT32, WordOrder.LITTLE, float("nan"))
    peer.values[GMP]["holding"].update({0: nan[0], 1: nan[1]})
    peer.values[S8]["input"][0] = 0x0001
    a, b, c = xy.read(0.0), gmp.read(0.0), s8.read(0.0)
    assert a.temperature_c is None and a.rh_pct == pytest.approx(60.3)
    assert [f.code for f in a.faults] == ["failure_value"]
    assert b.co2_ppm is None and [f.code for f in b.faults] == ["failure_value"]
    assert [f.code for f in c.faults] == ["status"] and "fatal error" in c.faults[0].message
    peer.values[XY]["input"][1] = 240
    assert xy.read(0.0).faults == () and xy.read(0.0).temperature_c == pytest.approx(24.0)


def test_missing_register_is_a_modbus_exception(pty_pair: tuple[str, str], peer: ModbusPeer,
                                                sensors: list[ModbusSensor]) -> None:
    """Asking a unit for a register it does not have gives exception 2, named in the reason."""
    server, client = pty_pair
    peer.start_serial(server)
    wrong = RegisterMap("wrong", (FieldSpec("co2_ppm", 300, RegisterType.INPUT),))
    s = _open(sensors, f"modbus-rtu://{client}?unit={XY}&{TIMEOUT}", wrong)
    sample = s.read(0.0)
    assert [f.code for f in sample.faults] == ["exception"]
    assert "exception 2 (illegal data address)" in sample.faults[0].message


def test_server_stopped_then_restarted_over_the_pty(pty_pair: tuple[str, str], peer: ModbusPeer,
                                                    sensors: list[ModbusSensor]) -> None:
    """A stopped server gives no_answer; after a restart the same sensor reads again."""
    server, client = pty_pair
    peer.start_serial(server)
    xy = _open(sensors, f"modbus-rtu://{client}?unit={XY}&{TIMEOUT}", XY_MD02)
    assert xy.read(0.0).faults == ()
    peer.stop()
    assert [f.code for f in xy.read(0.0).faults] == ["no_answer"]
    peer.start_serial(server)
    wait_for(lambda: xy.read(0.0).faults == (), 10, what="the sensor answering again")


def test_tcp_server_with_rtu_framer_via_pyserial_socket_url(peer: ModbusPeer,
                                                            sensors: list[ModbusSensor]) -> None:
    """modbus-rtu+socket:// reaches an RTU-over-TCP server, loses it and finds it again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    peer.start_tcp(port)
    url = f"modbus-rtu+socket://127.0.0.1:{port}?unit={XY}&{TIMEOUT}"
    xy = _open(sensors, url, XY_MD02)
    assert xy.url.port == f"socket://127.0.0.1:{port}"
    assert xy.read(0.0).temperature_c == pytest.approx(25.1)
    peer.stop()
    sample = xy.read(0.0)
    assert [f.code for f in sample.faults] == ["no_answer"]
    assert f"socket://127.0.0.1:{port}" in sample.faults[0].message
    peer.start_tcp(port)
    wait_for(lambda: xy.read(0.0).faults == (), 10, what="the gateway answering again")


def test_lines_are_released_when_the_last_sensor_closes(tmp_path: Path) -> None:
    """Two sensors on one port share a line; it is closed and forgotten after both close."""
    port = str(tmp_path / "nothing-here")
    a = ModbusSensor.from_url(f"modbus-rtu://{port}?unit=1", XY_MD02)
    b = ModbusSensor.from_url(f"modbus-rtu://{port}?unit=2", XY_MD02)
    assert a._line is b._line
    sample = a.read(0.0)
    assert "does not exist" in sample.faults[0].message  # unplugged adapter, not a crash
    a.close()
    assert LINES._lines
    b.close()
    assert not LINES._lines


def test_same_port_with_other_serial_settings_is_a_config_error(tmp_path: Path) -> None:
    """Two sensors on one port at different baud rates is refused, naming the port."""
    port = str(tmp_path / "ttyX")
    a = ModbusSensor.from_url(f"modbus-rtu://{port}?unit=1&baudrate=9600", XY_MD02)
    try:
        with pytest.raises(SensorConfigError, match="already used with other serial settings"):
            ModbusSensor.from_url(f"modbus-rtu://{port}?unit=2&baudrate=19200", XY_MD02)
    finally:
        a.close()


def test_url_parsing() -> None:
    """Serial and pyserial URLs parse into port, unit and line settings."""
    u = ModbusUrl.parse("modbus-rtu:///dev/ttyUSB1?unit=1&baudrate=9600")
    assert (u.port, u.unit, u.baudrate, u.parity, u.timeout_s) == ("/dev/ttyUSB1", 1, 9600, "N",
                                                                   1.0)
    v = ModbusUrl.parse("modbus-rtu+rfc2217://gw:2217?unit=7&parity=e&timeout=0.5&logging=debug")
    assert (v.port, v.unit, v.parity, v.timeout_s) == ("rfc2217://gw:2217?logging=debug", 7, "E",
                                                       0.5)


@pytest.mark.parametrize(("url", "path", "text"), [
    ("modbus-rtu:///dev/ttyUSB1", "url.unit", "missing"),
    ("modbus-rtu:///dev/ttyUSB1?unit=0", "url.unit", "1..247"),
    ("modbus-rtu:///dev/ttyUSB1?unit=1&baudrate=fast", "url.baudrate", "9600"),
    ("modbus-rtu:///dev/ttyUSB1?unit=1&slave=1", "url", "unknown key"),
    ("modbus-rtu://host/dev/ttyUSB1?unit=1", "url", "three slashes"),
    ("modbus-tcp://10.0.0.1:502?unit=1", "url", "not a modbus-rtu"),
])
def test_bad_urls_name_the_key(url: str, path: str, text: str) -> None:
    """A bad URL is a config error whose issue names the key and what is expected."""
    with pytest.raises(SensorConfigError) as err:
        ModbusUrl.parse(url, "flower-2-climate")
    assert err.value.device == "flower-2-climate"
    assert any(i.path == path and text in i.message for i in err.value.issues), err.value.issues


def test_a_modbus_fault_is_a_driver_error() -> None:
    """ModbusFault is in the DriverError tree (the agent maps driver errors in one place)."""
    from drivers.errors import DriverError
    from drivers.sensor.errors import ModbusFault

    fault = ModbusFault("no_answer", "unit 1 on /dev/ttyUSB0: no answer")
    assert isinstance(fault, DriverError) and fault.code == "no_answer"
