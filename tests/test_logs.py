"""Log lines (agent/logs.py): text with timestamps unless under journald, JSON one event a
line, secrets redacted; `[log] format` reaches the real daemon's stderr."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from agent import logs
from agent.config import AgentConfig


def emit(fmt: logs.LogFormat, stream: io.StringIO | object, *, exc: bool = False) -> None:
    logs.setup("INFO", fmt, stream)  # type: ignore[arg-type]
    log = logging.getLogger("agent.test")
    try:
        if exc:
            raise ValueError("bad\nthing")
        log.warning("uplink to %s: Authorization: Bearer s3cr3t-t0ken-value password=hunter2",
                    "hq")
    except ValueError:
        log.exception("failed with token=abc123")


@pytest.fixture(autouse=True)
def restore_logging() -> object:
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logs._Handler)]:
        root.removeHandler(handler)


def test_text_lines_carry_a_utc_time_and_no_secret() -> None:
    """Text on a plain stream: ISO UTC time, level, logger, the message with the bearer
    token and password replaced by ***."""
    out = io.StringIO()
    emit("text", out)
    line = out.getvalue().strip()
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING agent.test: uplink to hq",
                    line), line
    assert "s3cr3t" not in line and "hunter2" not in line
    assert "Bearer ***" in line and "password=***" in line


def test_text_under_journald_leaves_the_time_to_the_journal(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """With JOURNAL_STREAM naming our stream, lines start with the level (journald stamps)."""
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        emit("text", stream)
        stream.seek(0)
        assert stream.read().startswith("WARNING agent.test: ")


def test_json_is_one_object_per_line_even_with_a_traceback() -> None:
    """JSON: every line parses alone; a multi-line traceback is one event, redacted."""
    out = io.StringIO()
    emit("json", out, exc=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["level"] == "ERROR" and event["logger"] == "agent.test"
    assert event["msg"] == "failed with token=***"
    assert "ValueError: bad\nthing" in event["exc"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", event["ts"])


def test_log_format_is_a_config_key() -> None:
    """[log] format takes text or json; anything else is an error naming log.format."""
    assert AgentConfig(site={"id": "a"}, log={"format": "json"}).log.format == "json"
    with pytest.raises(ValueError, match=r"log\.format"):
        AgentConfig(site={"id": "a"}, log={"format": "xml"})


@pytest.mark.e2e
def test_hq_with_json_log_format_writes_json_lines() -> None:
    """`edge-agent hq` with [log] format = "json" writes its log lines as JSON objects."""
    from agent.testing.localsite import edge_agent_argv

    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp, "hq.toml")
        conf.write_text(f'[log]\nformat = "json"\n[mqtt]\nhosts = ["127.0.0.1:1"]\ntls = false\n'
                        f'[hq]\nstore = "sqlite:///{tmp}/hq.db"\nhttp_port = 0\n')
        proc = subprocess.Popen([*edge_agent_argv(), "hq", "--config", str(conf)],
                                stderr=subprocess.PIPE, text=True,
                                env={k: v for k, v in os.environ.items()
                                     if not k.startswith(("EDGE_AGENT", "JOURNAL"))})
        try:
            first = proc.stderr.readline() if proc.stderr else ""
        finally:
            proc.kill()
            proc.communicate(timeout=10)
    event = json.loads(first)
    assert {"ts", "level", "logger", "msg"} <= event.keys(), first
