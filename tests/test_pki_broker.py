"""Certificates from `edge-agent hq pki` through mosquitto's TLS listener and the shipped ACL.

`edge-agent hq install` makes the CA, HQ's and the broker's certificates;
`edge-agent hq pki issue` a site's bundle. A real mosquitto runs the shipped
config/mosquitto/edge-agent.conf (require_certificate, use_identity_as_username)
on those files, with the shipped ACL, and then with only the ACL lines the bundle
lists (plus HQ's block), which must grant and refuse the same.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.testing.localbroker import Broker, TlsFiles, make_tls_files, start_broker
from agent.testing.localsite import edge_agent_argv
from tests.conftest import wait_for
from tests.test_broker_acl import QUIET_S, SHIPPED, Client, marker, shipped_conf

SITE_A, SITE_B = "co-denver-01", "co-boulder-02"
pytestmark = pytest.mark.e2e   # the real edge-agent CLI makes every certificate


def cli(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT")}
    done = subprocess.run([*edge_agent_argv(), *args], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("pki")
    hq = base / "hq"
    cli("hq", "install", "--root", str(hq), "--broker", "127.0.0.1")
    bundles = {}
    for site in (SITE_A, SITE_B):
        cli("hq", "pki", "issue", site, "--root", str(hq), "--out", str(base / site))
        bundles[site] = base / site
    etc = hq / "etc/edge-agent-hq"
    # What the operator copies to the broker's /etc/mosquitto/edge-agent/.
    broker_dir = base / "mosquitto"
    shutil.copytree(etc / "pki/broker", broker_dir)
    tls = TlsFiles(ca=str(broker_dir / "ca.pem"), server_cert=str(broker_dir / "server.pem"),
                   server_key=str(broker_dir / "server.key"),
                   client_cert=str(etc / "hq.pem"), client_key=str(etc / "hq.key"))
    certs = {"hq": (tls.client_cert, tls.client_key)}
    for site, bundle in bundles.items():
        certs[site] = (str(bundle / "site.pem"), str(bundle / "site.key"))
    # A certificate from some other CA, CN = a real site's id: must not get in.
    stranger = make_tls_files(str(base / "stranger"), client_cn=SITE_A)
    certs["stranger"] = (stranger.client_cert, stranger.client_key)
    return {"tls": tls, "certs": certs, "base": base, "bundles": bundles}


def hq_block() -> str:
    """The shipped ACL's `user hq` block (the lines before the site patterns)."""
    text = (SHIPPED / "edge-agent.acl").read_text()
    block = text[text.index("user hq"):text.index("# Every site")]
    return block


@pytest.fixture(scope="module", params=["shipped-acl", "issued-lines"])
def pki_broker(request: pytest.FixtureRequest, pki: dict[str, Any]) -> Iterator[Broker]:
    workdir = pki["base"] / f"broker-{request.param}"
    workdir.mkdir()
    acl = workdir / "edge-agent.acl"
    if request.param == "shipped-acl":
        acl.write_text((SHIPPED / "edge-agent.acl").read_text())
    else:
        acl.write_text(hq_block() + "\n" + "\n".join(
            (bundle / "acl.txt").read_text() for bundle in pki["bundles"].values()))
    broker = start_broker(str(workdir), conf=lambda port: shipped_conf(pki["tls"], port, acl))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def clients(pki_broker: Broker, pki: dict[str, Any]) -> Iterator[dict[str, Client]]:
    made = {who: Client(pki_broker, pki, who, f"{who}-{time.monotonic_ns()}").ready()
            for who in ("hq", SITE_A, SITE_B)}
    try:
        yield made
    finally:
        for c in made.values():
            c.close()


def test_site_certificate_publishes_its_events_to_hq(clients: dict[str, Client]) -> None:
    """A site with its issued certificate reaches HQ on its own events topic; on another
    site's topic its message is dropped (CN = site id is its identity)."""
    hq, a = clients["hq"], clients[SITE_A]
    hq.subscribe("edge/+/events/#")
    forged, real = marker("forged"), marker("real")
    a.publish(f"edge/{SITE_B}/events/sale", forged)
    a.publish(f"edge/{SITE_A}/events/sale", real)
    wait_for(lambda: real in hq.payloads(), timeout=10)
    time.sleep(QUIET_S)  # what must not arrive: listened for after the control arrived
    assert forged not in hq.payloads()


def test_hq_certificate_acks_one_site_only_that_site_reads(clients: dict[str, Client]) -> None:
    """HQ's certificate (CN hq) writes acks; site A reads its own, never site B's."""
    hq, a = clients["hq"], clients[SITE_A]
    a.subscribe(f"edge/{SITE_A}/acks", f"edge/{SITE_B}/acks")
    theirs, mine = marker("b-ack"), marker("a-ack")
    hq.publish(f"edge/{SITE_B}/acks", theirs)
    hq.publish(f"edge/{SITE_A}/acks", mine)
    wait_for(lambda: mine in a.payloads(), timeout=10)
    time.sleep(QUIET_S)
    assert theirs not in a.payloads()


def test_certificate_from_another_ca_is_refused(pki_broker: Broker,
                                                pki: dict[str, Any]) -> None:
    """A certificate naming a real site but signed by another CA gets no session."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="stranger",
                         protocol=mqtt.MQTTv5)
    cert, key = pki["certs"]["stranger"]
    client.tls_set(ca_certs=pki["tls"].ca, certfile=cert, keyfile=key)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    try:
        client.connect("127.0.0.1", pki_broker.port, keepalive=10)
    except OSError:
        return   # refused in the handshake
    client.loop_start()
    try:
        assert not connected.wait(2)
    finally:
        client.loop_stop()
        client.disconnect()
