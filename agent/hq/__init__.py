"""The HQ half of the delivery protocol (CONTRACT 8).

- :mod:`agent.hq.store`: events stored once per (site, kind, seq), contiguous
  ack watermarks, lost and skipped ranges and the report, in SQLite.
- :mod:`agent.hq.receiver`: the MQTT 5 shared-subscription consumer that stores
  a batch, then PUBACKs it and acks the watermark on ``P/acks``.
- :mod:`agent.hq.report`: ``edge-agent hq report`` (JSON or a table).

The package keeps imports lazy: the report does not need paho.
"""

from __future__ import annotations
