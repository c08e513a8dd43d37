"""Fixtures shared by the suite: private mosquitto and PostgreSQL servers, polling waits."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from agent.localbroker import Broker, start_broker
from agent.localpg import PgServer, start_pg

T = TypeVar("T")


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
