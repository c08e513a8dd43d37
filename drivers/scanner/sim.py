"""``sim://scanner?...``: a simulated serial scanner for the demo and the site page.

It types a realistic counter mix, with AIM identifiers and CRLF like a USB
CDC scanner set up for a dispensary:

- package tags from :data:`SIM_KNOWN_TAGS` (seed these into the demo catalog
  so they show ``known: true``) and unknown-looking ones;
- a Metrc Retail ID QR (a unit of a known package);
- an EAN-13 GTIN and a GS1 DataMatrix with GTIN, expiry, lot and serial;
- now and then a garbled read (a control byte and invalid UTF-8) and a
  double read of one code (which debouncing counts once).

Query parameters: ``interval_ms`` (default 2000), ``seed`` (default: random),
``known`` (comma-separated tags replacing the default list), ``count`` (stop
after this many scans; 0 = never), ``vanish_every_s`` / ``vanish_for_s``
(unplug now and then, to show hot-plug; default never / 3 s).
"""

from __future__ import annotations

import random
import string
import threading
import time
from collections.abc import Callable
from datetime import date, timedelta
from urllib.parse import parse_qsl, urlsplit

from drivers.scanner.errors import BadScannerConfig, DeviceGone, DeviceUnavailable
from drivers.scanner.retail_id import encode_short_url

SIM_KNOWN_TAGS = (
    "1A4FF0100000022000000123",
    "1A4FF0100000022000000124",
    "1A4FF0100000022000000125",
    "1A4060300020081000006609",
    "1A4060300020081000006610",
)
SIM_GTINS = ("0850012345003", "0850012345010", "0850012345027")  # bases; check digit added
# (weight, kind) of each simulated read
MIX = ((40, "known_tag"), (18, "unknown_tag"), (12, "retail_id"), (10, "gtin"),
       (8, "gs1_datamatrix"), (6, "garbled"), (6, "double_read"))


def gtin_check_digit(body: str) -> str:
    """The GS1 mod-10 check digit for ``body`` (a GTIN without its last digit)."""
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body)))
    return str((10 - total % 10) % 10)


class SimScanGenerator:
    """The sequence of reads (bytes, terminator included) a simulated scanner sends."""

    def __init__(self, seed: int | None = None, known: tuple[str, ...] = SIM_KNOWN_TAGS) -> None:
        self._rng = random.Random(seed)  # noqa: S311 - a demo, not a secret
        self._known = known
        self._kinds = [k for w, k in MIX for _ in range(w)]

    def next_reads(self) -> list[bytes]:
        """The reads of the next trigger pull (two for a double read)."""
        kind = self._rng.choice(self._kinds)
        if kind == "double_read":
            one = self._tag(self._rng.choice(self._known))
            return [one, one]
        return [getattr(self, f"_{kind}")()]

    def _tag(self, tag: str) -> bytes:
        return f"{tag}\r\n".encode()

    def _known_tag(self) -> bytes:
        return self._tag(self._rng.choice(self._known))

    def _unknown_tag(self) -> bytes:
        tail = "".join(self._rng.choice("0123456789ABCDEF") for _ in range(21))
        return self._tag("1A4" + tail)

    def _retail_id(self) -> bytes:
        url = encode_short_url(self._rng.choice(self._known), self._rng.randint(1, 400))
        return f"]Q1{url}\r\n".encode()

    def _gtin(self) -> bytes:
        body = self._rng.choice(SIM_GTINS)[:12]
        return f"]E0{body}{gtin_check_digit(body)}\r\n".encode()

    def _gs1_datamatrix(self) -> bytes:
        body = "0" + self._rng.choice(SIM_GTINS)[:12]
        gtin = body + gtin_check_digit(body)
        expiry = (date(2026, 1, 1) + timedelta(days=self._rng.randint(30, 700))).strftime("%y%m%d")
        lot = "".join(self._rng.choice(string.ascii_uppercase + string.digits) for _ in range(6))
        serial = str(self._rng.randint(1, 999999))
        return f"]d201{gtin}17{expiry}10{lot}\x1d21{serial}\r\n".encode()

    def _garbled(self) -> bytes:
        # A smudged label read as noise: a control byte, or bytes that are not UTF-8.
        tag = self._rng.choice(self._known)
        cut = self._rng.randint(4, 18)
        noise = self._rng.choice((b"\x07", b"\xff\xfe", b"\x1b[", b"\x00"))
        return tag[:cut].encode() + noise + tag[cut + 2:].encode() + b"\r\n"


class SimTransport:
    """A transport that types :class:`SimScanGenerator` reads on a schedule."""

    framed = False

    def __init__(self, *, interval_s: float = 2.0, seed: int | None = None,
                 known: tuple[str, ...] = SIM_KNOWN_TAGS, count: int = 0,
                 vanish_every_s: float = 0.0, vanish_for_s: float = 3.0,
                 where: str = "sim://scanner",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.where = where
        self._gen = SimScanGenerator(seed, known)
        self._interval = interval_s
        self._count = count
        self._vanish_every = vanish_every_s
        self._vanish_for = vanish_for_s
        self._clock = clock
        self._wake = threading.Event()
        self._pending: list[bytes] = []
        self._sent = 0
        self._next_at = 0.0
        self._gone_until = 0.0
        self._vanish_at = 0.0
        self._open = False

    @classmethod
    def from_url(cls, url: str, *, where: str = "scanner") -> SimTransport:
        """Build from ``sim://scanner?interval_ms=..&seed=..``; bad values name the key."""
        parts = urlsplit(url)
        if parts.netloc != "scanner":
            raise BadScannerConfig(f"{where}.url", f"a simulated scanner is sim://scanner, "
                                                   f"got {url!r}")
        query = dict(parse_qsl(parts.query))
        try:
            interval = int(query.pop("interval_ms", "2000")) / 1000
            seed = int(query["seed"]) if "seed" in query else None
            query.pop("seed", None)
            count = int(query.pop("count", "0"))
            vanish_every = float(query.pop("vanish_every_s", "0"))
            vanish_for = float(query.pop("vanish_for_s", "3"))
        except ValueError as exc:
            raise BadScannerConfig(f"{where}.url",
                                   f"bad sim parameter in {url!r}: {exc}") from None
        known: tuple[str, ...] = SIM_KNOWN_TAGS
        if "known" in query:
            known = tuple(t for t in query.pop("known").split(",") if t)
        if query:
            unknown = ", ".join(sorted(query))
            raise BadScannerConfig(f"{where}.url", f"unknown sim parameter(s) {unknown}; known: "
                                                   "interval_ms, seed, known, count, "
                                                   "vanish_every_s, vanish_for_s")
        if interval <= 0 or not known:
            raise BadScannerConfig(f"{where}.url", "interval_ms must be > 0 and known non-empty")
        return cls(interval_s=interval, seed=seed, known=known, count=count,
                   vanish_every_s=vanish_every, vanish_for_s=vanish_for,
                   where=f"sim://scanner?{parts.query}" if parts.query else "sim://scanner")

    def open(self) -> None:
        """Plugged in, unless inside a simulated unplug."""
        now = self._clock()
        if now < self._gone_until:
            raise DeviceUnavailable(self.where, "simulated unplug")
        self._open = True
        self._wake.clear()
        self._next_at = now + self._interval
        if self._vanish_every > 0:
            self._vanish_at = now + self._vanish_every

    def read(self, timeout: float) -> bytes:
        """The next read when due; otherwise wait up to ``timeout``."""
        if not self._open:
            raise DeviceGone(self.where, "not open")
        now = self._clock()
        if self._vanish_every > 0 and now >= self._vanish_at:
            self._open = False
            self._gone_until = now + self._vanish_for
            raise DeviceGone(self.where, "simulated unplug")
        if self._pending:
            return self._pending.pop(0)
        if now >= self._next_at and (self._count == 0 or self._sent < self._count):
            reads = self._gen.next_reads()
            self._sent += 1
            self._next_at = now + self._interval
            self._pending.extend(reads[1:])
            return reads[0]
        self._wake.wait(max(0.0, min(timeout, self._next_at - now)))
        return b""

    def close(self) -> None:
        """Unplug."""
        self._open = False

    def cancel(self) -> None:
        """Wake a waiting read."""
        self._wake.set()
