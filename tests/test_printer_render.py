"""Receipts and labels rendered to bytes (golden) and to PNG previews decoded by zxing-cpp."""

from __future__ import annotations

import io

import pytest
import zxingcpp
from PIL import Image

from drivers.printer import (
    Label,
    LabelOptions,
    OptionsError,
    ReceiptOptions,
    RenderError,
    label_png,
    parse_label,
    printer_options,
    receipt_png,
    render_label,
    render_receipt,
)
from drivers.printer.label import layout_label, zpl_field
from tests.printer_fakes import LABEL, LABEL_OPTIONS, RECEIPT_OPTIONS, RETAIL_ID_URL, SALE, TAG

GOLDEN_RECEIPT = b"".join([
    b"\x1b@\x1b!\x00\x1b!\x00\x1b!0\x1bE\x01\x1ba\x01\x1bt\x00Denver Flagship\n",
    b"\x1b!\x00\x1b!\x00\x1b!\x00\x1bE\x00\x1ba\x01123 Main St\n",
    b"Denver, CO 80202\n",
    b"License 402R-00123\n",
    b"\x1b!\x00\x1b!\x00\x1b!\x00\x1bE\x00\x1ba\x00------------------------------------------\n",
    b"\x1b!\x00\x1b!\x00\x1b!\x00\x1bE\x01\x1ba\x00Receipt                           R-000123\n",
    b"\x1b!\x00\x1b!\x00\x1b!\x00\x1bE\x00\x1ba\x00Date             2026-11-22 10:03:11 -0700\n",
    b"Customer                          Consumer\n",
    b"Register                             pos-2\n",
    b"------------------------------------------\n",
    b"\x1b!\x00\x1b!\x00\x1b!\x00\x1bE\x01\x1ba\x00Blue Dream 3.5g\n",
    b"\x1b!\x00\x1b!\x00\x1b!\x00\x1bE\x00\x1ba\x001A4FF0100000022000000123\n",
    b"  3.5 Grams @ $35.00                $35.00\n",
    b"  THC 22.4%\n",
    b"1A4FF0100000022000000456\n",
    b"  1 Each @ $20.00                   $20.00\n",
    b"------------------------------------------\n",
    b"Subtotal                            $55.00\n",
    b"State excise 15%                     $8.25\n",
    b"\x1b!\x00\x1b!\x00\x1b!\x00\x1bE\x01\x1ba\x00TOTAL                               $63.25\n",
    b"\x1b!\x00\x1b!\x00\x1b!\x00\x1bE\x00\x1ba\x00------------------------------------------\n",
    # QR (GS ( k): model 2, module 6 dots, error correction M, data, print.
    b"\x1ba\x01\x1d(k\x04\x001A2\x00\x1d(k\x03\x001C\x06\x1d(k\x03\x001E1"
    b"\x1d(k\x0b\x001P0R-000123\x1d(k\x03\x001Q0\n",
    b"\x1b!\x00\x1b!\x00\x1b!\x00\x1bE\x00\x1ba\x01R-000123\n",
    b"\x1b!\x00\x1b!\x00\x1b!\x00\x1bE\x00\x1ba\x00\n",
    b"There may be health risks associated with\n",
    b"the consumption of this product. Keep out\n",
    b"of the reach of children.\n",
    b"\x1bd\x06\x1dV\x00",  # feed 6 lines, full cut
])

GOLDEN_LABEL = b"".join(line + b"\n" for line in [
    b"^XA",
    b"^CI28",
    b"^PW812",
    b"^LL609",
    b"^LH0,0",
    b"^BY2,3,10",
    b"^FO664,6^BQN,2,4^FH_^FDMA,https://retailid.example/p/1A4FF0100000022000000123?s=co_5Fx^FS",
    b"^FO16,16^A0N,32,32^FH_^FDBlue Dream Flower 3.5g^FS",
    b"^FO16,54^A0N,22,22^FH_^FDStrain: Blue Dream^FS",
    b"^FO16,80^A0N,22,22^FH_^FDNet wt: 3.5 Grams^FS",
    b"^FO16,106^A0N,22,22^FH_^FDTHC 22.4%   CBD 0.1%^FS",
    b"^FO16,132^A0N,22,22^FH_^FDBatch: BD-2026-11^FS",
    b"^FO16,158^A0N,22,22^FH_^FDHarvested 2026-10-01   Packaged 2026-11-01^FS",
    b"^FO16,184^A0N,22,22^FH_^FDTested 2026-11-05   Lab: SC Labs^FS",
    b"^FO16,210^A0N,22,22^FH_^FDLicense 402R-00123^FS",
    b"^FO36,246^BY2,3,72^BCN,72,N,N,N,A^FD1A4FF0100000022000000123^FS",
    b"^FO16,324^A0N,22,22^FH_^FD1A4FF0100000022000000123^FS",
    b"^FO16,354^A0N,18,18^FH_^FDWARNING: This product contains cannabis. "
    b"Keep out of the reach of children and^FS",
    b"^FO16,376^A0N,18,18^FH_^FDanimals. For use only by adults 21 and older.^FS",
    b"^PQ1",
    b"^XZ",
])


def decode(png: bytes) -> dict[str, str]:
    """Barcode format name -> text, as zxing-cpp reads the PNG."""
    found = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    return {r.format.name: r.text for r in found}


def test_receipt_golden_bytes() -> None:
    """A sale renders to exactly the pinned ESC/POS bytes."""
    assert render_receipt(SALE, ReceiptOptions(**RECEIPT_OPTIONS)) == GOLDEN_RECEIPT


def test_receipt_has_every_compliance_part() -> None:
    """Header, each tag, quantity, unit, price, THC, taxes, total and warning are printed."""
    out = render_receipt(SALE, ReceiptOptions(**RECEIPT_OPTIONS))
    for part in (b"Denver Flagship", b"123 Main St", b"License 402R-00123", TAG.encode(),
                 b"1A4FF0100000022000000456", b"3.5 Grams @ $35.00", b"THC 22.4%",
                 b"State excise 15%", b"$8.25", b"$63.25", b"Keep out", b"R-000123"):
        assert part in out, part


def test_receipt_drawer_kick_is_optional() -> None:
    """The cash-drawer pulse (ESC p) is sent only when drawer_kick is on, on the chosen pin."""
    plain = render_receipt(SALE, ReceiptOptions(**RECEIPT_OPTIONS))
    kick = render_receipt(SALE, ReceiptOptions(**RECEIPT_OPTIONS, drawer_kick=True, drawer_pin=5))
    assert b"\x1bp" not in plain
    assert kick == plain + b"\x1bp\x0122"  # ESC p m=1 (pin 5), 100 ms on / 100 ms off


def test_receipt_takes_json_numbers_and_rejects_missing_fields() -> None:
    """Numbers as JSON numbers print as written; a sale without lines names the field."""
    sale = {**SALE, "total": 63.25, "lines": [{**SALE["lines"][0], "quantity": 3.5}]}
    assert b"3.5 Grams" in render_receipt(sale, ReceiptOptions())
    with pytest.raises(RenderError) as err:
        render_receipt({**SALE, "lines": []}, ReceiptOptions())
    assert err.value.field == "sale.lines"


def test_receipt_preview_decodes_to_the_receipt_number() -> None:
    """The receipt PNG preview carries a QR that zxing-cpp reads back as the receipt number."""
    png = receipt_png(SALE, ReceiptOptions(**RECEIPT_OPTIONS))
    assert png.startswith(b"\x89PNG")
    assert decode(png) == {"QRCode": "R-000123"}


def test_label_golden_zpl() -> None:
    """A label renders to exactly the pinned ZPL on 4x3 in stock at 203 dpi."""
    assert render_label(LABEL, LabelOptions(**LABEL_OPTIONS)) == GOLDEN_LABEL


def test_label_preview_decodes_to_tag_and_url() -> None:
    """The label PNG preview's Code 128 and QR decode to the exact package tag and Retail ID URL."""
    png = label_png(LABEL, LabelOptions(**LABEL_OPTIONS))
    assert decode(png) == {"Code128": TAG, "QRCode": RETAIL_ID_URL}


@pytest.mark.parametrize(("opts", "width", "height"), [
    ({"dpi": 300}, 1200, 900),
    ({"dpi": 600}, 2400, 1800),
    ({"width": 102, "height": 76, "size_unit": "mm"}, 815, 607),  # 102 mm * 203/25.4
    ({"width": 100, "height": 150, "size_unit": "mm", "dpi": 300}, 1181, 1772),
])
def test_label_size_and_dpi_come_from_options(opts: dict[str, object], width: int,
                                              height: int) -> None:
    """Label stock (inches or mm) and DPI set ^PW/^LL, and the preview still decodes."""
    options = LabelOptions(**LABEL_OPTIONS, **opts)  # type: ignore[arg-type]
    zpl = render_label(LABEL, options).decode()
    assert f"^PW{width}\n^LL{height}\n" in zpl
    assert decode(label_png(LABEL, options)) == {"Code128": TAG, "QRCode": RETAIL_ID_URL}


def test_label_without_retail_id_has_no_qr() -> None:
    """No retail_id_url, no QR code; the barcode then still decodes."""
    label = {k: v for k, v in LABEL.items() if k != "retail_id_url"}
    zpl = render_label(label, LabelOptions())
    assert b"^BQ" not in zpl
    assert decode(label_png(label, LabelOptions())) == {"Code128": TAG}


def test_label_that_does_not_fit_is_refused() -> None:
    """A label too big for its stock is a RenderError naming the size, never a cut-off print."""
    with pytest.raises(RenderError) as err:
        render_label(LABEL, LabelOptions(**LABEL_OPTIONS, width=2, height=1))
    assert "2x1 in" in str(err.value)


def test_label_field_data_cannot_inject_zpl() -> None:
    """^, ~ and _ and non-ASCII in text are ^FH hex escapes, so no field can end early."""
    zpl = render_label({**LABEL, "product": "Kush ^XZ~JA_é"}, LabelOptions()).decode()
    assert "Kush _5EXZ_7EJA_5F_C3_A9" in zpl
    assert zpl.count("^XZ") == 1 and "~" not in zpl
    assert zpl_field("plain text 1-2") == "plain text 1-2"


@pytest.mark.parametrize(("change", "field"), [
    ({"package_tag": "1a4ff0100000022000000123"}, "package_tag"),
    ({"net_weight": "0"}, "net_weight"),
    ({"thc_pct": "101"}, "thc_pct"),
    ({"harvest_date": "yesterday"}, "harvest_date"),
    ({"retail_id_url": "ftp://x"}, "retail_id_url"),
    ({"colour": "blue"}, "colour"),
])
def test_label_bad_input_names_the_field(change: dict[str, object], field: str) -> None:
    """A bad label body is a RenderError that names the field at fault."""
    with pytest.raises(RenderError) as err:
        parse_label({**LABEL, **change})
    assert err.value.field == field


def test_label_licence_and_warning_default_from_options() -> None:
    """The device's licence and warning are used unless the label brings its own."""
    label = Label.model_validate({**LABEL, "licence_number": "OWN-1", "warning": "Own warning"})
    texts = [el.text for el in layout_label(label, LabelOptions(**LABEL_OPTIONS))
             .elements if hasattr(el, "text")]
    assert "License OWN-1" in texts and "Own warning" in texts


def test_printer_options_reject_unknown_keys() -> None:
    """Device options split into document and queue options; a typo is an error naming the key."""
    opts = printer_options("label", {"id": "z", "type": "label_printer", "url": "tcp://h",
                                     "dpi": 300, "retry_interval_s": 2})
    assert opts.document.dpi == 300  # type: ignore[union-attr]
    assert opts.queue.retry_interval_s == 2
    with pytest.raises(OptionsError) as err:
        printer_options("receipt", {"drawer_kik": True})
    assert err.value.key == "drawer_kik"
    with pytest.raises(OptionsError) as err:
        printer_options("label", {"dpi": 250})
    assert err.value.key == "dpi"


def test_printer_driver_never_imports_agent() -> None:
    """drivers/printer is a driver: nothing in it imports agent/ (imports flow one way)."""
    import ast
    from pathlib import Path

    import drivers.printer

    for path in Path(drivers.printer.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "agent" or n.startswith("agent.") for n in names), path
