"""The shipped broker ACL (config/mosquitto/) on a real mosquitto with client certificates.

mosquitto silently drops an unauthorised publish under MQTT 3.1.1 and answers
MQTT 5 QoS 1 with reason 0x87, so every test asserts on what a subscriber that
has the right to read a topic actually receives, waiting with a deadline, with
an authorised message as the control that the subscriber is really listening.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.testing.localbroker import (
    Broker,
    TlsFiles,
    make_client_cert,
    make_tls_files,
    start_broker,
)
from tests.conftest import wait_for

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "mosquitto"
SITE_A, SITE_B = "co-denver-01", "co-boulder-02"
QUIET_S = 1.0   # how long a subscriber listens for what must not arrive, after the control


def shipped_conf(tls: TlsFiles, port: int, acl: Path) -> str:
    """config/mosquitto/edge-agent.conf with this test's port and files."""
    text = (SHIPPED / "edge-agent.conf").read_text()
    text = text.replace("listener 8883", f"listener {port} 127.0.0.1")
    for name, path in (("ca.pem", tls.ca), ("server.pem", tls.server_cert),
                       ("server.key", tls.server_key), ("edge-agent.acl", str(acl))):
        text = text.replace(f"/etc/mosquitto/edge-agent/{name}", path)
    text = text.replace("persistence_location /var/lib/mosquitto/",
                        f"persistence_location {acl.parent}/")
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [line for line in settings if "/etc/" in line or "/var/" in line]
    return text


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, dict[str, Any]]]:
    workdir = tmp_path_factory.mktemp("acl")
    tls = make_tls_files(str(workdir / "tls"), client_cn="hq")
    certs = {"hq": (tls.client_cert, tls.client_key),
             SITE_A: make_client_cert(str(workdir / "tls"), SITE_A),
             SITE_B: make_client_cert(str(workdir / "tls"), SITE_B)}
    acl = workdir / "edge-agent.acl"
    acl.write_text((SHIPPED / "edge-agent.acl").read_text())
    broker = start_broker(str(workdir), conf=lambda port: shipped_conf(tls, port, acl))
    try:
        yield broker, {"tls": tls, "certs": certs}
    finally:
        broker.stop()


class Client:
    """One MQTT 5 client with a certificate; collects what it receives."""

    def __init__(self, broker: Broker, env: dict[str, Any], identity: str | None,
                 name: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.refused: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name,
                                  protocol=mqtt.MQTTv5)
        tls: TlsFiles = env["tls"]
        if identity is None:
            self.client.tls_set(ca_certs=tls.ca)
        else:
            cert, key = env["certs"][identity]
            self.client.tls_set(ca_certs=tls.ca, certfile=cert, keyfile=key)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: (
            self.connected.set() if not rc.is_failure else self.refused.append(str(rc)))
        self.subacks: list[list[Any]] = []
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subacks.append(codes)
        self.client.connect("127.0.0.1", broker.port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.received.append((msg.topic, bytes(msg.payload)))

    def ready(self) -> Client:
        assert self.connected.wait(10), f"not connected: {self.refused}"
        return self

    def subscribe(self, *filters: str) -> None:
        before = len(self.subacks)
        for topic in filters:
            self.client.subscribe(topic, qos=1)
        wait_for(lambda: len(self.subacks) >= before + len(filters), timeout=5)

    def publish(self, topic: str, payload: str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def payloads(self) -> list[str]:
        with self.lock:
            return [p.decode() for _, p in self.received]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def clients(acl_broker: tuple[Broker, dict[str, Any]]) -> Iterator[dict[str, Client]]:
    broker, env = acl_broker
    made = {who: Client(broker, env, who, f"{who}-{time.monotonic_ns()}").ready()
            for who in ("hq", SITE_A, SITE_B)}
    try:
        yield made
    finally:
        for c in made.values():
            c.close()


def marker(what: str) -> str:
    return json.dumps({"marker": what, "n": time.monotonic_ns()})


def test_no_certificate_no_connection(acl_broker: tuple[Broker, dict[str, Any]]) -> None:
    """A client without a certificate never gets a session (require_certificate)."""
    broker, env = acl_broker
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="anon", protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=env["tls"].ca)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    try:
        client.connect("127.0.0.1", broker.port, keepalive=10)
        client.loop_start()
    except OSError:
        return   # refused in the handshake: as good
    try:
        assert not connected.wait(2)
    finally:
        client.loop_stop()
        client.disconnect()


def test_site_cannot_publish_another_sites_events(clients: dict[str, Client]) -> None:
    """Site A's events reach HQ on A's topic; on B's topic they are dropped."""
    hq, a = clients["hq"], clients[SITE_A]
    hq.subscribe("edge/+/events/#")
    forged, real = marker("forged"), marker("real")
    a.publish(f"edge/{SITE_B}/events/sale", forged)
    a.publish(f"edge/{SITE_A}/events/sale", real)
    wait_for(lambda: real in hq.payloads(), timeout=5)
    time.sleep(QUIET_S)  # the forgery would have come first; give it time anyway
    assert forged not in hq.payloads()


def test_site_cannot_publish_its_own_acks_or_commands(clients: dict[str, Client]) -> None:
    """A site's cert cannot write its own P/acks or P/commands; HQ's cert can."""
    hq, a = clients["hq"], clients[SITE_A]
    a.subscribe(f"edge/{SITE_A}/acks", f"edge/{SITE_A}/commands/#")
    forged_ack, forged_cmd = marker("forged-ack"), marker("forged-cmd")
    a.publish(f"edge/{SITE_A}/acks", forged_ack)
    a.publish(f"edge/{SITE_A}/commands/print-label", forged_cmd)
    real_ack, real_cmd = marker("ack"), marker("cmd")
    hq.publish(f"edge/{SITE_A}/acks", real_ack)
    hq.publish(f"edge/{SITE_A}/commands/print-label", real_cmd)
    wait_for(lambda: {real_ack, real_cmd} <= set(a.payloads()), timeout=5)
    time.sleep(QUIET_S)
    assert forged_ack not in a.payloads() and forged_cmd not in a.payloads()


def test_site_cannot_read_another_sites_topics(clients: dict[str, Client]) -> None:
    """Site A subscribed to B's topics (and to everything) gets nothing of B's."""
    hq, a, b = clients["hq"], clients[SITE_A], clients[SITE_B]
    a.subscribe(f"edge/{SITE_B}/#", "edge/#")
    b.subscribe(f"edge/{SITE_B}/acks", f"edge/{SITE_B}/commands/#")
    hq.subscribe("edge/+/events/#")
    for_b = [marker("b-ack"), marker("b-cmd"), marker("b-event")]
    hq.publish(f"edge/{SITE_B}/acks", for_b[0])
    hq.publish(f"edge/{SITE_B}/commands/ping", for_b[1])
    b.publish(f"edge/{SITE_B}/events/sale", for_b[2])
    wait_for(lambda: {for_b[0], for_b[1]} <= set(b.payloads()), timeout=5)
    wait_for(lambda: for_b[2] in hq.payloads(), timeout=5)
    time.sleep(QUIET_S)
    assert not set(for_b) & set(a.payloads())


def test_hq_reads_the_uplink_of_every_site(clients: dict[str, Client]) -> None:
    """HQ's cert reads events, status, health and command-results of any site (its job)."""
    hq, a, b = clients["hq"], clients[SITE_A], clients[SITE_B]
    hq.subscribe("$share/hq/edge/+/events/#", "edge/+/status", "edge/+/health",
                 "edge/+/command-results")
    sent = []
    for client, site in ((a, SITE_A), (b, SITE_B)):
        for topic in ("events/sale", "status", "health", "command-results"):
            body = marker(f"{site}/{topic}")
            client.publish(f"edge/{site}/{topic}", body)
            sent.append(body)
    wait_for(lambda: set(sent) <= set(hq.payloads()), timeout=5)
    # ...but HQ does not read what it writes, nor does a site read its own uplink.
    assert all(not t.endswith("/acks") for t, _ in hq.received)
