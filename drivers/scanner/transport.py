"""Thin transports behind one small interface, chosen by the device URL.

=================================== ===========================================
URL                                 transport
=================================== ===========================================
``serial:///dev/ttyACM0?baudrate=`` pyserial on a local port (USB CDC-ACM, RS-232)
``socket://``, ``loop://``,         ``serial.serial_for_url``: anything pyserial
``rfc2217://``, ``tcp://h:p``       opens (``tcp://`` is ``socket://``)
``usb://VID:PID[?serial=..]``       pyusb: HID boot keyboard or HID-POS reports
``evdev:///dev/input/by-id/...``    python-evdev, exclusive grab (keyboard wedge)
``sim://scanner?...``               :mod:`sim`, for the demo
=================================== ===========================================

Every transport does four things: ``open()`` (raises :class:`DeviceUnavailable`),
``read(timeout) -> bytes`` (``b""`` when nothing came; raises
:class:`DeviceGone` when the device vanished), ``close()``, and ``cancel()``
to wake a blocked read from another thread. ``framed`` says whether each
non-empty read is one whole scan (HID-POS) or part of a byte stream that
:class:`~drivers.scanner.framing.Framer` cuts into reads. Foreign errors
(``SerialException``, ``USBError``, ``OSError``) are mapped here, once.

USB and evdev keep the device library behind a *source* (reports in, events
in), so tests and the replay tools feed recorded reports or events at exactly
that boundary (:mod:`replay`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import serial

from drivers.scanner.errors import BadScannerConfig, DeviceGone, DeviceUnavailable
from drivers.scanner.evdev_keys import EvdevKeyDecoder
from drivers.scanner.hid import BootKeyboardDecoder, HidPosAssembler
from drivers.scanner.options import ScannerOptions

# A blocked read returns at least this often, so stop() and vanish checks are prompt.
READ_TIMEOUT_S = 0.05
PYSERIAL_SCHEMES = frozenset({"socket", "loop", "rfc2217", "spy", "alt", "hwgrep"})
HID_PROTOCOL_KEYBOARD = 1  # bInterfaceProtocol of a boot keyboard


class Transport(Protocol):
    """What the reader needs from a device."""

    where: str  # how logs name the device: a path, "usb 0c2e:0b8f", a URL
    framed: bool  # True: each non-empty read() is one whole scan

    def open(self) -> None:
        """Open the device; raise DeviceUnavailable when it cannot be."""

    def read(self, timeout: float) -> bytes:
        """Bytes received within ``timeout`` (b"" if none); raise DeviceGone."""

    def close(self) -> None:
        """Release the device; never raises."""

    def cancel(self) -> None:
        """Wake a read blocked in another thread (best effort)."""


def scanner_setup(url: str, entry: Mapping[str, Any] | None = None, *,
                  where: str = "scanner") -> tuple[str, ScannerOptions]:
    """Split scanner options out of the URL query and merge the entry's keys.

    Returns the URL without our option keys (the rest of the query is the
    transport's: pyserial's ``?logging=debug``, usb's ``?serial=``) and the
    validated options. Entry keys override the query.
    """
    parts = urlsplit(url)
    if not parts.scheme:
        raise BadScannerConfig(f"{where}.url", f"no scheme in {url!r}; use serial://, usb://, "
                                               "evdev://, socket://, loop:// or sim://")
    ours: dict[str, Any] = {}
    theirs: list[tuple[str, str]] = []
    known = set(ScannerOptions.__dataclass_fields__)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in known:
            ours[key] = value
        else:
            theirs.append((key, value))
    ours.update(entry or {})
    options = ScannerOptions.from_mapping(ours, where=where)
    return urlunsplit(parts._replace(query=urlencode(theirs, safe=",:/"))), options


def open_transport(url: str, options: ScannerOptions, *, where: str = "scanner") -> Transport:
    """The transport for a (query-stripped) URL; raises BadScannerConfig for a bad one."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "serial":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path:
            raise BadScannerConfig(f"{where}.url", f"no device path in {url!r} "
                                                   "(serial:///dev/ttyACM0)")
        return SerialTransport(path, options)
    if scheme == "tcp":
        return SerialTransport(urlunsplit(parts._replace(scheme="socket")), options)
    if scheme in PYSERIAL_SCHEMES:
        return SerialTransport(url, options)
    if scheme == "usb":
        vid, pid, query = _usb_ids(url, where)
        return UsbHidTransport(lambda: PyUsbReportSource(vid, pid, serial=query.get("serial")),
                               options, where=f"usb {vid:04x}:{pid:04x}")
    if scheme == "evdev":
        path = parts.path
        if not path:
            raise BadScannerConfig(f"{where}.url", f"no device path in {url!r} "
                                                   "(evdev:///dev/input/by-id/...-event-kbd)")
        return EvdevTransport(lambda: PyEvdevSource(path, grab=options.grab), where=path)
    if scheme == "sim":
        from drivers.scanner.sim import SimTransport

        return SimTransport.from_url(url, where=where)
    raise BadScannerConfig(f"{where}.url", f"unsupported scheme {parts.scheme!r} for a scanner; "
                                           "use serial://, usb://, evdev://, socket://, loop://, "
                                           "rfc2217://, tcp:// or sim://")


def _usb_ids(url: str, where: str) -> tuple[int, int, dict[str, str]]:
    parts = urlsplit(url)
    try:
        vid_text, pid_text = parts.netloc.split(":")
        vid, pid = int(vid_text, 16), int(pid_text, 16)
        if not (0 <= vid <= 0xFFFF and 0 <= pid <= 0xFFFF):
            raise ValueError
    except ValueError:
        raise BadScannerConfig(f"{where}.url", f"expected usb://VID:PID in hex "
                                               f"(usb://0c2e:0b8f), got {url!r}") from None
    return vid, pid, dict(parse_qsl(parts.query))


# --- serial (and every pyserial URL) -----------------------------------------

class SerialTransport:
    """A local serial port or any pyserial URL."""

    framed = False

    def __init__(self, port_or_url: str, options: ScannerOptions) -> None:
        self._target = port_or_url
        self._is_path = port_or_url.startswith("/")
        self.where = port_or_url if self._is_path else port_or_url.split("?")[0]
        self._baudrate = options.baudrate
        self._ser: Any = None
        self._identity: tuple[int, int] | None = None

    def open(self) -> None:
        """Open the port; its identity (device number) is remembered for vanish checks."""
        try:
            if self._is_path:
                ser = _KeepInputSerial(port=None, baudrate=self._baudrate,
                                       timeout=READ_TIMEOUT_S)
                ser.port = self._target
                ser.open()
                self._identity = _device_identity(self._target)
            else:
                ser = serial.serial_for_url(self._target, baudrate=self._baudrate,
                                            timeout=READ_TIMEOUT_S)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceUnavailable(self.where, _reason(exc)) from None
        self._ser = ser

    def read(self, timeout: float) -> bytes:
        """Whatever arrived; returns at the first byte, or after the port's read timeout."""
        ser = self._ser
        if ser is None:
            raise DeviceGone(self.where, "not open")
        try:
            data: bytes = ser.read(1)
            if data:
                waiting = ser.in_waiting
                if waiting:
                    data += ser.read(waiting)
                return data
        except (serial.SerialException, OSError) as exc:
            raise DeviceGone(self.where, _reason(exc)) from None
        if self._is_path:
            # A quiet port may be a gone one: some adapters never error on read
            # after unplug, and a re-created node (socat, udev) is a new device.
            now = _device_identity(self._target)
            if now is None:
                raise DeviceGone(self.where, "device node removed")
            if now != self._identity:
                raise DeviceGone(self.where, "path now points to another device")
        return b""

    def write(self, data: bytes) -> None:
        """Send bytes (scanner commands; tests on loop://)."""
        try:
            self._ser.write(data)
        except (serial.SerialException, OSError, AttributeError) as exc:
            raise DeviceGone(self.where, _reason(exc)) from None

    def close(self) -> None:
        """Close the port; never raises."""
        ser, self._ser = self._ser, None
        if ser is not None:
            # Closing a vanished port may fail; it is closed either way.
            with contextlib.suppress(Exception):
                ser.close()

    def cancel(self) -> None:
        """Wake a blocked read (pyserial's cancel_read, where the port has one)."""
        ser = self._ser
        cancel = getattr(ser, "cancel_read", None)
        if cancel is not None:
            with contextlib.suppress(Exception):  # racing a close: the read returns anyway
                cancel()


class _KeepInputSerial(serial.Serial):  # type: ignore[misc]
    """pyserial's Serial without the input flush in open().

    pyserial's POSIX open() discards what is already queued on the tty
    (serialposix.Serial.open -> _reset_input_buffer). After a scanner comes
    back, bytes queued before we reopened are real scans: keep them.
    """

    def _reset_input_buffer(self) -> None:
        pass


def _device_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev, st.st_ino


def _reason(exc: BaseException) -> str:
    err = getattr(exc, "errno", None)
    if isinstance(err, int) and err in errno.errorcode:
        return f"{os.strerror(err)} [{errno.errorcode[err]}]"  # pyserial repeats the path
    return str(exc) or type(exc).__name__


# --- USB HID (pyusb) -----------------------------------------------------------

class ReportSource(Protocol):
    """HID input reports from one device."""

    hid_protocol: int  # bInterfaceProtocol: 1 for a boot keyboard

    def read_report(self, timeout: float) -> bytes | None:
        """One input report, or None after ``timeout``; raise DeviceGone."""

    def close(self) -> None:
        """Release the device."""


class UsbHidTransport:
    """A USB HID scanner: boot-keyboard reports to text, or HID-POS reports to reads."""

    def __init__(self, source_factory: Callable[[], ReportSource], options: ScannerOptions,
                 *, where: str) -> None:
        self.where = where
        self._factory = source_factory
        self._mode = options.hid_mode
        self._source: ReportSource | None = None
        self._keyboard = BootKeyboardDecoder()
        self._pos = HidPosAssembler()
        self.framed = options.hid_mode == "pos"

    def open(self) -> None:
        """Open the source and settle keyboard vs HID-POS mode."""
        self._source = self._factory()
        mode = self._mode
        if mode == "auto":
            mode = "keyboard" if self._source.hid_protocol == HID_PROTOCOL_KEYBOARD else "pos"
        self.framed = mode == "pos"
        self._keyboard.reset()
        self._pos.reset()

    def read(self, timeout: float) -> bytes:
        """Typed text (keyboard mode) or one whole read (HID-POS), b"" if none yet."""
        if self._source is None:
            raise DeviceGone(self.where, "not open")
        report = self._source.read_report(timeout)
        if not report:
            return b""
        if self.framed:
            return self._pos.feed(report) or b""
        return self._keyboard.feed(report).encode("utf-8")

    def close(self) -> None:
        """Release the device."""
        source, self._source = self._source, None
        if source is not None:
            source.close()

    def cancel(self) -> None:
        """Reads return within their timeout; nothing to wake."""


class PyUsbReportSource:
    """Reports from the IN interrupt endpoint of a HID interface, via pyusb/libusb.

    The kernel's usbhid driver is detached so keystrokes do not also reach a
    console or window, and re-attached on close.
    """

    def __init__(self, vid: int, pid: int, *, serial: str | None = None) -> None:
        import usb.core
        import usb.util

        self.where = f"usb {vid:04x}:{pid:04x}"
        try:
            match = None if serial is None else (
                lambda d: usb.util.get_string(d, d.iSerialNumber) == serial)
            dev = usb.core.find(idVendor=vid, idProduct=pid, custom_match=match)
        except (usb.core.NoBackendError, usb.core.USBError, ValueError) as exc:
            raise DeviceUnavailable(self.where, _reason(exc)) from None
        if dev is None:
            raise DeviceUnavailable(self.where, "not connected")
        try:
            try:
                cfg = dev.get_active_configuration()
            except usb.core.USBError:
                dev.set_configuration()
                cfg = dev.get_active_configuration()
            intf = next((i for i in cfg if i.bInterfaceClass == 3), None)  # 3: HID
            if intf is None:
                raise DeviceUnavailable(self.where, "no HID interface")
            self._number = intf.bInterfaceNumber
            self._detached = False
            if dev.is_kernel_driver_active(self._number):
                dev.detach_kernel_driver(self._number)
                self._detached = True
            usb.util.claim_interface(dev, self._number)
            ep = usb.util.find_descriptor(
                intf, custom_match=lambda e: usb.util.endpoint_direction(e.bEndpointAddress)
                == usb.util.ENDPOINT_IN)
            if ep is None:
                raise DeviceUnavailable(self.where, "no IN endpoint")
        except usb.core.USBError as exc:
            raise DeviceUnavailable(self.where, _reason(exc)) from None
        self._dev, self._ep = dev, ep
        self.hid_protocol = int(intf.bInterfaceProtocol)

    def read_report(self, timeout: float) -> bytes | None:
        """One report, None on timeout; an unplugged device raises DeviceGone."""
        import usb.core

        try:
            size = self._ep.wMaxPacketSize
            return bytes(self._ep.read(size, timeout=max(1, int(timeout * 1000))))
        except usb.core.USBTimeoutError:
            return None
        except usb.core.USBError as exc:
            raise DeviceGone(self.where, _reason(exc)) from None

    def close(self) -> None:
        """Release the interface and give the device back to the kernel."""
        import usb.util

        # A vanished device cannot be released; there is nothing to give back.
        with contextlib.suppress(Exception):
            usb.util.release_interface(self._dev, self._number)
            if self._detached:
                self._dev.attach_kernel_driver(self._number)
        usb.util.dispose_resources(self._dev)


# --- evdev (keyboard wedge) -------------------------------------------------------

class EventSource(Protocol):
    """Input events from one evdev device."""

    def read_events(self, timeout: float) -> list[tuple[int, int, int]]:
        """(type, code, value) events within ``timeout``; raise DeviceGone."""

    def close(self) -> None:
        """Release the device."""


class EvdevTransport:
    """A keyboard-wedge scanner read through evdev; typed text out."""

    framed = False

    def __init__(self, source_factory: Callable[[], EventSource], *, where: str) -> None:
        self.where = where
        self._factory = source_factory
        self._source: EventSource | None = None
        self._decoder = EvdevKeyDecoder()

    def open(self) -> None:
        """Open (and grab) the device."""
        self._source = self._factory()
        self._decoder.reset()

    def read(self, timeout: float) -> bytes:
        """Text typed within ``timeout``."""
        if self._source is None:
            raise DeviceGone(self.where, "not open")
        return self._decoder.feed_many(self._source.read_events(timeout)).encode("utf-8")

    def close(self) -> None:
        """Release the device."""
        source, self._source = self._source, None
        if source is not None:
            source.close()

    def cancel(self) -> None:
        """Reads return within their timeout; nothing to wake."""


class PyEvdevSource:
    """Events from ``/dev/input/...`` via python-evdev, grabbed exclusively.

    The grab (EVIOCGRAB) keeps the scan from also typing into whatever window
    has focus on the box's console.
    """

    def __init__(self, path: str, *, grab: bool = True) -> None:
        self.where = path
        try:
            import evdev

            self._dev = evdev.InputDevice(path)
        except (ImportError, OSError) as exc:
            raise DeviceUnavailable(path, _reason(exc)) from None
        if grab:
            try:
                self._dev.grab()
            except OSError as exc:
                self._dev.close()
                raise DeviceUnavailable(path, f"cannot grab exclusively: {_reason(exc)} "
                                              "(another program holds it?)") from None

    def read_events(self, timeout: float) -> list[tuple[int, int, int]]:
        """Events available within ``timeout``; ENODEV and friends are DeviceGone."""
        try:
            ready, _, _ = select.select([self._dev.fd], [], [], timeout)
            if not ready:
                return []
            return [(e.type, e.code, e.value) for e in self._dev.read()]
        except BlockingIOError:
            return []
        except OSError as exc:
            raise DeviceGone(self.where, _reason(exc)) from None

    def close(self) -> None:
        """Close the device (the grab goes with it)."""
        with contextlib.suppress(OSError):  # already gone with the device
            self._dev.close()
