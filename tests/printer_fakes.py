"""Fake printers on loopback TCP: the printer side of ESC/POS and ZPL, for tests and bench.

Each fake is a real TCP server on 127.0.0.1 (a free port) that records every
byte it receives and answers status queries (DLE EOT n, ~HS) the way the
printer would, through the simulated printers of ``drivers.printer.sim``.
``set_state("paper_out" | "head_open" | "paused" | "silent" | "ok" | ...)``
switches it at run time; ``printed`` lists the documents that came out.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from drivers.printer.sim import SimEscposPrinter, SimState, SimZplPrinter


class FakePrinter:
    """A loopback TCP printer around a simulated one; a context manager."""

    def __init__(self, sim: SimEscposPrinter | SimZplPrinter) -> None:
        self.sim = sim
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self._accept = threading.Thread(target=self._serve, name=f"fake-printer-{self.port}",
                                        daemon=True)
        self._accept.start()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def received(self) -> bytes:
        return bytes(self.sim.received)

    @property
    def printed(self) -> list[bytes]:
        return list(self.sim.printed)

    def set_state(self, state: SimState) -> None:
        self.sim.set_state(state)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(0.2)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self.connections += 1
                self._conns.append(conn)
                thread = threading.Thread(target=self._client, args=(conn,), daemon=True,
                                          name=f"fake-printer-{self.port}-conn")
                self._threads.append(thread)
            thread.start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                reply = self.sim.feed(data)
                if reply:
                    try:
                        conn.sendall(reply)
                    except OSError:
                        return

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._accept.join(2)
        for thread in threads:
            thread.join(2)

    def __enter__(self) -> FakePrinter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def fake_escpos_printer(state: SimState = "ok") -> Iterator[FakePrinter]:
    """An ESC/POS receipt printer on loopback TCP."""
    with FakePrinter(SimEscposPrinter(state)) as fake:
        yield fake


@contextlib.contextmanager
def fake_zpl_printer(state: SimState = "ok", *,
                     silent_when_faulted: bool = True) -> Iterator[FakePrinter]:
    """A ZPL label printer on loopback TCP (silent to ~HS when out of media or head open)."""
    sim = SimZplPrinter(state)
    sim.silent_when_faulted = silent_when_faulted
    with FakePrinter(sim) as fake:
        yield fake


# --- sample documents (shared by the printer tests and bench) -------------------

TAG = "1A4FF0100000022000000123"
RETAIL_ID_URL = "https://retailid.example/p/1A4FF0100000022000000123?s=co_x"

SALE: dict[str, Any] = {
    "receipt_number": "R-000123",
    "sold_at": "2026-11-22T10:03:11-07:00",
    "customer_type": "Consumer",
    "register": "pos-2",
    "lines": [
        {"package_tag": TAG, "quantity": "3.5", "unit": "Grams", "price": "35.00",
         "total": "35.00", "thc_pct": "22.4", "product": "Blue Dream 3.5g"},
        {"package_tag": "1A4FF0100000022000000456", "quantity": "1", "unit": "Each",
         "price": "20.00", "total": "20.00"},
    ],
    "taxes": [{"name": "State excise 15%", "amount": "8.25"}],
    "total": "63.25",
}

RECEIPT_OPTIONS: dict[str, Any] = {
    "site_name": "Denver Flagship",
    "address": ["123 Main St", "Denver, CO 80202"],
    "licence_number": "402R-00123",
    "warning": "There may be health risks associated with the consumption of this product. "
               "Keep out of the reach of children.",
}

LABEL: dict[str, Any] = {
    "package_tag": TAG,
    "product": "Blue Dream Flower 3.5g",
    "strain": "Blue Dream",
    "net_weight": "3.5",
    "unit": "Grams",
    "thc_pct": "22.4",
    "cbd_pct": "0.1",
    "batch": "BD-2026-11",
    "harvest_date": "2026-10-01",
    "package_date": "2026-11-01",
    "test_date": "2026-11-05",
    "lab": "SC Labs",
    "retail_id_url": RETAIL_ID_URL,
}

LABEL_OPTIONS: dict[str, Any] = {
    "licence_number": "402R-00123",
    "warning": "WARNING: This product contains cannabis. Keep out of the reach of children "
               "and animals. For use only by adults 21 and older.",
}
