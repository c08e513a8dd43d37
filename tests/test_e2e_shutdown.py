"""Bounded shutdown with the real process (issue 10): SIGTERM exits 0 within 10 s whatever
is in flight, here a receipt waiting on a printer that accepts and never answers."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.testing.localsite import LocalSite
from tests.conftest import wait_for
from tests.printer_fakes import SALE

pytestmark = pytest.mark.e2e


class DeadPrinter:
    """A loopback TCP server that accepts connections and never reads or answers: a
    printer whose firmware hung (the socket stays open, nothing comes back)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone may not.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


@pytest.fixture
def dead_printer() -> Iterator[DeadPrinter]:
    printer = DeadPrinter()
    try:
        yield printer
    finally:
        printer.close()


def test_sigterm_with_a_print_job_on_a_dead_printer_exits_0_within_10s(
        tmp_path: Path, dead_printer: DeadPrinter) -> None:
    """A receipt in flight to a printer that never answers does not hold SIGTERM: the
    daemon exits 0 within 10 s (systemd's stop timeout is 15 s)."""
    # status_timeout_s 20: the worker sits in its status read well past any stop budget.
    site = LocalSite(tmp_path / "site", devices=[{
        "id": "counter-1-receipt", "type": "receipt_printer",
        "url": f"tcp://127.0.0.1:{dead_printer.port}", "status_timeout_s": 20}])
    try:
        site.start()
        answers: list[Any] = []

        def post() -> None:
            with contextlib.suppress(OSError):
                answers.append(site.request("POST", "/v1/print/receipt", {"sale": SALE},
                                            timeout=60))

        poster = threading.Thread(target=post, daemon=True)
        poster.start()
        wait_for(lambda: dead_printer.conns, timeout=20, what="the agent to reach the printer")


        def submitted() -> bool:
            devices = site.request("GET", "/v1/status")[1]["devices"]
            return any((d.get("jobs") or {}).get("submitted") for d in devices)

        wait_for(submitted, timeout=20, what="the receipt job under way")
        assert site.agent is not None and site.agent.alive
        started = time.monotonic()
        code = site.agent.terminate(timeout=20)
        elapsed = time.monotonic() - started
        assert code == 0 and elapsed < 10, (code, elapsed, site.agent.log_tail())
        poster.join(10)   # the agent is gone: the request ends with an error
        assert not poster.is_alive()
    finally:
        site.stop()
