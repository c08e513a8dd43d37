"""A client for Metrc's v2 API: paced, with one error class per kind of failure.

httpx rather than requests: separate connect/read/write/pool timeouts, so a
connection that never opened (nothing was sent: safe to send again) is told
apart from an answer that never came (the POST may have been recorded: look
it up first); typed exceptions for each; a connection pool with keep-alive
per base URL; type hints; and ``httpx.MockTransport`` for pure unit tests.
The model is stripe-python's requestor (STYLE.md): retries are the caller's
decision, made on the error's class, never on its text.

Authentication is HTTP basic, the vendor key as user and the user key as
password (the description's ``securitySchemes.basic``). Neither key is ever
logged or put in a message: every error text passes :meth:`MetrcClient.redact`.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from agent.errors import AgentError
from hq.metrc.mapping import PlantCall, dumps

MAX_MESSAGE = 500          # characters of Metrc's message kept
DEFAULT_RETRY_AFTER_S = 10.0


class MetrcError(AgentError):
    """A Metrc call failed. ``sent``: the request may have reached Metrc (so a
    POST must be looked up before it is sent again); ``status``: the HTTP status."""

    retryable = True

    def __init__(self, message: str, *, status: int | None = None, sent: bool = False) -> None:
        self.status = status
        self.sent = sent
        self.message = message
        super().__init__(message)


class MetrcRefused(MetrcError):
    """Metrc answered 400 (or another 4xx): it refused the request, recorded nothing,
    and sending the same again would be refused again. Kept for a person."""

    retryable = False


class MetrcAuthFailed(MetrcError):
    """401/403: the keys are wrong or lack a permission; nothing was recorded."""


class MetrcNotFound(MetrcError):
    """404 on a look-up: no such receipt (or route)."""


class MetrcRateLimited(MetrcError):
    """429: wait ``retry_after`` seconds before the next call for this facility."""

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message, status=429)


class MetrcUnavailable(MetrcError):
    """5xx, a timeout or a dropped connection; ``sent`` says whether it may have landed."""


class Pacer:
    """Spaces calls per facility and per key (thread-safe): a call may start at the
    first time both allow; a 429 blocks the facility until its Retry-After."""

    def __init__(self, per_facility_s: float, per_key_s: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._gap_facility = 1.0 / per_facility_s
        self._gap_key = 1.0 / per_key_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_key = 0.0
        self._next: dict[str, float] = {}
        self._blocked: dict[str, float] = {}

    def reserve(self, facility: str) -> float:
        """Book the next slot for ``facility``; the seconds to wait before using it."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next_key, self._next.get(facility, 0.0),
                        self._blocked.get(facility, 0.0))
            self._next_key = start + self._gap_key
            self._next[facility] = start + self._gap_facility
            return start - now

    def acquire(self, facility: str) -> None:
        wait = self.reserve(facility)
        if wait > 0:
            self._sleep(wait)

    def block(self, facility: str, seconds: float) -> None:
        with self._lock:
            until = self._clock() + seconds
            self._blocked[facility] = max(self._blocked.get(facility, 0.0), until)

    def blocked_for(self, facility: str) -> float:
        with self._lock:
            return max(0.0, self._blocked.get(facility, 0.0) - self._clock())


def retry_after(value: str | None, cap: float, now: float | None = None) -> float:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), within 0..cap."""
    if not value:
        return min(cap, DEFAULT_RETRY_AFTER_S)
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return min(cap, DEFAULT_RETRY_AFTER_S)
        seconds = when - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return min(cap, DEFAULT_RETRY_AFTER_S)
    return max(0.0, min(cap, seconds))


def metrc_message(response: httpx.Response) -> str:
    """Metrc's own words from an error answer: ``{"Message"}``, a list of row
    messages, or the text."""
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:MAX_MESSAGE] or f"HTTP {response.status_code}"
    parts: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            msg = value.get("Message", value.get("message"))
            row = value.get("row", value.get("Row"))
            if isinstance(msg, str):
                parts.append(f"row {row}: {msg}" if isinstance(row, int) else msg)
        elif isinstance(value, list):
            for item in value[:20]:
                collect(item)
        elif isinstance(value, str):
            parts.append(value)

    collect(body)
    return ("; ".join(parts) or text.strip())[:MAX_MESSAGE] or f"HTTP {response.status_code}"


class MetrcClient:
    """One base URL (one state's Metrc) with one pair of keys."""

    def __init__(self, base_url: str, vendor_key: str, user_key: str, *, timeout_s: float,
                 pacer: Pacer, retry_after_max_s: float = 3600.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._secrets = tuple(s for s in (vendor_key, user_key) if s)
        self.pacer = pacer
        self._retry_after_max = retry_after_max_s
        self._http = httpx.Client(
            base_url=self.base_url, auth=httpx.BasicAuth(vendor_key, user_key),
            timeout=httpx.Timeout(timeout_s), transport=transport,
            headers={"Accept": "application/json", "User-Agent": "edge-agent-hq"})

    def close(self) -> None:
        self._http.close()

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- the calls -----------------------------------------------------------

    def post_receipts(self, license_number: str, receipts: list[dict[str, Any]]) -> list[Any]:
        """``POST /sales/v2/receipts``; Metrc's ``Ids`` (may be empty)."""
        answer = self._call("POST", "/sales/v2/receipts", license_number, body=receipts)
        ids = answer.get("Ids") if isinstance(answer, dict) else None
        return list(ids) if isinstance(ids, list) else []

    def find_receipt(self, license_number: str, external_number: str) -> dict[str, Any] | None:
        """``GET /sales/v2/receipts/external/{number}``: the receipt, or None when Metrc
        has none. Accepts the documented list, the ``Data`` wrapper and one object."""
        try:
            answer = self._call("GET", "/sales/v2/receipts/external/"
                                + urllib.parse.quote(external_number, safe=""),
                                license_number, lookup=True)
        except MetrcNotFound:
            return None
        items: Any = answer
        if isinstance(answer, dict):
            items = answer.get("Data", [answer])
        if not isinstance(items, list):
            return None
        for item in items:
            if isinstance(item, dict) and item.get("ExternalReceiptNumber") == external_number:
                return item
        return None

    def plant_call(self, license_number: str, call: PlantCall) -> None:
        self._call(call.method, call.path, license_number, body=call.body)

    def active_packages(self, license_number: str, page_size: int = 20) -> Iterator[
            dict[str, Any]]:
        """Every active package of the facility, page after page."""
        page = 1
        while True:
            answer = self._call("GET", "/packages/v2/active", license_number,
                                params={"pageNumber": page, "pageSize": page_size}, lookup=True)
            if not isinstance(answer, dict) or not isinstance(answer.get("Data"), list):
                raise MetrcUnavailable("GET /packages/v2/active: the answer is not a "
                                       "{\"Data\": [...]} page")
            yield from (p for p in answer["Data"] if isinstance(p, dict))
            total = answer.get("TotalPages")
            if not isinstance(total, int) or page >= total or not answer["Data"]:
                return
            page += 1

    # -- the transport -------------------------------------------------------

    def _call(self, method: str, path: str, license_number: str, *, body: Any = None,
              params: dict[str, Any] | None = None, lookup: bool = False) -> Any:
        self.pacer.acquire(license_number)
        what = f"{method} {path}"
        query = {"licenseNumber": license_number, **(params or {})}
        content = None if body is None else dumps(body)
        headers = {} if content is None else {"Content-Type": "application/json"}
        try:
            response = self._http.request(method, path, params=query, content=content,
                                          headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise MetrcUnavailable(self.redact(f"{what}: cannot reach {self.base_url}: "
                                               f"{type(exc).__name__}: {exc}"),
                                   sent=False) from None
        except httpx.TimeoutException as exc:
            raise MetrcUnavailable(self.redact(f"{what}: no answer in time "
                                               f"({type(exc).__name__}); it may have been "
                                               "recorded"), sent=not lookup) from None
        except httpx.HTTPError as exc:
            raise MetrcUnavailable(self.redact(f"{what}: the connection failed: "
                                               f"{type(exc).__name__}: {exc}"),
                                   sent=not lookup) from None
        status = response.status_code
        if status < 300:
            if not response.content.strip():
                return None   # "No response" (PUT /plants/v2/location and friends)
            try:
                return response.json()
            except ValueError:
                return None
        message = self.redact(metrc_message(response))
        if status == 429:
            wait = retry_after(response.headers.get("Retry-After"), self._retry_after_max)
            self.pacer.block(license_number, wait)
            raise MetrcRateLimited(f"{what}: Metrc is rate-limiting this facility (429, "
                                   f"Retry-After {wait:g}s): {message}", wait)
        if status in (401, 403):
            raise MetrcAuthFailed(f"{what}: Metrc refused the keys ({status}): {message} "
                                  "(check metrc.vendor_key_file / user_key_file and the "
                                  "user's permissions for this facility)", status=status)
        if status == 404 and lookup:
            raise MetrcNotFound(f"{what}: not found", status=404)
        if status >= 500:
            raise MetrcUnavailable(f"{what}: Metrc failed ({status}): {message}",
                                   status=status, sent=not lookup)
        raise MetrcRefused(message, status=status)
