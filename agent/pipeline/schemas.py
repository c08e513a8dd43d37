"""Wire payloads (``data`` of the envelope), validated with pydantic.

``sale`` is shaped after Metrc's sales receipt and ``plant`` after its plant
calls (CONTRACT 5). Quantities and money are decimal strings, never floats.
Unknown optional fields are kept (``extra="allow"``) so a POS can send more
than we model; the fields we model are checked strictly.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticValidationError

TAG_PATTERN = r"^[A-Z0-9]{24}$"
Tag = Annotated[str, Field(pattern=TAG_PATTERN, description="24 uppercase letters and digits")]
PACKAGE_TAG = re.compile(TAG_PATTERN.strip("^$"))
CUSTOMER_TYPES = ("Consumer", "Patient", "Caregiver", "ExternalPatient", "NonResidentConsumer")
UNITS = ("Each", "Grams", "Kilograms", "Milligrams", "Ounces", "Pounds", "Milliliters", "Liters",
         "Fluid Ounces")


# What the OpenAPI document promises (issue 10): plain non-negative decimals, as a POS
# sends them; Decimal() alone would also take "1e3", "+3" and "-0".
DECIMAL_PATTERN = r"^[0-9]{1,20}(\.[0-9]{1,10})?$"


def _decimal(value: str) -> str:
    if value.startswith("-"):
        raise ValueError("must not be negative")
    if not re.fullmatch(DECIMAL_PATTERN, value):
        raise ValueError("must be a decimal string such as \"3.5\"")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise ValueError("must be a decimal string such as \"3.5\"") from None
    if not number.is_finite():
        raise ValueError("must be a finite decimal")
    if number < 0:
        raise ValueError("must not be negative")
    return value


DecimalStr = Annotated[str, Field(max_length=32, json_schema_extra={"pattern": DECIMAL_PATTERN}),
                       AfterValidator(_decimal)]
Text = Annotated[str, Field(max_length=256)]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="allow", str_strip_whitespace=True, populate_by_name=True)


class SaleLine(_Payload):
    package_tag: Tag
    quantity: DecimalStr
    unit: Literal[UNITS]  # type: ignore[valid-type]
    price: DecimalStr
    total: DecimalStr


class Tax(_Payload):
    name: Text
    amount: DecimalStr


class Sale(_Payload):
    receipt_number: Annotated[str, Field(min_length=1, max_length=64)]
    sold_at: Annotated[str, Field(max_length=40, json_schema_extra={"format": "date-time"})]
    customer_type: Literal[CUSTOMER_TYPES]  # type: ignore[valid-type]
    patient_license: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    # "register" would shadow BaseModel.register (ABCMeta), hence the alias.
    register_: Text | None = Field(default=None, alias="register")
    lines: Annotated[list[SaleLine], Field(min_length=1, max_length=500)]
    taxes: Annotated[list[Tax], Field(max_length=20)] = Field(default_factory=list)
    total: DecimalStr

    @model_validator(mode="after")
    def _rules(self) -> Sale:
        from datetime import datetime

        try:
            sold = datetime.fromisoformat(self.sold_at)
        except ValueError:
            raise ValueError("sold_at: must be an ISO 8601 time with offset") from None
        if sold.tzinfo is None:
            raise ValueError("sold_at: must carry a UTC offset (e.g. -07:00)")
        if self.customer_type in ("Patient", "Caregiver") and not self.patient_license:
            raise ValueError(f"patient_license: required for customer_type {self.customer_type}")
        lines = sum((Decimal(line.total) for line in self.lines), Decimal(0))
        taxes = sum((Decimal(tax.amount) for tax in self.taxes), Decimal(0))
        if lines + taxes != Decimal(self.total):
            raise ValueError(f"total: {self.total} is not the sum of the line totals ({lines}) "
                             f"plus taxes ({taxes})")
        return self


class Plant(_Payload):
    action: Literal["move", "waste", "harvest", "observe", "destroy"]
    plant_tags: Annotated[list[Tag], Field(min_length=1, max_length=1000)]
    room: Text | None = None
    weight: DecimalStr | None = None
    unit: Literal[UNITS] | None = None  # type: ignore[valid-type]
    reason: Text | None = None
    method: Text | None = None
    note: Annotated[str, Field(max_length=2000)] | None = None

    @model_validator(mode="after")
    def _needs(self) -> Plant:
        needs = {
            "move": ("room",),
            "waste": ("weight", "unit", "reason"),
            "harvest": ("weight", "unit"),
        }.get(self.action, ())
        for field in needs:
            if getattr(self, field) in (None, ""):
                raise ValueError(f"{field}: required when action is {self.action}")
        return self


class Alarm(_Payload):
    code: Annotated[str, Field(min_length=1, max_length=64)]
    message: Annotated[str, Field(max_length=1000)]
    severity: Literal["info", "warning", "critical"] = "warning"
    state: Literal["raised", "cleared"] = "raised"


class Generic(_Payload):
    """Kinds whose drivers define the shape (scan, sensor, print, device)."""


SCHEMAS: dict[str, type[BaseModel]] = {
    "sale": Sale,
    "plant": Plant,
    "alarm": Alarm,
    "scan": Generic,
    "sensor": Generic,
    "print": Generic,
    "device": Generic,
}


# -- device kinds posted over the API (issue 10) -------------------------------------------
#
# scan, sensor, print and device events come from this box's drivers, which define
# their shape. Over the API anyone with a token could otherwise post any object as
# one, forging a device's readings or a printer's outcome. So print and device
# (outcomes and states only the agent knows) cannot be posted at all, and a scan or
# a sensor reading posted by a caller (a handheld scanner on a tablet, a hand-held
# meter) must fit these strict models and must not speak for a device of this box.
# The event's source is the caller's token name either way.

AGENT_ONLY_KINDS: dict[str, str] = {
    "print": "print events are the outcomes of this agent's own print jobs",
    "device": "device events are the state changes of this agent's own devices",
}


class _Posted(BaseModel):
    # strict: a reading is a JSON number, never "21.5" or true (what OpenAPI promises).
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)


class PostedScan(_Posted):
    """A scan a caller made (e.g. a tablet's camera): the code, and what read it."""

    code: Annotated[str, Field(min_length=1, max_length=4096)]
    symbology: Text | None = None
    device: Text | None = None
    note: Annotated[str, Field(max_length=2000)] | None = None


class PostedReading(_Posted):
    """A reading a caller took (a hand-held meter), in the units of ``GET /v1/sensors``."""

    device: Annotated[str, Field(min_length=1, max_length=64)]
    room: Text | None = None
    temperature_c: Annotated[float, Field(ge=-60, le=100)] | None = None
    rh_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    co2_ppm: Annotated[float, Field(ge=0, le=100_000)] | None = None
    vpd_kpa: Annotated[float, Field(ge=0, le=10)] | None = None
    dew_point_c: Annotated[float, Field(ge=-80, le=100)] | None = None
    note: Annotated[str, Field(max_length=2000)] | None = None

    @model_validator(mode="after")
    def _some_quantity(self) -> PostedReading:
        if all(getattr(self, q) is None for q in
               ("temperature_c", "rh_pct", "co2_ppm", "vpd_kpa", "dew_point_c")):
            raise ValueError("temperature_c: a reading needs at least one of temperature_c, "
                             "rh_pct, co2_ppm, vpd_kpa, dew_point_c")
        return self


POSTED_SCHEMAS: dict[str, type[BaseModel]] = {"scan": PostedScan, "sensor": PostedReading}


class FieldProblem(ValueError):
    """A payload failed validation; ``field`` is the dotted path of the first problem."""

    def __init__(self, field: str, message: str, problems: list[dict[str, str]]) -> None:
        self.field = field
        self.problems = problems
        super().__init__(f"{field}: {message}" if field else message)


def validate_posted(kind: str, data: Any, devices: frozenset[str] = frozenset()
                    ) -> dict[str, Any]:
    """Validate ``data`` posted over the API for ``kind`` (see ``AGENT_ONLY_KINDS``, which
    the caller refuses first); ``devices``: this box's device ids, which a posted scan or
    reading may not claim. FieldProblem names the field."""
    model = POSTED_SCHEMAS.get(kind)
    if model is None:
        return validate(kind, data)
    clean = _validate(model, data)
    device = clean.get("device")
    if device is not None and device in devices:
        message = (f"{str(device)[:64]!r} is a device of this box: its {kind} events come "
                   "from its driver, not the API; name the device that took this one")
        raise FieldProblem("data.device", message, [{"field": "data.device",
                                                     "message": message}])
    return {k: v for k, v in clean.items() if v is not None}


def validate(kind: str, data: Any) -> dict[str, Any]:
    """Validate ``data`` for ``kind``; return the normalised dict or raise FieldProblem."""
    return _validate(SCHEMAS[kind], data)


def _validate(schema: type[BaseModel], data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise FieldProblem("data", "must be a JSON object", [{"field": "data",
                                                             "message": "must be a JSON object"}])
    try:
        model = schema.model_validate(data)
    except PydanticValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in ("data", *err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            # Cross-field rules name their own field as "field: message".
            head, sep, rest = msg.partition(": ")
            if sep and err["type"] == "value_error" and " " not in head:
                loc, msg = f"{loc}.{head}", rest
            problems.append({"field": loc, "message": msg})
        first = problems[0]
        raise FieldProblem(first["field"], first["message"], problems) from None
    return model.model_dump(mode="json", by_alias=True)


def is_package_tag(value: object) -> bool:
    """24 upper-case letters and digits: a Metrc package tag."""
    return isinstance(value, str) and PACKAGE_TAG.fullmatch(value) is not None
