"""The shipped production broker config (config/mosquitto/edge-agent.conf) beyond its ACL:
persistence across a restart and queues sized for an HQ outage, on a real mosquitto."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig
from agent.testing.localbroker import Broker, make_client_cert, make_tls_files, start_broker
from tests.conftest import wait_for
from tests.test_broker_acl import SHIPPED, Client, shipped_conf

SITE = "co-denver-01"
CONF = (SHIPPED / "edge-agent.conf").read_text()


def setting(name: str) -> int:
    match = re.search(rf"^{name} (\d+)$", CONF, re.M)
    assert match, f"edge-agent.conf sets no {name}"
    return int(match.group(1))


def test_queue_arithmetic_in_the_comment_holds() -> None:
    """max_queued_messages covers the comment's fleet (sites x the agent's default
    max_inflight, plus status and health), with the agent's real default."""
    match = re.search(r"= (\d+) sites x (\d+) = ([\d,]+) events", CONF)
    assert match, "the sizing comment is gone"
    sites, window, total = int(match[1]), int(match[2]), int(match[3].replace(",", ""))
    assert window == MqttConfig().max_inflight
    assert total == sites * window
    assert setting("max_queued_messages") >= total + sites * 5
    assert setting("max_queued_bytes") >= setting("max_queued_messages") * 1024
    assert "persistence true" in CONF


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[Broker, dict[str, Any]]]:
    tls = make_tls_files(str(tmp_path / "tls"), client_cn="hq")
    certs = {"hq": (tls.client_cert, tls.client_key),
             SITE: make_client_cert(str(tmp_path / "tls"), SITE)}
    acl = tmp_path / "edge-agent.acl"
    acl.write_text((SHIPPED / "edge-agent.acl").read_text())
    running = start_broker(str(tmp_path), conf=lambda port: shipped_conf(tls, port, acl))
    try:
        yield running, {"tls": tls, "certs": certs}
    finally:
        running.stop()


def persistent_hq(broker: Broker, env: dict[str, Any]) -> mqtt.Client:
    """HQ's receiver with hq.client_id set: a persistent MQTT 5 session."""
    received: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edge-hq-persistent",
                         protocol=mqtt.MQTTv5)
    cert, key = env["certs"]["hq"]
    client.tls_set(ca_certs=env["tls"].ca, certfile=cert, keyfile=key)
    client.user_data_set(received)
    client.on_message = lambda c, u, m: u.append(bytes(m.payload))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 7 * 24 * 3600
    client.connect("127.0.0.1", broker.port, keepalive=10, clean_start=False, properties=props)
    client.loop_start()
    return client


def test_hq_session_gets_an_outage_worth_of_events_after_a_broker_restart(
        broker: tuple[Broker, dict[str, Any]]) -> None:
    """HQ's persistent session is offline while a site publishes 5,000 events (more than
    mosquitto's default queue of 1000) and the broker restarts; when HQ comes back,
    every event is delivered: the queue is sized for it and persisted."""
    running, env = broker
    hq = persistent_hq(running, env)
    subscribed: list[int] = []
    hq.on_subscribe = lambda c, u, mid, codes, p: subscribed.append(mid)
    hq.subscribe("$share/hq/edge/+/events/#", qos=1)
    wait_for(lambda: subscribed, timeout=10)
    hq.loop_stop()
    hq.disconnect()
    site = Client(running, env, SITE, f"edge-{SITE}").ready()
    count = 5000
    try:
        infos = [site.client.publish(f"edge/{SITE}/events/sale", f'{{"seq":{n}}}', qos=1)
                 for n in range(1, count + 1)]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        site.close()
    running.restart()   # SIGTERM: mosquitto writes its persistence file, then starts on it
    back = persistent_hq(running, env)
    try:
        received: list[bytes] = back.user_data_get()
        wait_for(lambda: len(received) >= count, timeout=60)
        seqs = {int(p.decode().split(":")[1].rstrip("}")) for p in received}
        assert seqs == set(range(1, count + 1))
    finally:
        back.loop_stop()
        back.disconnect()


def test_retained_site_status_survives_a_broker_restart(
        broker: tuple[Broker, dict[str, Any]]) -> None:
    """A site's retained P/status is still there after a restart (HQ's fleet view)."""
    running, env = broker
    site = Client(running, env, SITE, f"edge-{SITE}").ready()
    try:
        site.publish(f"edge/{SITE}/status", '{"state":"online"}', retain=True)
    finally:
        site.close()
    running.restart()
    hq = Client(running, env, "hq", f"hq-{time.monotonic_ns()}").ready()
    try:
        hq.subscribe(f"edge/{SITE}/status")
        wait_for(lambda: '{"state":"online"}' in hq.payloads(), timeout=10)
    finally:
        hq.close()
