"""The MQTT uplink: the outbox to HQ, acks and commands back (see :mod:`agent.uplink.link`)."""

from __future__ import annotations

from agent.uplink.ledger import DeliveryLedger
from agent.uplink.link import Uplink
from agent.uplink.protocol import parse_ack, split_host, with_epoch, with_floor

__all__ = ["DeliveryLedger", "Uplink", "parse_ack", "split_host", "with_epoch", "with_floor"]
