"""Which routes each device family adds to the API, by the family's service name.

The families know nothing of HTTP (devices/ never imports web/): the route
modules take a service and build its router, and this table says which module
serves which family. A new family with routes adds one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter

from agent.devices.family import Service
from agent.web.climate_routes import climate_router
from agent.web.print_routes import print_router
from agent.web.scanning_routes import scanning_router

ROUTERS: dict[str, Callable[[Any], APIRouter]] = {
    "scanners": scanning_router,
    "printers": print_router,
    "climate": climate_router,
}


def family_routers(services: Iterable[Service]) -> list[APIRouter]:
    """The routers of the families running here, in the services' order."""
    return [ROUTERS[s.name](s) for s in services if s.name in ROUTERS]
