"""``edge-agent run``: the outbox, the uplink and the API under one asyncio loop.

Start order matters for the contract: READY=1 goes to systemd only once the
outbox is open and the API listens. SIGTERM sends STOPPING=1, stops taking
requests, lets the group commit finish what it holds, publishes the offline
status and exits within ``SHUTDOWN_BUDGET_S``; nothing accepted is lost because
"accepted" already means "on disk".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from pathlib import Path
from typing import Any

from agent import __version__, sdnotify
from agent.advertise import Advertiser
from agent.allowed_hosts import allowed_hosts
from agent.api import ApiContext, create_app
from agent.auth import Tokens
from agent.command_journal import CommandJournal
from agent.commands import CommandRouter
from agent.config import AgentConfig
from agent.errors import AgentError, OutboxCorrupt, OutboxError
from agent.httpserver import build_server
from agent.outbox import Outbox
from agent.page import close_streams
from agent.services import Service, ServiceContext, all_devices, build_services
from agent.status import build_status
from agent.uplink import Uplink

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 8.0
CONDITION_POLL_S = 1.0


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

    def report_corrupt(self, report: OutboxCorrupt) -> None:
        self._pending.append({"code": "outbox_corrupt", "severity": "critical",
                              "state": "raised", "message": str(report),
                              "moved_to": report.moved_to})

    async def poll(self) -> None:
        state = self._outbox.state
        refused, self._refused = self._refused, self._refusals()
        for code, active, message in (
            ("outbox_full", state == "full",
             "outbox at max_bytes: sale, plant and scan events are refused until HQ catches up"),
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


async def serve(cfg: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    tokens = Tokens.load(cfg.api.tokens_file)
    # Bind before anything starts: a port in use is a clear error, not a
    # half-started daemon (uvicorn would sys.exit from inside its task).
    listener = _listen(cfg.api.bind, cfg.api.port)
    outbox = Outbox(cfg.outbox.path, cfg.site.id, max_bytes=cfg.outbox.max_bytes,
                    max_batch=cfg.outbox.max_batch, ballast_bytes=cfg.outbox.ballast_bytes)
    reports = await asyncio.to_thread(outbox.open)
    conditions = Conditions(outbox)
    for report in reports:
        log.error("%s", report)
        conditions.report_corrupt(report)

    uplink: Uplink | None = None
    # Command ids on disk beside the outbox: a command HQ resends after a restart runs once.
    journal = await asyncio.to_thread(CommandJournal, Path(cfg.outbox.path).parent)
    router = CommandRouter(lambda result: uplink.send_command_result(result) if uplink else None,
                           journal=journal)
    # In a thread: building the families imports their drivers (pymodbus, escpos, ...),
    # which would hold the loop for most of a second.
    services = await asyncio.to_thread(build_services, cfg)
    service_ctx = ServiceContext(cfg=cfg, outbox=outbox, state_dir=Path(cfg.outbox.path).parent,
                                 loop=loop)
    failed: list[dict[str, Any]] = []
    for service in list(services):
        try:
            await service.start(service_ctx)
        except Exception as exc:
            # A family that cannot start must not stop the site selling: the
            # rest runs, and status shows this family as a failed device.
            log.exception("%s: failed to start; its devices are not running", service.name)
            services.remove(service)
            failed.append({"id": service.name, "type": "service", "state": "error",
                           "last_fault": f"failed to start: {type(exc).__name__}: {exc}"})
            continue
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
    # agent/httpserver.py: TCP_NODELAY, header/body deadlines, the connection cap;
    # uvicorn's own signal handling is off there (the daemon owns SIGTERM/SIGINT).
    server = build_server(app, "api", host=cfg.api.bind, port=cfg.api.port,
                          max_connections=cfg.api.max_connections,
                          header_timeout_s=cfg.api.header_timeout_s,
                          body_timeout_s=cfg.api.body_timeout_s, graceful_s=3)
    server_task = asyncio.create_task(server.serve(sockets=[listener]), name="api")
    while not server.started:
        if server_task.done():
            await _shutdown(outbox, uplink, router, services)
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
    log.info("stopping: draining in-flight requests")
    close_streams(app)  # open site pages would otherwise hold the server's graceful stop
    server.should_exit = True
    if advertiser is not None:
        await asyncio.to_thread(advertiser.stop)  # goodbye packets, while the API drains
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(server_task, SHUTDOWN_BUDGET_S / 2)
    await conditions.poll()
    await _shutdown(outbox, uplink, router, services)
    log.info("stopped cleanly")
    return 0


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


async def _shutdown(outbox: Outbox, uplink: Uplink, router: CommandRouter,
                    services: list[Service]) -> None:
    # Devices first: a scan or reading that arrives while stopping still finds
    # the outbox open. Each service gets a slice of the budget.
    for service in reversed(services):
        try:
            await asyncio.wait_for(service.stop(), SHUTDOWN_BUDGET_S / 8)
        except Exception:  # one family failing to stop must not keep the rest open
            log.exception("stopping %s failed", service.name)
    await asyncio.to_thread(uplink.stop, SHUTDOWN_BUDGET_S / 4)
    await asyncio.to_thread(router.close)
    await asyncio.to_thread(outbox.close)


def run(cfg: AgentConfig) -> int:
    return asyncio.run(serve(cfg))
