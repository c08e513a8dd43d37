"""Receipts, sans-I/O: a sale (CONTRACT 5) becomes a list of blocks, the blocks become ESC/POS.

``layout_receipt(sale, options)`` is the one place that decides what a receipt
says; ``escpos_bytes(blocks)`` writes it with python-escpos (into its ``Dummy``
printer, i.e. to bytes) and ``preview.receipt_png`` draws the same blocks, so
the preview shows what prints. Rendering happens before any printer is
touched: a job is bytes that can be stored, retried and compared in tests.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from escpos.constants import QR_ECLEVEL_M
from escpos.printer import Dummy
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from drivers.printer.errors import RenderError

Align = Literal["left", "center", "right"]


@dataclass(frozen=True)
class Text:
    """One printed line (never longer than the receipt's columns)."""

    text: str
    align: Align = "left"
    bold: bool = False
    big: bool = False  # double width and height


@dataclass(frozen=True)
class Qr:
    """A QR code; ``module`` is the printer's dot size per module."""

    data: str
    module: int


@dataclass(frozen=True)
class Cut:
    """Feed and cut."""


@dataclass(frozen=True)
class DrawerKick:
    """Pulse the cash drawer connector."""

    pin: int


Block = Text | Qr | Cut | DrawerKick


def _lines(value: Any) -> Any:
    return value.splitlines() if isinstance(value, str) else value


class ReceiptOptions(BaseModel):
    """A receipt printer's document options, from its ``[[devices]]`` entry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site_name: Annotated[str, Field(max_length=80)] = ""
    address: Annotated[list[str], BeforeValidator(_lines), Field(max_length=6)] = Field(
        default_factory=list)
    licence_number: Annotated[str, Field(max_length=64)] = ""
    warning: Annotated[str, Field(max_length=2000)] = ""  # the jurisdiction's required text
    columns: Annotated[int, Field(ge=24, le=64)] = 42  # font A on 80 mm paper: 42 (58 mm: 32)
    currency: Annotated[str, Field(max_length=4)] = "$"
    qr_module: Annotated[int, Field(ge=2, le=16)] = 6
    cut: bool = True
    drawer_kick: bool = False
    drawer_pin: Literal[2, 5] = 2


class _Lenient(BaseModel):
    # The agent validated the sale strictly (agent/pipeline/schemas.py) before it got
    # here; drivers/ cannot import that, so this only checks what it prints.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class SaleLine(_Lenient):
    package_tag: Annotated[str, Field(min_length=1, max_length=64)]
    quantity: str
    unit: str
    price: str
    total: str
    thc_pct: str | None = None
    product: str | None = None


class SaleTax(_Lenient):
    name: str
    amount: str


class ReceiptSale(_Lenient):
    receipt_number: Annotated[str, Field(min_length=1, max_length=64)]
    sold_at: str
    customer_type: str
    patient_license: str | None = None
    register_: str | None = Field(default=None, alias="register")
    lines: Annotated[list[SaleLine], Field(min_length=1)]
    taxes: list[SaleTax] = Field(default_factory=list)
    total: str


def _sale(sale: ReceiptSale | dict[str, Any]) -> ReceiptSale:
    if isinstance(sale, ReceiptSale):
        return sale
    try:
        # Numbers may arrive as JSON numbers; print them as the POS wrote them.
        return ReceiptSale.model_validate(_stringify(sale))
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in ("sale", *err["loc"]))
        raise RenderError(where, err["msg"]) from None


def _stringify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stringify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify(v) for v in value]
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value)
    return value


def _two_cols(left: str, right: str, width: int) -> list[str]:
    """``left`` and ``right`` on one line, right-aligned; wrapped when they do not fit."""
    if len(left) + 1 + len(right) <= width:
        return [left + " " * (width - len(left) - len(right)) + right]
    head = textwrap.wrap(left, width) or [""]
    if len(head[-1]) + 1 + len(right) <= width:
        return head[:-1] + _two_cols(head[-1], right, width)
    return [*head, right.rjust(width)]


def _wrap(text: str, width: int, **style: Any) -> list[Text]:
    out: list[Text] = []
    for para in text.splitlines() or [""]:
        out.extend(Text(line, **style) for line in (textwrap.wrap(para, width) or [""]))
    return out


def _when(sold_at: str) -> str:
    try:
        return datetime.fromisoformat(sold_at).strftime("%Y-%m-%d %H:%M:%S %z")
    except ValueError:
        return sold_at


def layout_receipt(sale: ReceiptSale | dict[str, Any], options: ReceiptOptions) -> list[Block]:
    """What the receipt says, top to bottom."""
    s = _sale(sale)
    w = options.columns
    cur = options.currency
    rule = Text("-" * w)
    blocks: list[Block] = []
    if options.site_name:
        blocks += _wrap(options.site_name, w // 2, align="center", bold=True, big=True)
    for line in options.address:
        blocks += _wrap(line, w, align="center")
    if options.licence_number:
        blocks += _wrap(f"License {options.licence_number}", w, align="center")
    blocks.append(rule)
    blocks += [Text(line, bold=True) for line in _two_cols("Receipt", s.receipt_number, w)]
    blocks += [Text(line) for line in _two_cols("Date", _when(s.sold_at), w)]
    blocks += [Text(line) for line in _two_cols("Customer", s.customer_type, w)]
    if s.patient_license:
        blocks += [Text(line) for line in _two_cols("Patient license", s.patient_license, w)]
    if s.register_:
        blocks += [Text(line) for line in _two_cols("Register", s.register_, w)]
    blocks.append(rule)
    for item in s.lines:
        if item.product:
            blocks += _wrap(item.product, w, bold=True)
        blocks.append(Text(item.package_tag[:w]))
        qty = f"  {item.quantity} {item.unit} @ {cur}{item.price}"
        blocks += [Text(line) for line in _two_cols(qty, f"{cur}{item.total}", w)]
        if item.thc_pct is not None:
            blocks.append(Text(f"  THC {item.thc_pct}%"[:w]))
    blocks.append(rule)
    if s.taxes:
        subtotal = sum((Decimal(item.total) for item in s.lines), Decimal(0))
        blocks += [Text(line) for line in _two_cols("Subtotal", f"{cur}{subtotal}", w)]
        for tax in s.taxes:
            blocks += [Text(line) for line in _two_cols(tax.name, f"{cur}{tax.amount}", w)]
    blocks += [Text(line, bold=True) for line in _two_cols("TOTAL", f"{cur}{s.total}", w)]
    blocks.append(rule)
    blocks.append(Qr(s.receipt_number, options.qr_module))
    blocks.append(Text(s.receipt_number, align="center"))
    if options.warning:
        blocks.append(Text(""))
        blocks += _wrap(options.warning, w)
    if options.cut:
        blocks.append(Cut())
    if options.drawer_kick:
        blocks.append(DrawerKick(options.drawer_pin))
    return blocks


def escpos_bytes(blocks: list[Block]) -> bytes:
    """The ESC/POS bytes for ``blocks`` (python-escpos, written into its Dummy printer)."""
    p = Dummy()
    p.hw("INIT")
    style: tuple[Align, bool, bool] | None = None
    for block in blocks:
        if isinstance(block, Text):
            want = (block.align, block.bold, block.big)
            if want != style:
                p.set(align=block.align, bold=block.bold, double_width=block.big,
                      double_height=block.big, normal_textsize=not block.big)
                style = want
            p.textln(block.text)
        elif isinstance(block, Qr):
            # Justification applies to 2D codes on ESC/POS printers; the native
            # code (GS ( k) is a few dozen bytes where an image would be kilobytes.
            p.set(align="center")
            style = None
            p.qr(block.data, native=True, size=block.module, ec=QR_ECLEVEL_M)
            p.ln()
        elif isinstance(block, Cut):
            p.cut()
        elif isinstance(block, DrawerKick):
            p.cashdraw(block.pin)
    return bytes(p.output)


def render_receipt(sale: ReceiptSale | dict[str, Any], options: ReceiptOptions) -> bytes:
    """A sale to ESC/POS bytes; RenderError names the field when the sale cannot be printed."""
    return escpos_bytes(layout_receipt(sale, options))
