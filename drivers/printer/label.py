"""Compliance labels, sans-I/O: a :class:`Label` becomes a layout in printer dots, then ZPL.

``layout_label(label, options)`` decides where everything goes for the label
size and DPI in the device options; ``zpl_bytes(layout)`` writes it as ZPL II
and ``preview.label_png`` draws the same layout. A label that does not fit its
stock is refused (RenderError), never printed with a field cut off.

Field data goes through ``^FH`` hex escapes, so a ``^`` or ``~`` in a product
name cannot end the field or inject a command, and text is UTF-8 (``^CI28``).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from drivers.printer.errors import RenderError

TAG_PATTERN = r"^[A-Z0-9]{24}$"
QR_ZPL_OFFSET = 10  # ^BQ draws this many dots below its ^FO (the ^BY height, 10 by default)
CHAR_WIDTH = 0.5  # ZPL font 0 (scalable, condensed): average glyph width per dot of height


def _pct(value: Decimal) -> Decimal:
    if not value.is_finite() or not 0 <= value <= 100:
        raise ValueError("must be a percentage from 0 to 100")
    return value


def _positive(value: Decimal) -> Decimal:
    if not value.is_finite() or value <= 0:
        raise ValueError("must be more than 0")
    return value


def _url(value: str) -> str:
    if not value.startswith(("https://", "http://")) or any(c.isspace() for c in value):
        raise ValueError("must be an http(s) URL without spaces")
    return value


Short = Annotated[str, Field(min_length=1, max_length=120)]


class Label(BaseModel):
    """One package label (the API's label body less ``printer``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    package_tag: Annotated[str, Field(pattern=TAG_PATTERN,
                                      description="24 uppercase letters and digits")]
    product: Short
    net_weight: Annotated[Decimal, AfterValidator(_positive)]
    unit: Annotated[str, Field(min_length=1, max_length=20)]
    strain: Short | None = None
    thc_pct: Annotated[Decimal, AfterValidator(_pct)] | None = None
    cbd_pct: Annotated[Decimal, AfterValidator(_pct)] | None = None
    batch: Short | None = None
    harvest_date: date | None = None
    package_date: date | None = None
    test_date: date | None = None
    lab: Short | None = None
    licence_number: Annotated[str, Field(max_length=64)] | None = None  # default: device option
    warning: Annotated[str, Field(max_length=1000)] | None = None  # default: device option
    retail_id_url: Annotated[str, Field(max_length=512), AfterValidator(_url)] | None = None
    copies: Annotated[int, Field(ge=1, le=500)] = 1


def parse_label(data: dict[str, Any]) -> Label:
    """Validate a label body; RenderError names the first field at fault."""
    try:
        return Label.model_validate(data)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "label"
        raise RenderError(where, err["msg"].removeprefix("Value error, ")) from None


class LabelOptions(BaseModel):
    """A label printer's stock and defaults, from its ``[[devices]]`` entry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: Annotated[float, Field(gt=0, le=300)] = 4.0
    height: Annotated[float, Field(gt=0, le=1000)] = 3.0
    size_unit: Literal["in", "mm"] = "in"
    dpi: Literal[203, 300, 600] = 203
    licence_number: Annotated[str, Field(max_length=64)] = ""
    warning: Annotated[str, Field(max_length=1000)] = ""
    margin_mm: Annotated[float, Field(ge=0, le=20)] = 2.0
    # The most copies one job may ask for (issue 9: ``copies: 500`` was accepted).
    max_copies: Annotated[int, Field(ge=1, le=500)] = 50

    @property
    def dots_per_mm(self) -> float:
        return self.dpi / 25.4

    def dots(self, length: float) -> int:
        """A length in the options' unit, in printer dots."""
        mm = length * 25.4 if self.size_unit == "in" else length
        return round(mm * self.dots_per_mm)


@dataclass(frozen=True)
class TextLine:
    """One line of text, top-left at (x, y), ``height`` dots tall (ZPL font 0)."""

    x: int
    y: int
    height: int
    text: str


@dataclass(frozen=True)
class Code128:
    """A Code 128 symbol, top-left at (x, y)."""

    x: int
    y: int
    module: int
    height: int
    data: str


@dataclass(frozen=True)
class QrCode:
    """A QR code whose symbol's top-left is at (x, y); ``module`` dots per module."""

    x: int
    y: int
    module: int
    data: str


Element = TextLine | Code128 | QrCode


@dataclass(frozen=True)
class LabelLayout:
    width: int  # dots
    height: int
    dpi: int
    copies: int
    elements: tuple[Element, ...]


def _qr_modules(data: str) -> int:
    """Modules across the QR symbol ZPL will draw (error correction M, as ``MA,`` asks)."""
    import qrcode

    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=0)
    code.add_data(data)
    # The version alone fixes the size; make() would also pick a mask (5 ms).
    return 17 + 4 * int(code.best_fit())


def _fmt_date(value: date | None) -> str | None:
    return value.isoformat() if value else None


def layout_label(label: Label, options: LabelOptions) -> LabelLayout:
    """Place every field of ``label`` on the stock in ``options``; RenderError if it cannot fit."""
    dpmm = options.dots_per_mm
    width, height = options.dots(options.width), options.dots(options.height)
    margin = round(options.margin_mm * dpmm)
    title_h, body_h, small_h = (max(12, round(mm * dpmm)) for mm in (4.0, 2.8, 2.2))
    gap = round(1.2 * dpmm)
    inner = width - 2 * margin
    elements: list[Element] = []

    qr_bottom = margin
    text_width = inner
    if label.retail_id_url:
        module = max(2, min(10, round(0.5 * dpmm)))  # ~0.5 mm modules; ZPL magnification 1..10
        side = _qr_modules(label.retail_id_url) * module
        elements.append(QrCode(margin + inner - side, margin, module, label.retail_id_url))
        qr_bottom = margin + side
        text_width = inner - side - gap

    y = margin

    def put(text: str, h: int, avail: int) -> None:
        nonlocal y
        chars = max(8, int(avail / (h * CHAR_WIDTH)))
        for line in textwrap.wrap(text, chars) or [""]:
            elements.append(TextLine(margin, y, h, line))
            y += round(h * 1.2)

    def avail_at() -> int:
        return text_width if y < qr_bottom else inner

    put(label.product, title_h, avail_at())
    thc = f"THC {label.thc_pct}%" if label.thc_pct is not None else None
    cbd = f"CBD {label.cbd_pct}%" if label.cbd_pct is not None else None
    rows = [
        f"Strain: {label.strain}" if label.strain else None,
        f"Net wt: {label.net_weight} {label.unit}",
        "   ".join(x for x in (thc, cbd) if x) or None,
        f"Batch: {label.batch}" if label.batch else None,
        "   ".join(f"{k} {v}" for k, v in (("Harvested", _fmt_date(label.harvest_date)),
                                           ("Packaged", _fmt_date(label.package_date))) if v)
        or None,
        "   ".join(x for x in (f"Tested {_fmt_date(label.test_date)}" if label.test_date else None,
                               f"Lab: {label.lab}" if label.lab else None) if x) or None,
        f"License {lic}" if (lic := label.licence_number or options.licence_number) else None,
    ]
    for row in rows:
        if row:
            put(row, body_h, avail_at())
    y = max(y, qr_bottom) + gap

    quiet = 10
    modules = 11 * len(label.package_tag) + 35  # all in subset B: the widest ZPL can choose
    module = min(10, inner // (modules + 2 * quiet))
    if module < 1:
        raise _too_small(options, "the package tag barcode does not fit across the label")
    bar_h = round(9 * dpmm)
    elements.append(Code128(margin + quiet * module, y, module, bar_h, label.package_tag))
    y += bar_h + round(0.8 * dpmm)
    put(label.package_tag, body_h, inner)

    warning = label.warning if label.warning is not None else options.warning
    if warning:
        y += round(0.5 * dpmm)
        for para in warning.splitlines():
            put(para, small_h, inner)
    if y > height - margin + round(0.2 * small_h):
        need = (y + margin) / dpmm
        raise _too_small(options, f"everything needs {need:.0f} mm of height")
    return LabelLayout(width, height, options.dpi, label.copies, tuple(elements))


def _too_small(options: LabelOptions, why: str) -> RenderError:
    return RenderError("label", f"does not fit on {options.width:g}x{options.height:g} "
                                f"{options.size_unit} labels at {options.dpi} dpi: {why}; use "
                                f"larger stock (options width/height) or shorter text")


def zpl_field(text: str) -> str:
    """Field data for ``^FH_``: every byte outside plain printable ASCII, and ^ ~ _, as _XX."""
    out = []
    for ch in text:
        if " " <= ch <= "}" and ch not in "^~_":
            out.append(ch)
        else:
            out.append("".join(f"_{b:02X}" for b in ch.encode("utf-8")))
    return "".join(out)


def zpl_bytes(layout: LabelLayout) -> bytes:
    """The ZPL II for ``layout``: one format, ``^PQ`` copies."""
    out = [
        "^XA",
        "^CI28",  # field data is UTF-8
        f"^PW{layout.width}",
        f"^LL{layout.height}",
        "^LH0,0",
    ]
    for el in layout.elements:
        if isinstance(el, QrCode):
            # ^BY's height moves a QR code down on some renderers; pin it to the
            # default (10) so every renderer puts the symbol where we planned.
            out.append(f"^BY2,3,{QR_ZPL_OFFSET}")
            out.append(f"^FO{el.x},{max(0, el.y - QR_ZPL_OFFSET)}^BQN,2,{el.module}"
                       f"^FH_^FDMA,{zpl_field(el.data)}^FS")
        elif isinstance(el, Code128):
            out.append(f"^FO{el.x},{el.y}^BY{el.module},3,{el.height}"
                       f"^BCN,{el.height},N,N,N,A^FD{el.data}^FS")
        else:
            out.append(f"^FO{el.x},{el.y}^A0N,{el.height},{el.height}^FH_^FD{zpl_field(el.text)}^FS")
    out.append(f"^PQ{layout.copies}")
    out.append("^XZ")
    return ("\n".join(out) + "\n").encode("ascii")


def render_label(label: Label | dict[str, Any], options: LabelOptions) -> bytes:
    """A label to ZPL bytes; RenderError names the field, or says the stock is too small."""
    if not isinstance(label, Label):
        label = parse_label(label)
    return zpl_bytes(layout_label(label, options))
