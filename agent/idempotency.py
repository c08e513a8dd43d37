"""Idempotency-Key bodies (issue 9; IETF draft-ietf-httpapi-idempotency-key-header).

A key names one request: its answer is replayed to a retry, but only to a retry
of the same request. So the first request's body is remembered as a digest, and
a reuse of the key with another body is refused (422 naming the header) rather
than answered with the first request's result, which would tell a POS that a
sale nobody stored was accepted. Shared by ``POST /v1/events/{kind}`` (the
digest is kept with the stored answer in the outbox, so it survives restarts)
and the print routes (kept with the job on disk, ``agent/devices/print_jobs.py``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from agent.errors import AgentError

HEADER = "Idempotency-Key"


class IdempotencyKeyReused(AgentError):
    """The key was used before with another body."""

    field = HEADER

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"{HEADER}: already used with a different request body; a retry must "
                         "send the same body, a new request a new key")


def body_digest(body: Any) -> str:
    """The SHA-256 of a parsed JSON body, canonical (sorted keys, no spaces), in hex."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
