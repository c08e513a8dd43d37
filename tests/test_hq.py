"""The HQ receiver, its store and its report (CONTRACT 8), against a real mosquitto."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.envelope import UUIDv7, encode, iso_ms
from agent.errors import AgentError
from agent.testing.localbroker import Broker, make_tls_files, start_broker
from hq import receiver as receiver_mod
from hq.config import HqReceiverConfig
from hq.receiver import HqReceiver
from hq.report import format_report, report_main
from hq.store import EventRow, Reject, SqliteStore, StoreError
from tests.conftest import wait_for

SITE = "co-test-01"
IDS = UUIDv7()
REPO = Path(__file__).resolve().parent.parent
BASE_TS = 1_795_000_000.0  # 2026-11-18


def envelope(seq: int, *, site: str = SITE, kind: str = "sale", ts: float | None = None,
             **extra: Any) -> dict[str, Any]:
    """A decoded v1 envelope, as the receiver hands it to the store."""
    return json.loads(envelope_bytes(seq, site=site, kind=kind, ts=ts, **extra))


_EVENT_IDS: dict[tuple[str, str, int, Any], str] = {}


def event_id_of(site: str, kind: str, seq: int, seq_end: Any = None) -> str:
    """One id per (site, kind, seq), as an agent's resend keeps it (CONTRACT 4); a
    thinned aggregate (``seq_end``) is an event of its own, with its own id."""
    return _EVENT_IDS.setdefault((site, kind, seq, seq_end), IDS.new())


def envelope_bytes(seq: int, *, site: str = SITE, kind: str = "sale", ts: float | None = None,
                   event_id: str | None = None, **extra: Any) -> bytes:
    """An envelope; the same (site, kind, seq) keeps its id unless ``event_id`` is given."""
    return encode(event_id=event_id or event_id_of(site, kind, seq, extra.get("seq_end")),
                  site=site, kind=kind,
                  seq=seq,
                  ts=iso_ms(BASE_TS + seq if ts is None else ts), source="test",
                  data_json=json.dumps({"n": seq}), extra=extra or None)


def hq_config(port: int, db: Path, client_id: str = "hq-test-1", *,
              hosts: Sequence[str] = ("127.0.0.1",), **mqtt_extra: Any) -> HqReceiverConfig:
    return HqReceiverConfig(
        mqtt={"hosts": list(hosts), "port": port, "tls": False, "keepalive_s": 5,
              "backoff_min_s": 0.05, "backoff_max_s": 0.5, "connect_timeout_s": 2.0,
              **mqtt_extra},
        hq={"store": f"sqlite://{db}", "client_id": client_id},
    )


class Site:
    """A plain paho client playing an agent: publishes envelopes, collects acks."""

    def __init__(self, port: int, client_id: str = "test-site", **tls: str) -> None:
        self.acks: list[tuple[str, str, int]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        if tls:
            self.client.tls_set(ca_certs=tls["ca"], certfile=tls["cert"], keyfile=tls["key"])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 5)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        self.acks.append((msg.topic.split("/")[1], body["kind"], body["upto"]))

    def listen_acks(self) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe("edge/+/acks", qos=1)
        assert done.wait(5), "SUBACK for edge/+/acks"

    def publish(self, payload: bytes, *, site: str = SITE, kind: str = "sale",
                topic: str | None = None) -> None:
        info = self.client.publish(topic or f"edge/{site}/events/{kind}", payload, qos=1)
        info.wait_for_publish(5)

    def events(self, seqs: Sequence[int], **kw: Any) -> None:
        for seq in seqs:
            self.publish(envelope_bytes(seq, **kw), site=kw.get("site", SITE),
                         kind=kw.get("kind", "sale"))

    def upto(self, site: str = SITE, kind: str = "sale") -> int:
        return max((u for s, k, u in self.acks if (s, k) == (site, kind)), default=0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def site(broker: Broker) -> Iterator[Site]:
    s = Site(broker.port)
    s.listen_acks()
    yield s
    s.close()


@contextmanager
def running(rx: HqReceiver) -> Iterator[HqReceiver]:
    """Run a receiver in its own thread until the block ends."""
    stop = threading.Event()
    thread = threading.Thread(target=rx.run, args=(stop,), name="hq-receiver", daemon=True)
    thread.start()
    try:
        assert rx.subscribed.wait(10), "the receiver never got its subscription"
        yield rx
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "the receiver did not stop"


def kinds_of(report: Mapping[str, Any], site: str = SITE) -> dict[str, dict[str, Any]]:
    return {k["kind"]: k for s in report["sites"] if s["site"] == site for k in s["kinds"]}


# -- receiver against mosquitto -----------------------------------------------


def test_stores_each_seq_once_and_counts_the_duplicate(broker: Broker, site: Site,
                                                       tmp_path: Path) -> None:
    """A redelivered (site, kind, seq) is stored once and counted under duplicates."""
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db"))
    with running(rx):
        site.events([1, 2, 3])
        site.events([2])
        wait_for(lambda: rx.counters["duplicates"] == 1, what="the duplicate")
        wait_for(lambda: site.upto() == 3, what="ack upto 3")
        assert [e["seq"] for e in rx.store.events(SITE, "sale")] == [1, 2, 3]
        sale = kinds_of(rx.store.report())["sale"]
        assert (sale["received"], sale["duplicates"], sale["gaps"]) == (3, 1, [])
        assert rx.counters["stored"] == 3 and rx.counters["received"] == 4


def test_acks_only_the_contiguous_watermark(broker: Broker, site: Site, tmp_path: Path) -> None:
    """With 1, 2, 4 stored the ack says 2; once 3 arrives it says 4."""
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db"))
    with running(rx):
        site.events([1, 2, 4])
        wait_for(lambda: rx.counters["stored"] == 3, what="three stored")
        wait_for(lambda: site.upto() == 2, what="ack upto 2")
        assert rx.store.watermarks() == {(SITE, "sale", ""): 2}
        assert max(u for _, _, u in site.acks) == 2  # 4 is stored, but not contiguous
        site.events([3])
        wait_for(lambda: site.upto() == 4, what="ack upto 4")
        assert 3 not in {u for _, _, u in site.acks}  # 3 fills the hole: straight to 4
        assert kinds_of(rx.store.report())["sale"]["gaps"] == []


def test_aggregate_seq_end_covers_its_range(broker: Broker, site: Site, tmp_path: Path) -> None:
    """A thinned sensor aggregate (seq 2, seq_end 5) is one row covering 2..5 for the ack."""
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db"))
    with running(rx):
        site.events([1], kind="sensor")
        site.publish(envelope_bytes(2, kind="sensor", seq_end=5), kind="sensor")
        site.events([6], kind="sensor")
        wait_for(lambda: site.upto(kind="sensor") == 6, what="ack upto 6")
        sensor = kinds_of(rx.store.report())["sensor"]
        assert (sensor["received"], sensor["first_seq"], sensor["last_seq"]) == (3, 1, 6)
        assert sensor["gaps"] == []


def test_lost_range_passes_the_watermark_and_is_reported(broker: Broker, site: Site,
                                                         tmp_path: Path) -> None:
    """An event declaring "lost": [3, 5] lets the ack pass 5; the report lists the range."""
    db = tmp_path / "hq.db"
    rx = HqReceiver(hq_config(broker.port, db))
    with running(rx):
        site.events([1, 2])
        site.publish(envelope_bytes(6, lost=[3, 5]))
        wait_for(lambda: site.upto() == 6, what="ack upto 6")
        sale = kinds_of(rx.store.report())["sale"]
        assert sale["lost"] == [[3, 5]] and sale["gaps"] == []
    out = io.StringIO()
    assert report_main(hq_config(broker.port, db), None, None, False, out=out) == 1
    assert "3-5" in out.getvalue()


def test_malformed_messages_are_counted_and_do_not_stop_it(broker: Broker, site: Site,
                                                           tmp_path: Path) -> None:
    """Garbage, a non-object, a bad field and a site/topic mismatch are counted; work goes on."""
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db"))
    with running(rx):
        site.publish(b"\xff not json")
        site.publish(b"[1, 2]")
        site.publish(envelope_bytes(1, seq_end=0))       # seq_end below seq
        site.publish(envelope_bytes(1, site="other-site"))  # envelope says another site
        site.publish(b'{"v": 1}', topic=f"edge/{SITE}/events")  # not .../events/{kind}
        site.events([1])
        wait_for(lambda: site.upto() == 1, what="ack upto 1")
        assert rx.counters["malformed"] == 5
        assert [e["seq"] for e in rx.store.events(SITE, "sale")] == [1]


def test_two_receivers_share_the_subscription_and_the_store(broker: Broker, site: Site,
                                                            tmp_path: Path) -> None:
    """Two receivers on one SQLite file split the shared subscription; the union is complete."""
    db = tmp_path / "hq.db"
    a = HqReceiver(hq_config(broker.port, db, "hq-a"))
    b = HqReceiver(hq_config(broker.port, db, "hq-b"))
    with running(a), running(b):
        site.events(range(1, 201))
        wait_for(lambda: site.upto() == 200, what="ack upto 200")
        assert a.counters["stored"] > 0 and b.counters["stored"] > 0
        assert a.counters["stored"] + b.counters["stored"] == 200
        assert [e["seq"] for e in a.store.events(SITE, "sale")] == list(range(1, 201))


_STUCK_RECEIVER = """
import json, sys, threading, pathlib
from hq.config import HqReceiverConfig
from hq.receiver import HqReceiver
from hq.store import SqliteStore, sqlite_path

cfg = HqReceiverConfig(**json.loads(sys.argv[1]))
marks = pathlib.Path(sys.argv[2])

class StuckStore(SqliteStore):
    def store_batch(self, envelopes, rejects=()):
        (marks / "batch").write_text(str(len(envelopes)))
        threading.Event().wait()  # SIGKILL arrives while the batch is in hand

rx = HqReceiver(cfg, store=StuckStore(sqlite_path(cfg.hq.store)))
threading.Thread(target=rx.run, args=(threading.Event(),), daemon=True).start()
rx.subscribed.wait(10)
(marks / "subscribed").touch()
threading.Event().wait()
"""


def test_receiver_killed_before_storing_loses_nothing(broker: Broker, site: Site,
                                                      tmp_path: Path) -> None:
    """A receiver SIGKILLed holding an unstored batch never PUBACKed it: the broker redelivers."""
    db = tmp_path / "hq.db"
    cfg = hq_config(broker.port, db, "hq-killed")
    args = json.dumps({"mqtt": cfg.mqtt.model_dump(), "hq": cfg.hq.model_dump()})
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", _STUCK_RECEIVER, args, str(tmp_path)],
                                 cwd=REPO, stdout=log, stderr=log)
    try:
        wait_for(lambda: (tmp_path / "subscribed").exists() or child.poll() is not None,
                 timeout=20, what="the child receiver to subscribe")
        assert child.poll() is None, (tmp_path / "child.log").read_text()
        site.events(range(1, 21))
        wait_for(lambda: (tmp_path / "batch").exists(), what="the child to take a batch")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert SqliteStore(str(db)).events(SITE, "sale") == []
    assert site.upto() == 0
    rx = HqReceiver(cfg)
    with running(rx):
        wait_for(lambda: site.upto() == 20, what="ack upto 20 after the restart")
        assert [e["seq"] for e in rx.store.events(SITE, "sale")] == list(range(1, 21))


class FailingOnceStore(SqliteStore):
    """A store whose first write fails, as a full disk would make it."""

    failed = False

    def store_batch(self, envelopes: Sequence[Mapping[str, Any] | EventRow],
                    rejects: Sequence[Reject] = ()) -> dict[tuple[str, str, str], int]:
        if not self.failed:
            self.failed = True
            raise StoreError(self.path, "disk I/O error")
        return super().store_batch(envelopes, rejects)


def test_store_failure_is_not_acked_and_is_redelivered(broker: Broker, site: Site,
                                                       tmp_path: Path) -> None:
    """When a batch cannot be stored it is not PUBACKed; the reconnect brings it back."""
    store = FailingOnceStore(str(tmp_path / "hq.db"))
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db"), store=store)
    with running(rx):
        site.events([1, 2, 3])
        wait_for(lambda: site.upto() == 3, what="ack upto 3")
        assert rx.counters["store_failures"] == 1
        assert [e["seq"] for e in store.events(SITE, "sale")] == [1, 2, 3]
    store.close()


def test_watermark_is_republished_for_a_recent_site(broker: Broker, site: Site, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A site that missed its ack (not listening then) gets it again within a second or so."""
    monkeypatch.setattr(receiver_mod, "REPUBLISH_INTERVAL_S", 0.2)
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db"))
    deaf = Site(broker.port, "deaf-site")
    try:
        with running(rx):
            deaf.events([1])
            # `site` listens all along: once it has the ack, the broker has routed it.
            wait_for(lambda: site.upto() == 1, what="the first ack")
            deaf.listen_acks()
            wait_for(lambda: deaf.upto() == 1, what="the re-published ack")
    finally:
        deaf.close()


def _mqtt_packet(first: int, body: bytes) -> bytes:
    size, length = bytearray(), len(body)
    while True:
        byte, length = length & 0x7F, length >> 7
        size.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([first]) + bytes(size) + body


def _mqtt_str(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


class Flood:
    """Sites that each push a whole backlog (QoS 1) onto the broker as fast as TCP takes
    it: one raw MQTT 5 connection a site, the PUBLISH packets prebuilt."""

    def __init__(self, port: int, sites: Sequence[str], per_site: int) -> None:
        self.socks: list[socket.socket] = []
        self.backlogs: list[bytes] = []
        for site in sites:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(_mqtt_packet(0x10, _mqtt_str(b"MQTT") + b"\x05\x02\x00\x00"
                                      + b"\x03\x21\xff\xff" + _mqtt_str(b"flood-" + site.encode())))
            assert sock.recv(64)[:1] == b"\x20", f"CONNACK for {site}"
            self.socks.append(sock)
            topic = f"edge/{site}/events/sale".encode()
            self.backlogs.append(b"".join(
                _mqtt_packet(0x32, _mqtt_str(topic) + struct.pack("!H", seq) + b"\x00"
                             + envelope_bytes(seq, site=site)) for seq in range(1, per_site + 1)))
        self.threads = [threading.Thread(target=self._drain, args=(s,), daemon=True)
                        for s in self.socks]
        for t in self.threads:
            t.start()

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while sock.recv(65536):   # the broker's PUBACKs
                pass

    def push(self) -> None:
        pushers = [threading.Thread(target=s.sendall, args=(b,), daemon=True)
                   for s, b in zip(self.socks, self.backlogs, strict=True)]
        for t in pushers:
            t.start()

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")
            sock.close()


class TimedStore(SqliteStore):
    """A real store that notes when each stream's watermark first reached each height."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.reached: dict[str, list[tuple[float, int]]] = {}

    def store_batch(self, envelopes: Sequence[Mapping[str, Any] | EventRow],
                    rejects: Sequence[Reject] = ()) -> dict[tuple[str, str, str], int]:
        marks = super().store_batch(envelopes, rejects)
        now = time.monotonic()
        for (site, _, _), upto in marks.items():
            self.reached.setdefault(site, []).append((now, upto))
        return marks


def test_acks_keep_pace_with_the_store_under_a_backlog(broker: Broker, tmp_path: Path) -> None:
    """Under a flood of backlogs each site's first ack arrives while the store is still early
    in the flood, however small mqtt.max_inflight is: acks wait for no PUBACK (QoS 0)."""
    sites = [f"co-flood-{i:02d}" for i in range(20)]
    per_site = 1500
    total = len(sites) * per_site
    store = TimedStore(str(tmp_path / "hq.db"))
    # One QoS 1 ack in flight at a time: before, each ack waited for the PUBACK of the
    # one before it, which the broker sends behind every event it is flooding us with.
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db", max_inflight=1), store=store)
    arrived: dict[str, list[tuple[float, int, int]]] = {}   # site: (when, upto, stored then)
    listener = Site(broker.port, "ack-listener")

    def on_ack(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        arrived.setdefault(msg.topic.split("/")[1], []).append(
            (time.monotonic(), json.loads(msg.payload)["upto"], rx.counters["stored"]))

    listener.client.on_message = on_ack
    listener.listen_acks()
    flood = Flood(broker.port, sites, per_site)
    try:
        with running(rx):
            flood.push()
            wait_for(lambda: all(max((a[1] for a in arrived.get(s, [])), default=0) == per_site
                                 for s in sites), timeout=60, what="every site acked to the end")
    finally:
        flood.close()
        listener.close()
        store.close()
    # How far the store had got when each site heard its first ack, and how long after
    # the store reached that ack's watermark.
    stored_then = {s: arrived[s][0][2] for s in sites}
    lags = {}
    for site in sites:
        when, upto, _ = arrived[site][0]
        lags[site] = round(when - next(t for t, m in store.reached[site] if m >= upto), 3)
    assert max(stored_then.values()) <= total // 2, (stored_then, lags)
    assert max(lags.values()) < 5.0, lags


def test_acks_fall_back_to_the_events_connection_while_the_ack_link_is_down(
        broker: Broker, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another client taking the ack link's id knocks the link off: acks keep coming on the
    events connection (QoS 0) until the link is back, and then on the link again."""
    monkeypatch.setattr(receiver_mod, "ACK_LINK_RETRY_S", 0.2)
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db"))
    with running(rx):
        wait_for(lambda: rx._link_ready, what="the ack link up")
        site.events([1])
        wait_for(lambda: site.upto() == 1, what="ack upto 1 on the link")
        # Keep the link's client id taken: each reconnect of the link knocks the intruder
        # off, and the intruder's own reconnect knocks the link off again.
        intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=rx.client_id + "-acks",
                               protocol=mqtt.MQTTv5)
        intruder.connect("127.0.0.1", broker.port, 5)
        intruder.loop_start()
        try:
            wait_for(lambda: not rx._link_ready, what="the ack link knocked off")
            site.events([2, 3])
            wait_for(lambda: site.upto() == 3, what="ack upto 3 without the link")
        finally:
            intruder.disconnect()
            intruder.loop_stop()
        wait_for(lambda: rx._link_ready, what="the ack link back")
        site.events([4])
        wait_for(lambda: site.upto() == 4, what="ack upto 4")


def test_without_the_ack_link_acks_go_at_qos_0_on_the_events_connection(
        broker: Broker, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ACK_LINK off: the events connection carries the acks, at QoS 0, to the end."""
    monkeypatch.setattr(receiver_mod, "ACK_LINK", False)
    qos: list[int] = []
    on_message = site.client.on_message

    def spy(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        qos.append(msg.qos)
        on_message(client, userdata, msg)

    site.client.on_message = spy
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db"))
    with running(rx):
        site.events(range(1, 51))
        wait_for(lambda: site.upto() == 50, what="ack upto 50")
    assert rx._link is None and set(qos) == {0}


def test_fails_over_to_the_next_host(broker: Broker, site: Site, tmp_path: Path) -> None:
    """A host that refuses connections is skipped for the next one in mqtt.hosts."""
    cfg = hq_config(broker.port, tmp_path / "hq.db", hosts=("127.0.0.2", "127.0.0.1"))
    rx = HqReceiver(cfg)
    with running(rx):
        site.events([1])
        wait_for(lambda: site.upto() == 1, what="ack upto 1")


def test_resubscribes_after_the_broker_restarts(broker: Broker, tmp_path: Path) -> None:
    """A broker restart (sessions gone) is followed by reconnect and a fresh subscription."""
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db"))
    with running(rx):
        broker.restart()
        wait_for(lambda: rx.counters["connects"] >= 2 and rx.subscribed.is_set(),
                 what="reconnect and resubscribe")
        s = Site(broker.port)
        try:
            s.listen_acks()
            s.events([1, 2])
            wait_for(lambda: s.upto() == 2, what="ack upto 2")
        finally:
            s.close()


def test_mutual_tls(tmp_path: Path) -> None:
    """With [mqtt] tls and a client certificate, the receiver works against a mTLS broker."""
    tls = make_tls_files(str(tmp_path / "tls"), client_cn="edge-hq")
    b = start_broker(str(tmp_path), tls=tls)
    try:
        cfg = hq_config(b.port, tmp_path / "hq.db", tls=True, ca_file=tls.ca,
                        cert_file=tls.client_cert, key_file=tls.client_key)
        s = Site(b.port, ca=tls.ca, cert=tls.client_cert, key=tls.client_key)
        try:
            s.listen_acks()
            with running(HqReceiver(cfg)) as rx:
                s.events(range(1, 51))
                wait_for(lambda: s.upto() == 50, what="ack upto 50 over TLS")
                assert rx.counters["stored"] == 50
        finally:
            s.close()
    finally:
        b.stop()


def test_bad_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    """A CA file that does not exist fails at construction, naming the key."""
    cfg = hq_config(1, tmp_path / "hq.db", tls=True, ca_file=str(tmp_path / "nope.pem"))
    with pytest.raises(AgentError, match=r"mqtt\.ca_file"):
        HqReceiver(cfg)


# -- store and report ---------------------------------------------------------


def test_stores_on_one_file_see_each_others_watermarks(tmp_path: Path) -> None:
    """Watermarks come from the database, so two stores on one file advance each other's."""
    a = SqliteStore(str(tmp_path / "hq.db"))
    b = SqliteStore(str(tmp_path / "hq.db"))
    assert a.store_batch([envelope(1), envelope(3)]) == {(SITE, "sale", ""): 1}
    assert b.store_batch([envelope(2)]) == {(SITE, "sale", ""): 3}
    assert a.store_batch([envelope(4)]) == {(SITE, "sale", ""): 4}
    assert a.watermarks() == b.watermarks() == {(SITE, "sale", ""): 4}


def test_report_json_has_the_contract_shape(tmp_path: Path) -> None:
    """--json prints CONTRACT 8's keys (plus extras); a gap gives exit 1 and says since when."""
    db = tmp_path / "hq.db"
    clock = iter([BASE_TS + 100, BASE_TS + 200, BASE_TS + 300]).__next__
    store = SqliteStore(str(db), clock=clock)
    store.store_batch([envelope(1), envelope(2), envelope(2, kind="plant")])
    store.store_batch([envelope(5), envelope(2)])
    store.close()
    out = io.StringIO()
    code = report_main(hq_config(1, db), None, None, True, out=out, now=BASE_TS + 1000)
    report = json.loads(out.getvalue())
    assert code == 1
    assert set(report) >= {"sites"}
    [entry] = report["sites"]
    assert set(entry) == {"site", "kinds"} and entry["site"] == SITE
    contract = {"kind", "received", "first_seq", "last_seq", "gaps", "duplicates"}
    assert all(contract <= set(k) for k in entry["kinds"])
    plant, sale = entry["kinds"]  # sorted by kind
    assert {k: sale[k] for k in contract} == {"kind": "sale", "received": 3, "first_seq": 1,
                                              "last_seq": 5, "gaps": [[3, 4]],
                                              "duplicates": 1}
    assert plant["gaps"] == [] and plant["first_seq"] == 2
    assert sale["gap_since"] == iso_ms(BASE_TS + 200)  # when seq 5 showed up without 3, 4
    assert sale["lost"] == [] and sale["acked_upto"] == 2
    assert sale["newest_ts"] == iso_ms(BASE_TS + 5) and sale["newest_age_s"] == 995.0
    assert "3-4 (since" in format_report(report)


def test_report_exits_0_when_complete(tmp_path: Path) -> None:
    """No gap and nothing lost: exit 0 and a table that says so."""
    db = tmp_path / "hq.db"
    SqliteStore(str(db)).store_batch([envelope(1), envelope(2)])
    out = io.StringIO()
    assert report_main(hq_config(1, db), SITE, None, False, out=out) == 0
    assert "no gaps" in out.getvalue()


def test_report_since_filters_by_event_time(tmp_path: Path) -> None:
    """--since keeps events whose ts is at or after it, for counts, ranges and gaps."""
    store = SqliteStore(str(tmp_path / "hq.db"))
    day = 86400.0
    store.store_batch([envelope(1, ts=BASE_TS), envelope(2, ts=BASE_TS + day),
                       envelope(4, ts=BASE_TS + day + 60), envelope(1, kind="plant", ts=BASE_TS)])
    since = iso_ms(BASE_TS + day)[:10]  # the date of the second day
    report = store.report(since=since)
    assert report["since"] == since + "T00:00:00.000Z"
    sale = kinds_of(report)["sale"]
    assert (sale["received"], sale["first_seq"], sale["last_seq"]) == (2, 2, 4)
    assert sale["gaps"] == [[3, 3]]
    assert "plant" not in kinds_of(report)
    assert kinds_of(store.report())["sale"]["received"] == 3
    assert kinds_of(store.report(site="nobody")) == {}


def test_report_bad_store_or_since_exits_2(tmp_path: Path) -> None:
    """A missing store, a foreign SQLite file, or a bad --since: exit 2 with a clear message."""
    err = io.StringIO()
    assert report_main(hq_config(1, tmp_path / "missing.db"), None, None, False, err=err) == 2
    assert "no such file" in err.getvalue()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE cache (key, value)")
    err = io.StringIO()
    assert report_main(hq_config(1, other), None, None, False, err=err) == 2
    assert "not an HQ store" in err.getvalue()
    with pytest.raises(StoreError, match="not an HQ store"):
        SqliteStore(str(other))  # never adds tables to someone else's database
    err = io.StringIO()
    assert report_main(hq_config(1, other), None, "yesterday", False, err=err) == 2
    assert "--since 'yesterday'" in err.getvalue()


def test_store_creates_parent_directories_in_wal_mode(tmp_path: Path) -> None:
    """A store path in directories that do not exist yet is created, in WAL mode."""
    path = tmp_path / "a" / "b" / "hq.db"
    SqliteStore(str(path)).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert os.path.exists(path)
