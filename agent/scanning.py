"""The scanners family (issue 3): devices of type scanner.

A stub until issue 3 wires drivers/ into the daemon: it runs no device.
"""

from __future__ import annotations

from agent.services import BaseService


class ScannerService(BaseService):
    name = "scanners"
