"""The HQ half of the delivery protocol (CONTRACT 8).

- :mod:`hq.store`: events stored once per (site, kind, seq), contiguous
  ack watermarks, lost and skipped ranges and the report, in SQLite.
- :mod:`hq.receiver`: the MQTT 5 shared-subscription consumer that stores
  a batch, then PUBACKs it and acks the watermark on ``P/acks``.
- :mod:`hq.report`: ``edge-agent hq report`` (JSON or a table).

The package keeps imports lazy: the report does not need paho.
"""

from __future__ import annotations
