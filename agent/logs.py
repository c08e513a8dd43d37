"""Log lines: one event per line, as text or JSON (``[log] format``), never a secret.

Text under journald (``$JOURNAL_STREAM`` names our stderr) leaves the time to the
journal, which stamps every line itself; anywhere else (a terminal, a container,
a file) each line starts with its UTC time. JSON is one object per line
(``ts``, ``level``, ``logger``, ``msg``, and ``exc`` for a traceback), so a log
shipper needs no multi-line parsing. Every record passes a redaction filter
first: a bearer token, a ``password=``/``token=`` value or a PEM private key in
a message is replaced by ``***`` (tokens are never logged on purpose; this is the
net under a library that might).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

_SECRETS = [
    (re.compile(r"(?i)\b(bearer)\s+[^\s\"',]+"), r"\1 ***"),
    (re.compile(r"(?i)\b(password|passwd|token|secret|api[_-]?key)(\s*[=:]\s*)[^\s\"',&]+"),
     r"\1\2***"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
     "-----PRIVATE KEY REDACTED-----"),
]


def redact(text: str) -> str:
    """``text`` with anything shaped like a secret replaced by ``***``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """Renders the message once, redacted, so no handler sees the raw arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


def _utc(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-12-03T15:04:05.123Z INFO agent.uplink: connected`` (no time under journald);
    a traceback stays on the following lines, indented, as Python prints it."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"{_utc(record)} {line}" if self.timestamps else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; newlines inside a message or traceback are escaped."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {"ts": _utc(record), "level": record.levelname,
                                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            event["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(event, ensure_ascii=False)


def under_journald(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal's (systemd sets ``JOURNAL_STREAM=dev:inode``)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, inode)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`setup` installs (so a second call replaces only it)."""


def setup(level: str = "INFO", fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """(Re)configure the root logger: our one handler on stderr, the format, the filter.
    Handlers others put there (pytest's capture) stay."""
    out = stream or sys.stderr
    handler = _Handler(out)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else TextFormatter(timestamps=not under_journald(out)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
