"""Configuration: TOML files validated by pydantic, overridden by the environment.

Every key of CONTRACT 3 exists here under its contract name. Environment
variables ``EDGE_AGENT__SECTION__KEY`` win over the file. Secrets may be given
inline or as ``*_file`` paths. Unknown keys are errors (a typo must not be
silently ignored on a box nobody watches), and every error is reported with its
dotted key path: ``mqtt.port: must be 1..65535``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agent.errors import ConfigError, ConfigIssue

DEFAULT_CONFIG_PATH = "/etc/edge-agent/agent.toml"
# Where `edge-agent hq install` puts the HQ config and the HQ unit reads it.
DEFAULT_HQ_CONFIG_PATH = "/etc/edge-agent-hq/hq.toml"
CONFIG_ENV = "EDGE_AGENT_CONFIG"
ENV_PREFIX = "EDGE_AGENT__"

DEVICE_TYPES = ("scanner", "receipt_printer", "label_printer", "sensor")
SITE_ID_RE = re.compile(r"^[a-z0-9-]{1,64}$")
US_STATE_RE = re.compile(r"^[A-Z]{2}$")
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be 1..65535")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


Port = Annotated[int, AfterValidator(_port)]
PositiveFloat = Annotated[float, AfterValidator(_positive)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Names a site may not have: the shipped broker ACL (config/mosquitto/edge-agent.acl)
# gives the client certificate "hq" HQ's rights (every site's events, every site's
# acks and commands), and a site's certificate CN is its id.
RESERVED_SITE_IDS = frozenset({"hq"})


def _site_id(value: str) -> str:
    if not SITE_ID_RE.match(value):
        raise ValueError("must match [a-z0-9-]{1,64} (it is used in every MQTT topic)")
    if value in RESERVED_SITE_IDS:
        raise ValueError(f"{value!r} is reserved: the broker ACL (config/mosquitto/"
                         "edge-agent.acl) gives that certificate name HQ's rights")
    return value


def _timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as "
                         "'America/Denver')") from None
    return value


SiteId = Annotated[str, AfterValidator(_site_id)]
TimeZone = Annotated[str, AfterValidator(_timezone)]


class SiteConfig(_Section):
    id: SiteId
    name: str = ""
    timezone: TimeZone = "UTC"


class MqttConfig(_Section):
    hosts: list[str] = Field(default_factory=lambda: ["localhost"], min_length=1)
    port: Port = 8883
    tls: bool = True
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = Field(default="", repr=False)
    password_file: str = ""
    client_id: str = ""
    topic_prefix: str = "edge"
    keepalive_s: Annotated[int, AfterValidator(lambda v: _range(v, 5, 3600))] = 30
    delivery: Literal["hq-ack", "broker-ack"] = "hq-ack"
    ack_timeout_s: PositiveFloat = 30.0
    # Beyond the contract: the developers' knobs.
    protocol: Literal["5", "3.1.1"] = "5"
    max_inflight: Annotated[int, AfterValidator(lambda v: _range(v, 1, 65535))] = 2000
    connect_timeout_s: PositiveFloat = 5.0
    backoff_min_s: PositiveFloat = 0.5
    backoff_max_s: PositiveFloat = 30.0
    health_interval_s: PositiveFloat = 30.0
    # Beyond the contract (issue 10): status turns degraded once the link has been
    # down this long, counted from the first failure of the outage.
    down_grace_s: Annotated[float, AfterValidator(lambda v: _nonneg(v))] = 60.0
    # Beyond the contract (issue 9): the site key HQ's acks and commands are proved
    # with (64 hex digits, from ``edge-agent hq site-key SITE``); empty: unchecked.
    hq_key_file: str = ""
    # Beyond the contract (issue 10): with tls = false a password to a broker off this
    # machine is refused unless this says the network is trusted.
    allow_cleartext_password: bool = False

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\0") or value.startswith("/"):
            raise ValueError("must be a non-empty topic level without '+', '#' or leading '/'")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _files(self) -> MqttConfig:
        if self.tls and bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together (client certificate for mTLS)")
        return self

    def secret_password(self) -> str:
        """The broker password, read from ``password_file`` when that is set."""
        if self.password_file:
            return Path(self.password_file).read_text(encoding="utf-8").strip()
        return self.password


def _nonneg(value: float) -> float:
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _frange(value: float, low: float, high: float) -> float:
    if not low <= value <= high:
        raise ValueError(f"must be {low:g}..{high:g}")
    return value


def _range(value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValueError(f"must be {low}..{high}")
    return value


class OutboxConfig(_Section):
    path: str = "/var/lib/edge-agent/outbox"
    max_bytes: Annotated[int, AfterValidator(lambda v: _range(v, 1 << 16, 1 << 50))] = 1 << 30
    # Beyond the contract: the most events one group commit may hold.
    max_batch: Annotated[int, AfterValidator(lambda v: _range(v, 1, 100_000))] = 2000
    # A file kept beside the outbox and deleted to give SQLite room to delete
    # when the disk is full (see agent/outbox.py).
    ballast_bytes: Annotated[int, AfterValidator(lambda v: _range(v, 0, 1 << 30))] = 1 << 20


class LogConfig(_Section):
    """``[log]``: ``format = "text"`` (timestamps unless under journald) or ``"json"``
    (one object per line); agent/logs.py."""

    format: Literal["text", "json"] = "text"


class ComplianceConfig(_Section):
    report_within_h: PositiveFloat = 24.0
    # Beyond the contract (issue 13): a state's own deadline, by two-letter code
    # (``report_within_h_by_state = {WA = 24, CO = 12}``); others use report_within_h.
    report_within_h_by_state: dict[str, PositiveFloat] = Field(default_factory=dict)

    @field_validator("report_within_h_by_state")
    @classmethod
    def _states(cls, value: dict[str, float]) -> dict[str, float]:
        for state in value:
            if not US_STATE_RE.match(state):
                raise ValueError(f"{state!r}: must be a two-letter US state code such as 'CO'")
        return value

    def deadline_h(self, state: str) -> float:
        """The reporting deadline, in hours, of a site in ``state``."""
        return self.report_within_h_by_state.get(state, self.report_within_h)


def _host_name(value: str) -> str:
    name = value.strip().lower().rstrip(".")
    if name != "*" and not re.fullmatch(r"\.?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
                                        r"(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*", name):
        raise ValueError(f"{value[:64]!r} is not a host name (e.g. edge-denver.store.lan, "
                         "'.store.lan' for every name under it, or '*' for any)")
    return name


class ApiConfig(_Section):
    bind: str = "0.0.0.0"  # noqa: S104 - the POS and tablets reach it over the LAN
    port: Port = 8787
    tokens_file: str = "/etc/edge-agent/tokens"
    advertise: bool = True
    advertise_interfaces: list[str] = Field(default_factory=list)
    # Host names the API answers to besides the automatic ones (agent/web/allowed_hosts.py);
    # "*" answers any.
    allowed_hosts: list[Annotated[str, AfterValidator(lambda v: _host_name(v))]] = Field(
        default_factory=list)
    # Beyond the contract (issue 10, agent/web/httpserver.py): how long a client may
    # take over a request's head and its body, and the most connections at once.
    header_timeout_s: Annotated[float, AfterValidator(lambda v: _frange(v, 0.1, 300))] = 10.0
    body_timeout_s: Annotated[float, AfterValidator(lambda v: _frange(v, 0.1, 600))] = 30.0
    max_connections: Annotated[int, AfterValidator(lambda v: _range(v, 16, 65536))] = 512


class DeviceConfig(BaseModel):
    """One ``[[devices]]`` entry; type-specific keys are checked by the driver."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: Annotated[str, Field(pattern=DEVICE_ID_RE.pattern)]
    type: Literal["scanner", "receipt_printer", "label_printer", "sensor"]
    url: str
    enabled: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("must be a device URL such as serial:///dev/ttyACM0?baudrate=9600, "
                             "usb://VID:PID, tcp://host:9100, file:///path or sim://NAME")
        return value


class HqSiteConfig(_Section):
    """One ``[[hq.sites]]`` entry: a site HQ expects to hear from (CONTRACT 8)."""

    id: SiteId
    name: str = ""
    state: str = ""
    license_number: str = ""
    timezone: TimeZone = "UTC"

    @field_validator("state")
    @classmethod
    def _state(cls, value: str) -> str:
        if value and not US_STATE_RE.match(value):
            raise ValueError("must be a two-letter US state code such as 'CO'")
        return value


class HqConfig(_Section):
    store: str = "sqlite:///var/lib/edge-agent-hq/hq.db"
    # Empty: each receiver makes a unique one (edge-hq-<hostname>-<random>).
    client_id: str = ""
    share_group: str = "hq"
    batch_max: Annotated[int, AfterValidator(lambda v: _range(v, 1, 100_000))] = 1000
    # Beyond the contract (issue 9): HQ's one secret; every site's key derives from it.
    master_key_file: str = ""
    sites: list[HqSiteConfig] = Field(default_factory=list)
    # The fleet (hq/fleet.py): a site that is online but sends no P/health
    # for silent_after_intervals * health_interval_s is "silent".
    health_interval_s: PositiveFloat = 30.0
    silent_after_intervals: PositiveFloat = 3.0
    # The HQ page and its JSON API (hq/web.py); http_port 0 turns it off.
    http_bind: str = "127.0.0.1"
    http_port: Annotated[int, AfterValidator(lambda v: _range(v, 0, 65535))] = 8788
    tokens_file: str = "/etc/edge-agent-hq/tokens"
    # Opt-in: delete stored events older than this (hq/retention.py); 0 keeps all.
    retention_days: Annotated[float, AfterValidator(lambda v: _nonneg(v))] = 0.0

    @model_validator(mode="after")
    def _unique_sites(self) -> HqConfig:
        seen: set[str] = set()
        for entry in self.sites:
            if entry.id in seen:
                raise ValueError(f"site id {entry.id!r} is registered twice in [[hq.sites]]")
            seen.add(entry.id)
        return self

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if not (value.startswith("sqlite:///") or value.startswith("postgresql://")):
            raise ValueError("must be sqlite:///PATH or postgresql://user@host/db")
        return value


class SettingsBase(BaseSettings):
    """Shared loading rules: env (EDGE_AGENT__SECTION__KEY) over the TOML file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)


class AgentConfig(SettingsBase):
    site: SiteConfig
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    compliance: ComplianceConfig = Field(default_factory=ComplianceConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    devices: list[DeviceConfig] = Field(default_factory=list)
    # Grow rooms and their stage bands; validated by agent/devices/climate.py (issue 5).
    rooms: list[dict[str, Any]] = Field(default_factory=list)
    # Lets one file serve the demo's agent and HQ receiver alike.
    hq: HqConfig = Field(default_factory=HqConfig)

    @model_validator(mode="after")
    def _unique_devices(self) -> AgentConfig:
        seen: set[str] = set()
        for device in self.devices:
            if device.id in seen:
                raise ValueError(f"device id {device.id!r} is used twice")
            seen.add(device.id)
        return self

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-{self.site.id}"

    @property
    def topic_root(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.site.id}"


_S = TypeVar("_S", bound=SettingsBase)


def config_path(explicit: str | None, default: str = DEFAULT_CONFIG_PATH) -> str:
    """``--config``, else ``$EDGE_AGENT_CONFIG``, else the system path (``default``)."""
    return explicit or os.environ.get(CONFIG_ENV) or default


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, [ConfigIssue("", f"file not found: {path}")]) from None
    except PermissionError:
        raise ConfigError(path, [ConfigIssue("", f"permission denied reading {path}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [ConfigIssue("", f"not valid TOML: {exc}")]) from None


# Set to a prefix no variable has: a partial config (below) is built from data
# that already holds the environment's values.
_NO_ENV_PREFIX = "EDGE_AGENT_PARTIAL_CONFIG_READS_NO_ENVIRONMENT__"


def device_where(index: int, device_id: object) -> str:
    """How an issue names a ``[[devices]]`` entry: by its id (``devices[scanner-1]``),
    or by its place when it has no usable id (``devices[#1]`` is the first entry)."""
    if isinstance(device_id, str) and DEVICE_ID_RE.match(device_id):
        return f"devices[{device_id}]"
    return f"devices[#{index + 1}]"


def env_names(cls: type[SettingsBase]) -> dict[str, str]:
    """Dotted key -> the ``EDGE_AGENT__...`` variable that sets it (pydantic-settings
    matches names without regard to case)."""
    names: dict[str, str] = {}
    for name in os.environ:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if parts and parts[0] in cls.model_fields:
            names[".".join(parts)] = name
    return names


def blame_env(issues: list[ConfigIssue], names: dict[str, str]) -> list[ConfigIssue]:
    """Name the environment variable behind an issue whose value came from it, so
    the error is not blamed on the file: ``EDGE_AGENT__MQTT__PORT (environment)``."""
    out = []
    for issue in issues:
        path = issue.path
        for key in sorted(names, key=len, reverse=True):
            if path == key:
                path = f"{names[key]} (environment)"
                break
            if path.startswith((key + ".", key + "[")):
                path = f"{path} (from {names[key]}, environment)"
                break
        out.append(ConfigIssue(path, issue.message))
    return out


def _where(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """A pydantic error location as a key path; devices named by their id."""
    parts = [str(part) for part in loc]
    if len(loc) >= 2 and loc[0] == "devices" and isinstance(loc[1], int):
        devices = data.get("devices")
        entry = devices[loc[1]] if isinstance(devices, list) and loc[1] < len(devices) else None
        head = device_where(loc[1], entry.get("id") if isinstance(entry, dict) else None)
        return ".".join([head, *parts[2:]])
    return ".".join(parts)


def _issues(exc: ValidationError, data: dict[str, Any] | None = None) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        path = _where(tuple(err["loc"]), data or {})
        kind = err["type"]
        if kind == "extra_forbidden":
            message = "unknown key (check the spelling against the config reference)"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")
        issues.append(ConfigIssue(path, message))
    return issues


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, tables merged key by key (as pydantic-settings does)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _partial(cls: type[_S], data: dict[str, Any], exc: ValidationError,
             ) -> tuple[_S | None, frozenset[str]]:
    """The config without what failed: every top-level section with an error left
    at its defaults and every ``[[devices]]`` entry with one left out, so the checks
    that follow validation (drivers, files) still run on the rest in the same pass.
    Returns it (None if even that does not validate) and the sections left out."""
    dropped: set[str] = set()
    bad_devices: set[int] = set()
    for err in exc.errors():
        loc = tuple(err["loc"])
        if not loc:
            return None, frozenset()
        if loc[0] == "devices" and len(loc) >= 2 and isinstance(loc[1], int):
            bad_devices.add(loc[1])
        else:
            dropped.add(str(loc[0]))
    pruned = {k: v for k, v in data.items() if k not in dropped}
    if bad_devices and isinstance(pruned.get("devices"), list):
        pruned["devices"] = [d for i, d in enumerate(pruned["devices"]) if i not in bad_devices]
    if "site" in dropped and "site" in cls.model_fields:
        pruned["site"] = {"id": "x"}   # required; nothing after validation reads it
    try:
        return cls(**{**pruned, "_env_prefix": _NO_ENV_PREFIX}), frozenset(dropped)
    except (ValidationError, ValueError, TypeError):
        return None, frozenset()


def load_config(path: str, cls: type[_S],
                transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> _S:
    """Read and validate ``path``; raise :class:`ConfigError` listing every problem.

    Every pydantic error of the file and the environment is listed at once; an
    error in a value from the environment names its variable. The error carries
    the config without what failed (``partial``) for the checks that come after.
    ``transform`` rewrites the file's data first (``--root``: paths read under a root)."""
    data = _read_toml(path)
    if transform is not None:
        data = transform(data)
    try:
        return cls(**data)
    except ValidationError as exc:
        names = env_names(cls)
        try:
            merged = _merge(data, EnvSettingsSource(cls)())
        except Exception:  # an env value pydantic-settings cannot parse (bad JSON)
            merged = data
        error = ConfigError(path, blame_env(_issues(exc, merged), names))
        error.partial, error.dropped = _partial(cls, merged, exc)
        raise error from None


def load_agent_config(path: str,
                      transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                      ) -> AgentConfig:
    return load_config(path, AgentConfig, transform)


