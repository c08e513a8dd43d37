"""Understanding one read: AIM identifiers, GS1 via biip, classification, garbled input."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from drivers.scanner.parse import MAX_READ_BYTES, Scan, parse_scan
from drivers.scanner.retail_id import decode_short_code, encode_short_url, parse_retail_id

TAG = "1A4FF0100000022000000123"


def test_package_tag_is_classified_and_kept_opaque() -> None:
    """24 upper-case alphanumerics are a package tag, passed through unchanged."""
    scan = parse_scan(TAG.encode())
    assert (scan.classification, scan.valid, scan.code, scan.symbology) == (
        "package_tag", True, TAG, None)
    assert scan.gs1 is None and scan.retail_id is None and scan.raw == TAG.encode()


def test_aim_identifier_is_stripped_and_reported() -> None:
    """A Code 128 AIM prefix (]C0) is reported as the symbology and removed from the code."""
    scan = parse_scan(b"]C0" + TAG.encode())
    assert scan.symbology == "]C0" and scan.symbology_name == "Code 128"
    assert scan.code == TAG and scan.classification == "package_tag"


@pytest.mark.parametrize("text", [TAG.lower(), TAG[:-1], TAG + "4", TAG[:10] + "-" + TAG[11:]])
def test_near_package_tags_are_other(text: str) -> None:
    """Lower case, 23 or 25 characters, or a dash are not package tags."""
    scan = parse_scan(text.encode())
    assert scan.valid and scan.classification == "other"


def test_gs1_datamatrix_with_group_separator() -> None:
    """]d2 data is parsed by biip into GTIN, expiry, lot and serial across a GS."""
    scan = parse_scan(b"]d2010950110153000317260430" + b"10LOT42A\x1d21SN123")
    assert scan.valid and scan.classification == "gtin" and scan.symbology == "]d2"
    assert scan.symbology_name == "GS1 DataMatrix"
    assert scan.gs1 == {
        "elements": {"01": "09501101530003", "17": "260430", "10": "LOT42A", "21": "SN123"},
        "gtin": "09501101530003", "expiry": "2026-04-30", "lot": "LOT42A", "serial": "SN123"}
    assert "\x1d" in scan.code  # the code keeps the separator; consumers read gs1


def test_gs1_128_without_gtin_is_other_with_gs1_fields() -> None:
    """A GS1-128 SSCC (AI 00) parses but is not a GTIN."""
    scan = parse_scan(b"]C100106141411234567897")
    assert scan.valid and scan.classification == "other"
    assert scan.gs1 is not None and scan.gs1["sscc"] == "106141411234567897"


def test_gs1_symbology_that_does_not_parse_is_invalid() -> None:
    """A GS1 DataMatrix with a wrong GTIN check digit is a bad read, not 'other'."""
    scan = parse_scan(b"]d20109501101530000" + b"17260430")
    assert not scan.valid and scan.reason is not None and "check digit" in scan.reason


def test_ean13_with_aim_and_bare_gtin() -> None:
    """]E0 EAN-13 and a bare 13-digit GTIN with a good check digit are gtin."""
    for raw in (b"]E04006381333931", b"4006381333931"):
        scan = parse_scan(raw)
        assert scan.valid and scan.classification == "gtin"
        assert scan.gs1 == {"elements": {"01": "4006381333931"}, "gtin": "4006381333931"}


def test_bare_number_with_bad_check_digit_is_other() -> None:
    """A 13-digit number whose check digit fails is someone's code, still a good read."""
    scan = parse_scan(b"4006381333932")
    assert scan.valid and scan.classification == "other" and scan.gs1 is None


def test_ean13_aim_with_bad_check_digit_is_invalid() -> None:
    """]E0 promises EAN/UPC, so a wrong check digit makes the read invalid."""
    scan = parse_scan(b"]E04006381333932")
    assert not scan.valid and "GS1" in (scan.reason or "")


def test_gs1_without_aim_recognised_by_group_separator() -> None:
    """No AIM but a GS: the data is still parsed as GS1."""
    scan = parse_scan(b"0109501101530003\x1d10LOT")
    assert scan.classification == "gtin" and scan.gs1 is not None and scan.gs1["lot"] == "LOT"


def test_gs1_ecommerce_datamatrix_e0() -> None:
    """]e0 (GS1 DataBar) is parsed as GS1 too."""
    scan = parse_scan(b"]e0010950110153000317260430")
    assert scan.classification == "gtin" and scan.gs1 is not None
    assert scan.gs1["expiry"] == "2026-04-30"


def test_gs1_digital_link_is_gtin() -> None:
    """A GS1 Digital Link URI with /01/ is a GTIN, not a Retail ID."""
    scan = parse_scan(b"]Q1https://id.gs1.org/01/09501101530003/10/ABC")
    assert scan.classification == "gtin" and scan.gs1 is not None
    assert scan.gs1["gtin"] == "09501101530003" and scan.gs1["lot"] == "ABC"


def test_retail_id_qr_base36_decodes_package_and_index() -> None:
    """The SDK's example Retail ID URL gives its short code, package tag and unit index."""
    scan = parse_scan(b"]Q1HTTPS://1A4.COM/5LN8CBN1UB33DON9CHKX")
    assert scan.valid and scan.classification == "retail_id" and scan.symbology == "]Q1"
    assert scan.retail_id == {
        "url": "HTTPS://1A4.COM/5LN8CBN1UB33DON9CHKX", "host": "1a4.com",
        "short_code": "5LN8CBN1UB33DON9CHKX", "encoding": "base36",
        "package_tag": "1A4060300020081000006609", "index": 1}


def test_retail_id_legacy_base64_url() -> None:
    """A legacy lower-case base64url Retail ID decodes to the same fields."""
    rid = parse_retail_id("https://d.1a4.com/q83vASNFZwAAAnGQ5QM")
    assert rid is not None and rid.encoding == "base64"
    assert (rid.package_tag, rid.index) == ("ABCDEF012345670000027190", 485)


def test_retail_id_round_trip_for_large_index() -> None:
    """encode_short_url and decode_short_code agree for multi-byte varint indexes."""
    for index in (0, 1, 127, 128, 300, 16384, 2**30):
        url = encode_short_url(TAG, index)
        assert decode_short_code(url.rsplit("/", 1)[1]) == ("base36", TAG, index)


def test_retail_id_host_without_decodable_code_is_still_retail_id() -> None:
    """On a 1a4.com host a short code that does not decode keeps url and short code."""
    scan = parse_scan(b"https://1a4.com/ABCD1234")
    assert scan.classification == "retail_id" and scan.retail_id is not None
    assert scan.retail_id["short_code"] == "ABCD1234" and scan.retail_id["package_tag"] is None


@pytest.mark.parametrize("url", [b"https://example.com/products/gummies", b"http://1a4.com/5LN8CBN1UB33DON9CHKX",
                                 b"https://example.com/"])
def test_other_urls_are_other(url: bytes) -> None:
    """Marketing URLs, plain http and empty paths are 'other', not Retail IDs."""
    scan = parse_scan(url)
    assert scan.valid and scan.classification == "other" and scan.retail_id is None


@pytest.mark.parametrize(("raw", "reason"), [
    (b"1A4FF01\x070000022000000123", "control byte 0x07 at position 7"),
    (b"1A4FF01\xff\xfe", "invalid UTF-8 at byte 7"),
    (b"]C0", "empty read"),
    (b"   ", "empty read"),
    (b"A" * (MAX_READ_BYTES + 1), f"over-long read: {MAX_READ_BYTES + 1} bytes"),
    (b"\x00", "control byte 0x00 at position 0"),
    (b"]C1garbage", "GS1 data did not parse"),
    ("1A4\u200bFF".encode(), "non-printable character U+200B at position 3"),
    (b"\xc3\x80\xde\xb2", "non-printable character U+07B2 at position 1"),  # unassigned
])
def test_garbled_reads_are_invalid_with_a_reason(raw: bytes, reason: str) -> None:
    """Control bytes, bad UTF-8, empty and over-long reads: valid=False naming why."""
    scan = parse_scan(raw)
    assert not scan.valid and scan.reason is not None and scan.reason.startswith(reason)
    assert scan.classification == "other" and scan.raw == raw[:MAX_READ_BYTES]
    assert scan.code.isprintable()


def test_problem_from_framing_wins() -> None:
    """A read framing flagged (partial) is invalid even when its bytes look fine."""
    scan = parse_scan(TAG[:10].encode(), problem="partial read: device vanished mid-read")
    assert not scan.valid and scan.reason == "partial read: device vanished mid-read"


def test_iso15434_envelope_controls_are_allowed() -> None:
    """RS and EOT of an ISO/IEC 15434 DataMatrix are not garbling."""
    scan = parse_scan(b"[)>\x1e06\x1dP12345\x1e\x04")
    assert scan.valid and scan.classification == "other"


def test_scan_is_frozen_and_event_data_is_json_ready() -> None:
    """Scan cannot be mutated; as_event_data carries raw_hex only for invalid reads."""
    scan = parse_scan(TAG.encode())
    with pytest.raises(dataclasses.FrozenInstanceError):
        scan.code = "x"  # type: ignore[misc]
    assert "raw_hex" not in scan.as_event_data()
    bad = parse_scan(b"\xff")
    assert bad.as_event_data()["raw_hex"] == "ff"
    assert isinstance(bad, Scan)


def test_scanner_package_never_imports_agent() -> None:
    """drivers/scanner imports nothing from agent/ (data flows drivers -> agent only)."""
    package = Path(__file__).parent.parent / "drivers" / "scanner"
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "agent" or n.startswith("agent.") for n in names), module.name
