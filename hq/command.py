"""HQ's side of ``P/commands/{name}``: send one command to a site, wait for its result.

What an HQ integration does, in one function, for the demo (seeding the
package catalog), the end-to-end tests and benches: subscribe to
``P/command-results``, publish ``{"id", "args"}`` on ``P/commands/{name}``
at QoS 1, and resend the same id until the result for it arrives. Resending
is the protocol, not a workaround: a command published while the agent is not
connected (or before its subscription is in place) reaches no one, and the
agent answers a repeated id with its first result without running it again.

paho is not thread-safe, so the one client lives entirely in the caller's
thread (connect, publish and the network loop), and is closed before return.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import proof
from agent.errors import AgentError

RESEND_S = 1.0


class CommandTimeout(AgentError):
    """No result for the command within the time allowed."""


def send_command(host: str, port: int, topic_root: str, name: str, args: dict[str, Any], *,
                 command_id: str | None = None, timeout: float = 15.0,
                 resend_s: float = RESEND_S, tls: Any = None,
                 auth: tuple[str, str] | None = None,
                 key: bytes | None = None) -> dict[str, Any]:
    """Publish a command and return its result ``{"id", "ok", "result", "error"}``.

    ``topic_root`` is ``P`` (``{topic_prefix}/{site.id}``); ``tls`` a
    :class:`agent.testing.localbroker.TlsFiles` for an mTLS broker; ``key`` the site's key
    (:func:`agent.proof.derive_site_key`), to prove the command came from HQ.
    """
    command_id = command_id or f"hq-{secrets.token_hex(8)}"
    message: dict[str, Any] = {"id": command_id, "args": args}
    if key is not None:
        site = topic_root.rsplit("/", 1)[-1]
        message = proof.sign(key, site, f"commands/{name}", message)
    payload = json.dumps(message).encode()
    results: list[dict[str, Any]] = []
    subscribed: list[bool] = []

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(body, dict) and body.get("id") == command_id:
            results.append(body)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any,
                     props: Any) -> None:
        subscribed.append(True)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hq-cmd-{secrets.token_hex(4)}")
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    if tls is not None:
        client.tls_set(ca_certs=tls.ca, certfile=tls.client_cert, keyfile=tls.client_key)
    if auth is not None:
        client.username_pw_set(auth[0], auth[1] or None)
    deadline = time.monotonic() + timeout
    try:
        client.connect(host, port, keepalive=10)
        client.subscribe(f"{topic_root}/command-results", qos=1)
        while not subscribed:
            _loop(client, deadline, name)
        next_send = 0.0
        while not results:
            if time.monotonic() >= next_send:
                client.publish(f"{topic_root}/commands/{name}", payload, qos=1)
                next_send = time.monotonic() + resend_s
            _loop(client, deadline, name)
        return results[0]
    finally:
        client.disconnect()


def _loop(client: mqtt.Client, deadline: float, name: str) -> None:
    if time.monotonic() > deadline:
        raise CommandTimeout(f"command {name}: no result on command-results in time; is the "
                             "agent connected to this broker?")
    rc = client.loop(timeout=0.05)
    if rc != mqtt.MQTT_ERR_SUCCESS:
        raise CommandTimeout(f"command {name}: MQTT connection lost ({mqtt.error_string(rc)})")
