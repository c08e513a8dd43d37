"""Print documents, from the API body (or HQ command args) to printer bytes and a PNG.

``parse_document`` checks a body strictly (a sale with the same rules as a
``sale`` event, a label with the driver's :class:`~drivers.printer.Label`) and
names the bad field the way the API reports it (``sale.lines.0.package_tag``,
``net_weight``); ``render_document`` and ``preview_document`` turn the result
into ESC/POS or ZPL bytes and the PNG of the same layout. Pure and blocking
(CPU): the API runs them in a thread.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from agent.errors import Invalid
from agent.pipeline import schemas
from drivers.printer import (
    LabelOptions,
    ReceiptOptions,
    RenderError,
    label_png,
    parse_label,
    receipt_png,
    render_label,
    render_receipt,
)
from drivers.printer.device import Kind


def parse_document(kind: Kind, body: Any) -> tuple[Any, dict[str, str]]:
    """The API body (or command args) minus ``printer``, validated: (document, ref).

    Invalid names the field: ``sale.lines.0.package_tag``, ``net_weight``.
    """
    if not isinstance(body, dict):
        raise Invalid("body: must be a JSON object", "body")
    printer = body.get("printer")
    if printer is not None and not isinstance(printer, str):
        raise Invalid("printer: must be a printer id (a string)", "printer")
    rest = {k: v for k, v in body.items() if k != "printer"}
    control = _control_text(rest)
    if control is not None:
        # ESC/POS text goes to the printer as it is: an ESC or GS in a product name
        # would be a printer command (cut, reset, kick the cash drawer); and the PNG
        # renderer cannot lay out some of them either.
        raise Invalid(f"{control}: contains a control character or line separator; "
                      "send printable text only", control, "invalid")
    if kind == "receipt":
        unknown = sorted(set(rest) - {"sale"})
        if unknown:
            raise Invalid(f"{unknown[0][:64]}: unknown field; the body is "
                          '{"printer"?: id, "sale": {...}}', unknown[0][:64])
        if "sale" not in rest:
            raise Invalid('sale: required; the body is {"printer"?: id, "sale": {...}}',
                          "sale")
        try:
            sale = schemas.validate("sale", rest["sale"])
        except schemas.FieldProblem as exc:
            # schemas names fields under the event's "data"; here the sale is "sale".
            where = "sale" + exc.field.removeprefix("data")
            message = str(exc).removeprefix(f"{exc.field}: ")
            raise Invalid(f"{where}: {message}", where, "invalid") from None
        return sale, {"receipt_number": str(sale["receipt_number"])}
    try:
        label = parse_label(rest)
    except RenderError as exc:
        raise Invalid(str(exc), exc.field, "invalid") from None
    return label, {"package_tag": label.package_tag}


# C0, DEL and C1 controls; U+2028/U+2029 (the PNG renderer fails on U+2029).
_UNPRINTABLE = frozenset({"Cc", "Zl", "Zp"})


def _control_text(root: dict[str, Any]) -> str | None:
    """The path of the first key or string holding a control character or line separator.

    Iterative: HQ command args are not depth-limited the way API bodies are.
    """
    stack: list[tuple[str, Any]] = [("", root)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if any(unicodedata.category(c) in _UNPRINTABLE for c in value):
                return (path or "body")[:64]
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                sub = f"{path}.{key}" if path else str(key)
                stack.append((sub, item))
                stack.append((path or "body", str(key)))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in reversed(list(enumerate(value))))
    return None


def render_document(kind: Kind, document: Any,
                    options: ReceiptOptions | LabelOptions) -> tuple[bytes, str]:
    """Bytes for the printer and a one-line summary; Invalid if it cannot render."""
    try:
        if kind == "receipt":
            assert isinstance(options, ReceiptOptions)
            return render_receipt(document, options), f"receipt {document['receipt_number']}"
        assert isinstance(options, LabelOptions)
        return render_label(document, options), f"label {document.package_tag}"
    except RenderError as exc:
        raise Invalid(str(exc), exc.field, "invalid") from None


def preview_document(kind: Kind, document: Any, options: ReceiptOptions | LabelOptions) -> bytes:
    """The PNG preview (the same layout as the print)."""
    try:
        if kind == "receipt":
            assert isinstance(options, ReceiptOptions)
            return receipt_png(document, options)
        assert isinstance(options, LabelOptions)
        return label_png(document, options)
    except RenderError as exc:
        raise Invalid(str(exc), exc.field, "invalid") from None
