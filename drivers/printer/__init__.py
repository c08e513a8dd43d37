"""Receipt (ESC/POS) and label (ZPL) printers: render first, send second, know the real state.

Sans-I/O cores: ``receipt`` (a sale to blocks to ESC/POS bytes), ``label``
(a :class:`Label` to a layout to ZPL bytes), ``preview`` (the same layouts as
PNG), ``status`` (DLE EOT and ~HS answers to :class:`PrinterStatus`), ``sim``
(the printer side, for sim:// and tests). Blocking edges: ``transport`` (URL
to bytes moved), ``device`` (a printer: status, send, cancel, confirm), ``job``
(a queue per printer that holds, retries and expires jobs) and ``worker``
(the thread that runs a queue). ``config`` reads a ``[[devices]]`` entry.
"""

from __future__ import annotations

from drivers.printer.config import (
    DEVICE_TYPES,
    PrinterOptions,
    QueueOptions,
    build_worker,
    printer_options,
)
from drivers.printer.device import Printer
from drivers.printer.errors import (
    BadDeviceUrl,
    OptionsError,
    PrinterError,
    RenderError,
    TransportError,
)
from drivers.printer.job import (
    FaultStats,
    JobResult,
    JobTicket,
    PrintJob,
    PrintQueue,
)
from drivers.printer.label import Label, LabelOptions, parse_label, render_label
from drivers.printer.preview import label_png, receipt_png
from drivers.printer.receipt import ReceiptOptions, render_receipt
from drivers.printer.status import PrinterState, PrinterStatus
from drivers.printer.worker import PrinterWorker

__all__ = [
    "DEVICE_TYPES",
    "BadDeviceUrl",
    "FaultStats",
    "JobResult",
    "JobTicket",
    "Label",
    "LabelOptions",
    "OptionsError",
    "PrintJob",
    "PrintQueue",
    "Printer",
    "PrinterError",
    "PrinterOptions",
    "PrinterState",
    "PrinterStatus",
    "PrinterWorker",
    "QueueOptions",
    "ReceiptOptions",
    "RenderError",
    "TransportError",
    "build_worker",
    "label_png",
    "parse_label",
    "printer_options",
    "receipt_png",
    "render_label",
    "render_receipt",
]
