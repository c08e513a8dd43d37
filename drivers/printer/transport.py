"""Thin, blocking transports to a printer, chosen by the device URL.

``tcp://HOST[:9100]``, ``serial:///dev/ttyUSB0?baudrate=9600`` and any pyserial
URL (``socket://``, ``loop://``, ``rfc2217://``), ``usb://VID:PID``,
``file:///path`` (append the bytes to a file) and ``sim://receipt|label`` (an
in-memory simulated printer, see ``sim.py``).

Every transport has timeouts: connect, write and read. (python-escpos's USB
printer waits forever by default; ours never does.) Foreign errors (OSError,
serial.SerialException, usb.core.USBError) are mapped here, once, to
:class:`TransportError`. These calls block: the agent runs them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from abc import ABC, abstractmethod
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import serial
import usb.core
import usb.util

from drivers.printer.errors import BadDeviceUrl, TransportError
from drivers.printer.sim import SIM_STATES, SimEscposPrinter, SimZplPrinter, sim_printer

# Module level so tests can shrink them.
CONNECT_TIMEOUT_S = 3.0
WRITE_TIMEOUT_S = 10.0
DEFAULT_PORT = 9100
PYSERIAL_SCHEMES = ("socket", "loop", "rfc2217", "spy", "alt", "hwgrep")


class Transport(ABC):
    """Bytes to a printer and back. Opens lazily; after an error, reopens on next use."""

    url: str
    can_read: bool = True  # False: the printer's answers cannot be read (file://)

    @abstractmethod
    def open(self) -> None:
        """Connect now (normally done on first use)."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect; safe to call twice."""

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Send all of ``data`` within the write timeout, or raise TransportError."""

    @abstractmethod
    def read(self, size: int, timeout: float) -> bytes:
        """Up to ``size`` bytes, waiting at most ``timeout`` s for the first; b"" on timeout."""

    def drain(self) -> bytes:
        """Take whatever the printer sent unasked (stale replies); returns it."""
        got = bytearray()
        while chunk := self.read(4096, 0.0):
            got += chunk
        return bytes(got)

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpTransport(Transport):
    """Raw TCP, the JetDirect / port 9100 way most network printers take jobs."""

    def __init__(self, url: str, host: str, port: int, *, connect_timeout: float | None = None,
                 write_timeout: float | None = None) -> None:
        self.url = url
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout or CONNECT_TIMEOUT_S
        self.write_timeout = write_timeout or WRITE_TIMEOUT_S
        self._sock: socket.socket | None = None

    def open(self) -> None:
        if self._sock is not None:
            return
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise TransportError(self.url, f"cannot connect ({exc.strerror or exc}); is the "
                                           f"printer on and reachable?") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _fail(self, what: str, exc: OSError) -> TransportError:
        self.close()
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return TransportError(self.url, f"{what} failed: {reason}")

    def write(self, data: bytes) -> None:
        self.open()
        assert self._sock is not None
        try:
            self._sock.settimeout(self.write_timeout)
            self._sock.sendall(data)
        except OSError as exc:
            raise self._fail(f"sending {len(data)} bytes", exc) from None

    def read(self, size: int, timeout: float) -> bytes:
        self.open()
        assert self._sock is not None
        try:
            ready, _, _ = select.select([self._sock], [], [], max(timeout, 0.0))
            if not ready:
                return b""
            data = self._sock.recv(size)
        except OSError as exc:
            raise self._fail("reading", exc) from None
        if not data:
            self.close()
            raise TransportError(self.url, "the printer closed the connection")
        return data


class SerialTransport(Transport):
    """A serial port, or anything pyserial's ``serial_for_url`` understands."""

    def __init__(self, url: str, port: str, options: dict[str, Any], *,
                 write_timeout: float | None = None) -> None:
        self.url = url
        self.port = port
        self.options = options
        self.write_timeout = write_timeout or WRITE_TIMEOUT_S
        self._port: serial.SerialBase | None = None

    def open(self) -> None:
        if self._port is not None:
            return
        try:
            self._port = serial.serial_for_url(self.port, timeout=0,
                                               write_timeout=self.write_timeout, **self.options)
        except (serial.SerialException, ValueError, OSError) as exc:
            raise TransportError(self.url, f"cannot open {self.port}: {exc}") from None

    def close(self) -> None:
        if self._port is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                self._port.close()
            self._port = None

    def write(self, data: bytes) -> None:
        self.open()
        assert self._port is not None
        try:
            self._port.write(data)
            self._port.flush()
        except serial.SerialTimeoutException:
            self.close()
            raise TransportError(self.url, f"sending {len(data)} bytes timed out after "
                                           f"{self.write_timeout}s (flow control? printer busy?)"
                                 ) from None
        except (serial.SerialException, OSError) as exc:
            self.close()
            raise TransportError(self.url, f"sending failed: {exc}") from None

    def read(self, size: int, timeout: float) -> bytes:
        self.open()
        assert self._port is not None
        try:
            # pyserial's read(n) waits for all n bytes; wait only for the first.
            self._port.timeout = max(timeout, 0.0)
            first = bytes(self._port.read(1))
            if not first or size <= 1:
                return first
            waiting = self._port.in_waiting
            return first + (bytes(self._port.read(min(size - 1, waiting))) if waiting else b"")
        except (serial.SerialException, OSError) as exc:
            self.close()
            raise TransportError(self.url, f"reading failed: {exc}") from None


class UsbTransport(Transport):
    """A USB printer class device, bulk endpoints via pyusb, every call with a timeout."""

    def __init__(self, url: str, vendor: int, product: int, *, timeout_ms: int | None = None,
                 interface: int = 0) -> None:
        self.url = url
        self.vendor = vendor
        self.product = product
        self.interface = interface
        self.timeout_ms = timeout_ms or int(WRITE_TIMEOUT_S * 1000)
        self._dev: Any = None
        self._out: Any = None
        self._in: Any = None

    def open(self) -> None:
        if self._dev is not None:
            return
        where = f"{self.vendor:04x}:{self.product:04x}"
        try:
            dev = usb.core.find(idVendor=self.vendor, idProduct=self.product)
        except usb.core.NoBackendError:
            raise TransportError(self.url, "no libusb backend for pyusb "
                                           "(apt-get install libusb-1.0-0)") from None
        if dev is None:
            raise TransportError(self.url, f"no USB device {where}; is it plugged in and powered?")
        try:
            with contextlib.suppress(NotImplementedError, usb.core.USBError):
                if dev.is_kernel_driver_active(self.interface):
                    dev.detach_kernel_driver(self.interface)
            with contextlib.suppress(usb.core.USBError):
                dev.set_configuration()
            intf = dev.get_active_configuration()[(self.interface, 0)]

            def direction(want: int) -> Any:
                def match(e: Any) -> bool:
                    return bool(usb.util.endpoint_direction(e.bEndpointAddress) == want
                                and usb.util.endpoint_type(e.bmAttributes)
                                == usb.util.ENDPOINT_TYPE_BULK)

                return usb.util.find_descriptor(intf, custom_match=match)

            self._out = direction(usb.util.ENDPOINT_OUT)
            self._in = direction(usb.util.ENDPOINT_IN)
        except usb.core.USBError as exc:
            raise TransportError(self.url, f"cannot claim {where}: {exc} (permissions? udev rule "
                                           f"for this device only)") from None
        if self._out is None:
            raise TransportError(self.url, f"USB device {where} has no bulk OUT endpoint")
        self.can_read = self._in is not None
        self._dev = dev

    def close(self) -> None:
        if self._dev is not None:
            with contextlib.suppress(Exception):
                usb.util.dispose_resources(self._dev)
        self._dev = self._out = self._in = None

    def write(self, data: bytes) -> None:
        self.open()
        try:
            self._out.write(data, timeout=self.timeout_ms)
        except usb.core.USBError as exc:
            self.close()
            raise TransportError(self.url, f"sending {len(data)} bytes failed: {exc}") from None

    def read(self, size: int, timeout: float) -> bytes:
        self.open()
        if self._in is None:
            return b""
        try:
            # pyusb treats timeout=0 as "wait forever"; never ask for that.
            data = self._in.read(max(size, self._in.wMaxPacketSize),
                                 timeout=max(int(timeout * 1000), 1))
        except usb.core.USBTimeoutError:
            return b""
        except usb.core.USBError as exc:
            self.close()
            raise TransportError(self.url, f"reading failed: {exc}") from None
        return bytes(data)[:size]


class FileTransport(Transport):
    """Append the bytes to a file: a spool, a device node, a test. Answers nothing."""

    can_read = False

    def __init__(self, url: str, path: str) -> None:
        self.url = url
        self.path = path

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            raise TransportError(self.url, f"cannot write {self.path}: {exc.strerror}") from None

    def read(self, size: int, timeout: float) -> bytes:
        return b""


class SimTransport(Transport):
    """An in-memory simulated printer; ``printer`` is there to be switched and inspected."""

    def __init__(self, url: str, printer: SimEscposPrinter | SimZplPrinter) -> None:
        self.url = url
        self.printer = printer
        self._replies = bytearray()

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self._replies += self.printer.feed(data)

    def read(self, size: int, timeout: float) -> bytes:
        # Replies are produced synchronously by write(); nothing arrives later,
        # so an empty buffer means silence and there is nothing to wait for.
        data = bytes(self._replies[:size])
        del self._replies[:size]
        return data


def _one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


def _float(url: str, query: dict[str, list[str]], key: str) -> float | None:
    value = _one(query, key)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise BadDeviceUrl(url, f"{key}={value!r} is not a number of seconds") from None
    if not 0 < number <= 600:
        raise BadDeviceUrl(url, f"{key}={value} must be more than 0 and at most 600 seconds")
    return number


def open_transport(url: str) -> Transport:
    """The transport for a printer URL (not connected yet); BadDeviceUrl if it makes no sense.

    Query keys: ``timeout`` (write/USB timeout, s), ``connect_timeout`` (tcp),
    serial settings (``baudrate``, ``bytesize``, ``parity``, ``stopbits``,
    ``rtscts``, ``xonxoff``), ``state`` (sim://).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = parse_qs(parts.query)
    timeout = _float(url, query, "timeout")
    if scheme == "tcp":
        if not parts.hostname:
            raise BadDeviceUrl(url, "no host")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise BadDeviceUrl(url, "the port is not a number from 1 to 65535") from None
        return TcpTransport(url, parts.hostname, port, write_timeout=timeout,
                            connect_timeout=_float(url, query, "connect_timeout"))
    if scheme == "serial":
        path = unquote(parts.path)
        if not path:
            raise BadDeviceUrl(url, "no device path (serial:///dev/ttyUSB0?baudrate=9600)")
        options: dict[str, Any] = {}
        for key, convert in (("baudrate", int), ("bytesize", int), ("parity", str),
                             ("stopbits", float), ("rtscts", _bool), ("xonxoff", _bool),
                             ("dsrdtr", _bool)):
            value = _one(query, key)
            if value is not None:
                try:
                    options[key] = convert(value)
                except ValueError:
                    raise BadDeviceUrl(url, f"{key}={value!r} is not valid") from None
        if "stopbits" in options and options["stopbits"] in (1.0, 2.0):
            options["stopbits"] = int(options["stopbits"])
        return SerialTransport(url, path, options, write_timeout=timeout)
    if scheme in PYSERIAL_SCHEMES:
        return SerialTransport(url, url, {}, write_timeout=timeout)
    if scheme == "usb":
        ids = (parts.netloc or parts.path.lstrip("/")).split(":")
        try:
            vendor, product = (int(x, 16) for x in ids)
        except ValueError:
            raise BadDeviceUrl(url, "expected usb://VID:PID in hex, e.g. usb://04b8:0202") from None
        if not (0 <= vendor <= 0xFFFF and 0 <= product <= 0xFFFF):
            raise BadDeviceUrl(url, "VID and PID are 4 hex digits each")
        timeout_ms = int(timeout * 1000) if timeout else None
        return UsbTransport(url, vendor, product, timeout_ms=timeout_ms)
    if scheme == "file":
        path = unquote(parts.path)
        if not path or parts.netloc not in ("", "localhost"):
            raise BadDeviceUrl(url, "expected file:///absolute/path")
        return FileTransport(url, path)
    if scheme == "sim":
        kind = parts.netloc or parts.path.lstrip("/")
        state = _one(query, "state") or "ok"
        if kind not in ("receipt", "label"):
            raise BadDeviceUrl(url, "sim printers are sim://receipt and sim://label")
        if state not in SIM_STATES:
            raise BadDeviceUrl(url, f"state={state!r}: one of {', '.join(SIM_STATES)}")
        return SimTransport(url, sim_printer(kind, state))  # type: ignore[arg-type]
    raise BadDeviceUrl(url, f"unknown scheme {scheme!r}")


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)

