"""A Metrc-shaped HTTP server for the tests and bench/metrc_bench.py.

There is no software stand-in for a state's Metrc, so this is the one thing
the suite models itself. It is a real HTTP/1.1 server on a loopback port
(``http.server``, one thread per connection, keep-alive, TCP_NODELAY), built
from the public API description kept in tests/metrc_api/ (OcelliSolutions'
OpenMetrc ``open-metrc-swagger-v2.yaml``, MIT, and the example requests of
Metrc's pages scraped by the same project). What it serves:

- HTTP basic auth: user = vendor key, password = user key (the description's
  ``securitySchemes.basic``); anything else is 401 with no body;
- ``POST /sales/v2/receipts?licenseNumber=``: a JSON array of receipts, fields
  as in Metrc's example request (PascalCase; matched case-insensitively like
  Metrc's ASP.NET binder); answered ``{"Ids": [...], "Warnings": null}``;
- ``GET /sales/v2/receipts/external/{number}?licenseNumber=``: the receipts
  with that ``ExternalReceiptNumber``, a JSON array as in the example response;
- ``GET /packages/v2/active?licenseNumber=&pageNumber=&pageSize=``: the
  licence's inventory in the ``{"Data", "Total", "TotalPages", ...}`` wrapper
  (``PackageMetrcWrapper``); a pageSize over 20 is 400, as the page says;
- ``PUT /plants/v2/location``, ``POST /plants/v2/waste``, ``PUT /plants/v2/harvest``,
  ``DELETE /plants/v2/``: recorded (plant labels checked when the licence has
  a plant inventory).

Assumed, not in the description (README, "Metrc"): a request with one bad
receipt is refused whole with 400 ``{"Message": ...}`` (the ``ErrorResponse``
schema) and records nothing; a ``SalesDateTime`` with a zone is refused (real
Metrc would take it as local time and record the wrong hour: being stricter
catches that bug here); a 404 ``{"Message"}`` when no receipt has the number;
duplicate external numbers are recorded, not refused, so a test sees a double.

Faults are injected per call (:meth:`MetrcServer.inject`): 400, 401, 429 with
``Retry-After``, 500, and ``slow`` (the call is processed, then its answer is
held longer than the client waits: the "did my POST land?" case). ``latency_s``
delays every answer; ``rate_per_s`` is a per-(key, licence) limit answered
with 429 and ``Retry-After: 1``.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LOCAL_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,7})?$")
CUSTOMER_TYPES = {"consumer", "patient", "caregiver", "externalpatient", "nonresidentconsumer"}
MAX_PAGE_SIZE = 20


@dataclass
class Fault:
    kind: str                    # "400" | "401" | "429" | "500" | "slow"
    count: int = 1
    method: str | None = None
    path: str | None = None      # a path prefix
    retry_after: str = "1"
    delay_s: float = 0.0
    message: str = "injected fault"

    def matches(self, method: str, path: str) -> bool:
        return (self.count > 0 and (self.method is None or self.method == method)
                and (self.path is None or path.startswith(self.path)))


@dataclass
class Call:
    method: str
    path: str
    license: str | None
    body: Any
    status: int
    at: float = field(default_factory=time.monotonic)


def _lower(obj: Any) -> Any:
    """Keys matched case-insensitively, as Metrc's binder does."""
    if isinstance(obj, dict):
        return {str(k).lower(): _lower(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_lower(v) for v in obj]
    return obj


class Refused(Exception):
    """A 400 with Metrc's message."""


class MetrcServer:
    """Start with :meth:`start`; ``base_url`` is then ``http://127.0.0.1:PORT``."""

    def __init__(self, vendor_key: str = "vendor-key-test", user_key: str = "user-key-test",
                 *, latency_s: float = 0.0, rate_per_s: float | None = None) -> None:
        self.vendor_key = vendor_key
        self.user_key = user_key
        self.latency_s = latency_s
        self.rate_per_s = rate_per_s
        self.lock = threading.Lock()
        self.inventory: dict[str, dict[str, dict[str, Any]]] = {}
        self.plants: dict[str, set[str]] = {}
        self.receipts: list[dict[str, Any]] = []     # every recorded receipt, with License
        self.plant_calls: list[tuple[str, str, str, list[Any]]] = []
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self._recent: dict[tuple[str, str], deque[float]] = {}
        self._next_id = 1
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- set-up ----------------------------------------------------------------

    def add_packages(self, license_number: str, *labels: str, unit: str = "Grams") -> None:
        with self.lock:
            inv = self.inventory.setdefault(license_number, {})
            for label in labels:
                inv[label] = {"Id": self._take_id(), "Label": label, "Quantity": 100.0,
                              "UnitOfMeasureName": unit, "IsOnHold": False,
                              "LastModified": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime())}

    def remove_packages(self, license_number: str, *labels: str) -> None:
        with self.lock:
            for label in labels:
                self.inventory.get(license_number, {}).pop(label, None)

    def inject(self, kind: str, count: int = 1, *, method: str | None = None,
               path: str | None = None, retry_after: str = "1", delay_s: float = 0.0,
               message: str = "injected fault") -> None:
        with self.lock:
            self.faults.append(Fault(kind, count, method, path, retry_after, delay_s, message))

    def receipts_by_number(self) -> dict[str, int]:
        with self.lock:
            out: dict[str, int] = {}
            for r in self.receipts:
                n = r.get("ExternalReceiptNumber") or r.get("externalreceiptnumber") or ""
                out[n] = out.get(n, 0) + 1
            return out

    def status_counts(self) -> dict[int, int]:
        with self.lock:
            out: dict[int, int] = {}
            for c in self.calls:
                out[c.status] = out.get(c.status, 0) + 1
            return out

    # -- life ------------------------------------------------------------------

    def start(self) -> MetrcServer:
        server = self

        class Handler(_Handler):
            metrc = server

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={
            "poll_interval": 0.05}, name="metrc-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> MetrcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the API ---------------------------------------------------------------

    def _take_id(self) -> int:
        n = self._next_id
        self._next_id += 1
        return n

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(user, self.vendor_key) & hmac.compare_digest(
            password, self.user_key)

    def rate_limited(self, key: str, license_number: str) -> bool:
        if self.rate_per_s is None:
            return False
        now = time.monotonic()
        window = self._recent.setdefault((key, license_number), deque())
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= self.rate_per_s:
            return True
        window.append(now)
        return False

    def take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path):
                fault.count -= 1
                return fault
        return None

    def handle(self, method: str, path: str, query: dict[str, str], body: Any
               ) -> tuple[int, Any]:
        """The answer to one authorised call (under ``lock``)."""
        license_number = query.get("licensenumber")
        if path == "/sales/v2/receipts" and method == "POST":
            return 200, self._post_receipts(license_number, body)
        if path.startswith("/sales/v2/receipts/external/") and method == "GET":
            number = unquote(path.rsplit("/", 1)[1])
            found = [r for r in self.receipts if r["ExternalReceiptNumber"] == number
                     and (license_number is None or r["License"] == license_number)]
            if not found:
                return 404, {"Message": f"No receipt with external number {number} was found."}
            return 200, [{k: v for k, v in r.items() if k != "License"} for r in found]
        if path == "/packages/v2/active" and method == "GET":
            return 200, self._packages(license_number, query)
        plant_paths = {("PUT", "/plants/v2/location"), ("POST", "/plants/v2/waste"),
                       ("PUT", "/plants/v2/harvest"), ("DELETE", "/plants/v2/"),
                       ("DELETE", "/plants/v2")}
        if (method, path) in plant_paths:
            self._plants(license_number, method, path, body)
            return 200, None
        return 404, {"Message": f"No route {method} {path}"}

    def _facility(self, license_number: str | None) -> dict[str, dict[str, Any]]:
        if not license_number:
            raise Refused("licenseNumber is required.")
        if license_number not in self.inventory:
            raise Refused(f"Facility {license_number} is not valid for this user.")
        return self.inventory[license_number]

    def _post_receipts(self, license_number: str | None, body: Any) -> dict[str, Any]:
        inventory = self._facility(license_number)
        if not isinstance(body, list) or not body:
            raise Refused("No data was submitted.")
        checked = []
        for row, original in enumerate(body):
            r = _lower(original)
            if not isinstance(r, dict):
                raise Refused(f"Row {row}: a receipt must be an object.")
            number = r.get("externalreceiptnumber")
            where = f"Receipt {number}" if number else f"Row {row}"
            when = r.get("salesdatetime")
            if not isinstance(when, str) or not LOCAL_TIME_RE.match(when):
                raise Refused(f"{where}: SalesDateTime {when!r} must be the facility's local "
                              "date and time without a time zone.")
            kind = r.get("salescustomertype")
            if not isinstance(kind, str) or kind.lower() not in CUSTOMER_TYPES:
                raise Refused(f"{where}: SalesCustomerType {kind!r} is not valid.")
            if kind.lower() in ("patient", "caregiver") and not r.get("patientlicensenumber"):
                raise Refused(f"{where}: PatientLicenseNumber is required for {kind} sales.")
            txs = r.get("transactions")
            if not isinstance(txs, list) or not txs:
                raise Refused(f"{where}: at least one transaction is required.")
            for tx in txs:
                label = tx.get("packagelabel") if isinstance(tx, dict) else None
                if label not in inventory:
                    raise Refused(f"{where}: Package {label} is not active or not found at "
                                  f"facility {license_number}.")
                qty, total = tx.get("quantity"), tx.get("totalamount")
                if not isinstance(qty, int | float) or isinstance(qty, bool) or qty <= 0:
                    raise Refused(f"{where}: Quantity must be a number greater than 0.")
                if not isinstance(total, int | float) or isinstance(total, bool) or total < 0:
                    raise Refused(f"{where}: TotalAmount must be a number.")
                if not isinstance(tx.get("unitofmeasure"), str):
                    raise Refused(f"{where}: UnitOfMeasure is required.")
            checked.append(original)
        ids = []
        for original in checked:   # all or nothing
            rid = self._take_id()
            ids.append(rid)
            canon = {k[0].upper() + k[1:]: v for k, v in original.items()}
            self.receipts.append({"Id": rid, **canon, "License": license_number,
                                  "ExternalReceiptNumber": canon.get("ExternalReceiptNumber"),
                                  "IsFinal": False, "ArchivedDate": None,
                                  "RecordedDateTime": time.strftime("%Y-%m-%dT%H:%M:%S+00:00",
                                                                    time.gmtime())})
        return {"Ids": ids, "Warnings": None}

    def _packages(self, license_number: str | None, query: dict[str, str]) -> dict[str, Any]:
        inventory = list(self._facility(license_number).values())
        try:
            page = int(query.get("pagenumber", "1"))
            size = int(query.get("pagesize", str(max(1, len(inventory)))))
        except ValueError:
            raise Refused("pageNumber and pageSize must be whole numbers.") from None
        if size > MAX_PAGE_SIZE or size < 1 or page < 1:
            raise Refused(f"pageSize must be 1..{MAX_PAGE_SIZE}.")
        pages = max(1, -(-len(inventory) // size))
        data = inventory[(page - 1) * size: page * size]
        return {"Data": data, "Total": len(inventory), "TotalRecords": len(inventory),
                "PageSize": size, "RecordsOnPage": len(data), "Page": page,
                "CurrentPage": page, "TotalPages": pages}

    def _plants(self, license_number: str | None, method: str, path: str, body: Any) -> None:
        if not license_number:
            raise Refused("licenseNumber is required.")
        if not isinstance(body, list) or not body:
            raise Refused("No data was submitted.")
        known = self.plants.get(license_number)
        for row, item in enumerate(_lower(body)):
            labels = item.get("plantlabels") or [item.get("label") or item.get("plant")]
            for label in labels:
                if known is not None and label not in known:
                    raise Refused(f"Row {row}: Plant {label} was not found.")
        self.plant_calls.append((license_number, method, path, body))


class _Handler(BaseHTTPRequestHandler):
    metrc: MetrcServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes: without this, keep-alive
        # answers stall ~40 ms on Nagle + delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = b"" if body is None else json.dumps(body).encode()
        try:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if raw:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the client gave up waiting (the "slow" fault)

    def _serve(self) -> None:
        m = self.metrc
        parts = urlsplit(self.path)
        path = parts.path
        query = {k.lower(): v[0] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        method = self.command
        license_number = query.get("licensenumber") or ""
        status, answer, headers, hold = 0, None, {}, 0.0
        with m.lock:
            if not m.authorized(self.headers.get("Authorization")):
                status = 401
            else:
                fault = m.take_fault(method, path)
                if fault is not None and fault.kind != "slow":
                    status = int(fault.kind)
                    if status == 429:
                        headers["Retry-After"] = fault.retry_after
                    answer = None if status == 401 else {"Message": fault.message}
                elif m.rate_limited(self.headers.get("Authorization", ""), license_number):
                    status, answer = 429, {"Message": "Too many requests."}
                    headers["Retry-After"] = "1"
                else:
                    if fault is not None:
                        hold = fault.delay_s
                    try:
                        status, answer = m.handle(method, path, query, body)
                    except Refused as exc:
                        status, answer = 400, {"Message": str(exc)}
            m.calls.append(Call(method, path, license_number or None, body, status))
        if m.latency_s or hold:
            time.sleep(m.latency_s + hold)
        self._answer(status, answer, headers)

    do_GET = do_POST = do_PUT = do_DELETE = _serve
