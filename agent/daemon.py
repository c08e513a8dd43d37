"""``edge-agent run``: the outbox, the uplink and the API under one asyncio loop.

Start order matters for the contract: READY=1 goes to systemd only once the
outbox is open and the API listens. SIGTERM sends STOPPING=1, stops taking
requests, lets the group commit finish what it holds, publishes the offline
status and exits within ``SHUTDOWN_BUDGET_S``; nothing accepted is lost because
"accepted" already means "on disk".

Every component is entered on one ``AsyncExitStack`` as it starts, so a start-up
that fails halfway stops what already runs, in reverse order, like a SIGTERM.
Each stop step gets a slice of one shared deadline, and what still hangs after
it (a print command waiting on a dead printer, a thread in a driver call) is
left behind: :func:`run` exits past such threads, and a watchdog armed at
SIGTERM ends the process at ``HARD_EXIT_S`` whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent import __version__
from agent.commands.handlers import CommandRouter
from agent.commands.journal import CommandJournal
from agent.config import AgentConfig
from agent.devices.family import Service, ServiceContext, all_devices, build_services
from agent.errors import AgentError, OutboxCorrupt, OutboxError
from agent.kinds import NEVER_DROPPED_TEXT
from agent.ops import sdnotify
from agent.ops.advertise import Advertiser
from agent.ops.status import build_status
from agent.outbox import Outbox
from agent.uplink import Uplink
from agent.web.allowed_hosts import allowed_hosts
from agent.web.api import create_app
from agent.web.auth import Tokens
from agent.web.context import ApiContext
from agent.web.httpserver import build_server
from agent.web.page import close_streams

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 8.0
CONDITION_POLL_S = 1.0
# The outbox's final commit and close always get this much of the budget.
OUTBOX_CLOSE_S = 2.0
# systemd's TimeoutStopSec is 15 s and the contract says 10: past this, exit anyway.
HARD_EXIT_S = 9.5


class Conditions:
    """Turns outbox and uplink states into alarm events, once per edge (raise, clear)."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._open: dict[str, dict[str, Any]] = {}
        self._pending: list[dict[str, Any]] = []
        # Refusals seen so far: a refusal between two polls raises the alarm even
        # when HQ drained the outbox before the poll saw the state.
        self._refused = self._refusals()

    def _refusals(self) -> dict[str, int]:
        counters = self._outbox.counters
        return {"outbox_full": counters.get("refused_full", 0),
                "disk_full": counters.get("refused_disk", 0)}

    async def poll_within(self, timeout: float) -> None:
        """A last :meth:`poll` while stopping, bounded (a stuck writer must not hold it)."""
        await _bounded("the last alarm poll", self.poll(), timeout)

    def report_corrupt(self, report: OutboxCorrupt) -> None:
        self._pending.append({"code": "outbox_corrupt", "severity": "critical",
                              "state": "raised", "message": str(report),
                              "moved_to": report.moved_to})

    async def poll(self) -> None:
        state = self._outbox.state
        refused, self._refused = self._refused, self._refusals()
        for code, active, message in (
            ("outbox_full", state == "full",
             f"outbox at max_bytes: {NEVER_DROPPED_TEXT} events are refused until HQ "
             "catches up"),
            ("disk_full", state == "disk_full",
             "the disk under the outbox is full: events are refused"),
        ):
            refused_since = self._refused[code] > refused[code]
            if (active or refused_since) and code not in self._open:
                alarm = {"code": code, "severity": "critical", "state": "raised",
                         "message": message}
                self._open[code] = alarm
                log.error("%s", message)
                self._pending.append(alarm)
            elif not active and not refused_since and code in self._open:
                del self._open[code]
                log.info("%s cleared", code)
                self._pending.append({"code": code, "severity": "info", "state": "cleared",
                                      "message": f"{code} cleared"})
        # An alarm that cannot be written now (the disk is full) waits for room.
        while self._pending:
            alarm = self._pending[0]
            try:
                await self._outbox.append("alarm", _json(alarm), "edge-agent")
            except OutboxError:
                break
            self._pending.pop(0)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))


class Deadline:
    """One time budget shared by the stop steps; it starts on first use."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s = budget_s
        self._clock = clock
        self._ends: float | None = None

    def start(self) -> None:
        if self._ends is None:
            self._ends = self._clock() + self.budget_s

    def left(self, cap: float, reserve: float = 0.0) -> float:
        """Seconds a step may take: at most ``cap``, keeping ``reserve`` for later steps."""
        self.start()
        assert self._ends is not None
        return max(0.05, min(cap, self._ends - self._clock() - reserve))


async def _bounded(what: str, awaitable: Awaitable[Any], timeout: float) -> None:
    """Await one stop step for at most ``timeout`` s; a failure or a hang is logged."""
    try:
        await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        log.warning("stopping: %s did not finish within %.1f s; going on without it", what,
                    timeout)
    except Exception:  # one part failing to stop must not keep the rest running
        log.exception("stopping: %s failed", what)


def _arm_hard_exit(seconds: float) -> threading.Timer:
    """Exit the process ``seconds`` from now if the clean stop has not ended it by then."""
    def force() -> None:
        log.error("stopping took longer than %.1f s; exiting now (every accepted event is "
                  "already on disk)", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()
    return timer


async def serve(cfg: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    hard_exit: list[threading.Timer] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            code = await _serve(cfg, stack, hard_exit)
        log.info("stopped cleanly")
        return code
    finally:
        for timer in hard_exit:
            timer.cancel()


async def _serve(cfg: AgentConfig, stack: contextlib.AsyncExitStack,
                 hard_exit: list[threading.Timer]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    deadline = Deadline(SHUTDOWN_BUDGET_S)

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            hard_exit.append(_arm_hard_exit(HARD_EXIT_S))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    tokens = Tokens.load(cfg.api.tokens_file)
    # Bind before anything starts: a port in use is a clear error, not a
    # half-started daemon (uvicorn would sys.exit from inside its task).
    listener = _listen(cfg.api.bind, cfg.api.port)
    stack.callback(listener.close)   # uvicorn closes it too; this covers a failed start
    outbox = Outbox(cfg.outbox.path, cfg.site.id, max_bytes=cfg.outbox.max_bytes,
                    max_batch=cfg.outbox.max_batch, ballast_bytes=cfg.outbox.ballast_bytes)
    reports = await asyncio.to_thread(outbox.open)
    stack.push_async_callback(_close_outbox, outbox, deadline)
    conditions = Conditions(outbox)
    for report in reports:
        log.error("%s", report)
        conditions.report_corrupt(report)

    # The uplink, the command router and the status form a circle (the router answers
    # through the uplink, the uplink hands commands to the router and publishes the
    # status, the status reads the uplink): the uplink is made last, and the two
    # lambdas that reach it before then answer "not yet" while it is None.
    uplink: Uplink | None = None
    # Command ids on disk beside the outbox: a command HQ resends after a restart runs once.
    journal = await asyncio.to_thread(CommandJournal, Path(cfg.outbox.path).parent)
    router = CommandRouter(lambda result: uplink.send_command_result(result) if uplink else None,
                           journal=journal)
    # A command still running (a print on a dead printer) is not waited for past its slice.
    stack.push_async_callback(lambda: _bounded("the command router", asyncio.to_thread(
        router.close), deadline.left(0.5, reserve=OUTBOX_CLOSE_S)))

    async def stop_uplink() -> None:   # after the devices: what they emit stays queued
        if uplink is not None:
            await _bounded("the uplink", asyncio.to_thread(uplink.stop, SHUTDOWN_BUDGET_S / 4),
                           deadline.left(SHUTDOWN_BUDGET_S / 4 + 0.5, reserve=OUTBOX_CLOSE_S))

    stack.push_async_callback(stop_uplink)
    # In a thread: building the families imports their drivers (pymodbus, escpos, ...),
    # which would hold the loop for most of a second.
    services = await asyncio.to_thread(build_services, cfg)
    service_ctx = ServiceContext(cfg=cfg, outbox=outbox, state_dir=Path(cfg.outbox.path).parent,
                                 loop=loop)
    failed: list[dict[str, Any]] = []
    for service in list(services):
        try:
            await service.start(service_ctx)
        except Exception as exc:  # any family's start-up bug: the rest still runs
            # A family that cannot start must not stop the site selling: the
            # rest runs, and status shows this family as a failed device.
            log.exception("%s: failed to start; its devices are not running", service.name)
            services.remove(service)
            failed.append({"id": service.name, "type": "service", "state": "error",
                           "last_fault": f"failed to start: {type(exc).__name__}: {exc}"})
            continue
        # Devices stop before the uplink and the outbox: a scan or reading that arrives
        # while stopping still finds the outbox open. Each gets a slice of the budget.
        stack.push_async_callback(_stop_service, service, deadline)
        for name, handler in service.commands().items():
            router.register(name, handler)
    started_at = time.time()
    ctx = ApiContext(cfg=cfg, outbox=outbox, tokens=tokens,
                     uplink_snapshot=lambda: uplink.snapshot() if uplink else {},
                     devices_snapshot=lambda: failed + all_devices(services),
                     started_at=started_at,
                     services=services, allowed_hosts=allowed_hosts(cfg))
    uplink = Uplink(cfg, outbox, version=__version__, health=lambda: build_status(ctx),
                    on_command=router.dispatch)
    uplink.start()

    app = create_app(ctx)
    # agent/web/httpserver.py: TCP_NODELAY, header/body deadlines, the connection cap;
    # uvicorn's own signal handling is off there (the daemon owns SIGTERM/SIGINT).
    server = build_server(app, "api", host=cfg.api.bind, port=cfg.api.port,
                          max_connections=cfg.api.max_connections,
                          header_timeout_s=cfg.api.header_timeout_s,
                          body_timeout_s=cfg.api.body_timeout_s, graceful_s=3)
    server_task = asyncio.create_task(server.serve(sockets=[listener]), name="api")
    stack.push_async_callback(conditions.poll_within, 0.5)  # alarms raised while stopping

    async def stop_server() -> None:
        log.info("stopping: draining in-flight requests")
        close_streams(app)  # open site pages would otherwise hold the server's graceful stop
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await _bounded("the API server", asyncio.shield(server_task),
                           deadline.left(SHUTDOWN_BUDGET_S / 2, reserve=OUTBOX_CLOSE_S + 1.0))
        if not server_task.done():
            server_task.cancel()

    stack.push_async_callback(stop_server)
    while not server.started:
        if server_task.done():
            failure = server_task.exception()
            raise AgentError(f"api: the server on {cfg.api.bind}:{cfg.api.port} did not start"
                             + (f" ({failure})" if failure else ""))
        await asyncio.sleep(0.01)
    sdnotify.notify("READY=1")
    sdnotify.notify(f"STATUS=listening on {cfg.api.bind}:{cfg.api.port}")
    log.info("edge-agent %s for site %s: API on %s:%d, outbox %s", __version__, cfg.site.id,
             cfg.api.bind, cfg.api.port, cfg.outbox.path)
    # mDNS in its own thread: registration probes the LAN for a second or two.
    advertiser = Advertiser(cfg) if cfg.api.advertise else None
    if advertiser is not None:
        advertiser.start()
        # Goodbye packets; the API drains meanwhile in the next step.
        stack.push_async_callback(lambda: _bounded("mDNS", asyncio.to_thread(
            advertiser.stop, 1.0), deadline.left(1.5, reserve=OUTBOX_CLOSE_S + 2.0)))

    watchdog = sdnotify.watchdog_interval()
    next_ping = 0.0
    while not stop.is_set():
        await conditions.poll()
        now = time.monotonic()
        if watchdog and now >= next_ping:
            # Pinged from the loop itself: a wedged loop stops the pings and
            # systemd restarts us.
            sdnotify.notify("WATCHDOG=1")
            next_ping = now + watchdog / 2
        if server_task.done():
            log.error("api server stopped unexpectedly")
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CONDITION_POLL_S if not watchdog
                                   else min(CONDITION_POLL_S, watchdog / 4))

    sdnotify.notify("STOPPING=1")
    deadline.start()
    return 0  # the stack stops everything on the way out (see the module docstring)


def _listen(bind: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise AgentError(f"api: cannot listen on {bind}:{port}: {exc.strerror or exc} "
                         "(check api.bind and api.port; is another edge-agent running?)") \
            from None
    return sock


async def _stop_service(service: Service, deadline: Deadline) -> None:
    await _bounded(service.name, service.stop(),
                   deadline.left(SHUTDOWN_BUDGET_S / 8, reserve=OUTBOX_CLOSE_S + 1.0))


async def _close_outbox(outbox: Outbox, deadline: Deadline) -> None:
    # What the group commit holds is committed; the writer thread is joined within
    # its slice (a writer stuck in an fsync on a dying card is logged, not waited for).
    timeout = max(OUTBOX_CLOSE_S, deadline.left(OUTBOX_CLOSE_S + 1.0))
    await _bounded("the outbox", asyncio.to_thread(outbox.close, timeout), timeout + 0.5)


def _busy_threads(grace_s: float) -> list[str]:
    """Non-daemon threads still running after ``grace_s`` (those the exit would wait for)."""
    ends = time.monotonic() + grace_s
    while True:
        busy = [t for t in threading.enumerate()
                if t is not threading.current_thread() and not t.daemon and t.is_alive()]
        if not busy or time.monotonic() >= ends:
            return [t.name for t in busy]
        busy[0].join(max(0.0, ends - time.monotonic()))


def run(cfg: AgentConfig) -> int:
    """``serve`` on a fresh loop; exits past threads a stop step left behind.

    ``asyncio.run`` would wait for every ``to_thread`` call still running and the
    interpreter for every executor thread, without a limit: a print command
    blocked on a dead printer would hold the exit for its whole timeout.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Our own default executor, shut down without waiting below (3.11's
    # loop.shutdown_default_executor joins its threads even when cancelled).
    executor = ThreadPoolExecutor(thread_name_prefix="asyncio")
    loop.set_default_executor(executor)
    try:
        code = loop.run_until_complete(serve(cfg))
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        asyncio.set_event_loop(None)
        loop.close()
    stuck = _busy_threads(0.5)
    if stuck:
        log.warning("exiting with threads still busy (%s); everything accepted is on disk",
                    ", ".join(sorted(stuck)))
        logging.shutdown()
        os._exit(code)
    return code
