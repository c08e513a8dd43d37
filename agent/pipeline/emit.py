"""The one way an event enters the outbox from a device family.

From the event loop, ``await emit(...)``; from any other thread (a printer's
worker, a reader), ``submit(...)``, which never waits and never touches the loop:
the outbox's writer commits events in submit order and resolves the future once
the event is durable. Both serialize ``data`` the same way. A family reaches
these through its :class:`~agent.devices.family.ServiceContext`.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.outbox import Accepted, Outbox


def encode(data: dict[str, Any]) -> str:
    """An event's ``data`` as the outbox stores it: compact JSON, UTF-8 kept as is."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def submit(outbox: Outbox, kind: str, data: dict[str, Any],
           source: str) -> concurrent.futures.Future[Accepted]:
    """Queue one event from any thread; the future resolves once it is committed.

    Raises the outbox's errors at once when it is not open (a family stopping).
    """
    return outbox.submit(kind, encode(data), source)


async def emit(outbox: Outbox, kind: str, data: dict[str, Any], source: str) -> Accepted:
    """Commit one event from the loop (group commit); raises the outbox's errors."""
    # Outbox.append: the loop's events of one pass reach the writer together, in order.
    return await outbox.append(kind, encode(data), source)
