"""Device families plugged into the daemon: scanners, printers, climate sensors.

Each family is one :class:`Service` in its own module (``scanning.py``,
``printing.py``, ``climate.py`` here). The daemon builds every service from the
config, starts them after the outbox is open, stops them before it closes, and
asks each for its device states and its HQ commands. A family's API routes
(``agent/web/family_routes.py``) and metrics (``agent/ops/device_metrics.py``)
are built from the service by those layers; a family never imports them.
Services talk to the rest of the agent only through :class:`ServiceContext`:
flow stays devices -> pipeline -> outbox, and commands come back
uplink -> command router -> service.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent.config import AgentConfig
from agent.errors import ConfigIssue
from agent.pipeline import emit as pipeline

if TYPE_CHECKING:
    from agent.outbox import Accepted, Outbox

CommandHandler = Callable[[dict[str, Any]], Any]
# The id of the command a handler runs for. Handlers take only ``args``; the
# few that need the id (a print job keyed by it, so a resend cannot print
# twice) read it here. The command router (agent/commands/handlers.py) sets it.
current_command_id: ContextVar[str | None] = ContextVar("current_command_id", default=None)

# module:class, in start order. Each module exists, even while its family is a stub.
SERVICE_CLASSES: tuple[str, ...] = (
    "agent.devices.scanning:ScannerService",
    "agent.devices.printing:PrinterService",
    "agent.devices.climate:ClimateService",
)


@dataclass
class ServiceContext:
    """What a service may use. ``emit`` commits one event durably (group commit)."""

    cfg: AgentConfig
    outbox: Outbox
    state_dir: Path
    loop: asyncio.AbstractEventLoop

    async def emit(self, kind: str, data: dict[str, Any], source: str) -> Accepted:
        """From the loop: commit one event; raises the outbox's errors (OutboxFull, ...)."""
        return await pipeline.emit(self.outbox, kind, data, source)

    def submit(self, kind: str, data: dict[str, Any],
               source: str) -> concurrent.futures.Future[Accepted]:
        """From any thread: queue one event, never waiting (``agent/pipeline/emit.py``)."""
        return pipeline.submit(self.outbox, kind, data, source)


@runtime_checkable
class Service(Protocol):
    name: str

    @classmethod
    def config_issues(cls, cfg: AgentConfig) -> list[ConfigIssue]:
        """Problems in this family's config (devices of its types, its sections)."""
        ...

    async def start(self, ctx: ServiceContext) -> None: ...

    async def stop(self) -> None: ...

    def devices(self) -> list[dict[str, Any]]:
        """One status entry per device: {"id", "type", "state", "last_fault", ...}."""
        ...

    def commands(self) -> dict[str, CommandHandler]: ...


class BaseService:
    """Defaults for a family with nothing configured; real services override."""

    name = "base"

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg

    @classmethod
    def config_issues(cls, cfg: AgentConfig) -> list[ConfigIssue]:
        return []

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def stop(self) -> None:
        return None

    def devices(self) -> list[dict[str, Any]]:
        return []

    def commands(self) -> dict[str, CommandHandler]:
        return {}


def service_classes() -> list[type[Service]]:
    classes = []
    for spec in SERVICE_CLASSES:
        module, _, name = spec.partition(":")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def build_services(cfg: AgentConfig) -> list[Service]:
    return [cls(cfg) for cls in service_classes()]  # type: ignore[call-arg]


def config_issues(cfg: AgentConfig) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    for cls in service_classes():
        issues.extend(cls.config_issues(cfg))
    return issues


def idle_device(base: dict[str, Any], *, enabled: bool, problem: str | None,
                **zero_counts: int) -> dict[str, Any]:
    """The status entry of a device that is not running.

    Disabled in config, or not (yet) open: ``down`` with the problem that keeps
    it from running, else ``starting``; ``zero_counts`` are the family's counters.
    """
    if not enabled:
        return {**base, "state": "disabled", "enabled": False, "error": None,
                "last_fault": None}
    return {**base, "state": "down" if problem else "starting", "error": problem,
            "last_fault": problem, **zero_counts}


def all_devices(services: Iterable[Service]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = []
    for service in services:
        devices.extend(service.devices())
    return devices

