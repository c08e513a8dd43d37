"""The durable outbox (CONTRACT 6): see :mod:`agent.outbox.outbox`."""

from __future__ import annotations

from agent.outbox.outbox import Outbox
from agent.outbox.reader import OutboxReader
from agent.outbox.records import Accepted, KindStats

__all__ = ["Accepted", "KindStats", "Outbox", "OutboxReader"]
