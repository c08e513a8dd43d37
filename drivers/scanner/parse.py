"""Understanding one read: symbology, GS1 data, what kind of code it is.

``parse_scan(data)`` takes the bytes of one complete read (terminator, prefix
and suffix already removed by framing) and returns a frozen :class:`Scan`.
It never raises: garbled input (control bytes, invalid UTF-8, over-long or
partial reads) becomes ``Scan(valid=False, reason=...)``.

Classification, in order:

1. An AIM symbology identifier (``]C1``, ``]d2``, ``]Q3``, ``]E0``, ``]e0``...)
   is stripped and reported. One that promises GS1 data (GS1-128, GS1
   DataMatrix, GS1 QR, GS1 DataBar, EAN/UPC) must parse as GS1, or the read
   is invalid: a GS1 label that does not parse is a misread or a bad label,
   and either must stop a sale rather than pass as "other".
2. ``package_tag``: exactly 24 upper-case letters and digits (Metrc tags);
   opaque, never interpreted.
3. ``gtin``: a GS1 element string or GS1 Digital Link URI carrying AI (01), or
   a bare 8/12/13/14-digit GTIN with a good check digit. GS1 parsing is
   biip's, never ours; ``gs1`` carries the elements.
4. ``retail_id``: a Metrc Retail ID QR URL (see :mod:`retail_id`).
5. ``other``: anything else that is clean text (``gs1`` is still filled in
   when the data was a GS1 message without a GTIN, an SSCC for example).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import biip
from biip.gtin import Gtin
from biip.symbology import SymbologyIdentifier

from drivers.scanner.retail_id import parse_retail_id

log = logging.getLogger(__name__)

MAX_READ_BYTES = 4096  # longer than any 2D code a counter scanner reads (QR tops out at ~3 KB)
GS = "\x1d"  # ASCII group separator: how scanners send GS1 FNC1 inside the data
# Control characters a barcode may legitimately carry: GS (GS1 FNC1), and RS/EOT
# of the ISO/IEC 15434 envelope "[)>\x1e06\x1d...\x1e\x04" used in DataMatrix.
ALLOWED_CONTROLS = frozenset({"\x1d", "\x1e", "\x04"})
ISO15434_HEADER = "[)>\x1e"

PACKAGE_TAG = re.compile(r"[0-9A-Z]{24}")
_AIM = re.compile(r"\][A-Za-z][0-9A-Za-z]")
_DIGITS = re.compile(r"[0-9]+")
_GTIN_LENGTHS = frozenset({8, 12, 13, 14})

# Symbology identifiers (code letter + modifier) whose data is GS1 by definition.
_GS1_EAN_UPC = re.compile(r"\]E[0-4]")
_GS1_MESSAGE = frozenset({"]C1", "]d2", "]Q3", "]e0", "]J1", "]I1"})

_GS1_FIELDS = {  # AI -> the name a Scan consumer reads
    "00": "sscc",
    "01": "gtin",
    "10": "lot",
    "11": "production_date",
    "15": "best_before",
    "17": "expiry",
    "21": "serial",
}
_DATE_AIS = frozenset({"11", "15", "17"})
_NAMES = {  # biip's enum names -> how a person writes them
    "GS1_128": "GS1-128", "GS1_DATAMATRIX": "GS1 DataMatrix", "GS1_QR_CODE": "GS1 QR Code",
    "GS1_DOTCODE": "GS1 DotCode", "EAN_13": "EAN-13", "EAN_8": "EAN-8", "UPC_E": "UPC-E",
    "ITF_14": "ITF-14", "QR_CODE": "QR Code", "DATA_MATRIX": "Data Matrix", "CODE_128": "Code 128",
    "CODE_39": "Code 39", "PDF417": "PDF417",
}


@dataclass(frozen=True)
class Scan:
    """One read, understood. Frozen; ``raw`` is the read as it came off the wire."""

    code: str  # the data without symbology identifier; for an invalid read, an escaped rendering
    symbology: str | None  # AIM identifier, e.g. "]C1"; None when the scanner sent none
    classification: str  # "package_tag" | "retail_id" | "gtin" | "other"
    valid: bool
    reason: str | None  # why the read is invalid; None when valid
    gs1: dict[str, Any] | None
    retail_id: dict[str, Any] | None
    raw: bytes

    @property
    def symbology_name(self) -> str | None:
        """Human name of the symbology ("GS1 DataMatrix", "QR Code"), if known."""
        return symbology_name(self.symbology)

    def as_event_data(self) -> dict[str, Any]:
        """JSON-ready fields for a ``scan`` event (device, known and ts are the caller's)."""
        data: dict[str, Any] = {
            "code": self.code,
            "symbology": self.symbology,
            "classification": self.classification,
            "valid": self.valid,
            "reason": self.reason,
            "gs1": self.gs1,
            "retail_id": self.retail_id,
        }
        if not self.valid:
            data["raw_hex"] = self.raw[:512].hex()
        return data


def parse_scan(data: bytes, *, raw: bytes | None = None, problem: str | None = None) -> Scan:
    """Understand one complete read. Never raises; see the module docstring."""
    raw = data if raw is None else raw
    try:
        return _parse(data, raw, problem)
    except Exception as exc:  # a parser bug must cost one scan, never the reader thread
        log.debug("scan parser failed on %r", raw[:64], exc_info=True)
        return _invalid(data, raw, f"could not be understood ({type(exc).__name__})")


def symbology_name(aim: str | None) -> str | None:
    """Name of an AIM symbology identifier, from biip's tables."""
    if not aim:
        return None
    try:
        sid = SymbologyIdentifier.extract(aim)
    except Exception:  # unknown code letters: biip raises ParseError
        return None
    name = sid.gs1_symbology.name if sid.gs1_symbology is not None else sid.iso_symbology.name
    return _NAMES.get(name, name.replace("_", " ").title())


def _parse(data: bytes, raw: bytes, problem: str | None) -> Scan:
    if problem is not None:
        return _invalid(data, raw, problem)
    if len(data) > MAX_READ_BYTES:
        return _invalid(data, raw, f"over-long read: {len(data)} bytes (limit {MAX_READ_BYTES})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _invalid(data, raw, f"invalid UTF-8 at byte {exc.start}")

    symbology, body = _split_aim(text)
    body = body.strip(" ")
    if not body:
        return _invalid(data, raw, "empty read", symbology=symbology)
    for i, ch in enumerate(body):
        if ch in ALLOWED_CONTROLS or ch.isprintable():
            continue
        # Unassigned code points, format and separator characters (U+200B, U+2028,
        # U+FEFF...) do not occur in real labels: they are a garbled read.
        what = (f"control byte 0x{ord(ch):02x}" if unicodedata.category(ch) == "Cc"
                else f"non-printable character U+{ord(ch):04X}")
        return _invalid(data, raw, f"{what} at position {i}", symbology=symbology)

    def scan(classification: str, gs1: dict[str, Any] | None = None,
             retail: dict[str, Any] | None = None) -> Scan:
        return Scan(code=body, symbology=symbology, classification=classification, valid=True,
                    reason=None, gs1=gs1, retail_id=retail, raw=raw)

    if symbology is not None and (_GS1_EAN_UPC.fullmatch(symbology)
                                  or symbology in _GS1_MESSAGE):
        gs1, error = _gs1(symbology + body)
        if gs1 is None:
            return _invalid(data, raw, f"GS1 data did not parse: {error}", symbology=symbology)
        return scan("gtin" if gs1.get("gtin") else "other", gs1)

    if PACKAGE_TAG.fullmatch(body):
        return scan("package_tag")

    if body[:7].lower() == "http://" or body[:8].lower() == "https://":
        gs1, _ = _gs1(body)  # a GS1 Digital Link URI carries a GTIN in its path
        if gs1 is not None and gs1.get("gtin"):
            return scan("gtin", gs1)
        retail = parse_retail_id(body)
        if retail is not None:
            return scan("retail_id", retail=retail.as_dict())
        return scan("other")

    if _DIGITS.fullmatch(body) and len(body) in _GTIN_LENGTHS:
        # A bare number of GTIN length is a GTIN only if its check digit agrees;
        # otherwise it is someone's internal code, still a good read.
        try:
            gtin = Gtin.parse(body).value
        except Exception:  # biip.ParseError: wrong check digit
            return scan("other")
        return scan("gtin", {"elements": {"01": gtin}, "gtin": gtin})

    if (GS in body or body.startswith("01")) and not body.startswith(ISO15434_HEADER):
        # Without a symbology identifier only a GS, or AI (01) up front, says GS1
        # (an ISO/IEC 15434 envelope has GS between its own fields).
        gs1, error = _gs1(body)
        if gs1 is not None:
            return scan("gtin" if gs1.get("gtin") else "other", gs1)
        if GS in body:
            return _invalid(data, raw, f"GS1 data did not parse: {error}", symbology=symbology)
    return scan("other")


def _split_aim(text: str) -> tuple[str | None, str]:
    if not _AIM.match(text):
        return None, text
    try:
        length = len(SymbologyIdentifier.extract(text).value)  # "]Y" has longer modifiers
    except Exception:  # a code letter biip does not know: still three characters
        length = 3
    return text[:length], text[length:]


def _gs1(value: str) -> tuple[dict[str, Any] | None, str | None]:
    """GS1 fields of ``value`` through biip, or (None, biip's error)."""
    try:
        result = biip.parse(value)
    except Exception as exc:  # biip raises on some malformed identifiers
        return None, str(exc)
    strings = None
    if result.gs1_message is not None:
        strings = result.gs1_message.element_strings
    elif result.gs1_digital_link_uri is not None:
        strings = result.gs1_digital_link_uri.element_strings
    if strings is None:
        if result.gtin is not None:
            return {"elements": {"01": result.gtin.value}, "gtin": result.gtin.value}, None
        return None, (result.gs1_message_error or result.gtin_error
                      or result.gs1_digital_link_uri_error or "not GS1")
    out: dict[str, Any] = {"elements": {}}
    for element in strings:
        ai = element.ai.ai
        out["elements"][ai] = element.value
        name = _GS1_FIELDS.get(ai)
        if name is None:
            continue
        if ai in _DATE_AIS:
            out[name] = element.date.isoformat() if element.date is not None else None
        elif ai == "01":
            if element.gtin is None and result.gtin is None:
                return None, element.gtin_error or result.gtin_error or "bad GTIN"
            out[name] = element.value
        else:
            out[name] = element.value
    return out, None


def _invalid(data: bytes, raw: bytes, reason: str, *, symbology: str | None = None) -> Scan:
    shown = data[:256].decode("utf-8", errors="backslashreplace")
    shown = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in shown)
    return Scan(code=shown, symbology=symbology, classification="other", valid=False,
                reason=reason, gs1=None, retail_id=None, raw=raw[:MAX_READ_BYTES])
