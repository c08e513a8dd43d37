"""The local hardware inventory behind `edge-agent devices`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent.ops.hardware import inventory, keyboard_inputs, usb_devices
from agent.testing.localsite import edge_agent_argv, write_toml


def fake_usb(root: Path, name: str, vid: str, pid: str, product: str, classes: list[str],
             device_class: str = "00") -> None:
    """One device as the kernel lays it out under /sys/bus/usb/devices (a USB bus has no
    software stand-in, so the test builds its sysfs view)."""
    dev = root / name
    dev.mkdir(parents=True)
    for key, value in (("idVendor", vid), ("idProduct", pid), ("product", product),
                       ("manufacturer", "Acme"), ("bDeviceClass", device_class)):
        (dev / key).write_text(value + "\n")
    for n, cls in enumerate(classes):
        (dev / f"{name}:1.{n}").mkdir()
        (dev / f"{name}:1.{n}" / "bInterfaceClass").write_text(cls + "\n")


def test_usb_devices_are_listed_with_a_guess_and_a_url(tmp_path: Path) -> None:
    """Scanners and printers are recognised by vendor or class; hubs are left out."""
    sysfs = tmp_path / "usb"
    fake_usb(sysfs, "1-1", "0C2E", "0B61", "Xenon 1900", ["03"])
    fake_usb(sysfs, "1-2", "04b8", "0202", "TM-T88V", ["07"])
    fake_usb(sysfs, "1-3", "0a5f", "0166", "ZD421", ["07"])
    fake_usb(sysfs, "1-4", "1d6b", "0002", "root hub", ["09"], device_class="09")
    found = {d.url: d.guess for d in usb_devices(sysfs)}
    assert found == {"usb://0c2e:0b61": "scanner", "usb://04b8:0202": "receipt_printer",
                     "usb://0a5f:0166": "label_printer"}


def test_keyboard_wedges_and_missing_roots(tmp_path: Path) -> None:
    """Only *-event-kbd inputs are wedge candidates; an absent sysfs or /dev path lists none."""
    inputs = tmp_path / "by-id"
    inputs.mkdir()
    (inputs / "usb-Honeywell_Scanner-event-kbd").touch()
    (inputs / "usb-Logitech_Mouse-event-mouse").touch()
    assert [k["url"] for k in keyboard_inputs(inputs)] == [
        f"evdev://{inputs}/usb-Honeywell_Scanner-event-kbd"]
    assert inventory(tmp_path / "nope", tmp_path / "nope")["usb_devices"] == []


@pytest.mark.e2e
def test_devices_command_prints_inventory_and_configured(tmp_path: Path) -> None:
    """`edge-agent devices --json` lists configured devices, local hardware and mDNS finds."""
    tokens = tmp_path / "tokens"
    tokens.write_text("cli 9f3a61c0d2b74e85a1f06c3b9d2e7a48\n")
    tokens.chmod(0o600)
    config = tmp_path / "agent.toml"
    write_toml(config, {"site": {"id": "co-denver-01"},
                        "api": {"tokens_file": str(tokens), "advertise_interfaces": ["127.0.0.1"]},
                        "devices": [{"id": "counter-1-scanner", "type": "scanner",
                                     "url": "sim://scanner"}]})
    result = subprocess.run([*edge_agent_argv(), "devices", "--json", "--seconds", "0.5",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert [d["id"] for d in listing["configured"]] == ["counter-1-scanner"]
    assert set(listing["local"]) == {"serial_ports", "usb_devices", "keyboard_inputs"}
    assert listing["discovered"] == []
