"""The printers family (issue 4): devices of type receipt_printer, label_printer.

A stub until issue 4 wires drivers/ into the daemon: it runs no device.
"""

from __future__ import annotations

from agent.services import BaseService


class PrinterService(BaseService):
    name = "printers"
