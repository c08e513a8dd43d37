"""PNG previews of receipts and labels (Pillow), drawn from the same layout that is printed.

A receipt is drawn on the printer's grid (font A: 12 x 24 dots per character,
as on an 80 mm Epson), a label at its own size in printer dots. Barcodes are
drawn module by module from real encoders (python-barcode's Code 128, the
``qrcode`` package's QR), with quiet zones, so a scanner or zxing-cpp reads
them back; the printer may pick a different QR version or Code 128 subset
than these encoders, but the decoded text is the same.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import barcode
import qrcode
from PIL import Image, ImageDraw, ImageFont

from drivers.printer.label import (
    Code128,
    Label,
    LabelLayout,
    LabelOptions,
    QrCode,
    TextLine,
    layout_label,
)
from drivers.printer.label import parse_label as _parse_label
from drivers.printer.receipt import (
    Block,
    Cut,
    Qr,
    ReceiptOptions,
    ReceiptSale,
    Text,
    layout_receipt,
)

CELL_W, CELL_H = 12, 24  # ESC/POS font A
PAD = 12
QUIET = 4  # QR quiet zone, modules
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu")

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=64)
def _font(name: str, size: int) -> Font:
    for folder in FONT_DIRS:
        path = Path(folder) / name
        if path.exists():
            return ImageFont.truetype(str(path), size)
    # Pillow's own scalable font: proportional, so columns only roughly align.
    return ImageFont.load_default(size)


def _qr_matrix(data: str) -> list[list[bool]]:
    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=0)
    code.add_data(data)
    code.make(fit=True)
    return [list(map(bool, row)) for row in code.get_matrix()]


def _draw_qr(draw: ImageDraw.ImageDraw, x: int, y: int, module: int,
             matrix: list[list[bool]]) -> None:
    for r, row in enumerate(matrix):
        for c, dark in enumerate(row):
            if dark:
                draw.rectangle((x + c * module, y + r * module,
                                x + (c + 1) * module - 1, y + (r + 1) * module - 1), fill=0)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- receipts -------------------------------------------------------------------


def _block_height(block: Block, qr: dict[str, list[list[bool]]]) -> int:
    if isinstance(block, Text):
        return CELL_H * (2 if block.big else 1)
    if isinstance(block, Qr):
        return (len(qr[block.data]) + 2 * QUIET) * block.module + CELL_H
    if isinstance(block, Cut):
        return CELL_H * 2
    return 0


def receipt_image(blocks: Iterable[Block], columns: int) -> Image.Image:
    """The receipt as it would come out of an 80 mm ESC/POS printer, 1 pixel per dot."""
    blocks = list(blocks)
    qr = {b.data: _qr_matrix(b.data) for b in blocks if isinstance(b, Qr)}
    width = columns * CELL_W + 2 * PAD
    height = PAD * 2 + sum(_block_height(b, qr) for b in blocks)
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    y = PAD
    for block in blocks:
        if isinstance(block, Text):
            scale = 2 if block.big else 1
            font = _font("DejaVuSansMono-Bold.ttf" if block.bold else "DejaVuSansMono.ttf",
                         20 * scale)
            span = draw.textlength(block.text, font=font)
            room = columns * CELL_W
            x = PAD + {"left": 0, "center": (room - span) / 2, "right": room - span}[block.align]
            draw.text((x, y), block.text, font=font, fill=0)
        elif isinstance(block, Qr):
            matrix = qr[block.data]
            side = (len(matrix) + 2 * QUIET) * block.module
            x = (width - side) // 2 + QUIET * block.module
            _draw_qr(draw, x, y + QUIET * block.module, block.module, matrix)
        elif isinstance(block, Cut):
            mid = y + CELL_H
            for x in range(0, width, 16):
                draw.line((x, mid, x + 8, mid), fill=128, width=2)
        y += _block_height(block, qr)
    return image


def receipt_png(sale: ReceiptSale | dict[str, Any], options: ReceiptOptions) -> bytes:
    """PNG preview of the receipt for ``sale`` (RenderError as for printing)."""
    return _png(receipt_image(layout_receipt(sale, options), options.columns))


# --- labels ---------------------------------------------------------------------


def label_image(layout: LabelLayout) -> Image.Image:
    """The label at printer resolution (1 pixel per dot)."""
    image = Image.new("L", (layout.width, layout.height), 255)
    draw = ImageDraw.Draw(image)
    for el in layout.elements:
        if isinstance(el, TextLine):
            font = _font("DejaVuSansCondensed-Bold.ttf", el.height)
            draw.text((el.x, el.y), el.text, font=font, fill=0)
        elif isinstance(el, Code128):
            modules = barcode.Code128(el.data).build()[0]
            for i, bit in enumerate(modules):
                if bit == "1":
                    x = el.x + i * el.module
                    draw.rectangle((x, el.y, x + el.module - 1, el.y + el.height - 1), fill=0)
        elif isinstance(el, QrCode):
            _draw_qr(draw, el.x, el.y, el.module, _qr_matrix(el.data))
    return image


def label_png(label: Label | dict[str, Any], options: LabelOptions) -> bytes:
    """PNG preview of ``label`` on the stock in ``options`` (RenderError as for printing)."""
    if not isinstance(label, Label):
        label = _parse_label(label)
    return _png(label_image(layout_label(label, options)))
