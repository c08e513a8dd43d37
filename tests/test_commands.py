"""HQ command routing: once per id, clear answers for bad input."""

from __future__ import annotations

import json
import threading
from typing import Any

from agent.commands.handlers import CommandRouter
from agent.errors import AgentError
from tests.conftest import wait_for


def router() -> tuple[CommandRouter, list[dict[str, Any]]]:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def send(result: dict[str, Any]) -> None:
        with lock:
            results.append(result)

    return CommandRouter(send), results


def test_command_runs_once_per_id() -> None:
    """A command id seen before is answered with the first result and not run again."""
    r, results = router()
    calls = []
    r.register("count", lambda args: calls.append(args) or len(calls))
    payload = json.dumps({"id": "c1", "args": {"n": 1}}).encode()
    r.dispatch("count", payload)
    wait_for(lambda: len(results) == 1)
    r.dispatch("count", payload)
    wait_for(lambda: len(results) == 2)
    assert calls == [{"n": 1}]
    assert results[0] == results[1] == {"id": "c1", "ok": True, "result": 1, "error": None}
    r.close()


def test_malformed_and_unknown_commands_get_error_results() -> None:
    """Bad JSON, a missing id, bad args and an unknown name each get ok=false with a reason."""
    r, results = router()
    r.dispatch("ping", b"\xff")
    r.dispatch("ping", b'{"args": {}}')
    r.dispatch("ping", b'{"id": "a", "args": []}')
    r.dispatch("launch", b'{"id": "b"}')
    wait_for(lambda: len(results) == 4)
    assert [x["ok"] for x in results] == [False] * 4
    assert "UTF-8 JSON" in results[0]["error"]
    assert results[1]["error"].startswith("id:")
    assert results[2]["error"].startswith("args:")
    assert "unknown command 'launch'" in results[3]["error"]
    r.close()


def test_handler_errors_are_answered_not_raised() -> None:
    """An AgentError's message is the answer; an unexpected bug answers 'internal error'."""
    r, results = router()

    def fails(args: dict[str, Any]) -> None:
        raise AgentError("printer packaging-zebra: head open")

    r.register("fails", fails)
    r.register("bug", lambda args: 1 / 0)
    r.dispatch("fails", b'{"id": "1"}')
    r.dispatch("bug", b'{"id": "2"}')
    wait_for(lambda: len(results) == 2)
    by_id = {x["id"]: x for x in results}
    assert by_id["1"]["error"] == "printer packaging-zebra: head open"
    assert by_id["2"]["error"] == "internal error in bug: ZeroDivisionError"
    r.close()


def test_deeply_nested_command_is_answered_not_dropped() -> None:
    """A payload nested past the parser's recursion limit gets an error result, not silence."""
    r, results = router()
    r.dispatch("ping", b'{"id": "n", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    wait_for(lambda: len(results) == 1)
    assert results[0]["ok"] is False and "nested too deeply" in results[0]["error"]
    r.close()
