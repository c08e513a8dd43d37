"""What is plugged into this box: serial ports, USB devices, keyboard-wedge inputs.

Read from sysfs and /dev (no libusb needed, nothing opened), for
``edge-agent devices``: an installer sees the scanner's stable
``/dev/serial/by-id/...`` path or its ``usb://VID:PID`` before writing the
config. The roots are parameters so tests point them at a tree they built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# USB vendors whose devices on a site box are almost always scanners or printers.
SCANNER_VENDORS = {"0c2e": "Honeywell", "05e0": "Zebra (Symbol)", "05f9": "Datalogic",
                   "1eab": "Newland", "0536": "Hand Held Products"}
PRINTER_VENDORS = {"04b8": "Epson", "0a5f": "Zebra", "0519": "Star Micronics",
                   "0dd4": "Custom", "1504": "Bixolon", "154f": "SNBC"}
USB_CLASS_PRINTER = "07"


@dataclass(frozen=True)
class UsbDevice:
    vid: str
    pid: str
    manufacturer: str
    product: str
    classes: tuple[str, ...]
    guess: str  # scanner | receipt_printer | label_printer | printer | unknown

    @property
    def url(self) -> str:
        return f"usb://{self.vid}:{self.pid}"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _guess(vid: str, classes: tuple[str, ...]) -> str:
    if vid == "0a5f":
        return "label_printer"
    if vid in PRINTER_VENDORS:
        return "receipt_printer"
    if USB_CLASS_PRINTER in classes:
        return "printer"
    if vid in SCANNER_VENDORS:
        return "scanner"
    return "unknown"


def usb_devices(sysfs: Path = Path("/sys/bus/usb/devices")) -> list[UsbDevice]:
    """USB devices (not hubs), with a guess at what each is."""
    found: list[UsbDevice] = []
    if not sysfs.is_dir():
        return found
    for dev in sorted(sysfs.iterdir()):
        vid, pid = _read(dev / "idVendor").lower(), _read(dev / "idProduct").lower()
        if not vid or _read(dev / "bDeviceClass") == "09":  # no id, or a hub
            continue
        classes = tuple(sorted({_read(i / "bInterfaceClass").lower()
                                for i in dev.glob(f"{dev.name}:*") if i.is_dir()} - {""}))
        found.append(UsbDevice(vid, pid, _read(dev / "manufacturer"), _read(dev / "product"),
                               classes, _guess(vid, classes)))
    return found


def serial_ports() -> list[dict[str, Any]]:
    """Serial ports pyserial sees, with their stable by-id links where udev made one."""
    from serial.tools import list_ports

    by_id: dict[str, str] = {}
    links = Path("/dev/serial/by-id")
    if links.is_dir():
        for link in links.iterdir():
            try:
                by_id[str(link.resolve())] = str(link)
            except OSError:
                continue
    ports = []
    for port in list_ports.comports():
        ports.append({"device": port.device, "stable_path": by_id.get(port.device),
                      "description": port.description, "hwid": port.hwid,
                      "url": f"serial://{by_id.get(port.device, port.device)}?baudrate=9600"})
    return ports


def keyboard_inputs(root: Path = Path("/dev/input/by-id")) -> list[dict[str, str]]:
    """Keyboard-wedge candidates (``*-event-kbd``), for ``evdev://`` scanner URLs."""
    if not root.is_dir():
        return []
    return [{"path": str(p), "url": f"evdev://{p}"}
            for p in sorted(root.iterdir()) if p.name.endswith("-event-kbd")]


def inventory(sysfs: Path = Path("/sys/bus/usb/devices"),
              inputs: Path = Path("/dev/input/by-id")) -> dict[str, Any]:
    usb = usb_devices(sysfs)
    return {"serial_ports": serial_ports(),
            "usb_devices": [{**asdict(d), "url": d.url} for d in usb],
            "keyboard_inputs": keyboard_inputs(inputs)}


def format_inventory(found: dict[str, Any]) -> str:
    lines = [f"serial ports ({len(found['serial_ports'])})"]
    lines += [f"  {p['stable_path'] or p['device']:<48} {p['description']}"
              for p in found["serial_ports"]]
    lines.append(f"USB devices ({len(found['usb_devices'])})")
    lines += [f"  {d['url']:<18} {d['guess']:<16} {d['manufacturer']} {d['product']}".rstrip()
              for d in found["usb_devices"]]
    lines.append(f"keyboard-wedge inputs ({len(found['keyboard_inputs'])})")
    lines += [f"  {k['url']}" for k in found["keyboard_inputs"]]
    return "\n".join(lines)
