"""Status tells the truth (issue 10): outages counted from the first failure, named causes,
stalled acks, and the same answer in /metrics and the page's HQ banner."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig
from agent.ops.metrics import ApiMetrics
from agent.ops.status import build_status
from agent.outbox import Outbox
from agent.testing.localbroker import Broker, free_port
from agent.uplink import DeliveryLedger, Uplink
from agent.web.page import hq_link
from tests.conftest import wait_for

SITE = "t-truth"
ROOT = f"edge/{SITE}"


def config(port: int, **mqtt_keys: Any) -> AgentConfig:
    keys: dict[str, Any] = {"hosts": ["127.0.0.1"], "port": port, "tls": False,
                            "keepalive_s": 5, "backoff_min_s": 0.05, "backoff_max_s": 0.3,
                            "connect_timeout_s": 1.0, "ack_timeout_s": 30.0,
                            "down_grace_s": 1.0}
    keys.update(mqtt_keys)
    return AgentConfig(site={"id": SITE}, mqtt=keys)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(str(tmp_path / "outbox"), SITE, max_bytes=1 << 26)
    box.open()
    try:
        yield box
    finally:
        box.close()


@pytest.fixture
def make_uplink() -> Iterator[Callable[[AgentConfig, Outbox], Uplink]]:
    made: list[Uplink] = []

    def make(cfg: AgentConfig, outbox: Outbox) -> Uplink:
        up = Uplink(cfg, outbox, version="9.9.9")
        up.start()
        made.append(up)
        return up

    yield make
    for up in made:
        up.stop()


def status_of(cfg: AgentConfig, outbox: Outbox, up: Uplink) -> dict[str, Any]:
    src = SimpleNamespace(cfg=cfg, outbox=outbox, uplink_snapshot=up.snapshot,
                          devices_snapshot=list, started_at=time.time() - 3600)
    return build_status(src)  # type: ignore[arg-type]


def codes(status: dict[str, Any]) -> list[str]:
    return [r.split(":", 1)[0] for r in status["reasons"]]


def submit_sales(outbox: Outbox, n: int) -> None:
    for f in [outbox.submit("sale", json.dumps({"n": i}), "test") for i in range(n)]:
        f.result(timeout=30)


# --------------------------------------------------------------------------- pure parts


def test_ack_wait_survives_resends_and_reconnects_and_clears_on_the_ack() -> None:
    """The ack wait starts with the first unacked send; a rewind (resend, reconnect) keeps it;
    an ack that covers everything sent ends it, a partial ack restarts it."""
    ledger = DeliveryLedger({}, max_inflight=100, hq_ack=True, ack_timeout_s=5, hold_min_s=0.1)
    assert ledger.ack_waits(0.0) == {}
    for seq in (1, 2, 3):
        ledger.record_sent("sale", seq, 10.0)
    ledger.rewind("sale")                 # ack timeout: resent from seq 1
    ledger.record_sent("sale", 1, 16.0)
    ledger.rewind_all()                   # a reconnect
    ledger.record_sent("sale", 1, 30.0)
    assert ledger.ack_waits(40.0) == {"sale": 30.0}
    assert ledger.hq_acked("sale", 2, 41.0)
    assert ledger.ack_waits(43.0) == {"sale": 2.0}
    assert ledger.hq_acked("sale", 3, 44.0)
    assert ledger.ack_waits(50.0) == {}


def test_page_banner_and_metrics_say_what_status_says(outbox: Outbox) -> None:
    """Stalled acks make the HQ banner unreachable with the status's words; /metrics carries
    degraded, the reason codes and the outage's age."""
    now = time.time()
    connected = {"state": "connected", "host": "hq:8883", "last_ack_ts": now - 1}
    stalled = ["acks_stalled: HQ has acknowledged no sale event for 75 s while 3 wait"]
    view = hq_link(connected, {"sale": {"depth": 3, "oldest_age_s": 2.0}}, 30, now, stalled)
    assert view["reachable"] is False and "acknowledged no sale event for 75 s" in view["detail"]
    assert view["message"] == "HQ is not confirming what this box sends"
    down = hq_link({"state": "connecting", "cause": "keepalive_timeout",
                    "last_error": "keepalive timeout: no answer"}, {}, 30, now, [])
    assert "keepalive timeout" in down["detail"] and not down["reachable"]

    snapshot = {"state": "connecting", "down_since": now - 90.0}
    status = {"state": "degraded", "reasons": ["uplink_down: 90 s", *stalled],
              "uplink": snapshot}
    metrics = ApiMetrics(outbox, lambda: snapshot, clock=lambda: now, status=lambda: status)
    samples = {(s.name, tuple(s.labels.values())): s.value
               for fam in text_string_to_metric_families(generate_latest(metrics.registry)
                                                         .decode())
               for s in fam.samples}
    assert samples[("edge_status_degraded", ())] == 1.0
    assert samples[("edge_status_reasons", ("uplink_down",))] == 1.0
    assert samples[("edge_status_reasons", ("acks_stalled",))] == 1.0
    assert samples[("edge_status_reasons", ("device_down",))] == 0.0
    assert samples[("edge_uplink_down_seconds", ())] == pytest.approx(90.0)


# --------------------------------------------------------------------------- a real broker


def test_outage_is_counted_from_the_first_failure(broker: Broker, outbox: Outbox,
                                                  make_uplink: Any) -> None:
    """Broker gone: reconnect attempts every ~0.3 s do not restart the outage, so status is
    degraded once down_grace_s has passed, naming the cause; healthy again once back."""
    cfg = config(broker.port)
    up = make_uplink(cfg, outbox)
    wait_for(lambda: up.snapshot()["state"] == "connected", what="connected")
    assert status_of(cfg, outbox, up)["state"] == "healthy"
    broker.kill()
    first = wait_for(lambda: up.snapshot()["down_since"], what="the outage noticed")
    status = wait_for(lambda: (s := status_of(cfg, outbox, up))["state"] == "degraded" and s,
                      timeout=10, what="degraded after the grace")
    assert codes(status) == ["uplink_down"]
    assert "cause: connection refused" in status["reasons"][0]
    assert up.snapshot()["reconnects"] == 0 and up.snapshot()["down_since"] == first
    assert up.snapshot()["cause"] == "refused"
    broker.start()
    wait_for(lambda: status_of(cfg, outbox, up)["state"] == "healthy", timeout=15,
             what="healthy after the broker returns")
    assert up.snapshot()["down_since"] is None and up.snapshot()["cause"] is None


@pytest.mark.slow
def test_a_stalled_broker_is_our_keepalive_timeout(broker: Broker, outbox: Outbox,
                                                  make_uplink: Any) -> None:
    """A SIGSTOPped broker (a partition: the TCP connection stays up) ends in our keepalive
    timeout, named as such, not blamed on the broker; status degraded; fine after SIGCONT."""
    cfg = config(broker.port)
    up = make_uplink(cfg, outbox)
    wait_for(lambda: up.snapshot()["state"] == "connected", what="connected")
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        snap = wait_for(lambda: (s := up.snapshot())["state"] != "connected" and s, timeout=20,
                        what="the keepalive timeout")
        assert snap["cause"] == "keepalive_timeout"
        assert "keepalive timeout" in snap["last_error"]
        assert "by the broker" not in snap["last_error"]
        status = wait_for(lambda: (s := status_of(cfg, outbox, up))["state"] == "degraded" and s,
                          timeout=10, what="degraded during the partition")
        assert codes(status) == ["uplink_down"]
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    wait_for(lambda: status_of(cfg, outbox, up)["state"] == "healthy", timeout=20,
             what="healthy after the partition")


def test_acks_that_stop_advancing_degrade_status(broker: Broker, outbox: Outbox,
                                                 make_uplink: Any) -> None:
    """Connected, sales sent, no HQ ack for 2 x ack_timeout_s (resends included): degraded
    with acks_stalled; an ack covering them makes status healthy again."""
    cfg = config(broker.port, ack_timeout_s=0.5)
    up = make_uplink(cfg, outbox)
    wait_for(lambda: up.snapshot()["state"] == "connected", what="connected")
    submit_sales(outbox, 3)
    status = wait_for(lambda: (s := status_of(cfg, outbox, up))["state"] == "degraded" and s,
                      timeout=10, what="acks_stalled")
    assert codes(status) == ["acks_stalled"]
    assert "no sale event" in status["reasons"][0] and "3 wait" in status["reasons"][0]
    assert up.snapshot()["resends"] >= 1   # the ack timeout resent them meanwhile
    hq = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hq-{free_port()}",
                     protocol=mqtt.MQTTv5)
    hq.connect("127.0.0.1", broker.port)
    hq.loop_start()
    try:
        hq.publish(f"{ROOT}/acks", json.dumps({"kind": "sale", "upto": 3}), qos=1)
        wait_for(lambda: status_of(cfg, outbox, up)["state"] == "healthy", timeout=10,
                 what="healthy after HQ's ack")
    finally:
        hq.disconnect()
        hq.loop_stop()
