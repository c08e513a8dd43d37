"""HQ commands (``P/commands/{name}``): parse, dispatch once per id, answer.

The uplink thread hands every command message to :meth:`CommandRouter.dispatch`
and must not block, so handlers run on a small worker pool and their results go
back through ``send_result`` (the uplink's queue to ``P/command-results``).
A command id seen before is answered with the first result and not run again,
because HQ resends a command whose result it did not see; with a
:class:`~agent.commands.journal.CommandJournal` that holds across restarts too
(the id is on disk before the handler runs; the worker, not the uplink thread,
does that disk write).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agent.commands.journal import CommandJournal
from agent.devices.family import current_command_id
from agent.errors import AgentError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]
MAX_ID_LEN = 200
REMEMBERED_IDS = 10_000
MAX_PAYLOAD = 256 * 1024


class CommandRouter:
    def __init__(self, send_result: Callable[[dict[str, Any]], None], workers: int = 2,
                 journal: CommandJournal | None = None) -> None:
        self._send = send_result
        self._journal = journal
        self._handlers: dict[str, Handler] = {}
        self._done: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="command")
        self.counters = {"received": 0, "malformed": 0, "failed": 0, "replayed": 0}
        self.register("ping", lambda args: {"pong": True, "echo": args.get("echo")})

    def register(self, name: str, handler: Handler) -> None:
        self._handlers[name] = handler

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def dispatch(self, name: str, payload: bytes) -> None:
        """Called from the uplink thread: validate, then run the handler off-thread."""
        self.counters["received"] += 1
        command_id, args, problem = self._parse(payload)
        if problem is not None:
            self.counters["malformed"] += 1
            log.warning("command %r rejected: %s", name[:64], problem)
            self._send({"id": command_id, "ok": False, "result": None, "error": problem})
            return
        assert command_id is not None
        with self._lock:
            if command_id in self._done:
                self.counters["replayed"] += 1
                self._send(self._done[command_id])
                return
            if command_id in self._running:
                return  # the first delivery is still running and will answer
            self._running.add(command_id)
        handler = self._handlers.get(name)
        if handler is None:
            known = ", ".join(self.names())
            self._finish(command_id, None, f"unknown command {name[:64]!r}; known: {known}")
            return
        self._pool.submit(self._run, command_id, name, handler, args)

    def _run(self, command_id: str, name: str, handler: Handler, args: dict[str, Any]) -> None:
        if self._journal is not None:
            try:
                earlier = self._journal.start(command_id, name)
            except Exception as exc:  # a disk fault: refuse rather than risk running twice
                log.exception("command %s (%s): cannot record its id", name, command_id)
                self._finish(command_id, None, f"cannot record command id {command_id} on "
                                               f"disk ({type(exc).__name__}); not run")
                return
            if earlier is not None:
                log.info("command %s (%s) was received before this restart; answering with "
                         "its first result", name, command_id)
                self.counters["replayed"] += 1
                self._finish(command_id, earlier.get("result"), earlier.get("error"),
                             record=False)
                return
        token = current_command_id.set(command_id)
        try:
            result = handler(args)
        except AgentError as exc:
            self._finish(command_id, None, str(exc))
        except Exception as exc:  # a handler bug must not kill the worker or go unanswered
            log.exception("command %s (%s) failed", name, command_id)
            self._finish(command_id, None, f"internal error in {name}: {type(exc).__name__}")
        else:
            self._finish(command_id, result, None)
        finally:
            current_command_id.reset(token)

    def _finish(self, command_id: str, result: Any, error: str | None, *,
                record: bool = True) -> None:
        answer = {"id": command_id, "ok": error is None, "result": result, "error": error}
        if error is not None and record:
            self.counters["failed"] += 1
        if record and self._journal is not None:
            try:
                self._journal.finish(command_id, answer)
            except Exception:  # the answer still goes out; a resend is then "interrupted"
                log.exception("command %s: cannot record its answer", command_id)
        with self._lock:
            self._running.discard(command_id)
            self._done[command_id] = answer
            while len(self._done) > REMEMBERED_IDS:
                self._done.popitem(last=False)
        self._send(answer)

    @staticmethod
    def _parse(payload: bytes) -> tuple[str | None, dict[str, Any], str | None]:
        if len(payload) > MAX_PAYLOAD:
            return None, {}, f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD}"
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, {}, f"payload is not UTF-8 JSON: {exc}"
        except RecursionError:  # hostile nesting within the size limit
            return None, {}, "payload is nested too deeply"
        if not isinstance(body, dict):
            return None, {}, "payload must be a JSON object {\"id\": str, \"args\": {...}}"
        command_id = body.get("id")
        if not isinstance(command_id, str) or not 0 < len(command_id) <= MAX_ID_LEN:
            return None, {}, f"id: must be a string of 1..{MAX_ID_LEN} characters"
        args = body.get("args", {})
        if not isinstance(args, dict):
            return command_id, {}, "args: must be a JSON object"
        return command_id, args, None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._journal is not None:
            self._journal.close()
