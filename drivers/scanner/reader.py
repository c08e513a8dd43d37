"""One scanner, read in a thread: open, read, frame, parse, debounce, report.

``ScannerReader`` owns one transport in one thread. Scans go to ``on_scan``
and state edges to ``on_state`` (both called in the reader thread; they must
be quick, e.g. ``loop.call_soon_threadsafe``). A device that cannot be opened
or vanishes turns the state ``down`` once (one ERROR line, naming the device
and what happens next); the reader keeps trying with capped backoff and turns
``up`` once when the device is back (one INFO line). Repeats log at DEBUG.

Bytes buffered when a device vanishes come out as an invalid "partial read"
scan, never silently dropped. A failing callback costs that one callback,
never the thread.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from drivers.scanner.errors import DeviceGone, DeviceUnavailable
from drivers.scanner.framing import Debouncer, Frame, Framer
from drivers.scanner.options import ScannerOptions
from drivers.scanner.parse import Scan, parse_scan
from drivers.scanner.transport import READ_TIMEOUT_S, Transport, open_transport, scanner_setup

log = logging.getLogger(__name__)

# Reopen backoff: doubles from INITIAL up to MAX, so a scanner that comes back
# is found within about MAX seconds. Module-level so tests can shrink them.
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 1.0
STOP_TIMEOUT_S = 2.0


class ScannerReader:
    """Reads one scanner in a thread and reports scans and up/down edges."""

    def __init__(self, device_id: str, url: str,
                 options: Mapping[str, Any] | ScannerOptions | None,
                 on_scan: Callable[[Scan], None],
                 on_state: Callable[[str, str | None], None],
                 clock: Callable[[], float] = time.monotonic,
                 *, transport: Transport | None = None) -> None:
        """Validate the URL and options now (BadScannerConfig names the key); open later.

        ``transport`` replaces the one the URL would pick (tests, replays).
        """
        self.device_id = device_id
        self.url = url
        where = f"devices[{device_id}]"
        entry = None if isinstance(options, ScannerOptions) else options
        stripped, parsed = scanner_setup(url, entry, where=where)
        self.options = options if isinstance(options, ScannerOptions) else parsed
        self._transport = transport or open_transport(stripped, self.options, where=where)
        self._on_scan = on_scan
        self._on_state = on_state
        self._clock = clock
        self._framer = Framer(self.options)
        self._debouncer = Debouncer(self.options.debounce_ms / 1000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = "starting"  # "starting" | "up" | "down" | "stopped"
        self.reason: str | None = None
        self.since = time.time()
        self.counts = {"scans": 0, "invalid": 0, "debounced": 0, "reopens": 0,
                       "callback_errors": 0}
        self.last_scan_at: float | None = None

    @property
    def where(self) -> str:
        """The device as logs name it."""
        return self._transport.where

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start the reader thread."""
        if self._thread is not None:
            raise RuntimeError(f"scanner {self.device_id}: already started")
        self._thread = threading.Thread(target=self.run, name=f"scanner-{self.device_id}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop and join within ``timeout``; False if the thread did not finish in time."""
        self._stop.set()
        self._transport.cancel()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("scanner %s: reader did not stop within %.1f s", self.device_id, timeout)
            return False
        return True

    def __enter__(self) -> ScannerReader:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> dict[str, Any]:
        """State and counters for status and metrics."""
        return {"id": self.device_id, "type": "scanner", "url": self.url, "where": self.where,
                "state": self.state, "reason": self.reason, "since": self.since,
                "last_scan_at": self.last_scan_at, **self.counts}

    # -- the thread -------------------------------------------------------------

    def run(self) -> None:
        """The reader loop; returns when stop() is called."""
        backoff = BACKOFF_INITIAL_S
        is_open = False
        try:
            while not self._stop.is_set():
                if not is_open:
                    try:
                        self._transport.open()
                    except DeviceUnavailable as exc:
                        self._went_down(exc.reason, vanished=False)
                        self._stop.wait(backoff * random.uniform(0.8, 1.0))  # noqa: S311
                        backoff = min(backoff * 2, BACKOFF_MAX_S)
                        continue
                    except Exception as exc:  # a source bug must not end the reader
                        log.debug("scanner %s: open failed", self.device_id, exc_info=True)
                        self._went_down(f"{type(exc).__name__}: {exc}", vanished=False)
                        self._stop.wait(backoff)
                        backoff = min(backoff * 2, BACKOFF_MAX_S)
                        continue
                    is_open = True
                    backoff = BACKOFF_INITIAL_S
                    self._came_up()
                try:
                    data = self._transport.read(self._read_timeout())
                except DeviceGone as exc:
                    self._vanished(exc.reason)
                    is_open = False
                    continue
                except Exception as exc:  # unexpected: treat as gone, keep the thread
                    log.debug("scanner %s: read failed", self.device_id, exc_info=True)
                    self._vanished(f"{type(exc).__name__}: {exc}")
                    is_open = False
                    continue
                now = self._clock()
                if data and self._transport.framed:
                    frames = self._framer.whole(data) + self._framer.poll(now)
                else:
                    frames = self._framer.feed(data, now)
                for frame in frames:
                    self._deliver(frame, now)
        finally:
            self._transport.close()
            self.state = "stopped"

    def _read_timeout(self) -> float:
        deadline = self._framer.deadline()
        if deadline is None:
            return READ_TIMEOUT_S
        return max(0.0, min(READ_TIMEOUT_S, deadline - self._clock()))

    def _deliver(self, frame: Frame, now: float) -> None:
        scan = parse_scan(frame.data, raw=frame.raw, problem=frame.problem)
        key: bytes | str = scan.code if scan.valid else scan.raw
        if not self._debouncer.accept(key, now):
            self.counts["debounced"] += 1
            return
        self.counts["scans"] += 1
        if not scan.valid:
            self.counts["invalid"] += 1
            log.debug("scanner %s: invalid read (%s): %r", self.device_id, scan.reason,
                      scan.raw[:64])
        self.last_scan_at = time.time()
        try:
            self._on_scan(scan)
        except Exception:  # the daemon's callback bug must not stop the reader
            self.counts["callback_errors"] += 1
            log.exception("scanner %s: on_scan callback failed", self.device_id)

    def _vanished(self, reason: str) -> None:
        for frame in self._framer.flush("partial read: device vanished mid-read"):
            self._deliver(frame, self._clock())
        self._transport.close()
        self._went_down(reason, vanished=True)

    def _came_up(self) -> None:
        if self.state == "up":
            return
        back = self.state == "down"
        if back:
            self.counts["reopens"] += 1
            log.info("scanner %s: %s is back", self.device_id, self.where)
        else:
            log.info("scanner %s: %s open", self.device_id, self.where)
        self._set_state("up", None)

    def _went_down(self, reason: str, *, vanished: bool) -> None:
        if self.state == "down":
            log.debug("scanner %s: %s still unavailable (%s)", self.device_id, self.where, reason)
            return
        if vanished:
            log.error("scanner %s: %s vanished; waiting for it to come back",
                      self.device_id, self.where)
        else:
            log.error("scanner %s: cannot open %s (%s); waiting for it to come back",
                      self.device_id, self.where, reason)
        self._set_state("down", reason)

    def _set_state(self, state: str, reason: str | None) -> None:
        self.state, self.reason, self.since = state, reason, time.time()
        try:
            self._on_state(state, reason)
        except Exception:  # as above, for the state callback
            log.exception("scanner %s: on_state callback failed", self.device_id)
