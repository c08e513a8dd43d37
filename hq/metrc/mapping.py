"""Stored events to Metrc request bodies (pure: no I/O, time passed in).

The shapes follow Metrc's v2 documentation as kept in tests/metrc_api/ (the
OpenMetrc description and the example requests of Metrc's own pages):

- a sale is one receipt of ``POST /sales/v2/receipts``: ``SalesDateTime`` is
  the facility's local wall-clock time **without a zone** (Metrc's page: "must
  be the actual date and time of the transaction without the time zone ... in
  the same time zone as the Facility"), ``ExternalReceiptNumber`` the sale's
  receipt number (what a lost answer is looked up by), and one transaction per
  line;
- a plant event is one v2 plant call: move -> ``PUT /plants/v2/location``,
  waste -> ``POST /plants/v2/waste``, harvest -> ``PUT /plants/v2/harvest``,
  destroy -> ``DELETE /plants/v2/``; ``observe`` has no Metrc call.

Money and quantities stay decimals: :func:`dumps` writes them as JSON numbers
with exactly the digits the POS sent (``35.00``, never ``35.000000001``).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from agent.pipeline.schemas import FieldProblem, validate

# Optional line fields a POS may send (CONTRACT 5: "more optional fields are
# welcome"), and the Metrc transaction field each one fills.
LINE_MONEY_FIELDS = {
    "price": "Price",
    "excise_tax": "ExciseTax",
    "city_tax": "CityTax",
    "county_tax": "CountyTax",
    "municipal_tax": "MunicipalTax",
    "sales_tax": "SalesTax",
    "discount": "DiscountAmount",
    "sub_total": "SubTotal",
}
# A sale-level tax (``taxes: [{"name", "amount"}]``) whose name says which one it is.
TAX_NAMES = {"excise": "ExciseTax", "city": "CityTax", "county": "CountyTax",
             "municipal": "MunicipalTax", "sales": "SalesTax"}


class MappingError(ValueError):
    """The stored event cannot become a Metrc request; the message says why (for a person)."""


@dataclass(frozen=True)
class PlantCall:
    """One v2 plant call: ``method path?licenseNumber=`` with a JSON array body."""

    method: str
    path: str
    body: list[dict[str, Any]]
    # Sending it twice does no harm (a move to the room it is in): after a lost
    # answer it may be sent again; the others wait for a person.
    repeatable: bool


def local_time(sold_at: str, timezone: str) -> str:
    """``sold_at`` (ISO 8601 with an offset) as the facility's local time, no zone:
    ``2026-11-22T10:03:11.000``."""
    try:
        moment = datetime.fromisoformat(sold_at.replace("Z", "+00:00"))
    except ValueError:
        raise MappingError(f"sold_at {sold_at[:40]!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise MappingError(f"sold_at {sold_at[:40]!r} has no UTC offset; its local time "
                           "cannot be known")
    local = moment.astimezone(ZoneInfo(timezone))
    return local.strftime("%Y-%m-%dT%H:%M:%S") + f".{local.microsecond // 1000:03d}"


def _decimal(value: Any, name: str) -> Decimal:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise MappingError(f"{name}: {str(value)[:32]!r} is not a decimal") from None
    if not number.is_finite():
        raise MappingError(f"{name}: must be a finite decimal")
    return number


def receipt(data: dict[str, Any], timezone: str) -> dict[str, Any]:
    """The Metrc receipt of one sale's ``data`` (checked again with the agent's schema)."""
    try:
        sale = validate("sale", data)
    except FieldProblem as exc:
        raise MappingError(f"the stored sale is not valid: {exc}") from None
    lines = sale["lines"]
    transactions = []
    for i, line in enumerate(lines):
        tx: dict[str, Any] = {
            "PackageLabel": line["package_tag"],
            "Quantity": _decimal(line["quantity"], f"lines.{i}.quantity"),
            "UnitOfMeasure": line["unit"],
            "TotalAmount": _decimal(line["total"], f"lines.{i}.total"),
        }
        for ours, theirs in LINE_MONEY_FIELDS.items():
            if line.get(ours) not in (None, ""):
                tx[theirs] = _decimal(line[ours], f"lines.{i}.{ours}")
        transactions.append(tx)
    if len(transactions) == 1:
        # Metrc's tax fields are per transaction: a sale-level tax is placed only
        # where it cannot be ambiguous, on the one line there is.
        for tax in sale.get("taxes") or []:
            field = next((f for key, f in TAX_NAMES.items()
                          if key in str(tax.get("name", "")).lower()), None)
            if field is not None and field not in transactions[0]:
                transactions[0][field] = _decimal(tax["amount"], "taxes.amount")
    body: dict[str, Any] = {
        "SalesDateTime": local_time(sale["sold_at"], timezone),
        "ExternalReceiptNumber": sale["receipt_number"],
        "SalesCustomerType": sale["customer_type"],
        "PatientLicenseNumber": sale.get("patient_license"),
        "CaregiverLicenseNumber": sale.get("caregiver_license"),
        "IdentificationMethod": sale.get("identification_method"),
        "Transactions": transactions,
    }
    return body


def _split(weight: Decimal | None, n: int) -> list[Decimal | None]:
    """A total weight shared evenly by ``n`` plants, to 0.01, the remainder on the last."""
    if weight is None:
        return [None] * n
    each = (weight / n).quantize(Decimal("0.01"))
    shares: list[Decimal | None] = [each] * (n - 1)
    return [*shares, weight - each * (n - 1)]


def plant_call(data: dict[str, Any], ts: str, timezone: str) -> PlantCall | None:
    """The v2 call of one plant event, or None for an action Metrc has no call for.

    ``ts`` (the agent's acceptance time, UTC) gives the facility-local
    ``ActualDate``; a ``weight`` of several plants is shared evenly among them.
    """
    try:
        plant = validate("plant", data)
    except FieldProblem as exc:
        raise MappingError(f"the stored plant event is not valid: {exc}") from None
    action = plant["action"]
    day = local_time(ts, timezone)[:10]
    tags: list[str] = plant["plant_tags"]
    weight = None if plant.get("weight") is None else _decimal(plant["weight"], "weight")
    if action == "move":
        return PlantCall("PUT", "/plants/v2/location", [
            {"Id": None, "Label": tag, "Location": plant["room"], "ActualDate": day}
            for tag in tags], repeatable=True)
    if action == "waste":
        return PlantCall("POST", "/plants/v2/waste", [{
            "WasteMethodName": plant.get("method"),
            "MixedMaterial": plant.get("mixed_material"),
            "WasteWeight": weight,
            "UnitOfMeasureName": plant["unit"],
            "ReasonName": plant["reason"],
            "Note": plant.get("note") or "",
            "LocationName": plant.get("room"),
            "WasteDate": day,
            "PlantLabels": tags,
        }], repeatable=False)
    if action == "harvest":
        return PlantCall("PUT", "/plants/v2/harvest", [
            {"Plant": tag, "Weight": share, "UnitOfWeight": plant["unit"],
             "DryingLocation": plant.get("room"), "HarvestName": plant.get("harvest_name"),
             "PatientLicenseNumber": plant.get("patient_license"), "ActualDate": day}
            for tag, share in zip(tags, _split(weight, len(tags)), strict=True)],
            repeatable=False)
    if action == "destroy":
        return PlantCall("DELETE", "/plants/v2/", [
            {"Id": None, "Label": tag, "WasteMethodName": plant.get("method"),
             "WasteMaterialMixed": plant.get("mixed_material"),
             "WasteWeight": share if share is not None else Decimal(0),
             "WasteUnitOfMeasureName": plant.get("unit"),
             "WasteReasonName": plant.get("reason"), "ReasonNote": plant.get("note") or "",
             "ActualDate": day}
            for tag, share in zip(tags, _split(weight, len(tags)), strict=True)],
            repeatable=False)
    return None  # observe: nothing to tell the state


def dumps(body: Any) -> bytes:
    """JSON with every :class:`~decimal.Decimal` written as a number, digit for digit."""
    nonce = secrets.token_hex(8)
    marks: dict[str, str] = {}

    def default(value: Any) -> Any:
        if isinstance(value, Decimal):
            key = f"\x00{nonce}:{len(marks)}\x00"
            marks[json.dumps(key)] = str(value)
            return key
        raise TypeError(f"cannot send {type(value).__name__} to Metrc")

    text = json.dumps(body, default=default, separators=(",", ":"))
    for key, digits in marks.items():
        text = text.replace(key, digits, 1)
    return text.encode("utf-8")
