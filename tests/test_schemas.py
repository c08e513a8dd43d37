"""Sale and plant payload rules (CONTRACT 5)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.pipeline.schemas import FieldProblem, validate
from agent.testing.localsite import sample_sale


def problem(kind: str, data: Any) -> str:
    with pytest.raises(FieldProblem) as info:
        validate(kind, data)
    return info.value.field


def test_contract_sale_example_is_valid() -> None:
    """The sale in CONTRACT 5 validates and keeps extra fields."""
    data = {**sample_sale(1), "loyalty_id": "L-9"}
    assert validate("sale", data)["loyalty_id"] == "L-9"


def test_sale_rules_name_the_field() -> None:
    """Each broken sale rule names the field that is wrong."""
    sale = sample_sale(1)
    assert problem("sale", {**sale, "lines": [{**sale["lines"][0], "package_tag": "1a4ff"}]}) \
        == "data.lines.0.package_tag"
    assert problem("sale", {**sale, "total": "36.00"}) == "data.total"
    assert problem("sale", {**sale, "customer_type": "Patient"}) == "data.patient_license"
    assert problem("sale", {**sale, "customer_type": "Tourist"}) == "data.customer_type"
    assert problem("sale", {**sale, "sold_at": "yesterday"}) == "data.sold_at"
    assert problem("sale", {**sale, "lines": [{**sale["lines"][0], "quantity": "NaN"}]}) \
        == "data.lines.0.quantity"
    assert problem("sale", {**sale, "lines": []}) == "data.lines"


def test_sale_taxes_count_toward_the_total() -> None:
    """total = line totals + taxes."""
    sale = {**sample_sale(1), "taxes": [{"name": "excise", "amount": "5.25"}], "total": "40.25"}
    assert validate("sale", sale)["total"] == "40.25"


def test_plant_actions_need_their_fields() -> None:
    """move needs room; waste needs weight, unit and reason; harvest weight and unit."""
    tag = "1A4FF0200000022000000456"
    assert validate("plant", {"action": "observe", "plant_tags": [tag]})["action"] == "observe"
    assert problem("plant", {"action": "move", "plant_tags": [tag]}) == "data.room"
    assert problem("plant", {"action": "waste", "plant_tags": [tag], "weight": "1",
                             "unit": "Grams"}) == "data.reason"
    assert problem("plant", {"action": "harvest", "plant_tags": [tag]}) == "data.weight"
    assert problem("plant", {"action": "clone", "plant_tags": [tag]}) == "data.action"
    assert problem("plant", {"action": "observe", "plant_tags": ["bad"]}) == "data.plant_tags.0"


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4),
                    max_leaves=20))
def test_random_payloads_never_raise_anything_but_fieldproblem(data: Any) -> None:
    """Any JSON-like value either validates or raises FieldProblem with a field."""
    for kind in ("sale", "plant", "alarm", "sensor"):
        try:
            validate(kind, data)
        except FieldProblem as exc:
            assert exc.field
