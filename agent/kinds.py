"""One table of the event kinds and their rules.

Every rule that depends on an event's kind is read from :data:`RULES`: the
uplink's order and quantum, the in-flight reserve, what the outbox does at
``outbox.max_bytes``, and which kinds are the state's compliance records. The
other modules' constants (``KINDS``, ``PRIORITY``, ``NEVER_DROPPED``, ...) are
views of this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What the outbox does with a new event of the kind at outbox.max_bytes:
# refuse   - refused (OutboxFull, HTTP 507); nothing already stored is dropped
# thin     - the oldest unpublished ones are folded into per-minute aggregates first
# headroom - may use a small slice over max_bytes (so "outbox full" can be said),
#            then refused
WhenFull = Literal["refuse", "thin", "headroom"]


@dataclass(frozen=True)
class KindRule:
    kind: str
    priority: int        # uplink order: 0 is served first in each pass
    quantum: int         # events of the kind one uplink pass may publish
    bulk: bool           # high volume: kept out of the in-flight reserve for the others
    when_full: WhenFull
    compliance: bool     # reported to the state (Metrc): its delay is a deadline


RULES: tuple[KindRule, ...] = (
    KindRule("sale", 0, 256, bulk=False, when_full="refuse", compliance=True),
    KindRule("plant", 1, 256, bulk=False, when_full="refuse", compliance=True),
    KindRule("scan", 5, 128, bulk=True, when_full="refuse", compliance=False),
    KindRule("sensor", 6, 128, bulk=True, when_full="thin", compliance=False),
    KindRule("print", 3, 64, bulk=False, when_full="headroom", compliance=False),
    KindRule("device", 4, 64, bulk=False, when_full="headroom", compliance=False),
    KindRule("alarm", 2, 64, bulk=False, when_full="headroom", compliance=False),
)

# The contract's order (CONTRACT 4's topics, the API's enum).
KINDS: tuple[str, ...] = tuple(rule.kind for rule in RULES)
PRIORITY: tuple[str, ...] = tuple(r.kind for r in sorted(RULES, key=lambda r: r.priority))
QUANTUM: dict[str, int] = {rule.kind: rule.quantum for rule in RULES}
BULK_KINDS = frozenset(rule.kind for rule in RULES if rule.bulk)
NEVER_DROPPED = frozenset(rule.kind for rule in RULES if rule.when_full == "refuse")
THINNED_KINDS = frozenset(rule.kind for rule in RULES if rule.when_full == "thin")
HEADROOM_KINDS = frozenset(rule.kind for rule in RULES if rule.when_full == "headroom")
COMPLIANCE_KINDS: tuple[str, ...] = tuple(rule.kind for rule in RULES if rule.compliance)


def _listed(kinds: tuple[str, ...]) -> str:
    return ", ".join(kinds[:-1]) + f" and {kinds[-1]}" if len(kinds) > 1 else kinds[0]


# "sale, plant and scan": what a full outbox refuses, in the words every message uses.
NEVER_DROPPED_TEXT = _listed(tuple(k for k in KINDS if k in NEVER_DROPPED))
