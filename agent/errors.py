"""The one error tree of edge-agent.

Every error a user can meet derives from :class:`AgentError`. Messages name the
key, device or kind involved and the next step; the same facts are kept on
attributes so callers (the API, status, alarms) never parse strings.
Foreign exceptions (sqlite3, OSError, paho) are mapped at the boundary that
meets them, not passed through.
"""

from __future__ import annotations

from dataclasses import dataclass


class AgentError(Exception):
    """Root of every edge-agent error."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file: the dotted key path and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(AgentError):
    """The config file cannot be used; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        # From agent/config.py: the config without what failed (or None), and the
        # top-level sections left at their defaults in it.
        self.partial: object | None = None
        self.dropped: frozenset[str] = frozenset()
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"invalid config {source}:\n{lines}")


class OutboxError(AgentError):
    """The outbox cannot take or give events."""


class OutboxFull(OutboxError):
    """The outbox is at ``outbox.max_bytes`` and this kind is never dropped."""

    def __init__(self, kind: str, used_bytes: int, max_bytes: int) -> None:
        self.kind = kind
        self.used_bytes = used_bytes
        self.max_bytes = max_bytes
        super().__init__(
            f"outbox full: {used_bytes} of {max_bytes} bytes (outbox.max_bytes) hold events "
            f"not yet stored at HQ; {kind} events are refused until HQ acknowledges the backlog "
            f"(check the HQ link with 'edge-agent status')"
        )


class DiskFull(OutboxError):
    """The filesystem under the outbox has no space left."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"disk full under {path}: the event was not stored; free space on that filesystem "
            f"(the outbox recovers by itself once HQ acknowledges and space returns)"
        )


class OutboxCorrupt(OutboxError):
    """An outbox file failed SQLite's checks and was moved aside."""

    def __init__(self, path: str, moved_to: str, reason: str) -> None:
        self.path = path
        self.moved_to = moved_to
        self.reason = reason
        super().__init__(
            f"outbox {path} was corrupt ({reason}); moved aside to {moved_to} and started fresh"
        )


class EventTooLarge(OutboxError):
    """One event is over the size the outbox keeps inline in SQLite."""

    def __init__(self, kind: str, size: int, limit: int) -> None:
        self.kind = kind
        self.size = size
        self.limit = limit
        super().__init__(f"{kind} event is {size} bytes; the limit is {limit} bytes")


class DeviceError(AgentError):
    """A device failed; ``device`` is its configured id."""

    def __init__(self, device: str, message: str) -> None:
        self.device = device
        super().__init__(f"{device}: {message}")


class Refused(AgentError):
    """A request the agent will not take as sent; ``field`` names what to fix.

    The subclass says why; the HTTP layer answers each with one status
    (``agent/web/print_routes.py``'s table), commands and the CLI with the
    message. ``reason`` is a short machine-readable code where one helps.
    """

    def __init__(self, message: str, field: str | None = None,
                 reason: str | None = None) -> None:
        self.field = field
        self.reason = reason
        super().__init__(message)


class NotFound(Refused):
    """It names something that is not here (a printer id, a job)."""


class Invalid(Refused):
    """A field's value cannot be used (a bad tag, too many copies, a control character)."""


class Unavailable(Refused):
    """Right request, wrong moment: the device is disabled, stopping or its queue is full."""

