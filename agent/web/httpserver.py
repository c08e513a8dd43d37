"""The HTTP server under the site API and the HQ page: uvicorn, made to hold up.

uvicorn (h11) serves the apps; this module adds what a box on a shop's LAN
needs from it (issue 10):

- **No keep-alive stall.** uvicorn writes a response's head and body in two
  ``send()`` calls; without ``TCP_NODELAY`` Nagle holds the body until the
  client's delayed ACK (~40 ms) on every keep-alive request. asyncio sets the
  option only on sockets whose ``proto`` is ``IPPROTO_TCP``, and a listening
  socket made with ``socket.socket(AF_INET, SOCK_STREAM)`` has proto 0, so it is
  set here on every accepted socket.
- **Header and body deadlines.** A request head must be complete within
  ``header_timeout_s`` of the connection opening (or of the previous answer on
  a keep-alive connection), however the bytes trickle in; a body within
  ``body_timeout_s`` of its head. uvicorn has neither: a socket that sends half
  a request is held forever. A late head is closed (with a 408 when part of it
  came); a late body gets a 408 and the app sees the client gone.
- **A connection cap that keeps room for the counter**, applied on the
  listening socket, before a descriptor is taken (:class:`GuardedListener`).
  At ``max_connections`` (bounded further by the file limit, keeping
  ``FD_RESERVE`` descriptors for the outbox, devices and MQTT) a new
  connection evicts the connections that have waited longest for their
  clients (head or body still incomplete): a POS's request arrives within
  milliseconds of its connection, so a flood of half-open sockets cannot crowd
  it out. Only when every connection is busy (handlers, streams, WebSockets)
  is the new one answered 503 and closed.
- **Accept errors once per edge.** asyncio logs ``socket.accept() out of
  system resource`` with a traceback for every attempt (up to the backlog per
  loop tick); here that is one ERROR when accepting starts failing and one
  INFO when it works again, the repeats counted.

The h11 protocol is subclassed rather than wrapped because the deadlines
follow h11's own states (``their_state``: IDLE = waiting for a head,
SEND_BODY = the body is coming).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 512
# Descriptors kept for everything but HTTP connections (outbox files, serial
# ports, printers, MQTT, the WebSocket of a scan, logging...).
FD_RESERVE = 128
MIN_CONNECTIONS = 16
# At the cap, how many waiting connections one turn of the loop evicts at most.
EVICT_BATCH = 16
# An accepted socket counts against the cap until its protocol is made, or this long.
ACCEPTED_GRACE_S = 5.0
# Set in a request's scope when its body missed the deadline, so the app's
# "client gone" handler answers 408 rather than 400 (agent/web/api.py).
TIMEOUT_SCOPE_KEY = "edge_agent.timed_out"

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
_BUSY_503 = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
             b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s")
_ACCEPT_FAILED = "socket.accept() out of system resource"


def _raw_response(template: bytes, message: str, reason: str) -> bytes:
    import json

    body = json.dumps({"error": message, "field": None, "problems": [
        {"field": None, "message": message}], "reason": reason}).encode()
    return template % (len(body), body)


def file_limit() -> int:
    """The soft RLIMIT_NOFILE, raised toward the hard limit when that is allowed.

    Under systemd ``LimitNOFILE=`` sets both (the unit's syscall filter refuses
    setrlimit, so the attempt fails quietly there)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_CONNECTIONS * 2 + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return 1 << 30 if soft == resource.RLIM_INFINITY else int(soft)


class ConnectionGuard:
    """The deadlines, the cap and the accept-error edge of one server."""

    def __init__(self, name: str, *, max_connections: int = MAX_CONNECTIONS,
                 header_timeout_s: float = HEADER_TIMEOUT_S,
                 body_timeout_s: float = BODY_TIMEOUT_S, fd_limit: int | None = None) -> None:
        self.name = name
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        limit = file_limit() if fd_limit is None else fd_limit
        self.max_connections = min(max_connections, max(MIN_CONNECTIONS, limit - FD_RESERVE))
        if self.max_connections < max_connections:
            log.warning("%s: at most %d connections at once (the open-file limit is %d; "
                        "raise LimitNOFILE for the configured %d)", name, self.max_connections,
                        limit, max_connections)
        # The server's open connections (uvicorn's server_state.connections; the
        # Server sets it), and those accepted whose protocol is not made yet.
        self.connections: set[Any] = set()
        self._accepted: collections.deque[float] = collections.deque()
        # Connections waiting for their client (head or body incomplete), the
        # longest-waiting first: the ones a new connection may evict.
        self.waiting: collections.OrderedDict[EdgeH11Protocol, None] = collections.OrderedDict()
        self.counters: collections.Counter[str] = collections.Counter()
        self._accept_failing = False
        self._failed_since = 0
        self._at_cap = False

    # -- admission, at accept() ----------------------------------------------------------
    def _in_use(self) -> int:
        now = time.monotonic()
        # An accepted socket whose transport never got made (asyncio logged why) stops
        # counting after a while.
        while self._accepted and self._accepted[0] < now - ACCEPTED_GRACE_S:
            self._accepted.popleft()
        return len(self._accepted) + _open(self.connections)

    def room(self) -> bool:
        """Whether one more connection fits now."""
        in_use = self._in_use()
        if in_use < self.max_connections:
            if self._at_cap and in_use < self.max_connections * 0.9:
                self._at_cap = False
                log.info("%s: below the connection cap again", self.name)
            return True
        if not self._at_cap:
            self._at_cap = True
            log.warning("%s: at the cap of %d connections; the longest-waiting idle or "
                        "half-sent ones make room for new ones", self.name, self.max_connections)
        return False

    def make_room(self) -> bool:
        """Evict up to EVICT_BATCH connections waiting on their clients; False if none was."""
        evicted = 0
        while self.waiting and evicted < EVICT_BATCH:
            oldest, _ = self.waiting.popitem(last=False)
            oldest.evict()
            evicted += 1
        self.counters["evicted"] += evicted
        return evicted > 0

    def making(self) -> bool:
        """Whether some accepted connections do not have their protocol yet."""
        self._in_use()  # forgets those that never got one
        return bool(self._accepted)

    def accepted(self) -> None:
        self._accepted.append(time.monotonic())

    def made(self) -> None:
        """A protocol got its connection (the accept before it succeeded)."""
        if self._accepted:
            self._accepted.popleft()
        if self._accept_failing:
            self._accept_failing = False
            log.info("%s: accepting connections again (%d attempts failed meanwhile)",
                     self.name, self._failed_since)

    def refused(self) -> None:
        self.counters["refused"] += 1
        log.debug("%s: every connection busy: refused one with 503", self.name)

    def timed_out(self, phase: str, client: Any) -> None:
        self.counters[f"{phase}_timeout"] += 1
        log.debug("%s: closed a connection from %s: its request %s did not arrive in time",
                  self.name, client, phase)

    # -- accept errors ------------------------------------------------------------------
    def accept_failed(self, exc: BaseException | None) -> None:
        self.counters["accept_failed"] += 1
        self._failed_since += 1
        if self._accept_failing:
            return
        self._accept_failing = True
        self._failed_since = 1
        log.error("%s: cannot accept connections: %s (%d open; LimitNOFILE too low or "
                  "descriptors leaking?); retrying every second", self.name,
                  exc or "out of resources", _open(self.connections))

    def exception_handler(self, previous: Any) -> Any:
        """A loop exception handler that takes asyncio's accept errors, passing on the rest."""

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if str(context.get("message", "")).startswith(_ACCEPT_FAILED):
                self.accept_failed(context.get("exception"))
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        return handle


class GuardedListener(socket.socket):
    """The listening socket, admitting each connection at ``accept()``.

    asyncio calls ``accept()`` in a loop (up to the backlog per turn of the loop)
    and only later makes each connection's protocol, so a cap applied there
    would come after the descriptors are gone. Here a connection is taken only
    when it fits: at the cap the longest-waiting connections are evicted and the
    turn ends (``BlockingIOError``: asyncio comes back on the next turn, when
    their descriptors are closed); with nothing to evict the new one is answered
    503 and closed at once.
    """

    guard: ConnectionGuard

    @classmethod
    def wrap(cls, sock: socket.socket, guard: ConnectionGuard) -> GuardedListener:
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.guard = guard
        return listener

    def accept(self) -> tuple[socket.socket, Any]:
        guard = self.guard
        while not guard.room():
            if guard.make_room() or guard.making():
                # Back on the next turn, when the evicted ones are closed, or the ones
                # accepted this turn have their protocols (and can be evicted).
                raise BlockingIOError
            conn, _ = super().accept()
            guard.refused()
            with contextlib.suppress(OSError):
                conn.send(_raw_response(_BUSY_503, "the agent is at its connection limit; "
                                        "retry in a second", "too_many_connections"))
            conn.close()
        conn, address = super().accept()
        guard.accepted()
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets this only when the socket's proto is IPPROTO_TCP, which a
            # socket made as socket(AF_INET, SOCK_STREAM) does not say.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` (OSError when it cannot be had)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class CorkedTransport:
    """A transport whose writes of one loop turn leave in one ``send()``.

    uvicorn writes a response's head and its body separately; with TCP_NODELAY
    each is a packet and a system call of its own, a quarter of the event loop's
    time under load. A small answer (head and body written in the same turn, as
    every JSON answer is) goes out as one packet. Everything else is the real
    transport's.
    """

    __slots__ = ("_buffer", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._buffer is None:
            self._buffer = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            self._buffer.append(bytes(data))

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, None
        if buffer and not self._transport.is_closing():
            self._transport.write(b"".join(buffer))

    def get_write_buffer_size(self) -> int:
        pending = sum(len(b) for b in self._buffer) if self._buffer else 0
        return self._transport.get_write_buffer_size() + pending

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._buffer = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class EdgeH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY, the deadlines and the cap."""

    guard: ConnectionGuard  # set on the per-server subclass made by protocol_class()

    _timer: asyncio.TimerHandle | None = None
    _phase: str | None = None
    _head_seen = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]
        self.guard.made()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "header":
            self._head_seen = True
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._set_phase(None)  # the WebSocket protocol takes the connection over
        super().handle_websocket_upgrade(event)

    # -- deadlines -------------------------------------------------------------------------
    def _watch(self) -> None:
        """Arm the deadline that fits h11's state of the client's side."""
        if self.transport is None or self.transport.is_closing():
            self._set_phase(None)
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            self._set_phase("header")
        elif state is h11.SEND_BODY:
            self._set_phase("body")
        else:
            self._set_phase(None)

    def _set_phase(self, phase: str | None) -> None:
        if phase == self._phase:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        waiting = self.guard.waiting
        if phase is None:
            waiting.pop(self, None)
            return
        if phase == "header":
            self._head_seen = bool(self.conn.trailing_data[0])
        timeout = self.guard.header_timeout_s if phase == "header" else self.guard.body_timeout_s
        self._timer = self.loop.call_later(timeout, self._expire, phase)
        waiting[self] = None
        waiting.move_to_end(self)

    def _expire(self, phase: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self.guard.timed_out(phase, self.client)
        timeout = self.guard.header_timeout_s if phase == "header" else self.guard.body_timeout_s
        message = f"{phase}: the request's {phase} did not arrive within {timeout:g} s"
        if phase == "body" and self.cycle is not None:
            self.scope[TIMEOUT_SCOPE_KEY] = phase  # type: ignore[literal-required]
            if not self.cycle.response_started:
                self.transport.write(_raw_response(_TIMEOUT_408, message, "request_timeout"))
            # The app's receive() now returns http.disconnect; what it sends is dropped.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        elif self._head_seen:
            self.transport.write(_raw_response(_TIMEOUT_408, message, "request_timeout"))
        self._set_phase(None)
        self.transport.close()

    def evict(self) -> None:
        """Close this connection to make room for a new one (it was waiting on its client)."""
        self._timer_cancel()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _timer_cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = None


def _open(connections: set[Any]) -> int:
    """Connections not already closing (an evicted one stays in the set until its
    ``connection_lost``, on the next loop turn)."""
    count = 0
    for connection in connections:
        transport = getattr(connection, "transport", None)
        if transport is None or not transport.is_closing():
            count += 1
    return count


def protocol_class(guard: ConnectionGuard) -> type[EdgeH11Protocol]:
    """A protocol class bound to ``guard`` (uvicorn instantiates the class itself)."""
    return type("EdgeH11Protocol", (EdgeH11Protocol,), {"guard": guard})


class Server(uvicorn.Server):
    """uvicorn with the guard; without its own signal handling (the caller owns signals)."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard) -> None:
        super().__init__(config)
        self.guard = guard
        guard.connections = self.server_state.connections
        self.listen_error: OSError | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve on ``sockets`` (taken over: wrapped as :class:`GuardedListener`), or on a
        socket bound here to the config's host and port (``listen_error`` when that fails)."""
        if sockets is None:
            try:
                sockets = [listen_socket(self.config.host, self.config.port,
                                         self.config.backlog)]
            except OSError as exc:
                self.listen_error = exc
                return
        listeners: list[socket.socket] = [GuardedListener.wrap(s, self.guard) for s in sockets]
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        loop.set_exception_handler(self.guard.exception_handler(previous))
        try:
            await super().serve(listeners)
        finally:
            loop.set_exception_handler(previous)
            for listener in listeners:
                listener.close()


def build_server(app: Any, name: str, *, host: str, port: int,
                 max_connections: int = MAX_CONNECTIONS,
                 header_timeout_s: float = HEADER_TIMEOUT_S,
                 body_timeout_s: float = BODY_TIMEOUT_S,
                 lifespan: str = "on", graceful_s: int | None = None) -> Server:
    """A :class:`Server` for ``app``; ``name`` prefixes its log lines (``api``, ``hq page``)."""
    guard = ConnectionGuard(name, max_connections=max_connections,
                            header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s)
    config = uvicorn.Config(app, host=host, port=port, http=protocol_class(guard),
                            log_level="warning", access_log=False,
                            lifespan=lifespan,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=graceful_s)
    return Server(config, guard)
