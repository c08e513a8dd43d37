"""Metrc Retail ID QR codes: the URL, its short code, and what the code holds.

A Retail ID QR encodes a short URL, ``HTTPS://1A4.COM/5LN8CBN1UB33DON9CHKX``.
Its last path segment (the short code) is the 12-byte package id (the Metrc
package tag, read as hex) followed by the unit index as an unsigned LEB128
varint, written in one of two ways (after Metrc's RetailID SDK):

- base36, digits and upper-case letters (current; the whole URL upper case so
  the QR can use alphanumeric mode): the bytes as one big-endian integer;
- base64url without padding (legacy; lower-case ``https://``).

Decoding is best effort: a URL whose short code does not decode is still a
Retail ID when it is on a Metrc Retail ID host (``*.1a4.com``), just without
``package_tag``/``index``. Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

PACKAGE_ID_BYTES = 12
MAX_VARINT_BYTES = 5  # indexes up to 2**35: far more units than any package holds
RETAIL_ID_HOSTS = ("1a4.com",)  # Metrc's Retail ID domain; subdomains (d.1a4.com) included
_SHORT_CODE = re.compile(r"[0-9A-Za-z_-]{4,128}")
_BASE36 = re.compile(r"[0-9A-Z]+")


@dataclass(frozen=True)
class RetailId:
    """A Retail ID URL taken apart."""

    url: str
    host: str
    short_code: str
    encoding: str | None  # "base36" | "base64" | None when the code did not decode
    package_tag: str | None  # the 24-character package tag the unit came from
    index: int | None  # the unit's index within that package

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form, as carried on a Scan."""
        return {
            "url": self.url,
            "host": self.host,
            "short_code": self.short_code,
            "encoding": self.encoding,
            "package_tag": self.package_tag,
            "index": self.index,
        }


def parse_retail_id(text: str) -> RetailId | None:
    """Take a Retail ID URL apart; None when ``text`` is not one."""
    if text[:8].lower() != "https://":
        return None
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    segments = [s for s in parts.path.split("/") if s]
    if not host or not segments:
        return None
    code = segments[-1]
    if not _SHORT_CODE.fullmatch(code):
        return None
    decoded = decode_short_code(code, upper_case_url=text.startswith("HTTPS://"))
    on_known_host = any(host == h or host.endswith("." + h) for h in RETAIL_ID_HOSTS)
    if decoded is None and not on_known_host:
        return None
    encoding, tag, index = decoded if decoded is not None else (None, None, None)
    return RetailId(url=text, host=host, short_code=code, encoding=encoding,
                    package_tag=tag, index=index)


def decode_short_code(code: str, *, upper_case_url: bool = True) -> tuple[str, str, int] | None:
    """(encoding, package_tag, index) from a short code, or None if it holds neither form."""
    order = ("base36", "base64") if upper_case_url and _BASE36.fullmatch(code) else ("base64",
                                                                                      "base36")
    for encoding in order:
        raw = _base36_bytes(code) if encoding == "base36" else _base64_bytes(code)
        if raw is None:
            continue
        split = _split_id_and_index(raw)
        if split is not None:
            return encoding, split[0], split[1]
    return None


def encode_short_url(package_tag: str, index: int, *, domain: str = "1A4.COM") -> str:
    """The base36 Retail ID URL for unit ``index`` of ``package_tag`` (sim and tests)."""
    package_id = bytes.fromhex(package_tag)
    if len(package_id) != PACKAGE_ID_BYTES or index < 0:
        raise ValueError(f"need a 24-hex-digit package tag and index >= 0, got {package_tag!r}, "
                         f"{index}")
    number = int.from_bytes(package_id + _varint(index), "big")
    digits = ""
    while number:
        number, rem = divmod(number, 36)
        digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[rem] + digits
    return f"HTTPS://{domain.upper()}/{digits or '0'}"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _base36_bytes(code: str) -> bytes | None:
    if not _BASE36.fullmatch(code.upper()):
        return None
    number = int(code, 36)
    return number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")


def _base64_bytes(code: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(code + "=" * (-len(code) % 4))
    except (binascii.Error, ValueError):
        return None


def _split_id_and_index(raw: bytes) -> tuple[str, int] | None:
    # The package id is the first 12 bytes and the varint the rest. base36 drops
    # leading zero bytes of the id, so a short result is padded back; an id byte
    # may have its high bit set, so the split cannot be found from the varint.
    for pad in range(3):
        data = b"\0" * pad + raw
        package_id, varint = data[:PACKAGE_ID_BYTES], data[PACKAGE_ID_BYTES:]
        if len(package_id) < PACKAGE_ID_BYTES or not 1 <= len(varint) <= MAX_VARINT_BYTES:
            continue
        if varint[-1] & 0x80 or any(not b & 0x80 for b in varint[:-1]):
            continue
        index = 0
        for shift, byte in enumerate(varint):
            index |= (byte & 0x7F) << (7 * shift)
        return package_id.hex().upper(), index
    return None
