"""The uplink's side of CONTRACT 4 that needs no socket.

Ack payloads, host entries, the status payload, the ``floor`` splice, and the
one-line wording of connection failures for operators (foreign errors are
mapped here, once).
"""

from __future__ import annotations

import json
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from paho.mqtt.reasoncodes import ReasonCode

from agent.envelope import iso_ms
from agent.kinds import KINDS


def reconnect_delay(attempt: int, low: float, high: float,
                    rand: Callable[[], float] = random.random) -> float:
    """Capped exponential backoff with jitter, the site's uplink's and HQ's receivers' alike:
    ``low`` doubled per failed ``attempt`` (0 first), at most ``high``, then a random point
    in its upper half, so a fleet that lost its broker together does not return in step."""
    ceiling: float = min(high, low * 2 ** min(attempt, 30))
    return ceiling * (0.5 + rand() / 2)


def split_host(entry: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` from ``mqtt.hosts``."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else default_port
    host, sep, port = entry.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return entry, default_port


def describe_connect_error(exc: BaseException, where: str, connect_timeout: float) -> str:
    """One line for an operator: what failed, and which key to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"{where}: TLS: the broker's certificate is not trusted ({exc.verify_message}); "
                f"check mqtt.ca_file")
    if isinstance(exc, ssl.SSLError):
        return f"{where}: TLS handshake failed ({exc.reason or exc}); check mqtt.ca_file/cert_file"
    if isinstance(exc, ConnectionRefusedError):
        return f"{where}: connection refused (is the broker running and listening there?)"
    if isinstance(exc, socket.gaierror):
        return f"{where}: cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"{where}: no answer within {connect_timeout:g}s (mqtt.connect_timeout_s)"
    if isinstance(exc, OSError):
        return f"{where}: {exc.strerror or exc}"
    return f"{where}: {type(exc).__name__}: {exc}"


# Why the link is down, as a stable code (status reasons, P/health, the page); the
# words are what an operator reads after "cause:".
CAUSES: dict[str, str] = {
    "keepalive_timeout": "keepalive timeout (no answer to our ping: the network or the "
                         "broker stalled)",
    "refused": "connection refused",
    "broker_refused": "the broker refused the connection (CONNACK)",
    "broker_disconnect": "the broker disconnected us",
    "tls": "TLS",
    "dns": "DNS",
    "timeout": "no answer in time",
    "closed": "connection closed",
    "network": "network error",
    "internal": "internal error",
}


class TlsSetupError(OSError):
    """The TLS files (mqtt.ca_file/cert_file/key_file) are missing or cannot be loaded."""


def connect_error_cause(exc: BaseException) -> str:
    """The :data:`CAUSES` code of an exception from connecting (see describe_connect_error)."""
    if isinstance(exc, ssl.SSLError | TlsSetupError):
        return "tls"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, OSError):
        return "network"
    return "internal"


def describe_refusal(reason: ReasonCode | None, where: str) -> str:
    name = str(reason) if reason is not None else "unknown reason"
    hint = ""
    if reason is not None and reason.value in (0x86, 0x87, 4, 5):   # bad user/pw, not authorised
        hint = " (check mqtt.username, mqtt.password_file and the client certificate)"
    return f"{where}: the broker refused the connection: {name}{hint}"


# Acks and commands are a few hundred bytes; anything far bigger is refused
# before it is parsed (a 10 MB or 100,000-deep message must cost nothing).
MAX_DOWNLINK_BYTES = 64 * 1024


@dataclass(frozen=True)
class AckMessage:
    """A valid ack: HQ has stored every ``kind`` event with seq <= ``upto`` that this
    outbox sent under ``epoch`` (None: an HQ that does not know epochs)."""

    kind: str
    upto: int
    epoch: str | None = None


def parse_ack(payload: bytes) -> AckMessage | str:
    """``{"kind": K, "upto": N, "epoch"?: E}`` from ``P/acks``, or what is wrong with it."""
    if len(payload) > MAX_DOWNLINK_BYTES:
        return f"{len(payload)} bytes, over the {MAX_DOWNLINK_BYTES}-byte limit"
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):   # bad UTF-8 or JSON, or nested absurdly deep
        return "not UTF-8 JSON"
    if not isinstance(body, dict):
        return "not a JSON object"
    kind, upto = body.get("kind"), body.get("upto")
    if kind not in KINDS:
        return f"kind {kind!r} is not one of {', '.join(KINDS)}"
    if not isinstance(upto, int) or isinstance(upto, bool) or upto < 0:
        return f"upto {upto!r:.40} is not a non-negative integer"
    epoch = body.get("epoch")
    if epoch is not None and not isinstance(epoch, str):
        return f"epoch {epoch!r:.40} is not a string"
    return AckMessage(kind, upto, epoch)


def with_epoch(body: bytes, epoch: str) -> bytes:
    """The envelope ``body`` with ``"epoch":"E",`` spliced in after its opening brace
    (agent/outbox/epoch.py): the published bytes only, like ``floor``. ``epoch`` is
    made by :func:`agent.outbox.epoch.new_epoch` (no character needs escaping)."""
    if not epoch or not body.startswith(b'{"'):
        return body
    return b'{"epoch":"%s",' % epoch.encode() + body[1:]


def with_floor(body: bytes, floor: int) -> bytes:
    """The envelope ``body`` with ``"floor":N,`` spliced in after its opening brace.

    ``floor`` says every seq <= N of the kind has left the outbox for good (acked,
    possibly by an earlier HQ store, or declared lost), so an HQ store that never
    saw them can still ack. Only the published bytes carry it: the stored
    envelope, its id, seq and data stay as they are. A body that is not a JSON
    object with keys, or a floor below 1, is returned unchanged.
    """
    if floor < 1 or not body.startswith(b'{"'):
        return body
    return b'{"floor":%d,' % floor + body[1:]


def status_payload(state: str, version: str, now: float) -> bytes:
    """``P/status``: ``{"state": "online"|"offline", "ts", "version"}``."""
    return json.dumps({"state": state, "ts": iso_ms(now), "version": version}).encode()
