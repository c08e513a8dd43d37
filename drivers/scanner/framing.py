"""From a byte stream to reads, and from reads to scans that count once.

Sans-I/O, time passed in: ``Framer.feed(data, now)`` returns the reads that
``data`` completed; ``Framer.poll(now)`` the ones that silence completed.
A read ends at a terminator (CR, LF, CRLF, tab, or any of CR/LF), or after
``idle_timeout`` of silence when one is set. When a terminator is expected and
the bytes stop without one for ``PARTIAL_TIMEOUT_S``, or the device vanishes
mid-read (:meth:`Framer.flush`), what was buffered comes out as a read with a
``problem``: the scan layer reports it invalid, it is never silently dropped.
A read longer than ``max_length`` is cut there, reported as over-long, and the
rest is skipped up to the next terminator, so a stuck or babbling device
cannot grow the buffer without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.scanner.options import ScannerOptions

# Bytes that stop without a terminator for this long are a partial read.
# Module-level so tests can shrink it instead of waiting.
PARTIAL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Frame:
    """One read: ``data`` without terminator/prefix/suffix; ``raw`` as received."""

    data: bytes
    raw: bytes
    problem: str | None = None


class Framer:
    """Cuts a byte stream into reads; see the module docstring."""

    def __init__(self, options: ScannerOptions | None = None) -> None:
        opts = options or ScannerOptions()
        self._terminators = opts.terminators
        self._idle_s = opts.idle_timeout_s
        self._prefix = opts.prefix
        self._suffix = opts.suffix
        self._max = opts.max_length
        self._buf = bytearray()
        self._last_at: float | None = None
        self._skipping = False  # inside an over-long read, until its terminator

    def feed(self, data: bytes, now: float) -> list[Frame]:
        """Take bytes received at ``now``; return the reads they complete."""
        out = self.poll(now)  # silence before these bytes may have ended a read
        if not data:
            return out
        self._last_at = now
        self._buf += data
        while True:
            end, term_len = self._find_terminator()
            if end < 0:
                break
            line = bytes(self._buf[:end])
            del self._buf[: end + term_len]
            if self._skipping:
                self._skipping = False
                continue
            out.extend(self._frame(line))
        if len(self._buf) > self._max:
            if not self._skipping:
                head = bytes(self._buf[: self._max])
                out.append(Frame(head, head, f"over-long read: more than {self._max} bytes "
                                             "without a terminator"))
                self._skipping = True
            self._buf.clear()
        return out

    def poll(self, now: float) -> list[Frame]:
        """Reads that silence has completed by ``now``."""
        if self._last_at is None or not (self._buf or self._skipping):
            return []
        quiet = now - self._last_at
        if self._idle_s is not None and quiet >= self._idle_s:
            line = bytes(self._buf)
            self._reset()
            return self._frame(line)
        if self._idle_s is None and quiet >= PARTIAL_TIMEOUT_S:
            line = bytes(self._buf)
            self._reset()
            if not line:  # the tail of an over-long read, already reported
                return []
            return [Frame(line, line, f"partial read: no terminator within "
                                      f"{PARTIAL_TIMEOUT_S:g} s")]
        return []

    def deadline(self) -> float | None:
        """When :meth:`poll` could next complete a read; None when nothing waits."""
        if self._last_at is None or not (self._buf or self._skipping):
            return None
        return self._last_at + (self._idle_s if self._idle_s is not None else PARTIAL_TIMEOUT_S)

    def whole(self, data: bytes) -> list[Frame]:
        """A read that arrived complete (HID-POS): strip affixes and a stray terminator."""
        for term in sorted(self._terminators, key=len, reverse=True):
            if data.endswith(term):
                data = data[: -len(term)]
                break
        if len(data) > self._max:
            head = data[: self._max]
            return [Frame(head, head, f"over-long read: {len(data)} bytes "
                                      f"(limit {self._max})")]
        return self._frame(data)

    def flush(self, problem: str) -> list[Frame]:
        """The device went away: what was buffered becomes a read with ``problem``."""
        line = bytes(self._buf)
        skipping = self._skipping
        self._reset()
        if not line or skipping:
            return []
        return [Frame(line, line, problem)]

    def _reset(self) -> None:
        self._buf.clear()
        self._skipping = False
        self._last_at = None

    def _find_terminator(self) -> tuple[int, int]:
        best, best_len = -1, 0
        for term in self._terminators:
            i = self._buf.find(term)
            if i >= 0 and (best < 0 or i < best):
                best, best_len = i, len(term)
        return best, best_len

    def _frame(self, line: bytes) -> list[Frame]:
        if not line:
            return []  # an empty line: the LF of a CRLF under "any", or a stray Enter
        if len(line) > self._max:
            head = line[: self._max]
            return [Frame(head, head, f"over-long read: {len(line)} bytes (limit {self._max})")]
        data = line
        # Affixes are stripped when present; a scanner whose prefix was turned off
        # still delivers good reads.
        if self._prefix and data.startswith(self._prefix):
            data = data[len(self._prefix):]
        if self._suffix and data.endswith(self._suffix):
            data = data[: -len(self._suffix)]
        if not data:
            return []
        return [Frame(data, line)]


class Debouncer:
    """The same code again within ``window_s`` of its last counted read counts once.

    The window runs from the last read that counted, so a deliberate rescan
    after the window always counts, while a scanner's double-read (or a held
    trigger repeating faster than the window) does not.
    """

    def __init__(self, window_s: float) -> None:
        self._window = window_s
        self._seen: dict[bytes | str, float] = {}

    def accept(self, key: bytes | str, now: float) -> bool:
        """True when this read counts; remembers it if so."""
        if self._window <= 0:
            return True
        last = self._seen.get(key)
        if last is not None and now - last < self._window:
            return False
        # Keep the dict in time order (re-insert at the end), so expired codes
        # are always at the front and pruning is amortised O(1) even in a flood.
        self._seen.pop(key, None)
        self._seen[key] = now
        expired = []
        for old, seen_at in self._seen.items():
            if now - seen_at < self._window:
                break
            expired.append(old)
        for old in expired:
            del self._seen[old]
        return True
