"""`edge-agent outbox export` (issue 14): --kind and --since select the right events; a
progress bar goes to stderr only when stderr is a terminal."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import ProgressBar
from agent.cli import main as cli_main
from agent.envelope import parse_iso
from agent.outbox import Outbox
from agent.testing.localsite import edge_agent_argv

SITE = "t-export"
# 2026-11-22T06:00:00Z, then one event a minute.
T0 = parse_iso("2026-11-22T06:00:00.000Z")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """An agent config whose outbox holds sales at 06:00..06:04 and scans at 06:05..06:07."""
    clock = Clock()
    box = Outbox(str(tmp_path / "outbox"), SITE, max_bytes=1 << 26, clock=clock)
    box.open()
    try:
        for kind, n in (("sale", 5), ("scan", 3)):
            for i in range(n):
                box.submit(kind, json.dumps({"i": i}), "test").result(timeout=30)
                clock.now += 60
    finally:
        box.close()
    path = tmp_path / "agent.toml"
    path.write_text(f'[site]\nid = "{SITE}"\n[outbox]\npath = "{tmp_path / "outbox"}"\n')
    return path


def exported(text: str) -> list[tuple[str, int]]:
    return [(e["kind"], e["seq"]) for e in map(json.loads, text.splitlines())]


def test_kind_and_since_select_the_events(config: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--kind keeps one kind, --since keeps events accepted at or after it (any offset)."""
    assert cli_main(["outbox", "export", "--config", str(config)]) == 0
    assert len(exported(capsys.readouterr().out)) == 8
    assert cli_main(["outbox", "export", "--config", str(config), "--kind", "scan"]) == 0
    assert exported(capsys.readouterr().out) == [("scan", 1), ("scan", 2), ("scan", 3)]
    # 06:03Z written as Denver time: sales 4 and 5, and every scan.
    assert cli_main(["outbox", "export", "--config", str(config),
                     "--since", "2026-11-21T23:03:00-07:00"]) == 0
    assert exported(capsys.readouterr().out) == [
        ("sale", 4), ("sale", 5), ("scan", 1), ("scan", 2), ("scan", 3)]
    assert cli_main(["outbox", "export", "--config", str(config), "--kind", "sale",
                     "--since", "2026-11-22T06:04"]) == 0
    assert exported(capsys.readouterr().out) == [("sale", 5)]


def test_bad_since_and_kind_are_usage_errors(config: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A --since that is not ISO 8601 exits 2 naming the option; an unknown --kind too."""
    assert cli_main(["outbox", "export", "--config", str(config), "--since", "yesterday"]) == 2
    assert "--since 'yesterday': not an ISO 8601" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli_main(["outbox", "export", "--config", str(config), "--kind", "sales"])
    assert info.value.code == 2 and "--kind" in capsys.readouterr().err


@pytest.mark.e2e
def test_no_bar_when_stderr_is_a_pipe(config: Path, tmp_path: Path) -> None:
    """Piped stderr gets only the summary line: no carriage returns, no bar."""
    out = tmp_path / "out.jsonl"
    done = subprocess.run([*edge_agent_argv(), "outbox", "export", "--config",
                           str(config), "-o", str(out)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"exported 8 events to {out}\n"
    assert len(out.read_text().splitlines()) == 8


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_that_ends_at_100(config: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With stderr a terminal the bar is drawn on one line and ends at 100% and a newline."""
    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    out = tmp_path / "out.jsonl"
    assert cli_main(["outbox", "export", "--config", str(config), "--kind", "sale",
                     "-o", str(out)]) == 0
    text = err.getvalue()
    assert text.startswith("\rexporting [")
    assert "100%  5 of 5\n" in text and text.endswith(f"exported 5 events to {out}\n")


def test_bar_redraws_at_most_ten_times_a_second() -> None:
    """Thousands of updates within 0.1 s draw once; the last is drawn at the end."""
    stream = io.StringIO()
    now = [0.0]
    bar = ProgressBar(stream, "exporting", clock=lambda: now[0])
    for done in range(1, 5000):
        bar.update(done, 10_000)
    assert stream.getvalue().count("\r") == 1
    now[0] = 0.2
    bar.update(5000, 10_000)
    bar.finish()
    assert stream.getvalue().count("\r") == 3
    assert stream.getvalue().endswith(" 50%  5,000 of 10,000\n")
