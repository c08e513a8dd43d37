"""``[metrc]``: the keys of CONTRACT 9, and the developers' knobs beside them.

Kept apart from agent/config.py (which imports this module) so the Metrc
forwarder's settings live with the forwarder; it imports nothing of
``agent`` so there is no import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

Kind = Literal["sale", "plant"]


def _between(low: float, high: float) -> AfterValidator:
    def check(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(f"must be {low:g}..{high:g}")
        return value

    return AfterValidator(check)


class MetrcConfig(BaseModel):
    """CONTRACT 9. ``{state}`` in ``base_url`` is the site's state, lower case."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    base_url: str = "https://api-{state}.metrc.com"
    vendor_key_file: str = "/etc/edge-agent-hq/metrc-vendor.key"   # HTTP basic user
    user_key_file: str = "/etc/edge-agent-hq/metrc-user.key"       # HTTP basic password
    kinds: list[Kind] = Field(default_factory=lambda: list[Kind](["sale"]), min_length=1)
    # Beyond the contract (issue 13):
    batch_size: Annotated[int, _between(1, 100)] = 10          # receipts per POST
    timeout_s: Annotated[float, _between(0.05, 300)] = 10.0    # per HTTP call
    # Pacing. Metrc publishes no numbers in the API description; these are
    # conservative guesses an operator tunes to what the state's Metrc allows.
    # Each receiver paces alone: with N receivers, divide by N.
    calls_per_s_per_facility: Annotated[float, _between(0.01, 1000)] = 5.0
    calls_per_s_per_key: Annotated[float, _between(0.01, 1000)] = 15.0
    backoff_min_s: Annotated[float, _between(0.01, 3600)] = 1.0
    backoff_max_s: Annotated[float, _between(0.01, 86400)] = 300.0
    retry_after_max_s: Annotated[float, _between(1, 86400)] = 3600.0
    # A claimed batch is this forwarder's for lease_s; it must outlast one
    # attempt (a POST and its look-ups), so it is checked against timeout_s.
    lease_s: Annotated[float, _between(1, 86400)] = 120.0
    workers: Annotated[int, _between(1, 64)] = 4
    poll_interval_s: Annotated[float, _between(0.01, 60)] = 1.0
    # Packages from Metrc to the counter (catalog-put/-remove); 0 turns it off.
    catalog_sync_interval_s: Annotated[float, _between(0, 86400)] = 900.0
    catalog_page_size: Annotated[int, _between(1, 20)] = 20    # Metrc: "not exceed 20"
    command_timeout_s: Annotated[float, _between(1, 600)] = 30.0

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL such as https://api-{state}.metrc.com")
        return value.rstrip("/")

    def url_for(self, state: str) -> str:
        return self.base_url.replace("{state}", state.lower())

    def keys(self) -> tuple[str, str]:
        """(vendor key, user key) from their files; ``OSError`` if one cannot be read,
        ``ValueError`` if one is empty. Neither value is ever put in a message."""
        out = []
        for name in ("vendor_key_file", "user_key_file"):
            path = getattr(self, name)
            value = Path(path).read_text(encoding="utf-8").strip()
            if not value:
                raise ValueError(f"metrc.{name}: {path} is empty")
            out.append(value)
        return out[0], out[1]
