"""agent/kinds.py: the one table of per-kind rules and the views the other modules read."""

from __future__ import annotations

from agent import kinds


def test_the_views_say_what_the_contract_and_the_readme_say() -> None:
    """Kinds in the contract's order, compliance first on the uplink, what a full outbox does."""
    assert kinds.KINDS == ("sale", "plant", "scan", "sensor", "print", "device", "alarm")
    assert kinds.PRIORITY == ("sale", "plant", "alarm", "print", "device", "scan", "sensor")
    assert sorted(kinds.NEVER_DROPPED) == ["plant", "sale", "scan"]
    assert sorted(kinds.THINNED_KINDS) == ["sensor"]
    assert sorted(kinds.HEADROOM_KINDS) == ["alarm", "device", "print"]
    assert sorted(kinds.BULK_KINDS) == ["scan", "sensor"]
    assert kinds.COMPLIANCE_KINDS == ("sale", "plant")
    assert kinds.NEVER_DROPPED_TEXT == "sale, plant and scan"


def test_every_kind_has_one_rule_and_one_place_in_the_order() -> None:
    """No kind twice, priorities a permutation, a positive quantum each."""
    assert len(set(kinds.KINDS)) == len(kinds.RULES)
    assert sorted(r.priority for r in kinds.RULES) == list(range(len(kinds.RULES)))
    assert all(r.quantum > 0 for r in kinds.RULES)
