"""What a printer's ``[[devices]]`` entry may say, and the worker built from it.

```toml
[[devices]]
id = "counter-1-receipt"
type = "receipt_printer"
url = "tcp://10.0.0.60:9100"
site_name = "Denver Flagship"          # receipt header (default: the agent passes site.name)
address = ["123 Main St", "Denver, CO 80202"]
licence_number = "402R-00123"
warning = "There may be health risks associated with the consumption of this product."
columns = 42                           # 80 mm paper, font A (58 mm: 32)
drawer_kick = true                     # pulse the cash drawer after the receipt
retry_interval_s = 5                   # a held job is tried again this often
job_ttl_s = 900                        # ...until it expires with a result

[[devices]]
id = "packaging-zebra"
type = "label_printer"
url = "tcp://10.0.0.50:9100"
width = 4                              # label stock, in size_unit
height = 3
size_unit = "in"                       # in | mm
dpi = 203                              # 203 | 300 | 600
licence_number = "402R-00123"
warning = "This product contains cannabis. Keep out of the reach of children."
```

Unknown keys are errors naming the key: a typo must not leave a default in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from drivers.printer.device import Kind, Printer
from drivers.printer.errors import OptionsError
from drivers.printer.job import JOB_TTL_S, JobResult, PrintQueue
from drivers.printer.label import LabelOptions
from drivers.printer.receipt import ReceiptOptions
from drivers.printer.worker import PrinterWorker

DEVICE_TYPES: dict[str, Kind] = {"receipt_printer": "receipt", "label_printer": "label"}
# Keys of a [[devices]] entry that the agent itself reads.
ENTRY_KEYS = ("id", "type", "url", "enabled")


class QueueOptions(BaseModel):
    """How a printer's jobs are checked, held and retried."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status_timeout_s: Annotated[float, Field(gt=0, le=30)] = 1.0
    retry_interval_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    job_ttl_s: Annotated[float, Field(gt=0, le=7 * 86400)] = JOB_TTL_S
    hold_on_unknown: bool = True  # ESC/POS: no job for a printer that should answer and does not
    status_interval_s: Annotated[float, Field(ge=0, le=3600)] = 30.0  # idle polls; 0: off


@dataclass(frozen=True)
class PrinterOptions:
    kind: Kind
    document: ReceiptOptions | LabelOptions
    queue: QueueOptions


def _validate(model: type[BaseModel], values: dict[str, Any]) -> Any:
    try:
        return model.model_validate(values)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or model.__name__
        raise OptionsError(key, err["msg"].removeprefix("Value error, ")) from None


def printer_options(kind: Kind, entry: Mapping[str, Any]) -> PrinterOptions:
    """Split and check a printer's options (the entry's keys beyond id/type/url/enabled)."""
    doc_model: type[ReceiptOptions] | type[LabelOptions] = (
        ReceiptOptions if kind == "receipt" else LabelOptions)
    doc_keys = set(doc_model.model_fields)
    queue_keys = set(QueueOptions.model_fields)
    values = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    for key in sorted(values):
        if key not in doc_keys | queue_keys:
            known = ", ".join(sorted(doc_keys | queue_keys))
            raise OptionsError(key, f"not an option of a {kind} printer (known: {known})")
    document = _validate(doc_model, {k: v for k, v in values.items() if k in doc_keys})
    queue = _validate(QueueOptions, {k: v for k, v in values.items() if k in queue_keys})
    return PrinterOptions(kind, document, queue)


def build_worker(name: str, kind: Kind, url: str, options: PrinterOptions, *,
                 on_result: Callable[[JobResult], None] | None = None) -> PrinterWorker:
    """A (not yet started) worker for one printer; BadDeviceUrl if the URL makes no sense."""
    printer = Printer.from_url(name, kind, url, status_timeout=options.queue.status_timeout_s)
    queue = PrintQueue(printer, retry_interval_s=options.queue.retry_interval_s,
                       job_ttl_s=options.queue.job_ttl_s,
                       hold_on_unknown=options.queue.hold_on_unknown, on_result=on_result)
    return PrinterWorker(queue, status_interval_s=options.queue.status_interval_s)
