"""The names the local API answers to (issue 10): a guard against DNS rebinding.

A web page on the internet can make a browser on the store's LAN send requests
to the box by pointing a name it controls at the box's address (DNS rebinding):
the browser then treats the box as that page's own origin and the page reads the
answers. Such a request carries the attacker's name in ``Host``; refusing names
that are not the box's own ends it. The API answers:

- loopback names (``localhost``, ``*.localhost``);
- the box's host name, its fully qualified name, ``HOSTNAME.local`` and the
  name advertised over mDNS (``edge-agent-SITE.local``);
- ``api.bind`` when it is a name or an address;
- any IP address literal (a browser that sends one was pointed at the address
  itself, which no other site can rebind), so a POS configured with the box's
  LAN address keeps working;
- the names in ``api.allowed_hosts`` (a name, ``.domain`` for every name under
  it, or ``*`` to turn the check off).

Anything else is 400 naming ``Host`` and the key; a request without ``Host``
(HTTP/1.0 tools; no browser sends one) is let through.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket

from starlette.types import ASGIApp, Receive, Scope, Send

from agent.config import AgentConfig

log = logging.getLogger(__name__)


def allowed_hosts(cfg: AgentConfig, hostname: str | None = None) -> frozenset[str]:
    """The names (lower case, no port) ``cfg``'s API answers to; ``*`` means any."""
    host = (hostname if hostname is not None else socket.gethostname()).lower().rstrip(".")
    names = {"localhost", host, f"{host}.local", f"edge-agent-{cfg.site.id}.local"}
    if hostname is None:
        with contextlib.suppress(OSError):  # a box without name resolution still serves
            names.add(socket.getfqdn().lower().rstrip("."))
    names.add(cfg.api.bind.lower().strip("[]"))
    names.update(cfg.api.allowed_hosts)
    return frozenset(n for n in names if n)


def host_of(header: str) -> str:
    """The name in a Host header value, lower case, without the port or brackets."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    name, _, _ = value.partition(":") if value.count(":") == 1 else (value, "", "")
    return name.rstrip(".")


def is_allowed(name: str, allowed: frozenset[str]) -> bool:
    if "*" in allowed or name in allowed or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return any(entry.startswith(".") and (name.endswith(entry) or name == entry[1:])
               for entry in allowed)


class HostCheck:
    """ASGI middleware: a request whose Host is not one of ours gets 400 (a WebSocket, 1008)."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed
        self._logged: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"host"), None)
        if header is None:
            await self.app(scope, receive, send)
            return
        name = host_of(header.decode("latin-1"))
        if is_allowed(name, self.allowed):
            await self.app(scope, receive, send)
            return
        if name not in self._logged and len(self._logged) < 100:  # once per name
            self._logged.add(name)
            client = scope.get("client") or ("?", 0)
            log.warning("api: refused Host %r from %s (not one of this box's names; add it to "
                        "api.allowed_hosts if it is)", name[:100], client[0])
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        message = (f"Host: {name[:100]!r} is not a name of this agent; use its address or host "
                   "name, or add the name to api.allowed_hosts")
        body = json.dumps({"error": message, "field": "Host",
                           "problems": [{"field": "Host", "message": message}],
                           "reason": "host_not_allowed"}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
