"""Fixtures shared by the suite: private mosquitto and PostgreSQL servers, polling waits."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.testing import localsite
from agent.testing.localbroker import Broker, start_broker
from agent.testing.localpg import PgServer, start_pg

T = TypeVar("T")

# A callback or task step that holds the event loop fails the test when it used more
# than LOOP_CPU_LIMIT_S of the loop thread's CPU (work that belongs off the loop,
# whatever the machine's load), or took longer than LOOP_WALL_LIMIT_S on the clock (a
# blocking call: a sleep, an fsync, a socket). Wall time alone cannot be the 100 ms
# test on a loaded 2-core machine: a step that only sets a future's result was seen
# to take 409 ms there, waiting for a CPU (and one of 2 ms of CPU took 519 ms in a full
# run, hence 1 s on the clock). EDGE_TEST_LOOP_LIMIT_S sets the CPU limit.
LOOP_CPU_LIMIT_S = float(os.environ.get("EDGE_TEST_LOOP_LIMIT_S", "0.1"))
LOOP_WALL_LIMIT_S = float(os.environ.get("EDGE_TEST_LOOP_WALL_LIMIT_S", "1.0"))
# How long a test's threads get to finish after it (and its fixtures) end.
THREAD_GRACE_S = 5.0


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def screenshot_dir() -> Path:
    """Where the browser tests write their screenshots.

    docs/screenshots/ (the README's pictures, tracked) only when
    EDGE_SCREENSHOTS=update; otherwise a temporary folder, so an ordinary run
    leaves the checkout exactly as it was.
    """
    if os.environ.get("EDGE_SCREENSHOTS") == "update":
        return Path(__file__).resolve().parent.parent / "docs" / "screenshots"
    return Path(tempfile.gettempdir()) / f"edge-screenshots-{os.getpid()}"


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A mosquitto of our own on a free loopback port; stopped after the test."""
    b = start_broker(str(tmp_path_factory.mktemp("mosquitto")))
    try:
        yield b
    finally:
        b.stop()


class Pty:
    """A serial scanner stand-in: the agent opens the slave by path; tests type into the master."""

    def __init__(self, end: str = "\r") -> None:
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.end = end
        self.last_write = 0.0

    def scan(self, *codes: str) -> None:
        os.write(self.master, b"".join(f"{c}{self.end}".encode() for c in codes))
        self.last_write = time.monotonic()

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty() -> Iterator[Pty]:
    """A pty pair whose scans end in CR."""
    p = Pty()
    try:
        yield p
    finally:
        p.close()


class FakeClock:
    """A clock the test moves by hand: pass it where code takes ``clock=``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One private PostgreSQL for the session (initdb in a temp dir, free port, non-root)."""
    server = start_pg()
    try:
        yield server
    finally:
        server.stop()


_pg_databases = itertools.count(1)


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database on the session's private PostgreSQL."""
    return pg_server.create_database(f"t{next(_pg_databases)}_{os.getpid()}")


class _DebugLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """Every new loop in debug mode (a loop method called from the wrong thread raises
    instead of corrupting the loop), its steps timed by :func:`_timed_run`."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_debug(True)
        # asyncio's own wall-time warning stays quiet; _timed_run judges each step.
        loop.slow_callback_duration = 3600.0
        _guarded_loops.add(loop)
        return loop


_guarded_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_slow_steps: list[str] = []
_handle_run = asyncio.events.Handle._run
# Time the garbage collector ran on this thread: a full collection of a long test
# session's heap (100+ ms) is the interpreter's work, not the step's, so the CPU
# and wall limits are applied to the step's time without it.
_gc_time = threading.local()


def _gc_clock(phase: str, info: dict[str, int]) -> None:
    now = time.perf_counter(), time.thread_time()
    if phase == "start":
        _gc_time.started = now
    elif (started := getattr(_gc_time, "started", None)) is not None:
        wall, cpu = getattr(_gc_time, "spent", (0.0, 0.0))
        _gc_time.spent = (wall + now[0] - started[0], cpu + now[1] - started[1])
        _gc_time.started = None


gc.callbacks.append(_gc_clock)


def _timed_run(handle: asyncio.Handle) -> None:
    """Handle._run with the step's loop-thread CPU time and wall time measured."""
    if handle._loop not in _guarded_loops:  # type: ignore[attr-defined]
        return _handle_run(handle)  # type: ignore[no-any-return]
    gc_wall, gc_cpu = getattr(_gc_time, "spent", (0.0, 0.0))
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        return _handle_run(handle)  # type: ignore[no-any-return]
    finally:
        gc_wall2, gc_cpu2 = getattr(_gc_time, "spent", (0.0, 0.0))
        cpu = time.thread_time() - cpu - (gc_cpu2 - gc_cpu)
        wall = time.perf_counter() - wall - (gc_wall2 - gc_wall)
        if cpu > LOOP_CPU_LIMIT_S or wall > LOOP_WALL_LIMIT_S:
            _slow_steps.append(f"{handle!r} used {cpu * 1000:.0f} ms of CPU in "
                               f"{wall * 1000:.0f} ms (garbage collection left out)")


@pytest.fixture(autouse=True)
def loop_never_blocks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test in which an event loop step used over LOOP_CPU_LIMIT_S of CPU or
    took over LOOP_WALL_LIMIT_S (the way python-zeroconf's suite guards its loop)."""
    old_policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DebugLoopPolicy())
    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]
    _slow_steps.clear()
    try:
        yield
    finally:
        asyncio.events.Handle._run = _handle_run  # type: ignore[method-assign]
        asyncio.set_event_loop_policy(old_policy)
    if _slow_steps:
        pytest.fail(f"an event loop step used over {LOOP_CPU_LIMIT_S * 1000:.0f} ms of CPU "
                    f"or took over {LOOP_WALL_LIMIT_S * 1000:.0f} ms: "
                    + "; ".join(_slow_steps[:3]), pytrace=False)


@pytest.fixture(autouse=True)
def no_thread_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a thread running once it and its fixtures are done (as
    python-zeroconf's suite does); threads get THREAD_GRACE_S to wind down."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_S
    while True:
        # asyncio_N: the default executor's workers of a loop a longer-lived fixture
        # owns (Playwright's); they end with that loop (python-zeroconf skips them too).
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()
                and not t.name.startswith("asyncio_")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if left:
        pytest.fail("threads still running after the test: "
                    + ", ".join(sorted(t.name for t in left)), pytrace=False)


@pytest.fixture(autouse=True)
def process_tests_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that starts a real edge-agent process without the ``e2e`` marker."""
    before = localsite.ARGV_CALLS[0]
    yield
    if localsite.ARGV_CALLS[0] != before and request.node.get_closest_marker("e2e") is None:
        pytest.fail("this test starts the real edge-agent: mark it @pytest.mark.e2e",
                    pytrace=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty HQ store's URL on each backend in turn: a SQLite file, a fresh PostgreSQL db."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/hq.db"
    return str(request.getfixturevalue("pg_url"))


def make_store(url: str, clock: Callable[[], float] | None = None) -> Any:
    """The HQ store at ``url`` (as ``open_store`` opens it), on a test clock if given."""
    from hq.pgstore import PgStore
    from hq.store import SqliteStore, sqlite_path

    kw: dict[str, Any] = {} if clock is None else {"clock": clock}
    if url.startswith("sqlite:"):
        return SqliteStore(sqlite_path(url), **kw)
    return PgStore(url, **kw)
