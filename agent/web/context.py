"""What the HTTP layer reads and writes (ApiContext); the daemon builds it, and tests do."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig
from agent.web.auth import Tokens

if TYPE_CHECKING:
    from agent.outbox import Outbox


MAX_BODY_BYTES = 1 << 20


@dataclass
class ApiContext:
    """What the API reads and writes; built by the daemon (and by tests)."""

    cfg: AgentConfig
    outbox: Outbox
    tokens: Tokens
    uplink_snapshot: Callable[[], dict[str, Any]]
    devices_snapshot: Callable[[], list[dict[str, Any]]]
    started_at: float
    max_body_bytes: int = MAX_BODY_BYTES
    clock: Callable[[], float] = field(default=time.time)
    # Device families (agent/devices/family.py): each may add routes and metrics.
    services: list[Any] = field(default_factory=list)
    # The Host names answered (agent/web/allowed_hosts.py); the daemon sets them. None: any
    # (an app embedded in a test client, whose Host is "testserver").
    allowed_hosts: frozenset[str] | None = None
