"""The climate family (issue 5): devices of type sensor.

A stub until issue 5 wires drivers/ into the daemon: it runs no device.
"""

from __future__ import annotations

from agent.services import BaseService


class ClimateService(BaseService):
    name = "climate"
