"""The MQTT uplink against a real mosquitto: delivery, acks, resends, failover, TLS, priority."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig
from agent.kinds import KINDS
from agent.outbox import Outbox
from agent.testing.localbroker import Broker, free_port, make_tls_files, start_broker
from agent.uplink import DeliveryLedger, Uplink, parse_ack, split_host, with_epoch
from agent.uplink.ledger import ACK_BACKOFF_MAX_FACTOR, backed_off_ack_wait
from tests.conftest import wait_for

SITE = "t-site"
ROOT = f"edge/{SITE}"


# --------------------------------------------------------------------------- outbox


@pytest.fixture
def make_outbox(tmp_path: Path) -> Iterator[Callable[[], Outbox]]:
    made: list[Outbox] = []

    def make() -> Outbox:
        box = Outbox(str(tmp_path / f"outbox{len(made)}"), SITE, max_bytes=1 << 28)
        box.open()
        made.append(box)
        return box

    yield make
    for box in made:
        box.close()


@pytest.fixture
def outbox(make_outbox: Callable[[], Outbox]) -> Outbox:
    return make_outbox()


def submit(outbox: Any, kind: str, n: int, start: int = 0) -> None:
    futures = [outbox.submit(kind, json.dumps({"n": start + i}), "test") for i in range(n)]
    for f in futures:
        f.result(timeout=30)


def depth(outbox: Any, kind: str) -> int:
    return int(outbox.stats()[kind].depth)


# --------------------------------------------------------------------------- HQ played by the test


class Hq:
    """A subscriber on P/#: records events, status and results; acks like HQ when asked."""

    def __init__(self, port: int, *, ack: bool = False) -> None:
        self.ack = ack
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[tuple[float, str, int]] = []   # (monotonic, kind, seq)
        self.raw: list[bytes] = []
        self.status: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.health: list[dict[str, Any]] = []
        self.stored: dict[str, set[int]] = {k: set() for k in KINDS}
        self.watermark = dict.fromkeys(KINDS, 0)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hq-{free_port()}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{ROOT}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        wait_for(self.client.is_connected, what="test HQ connected")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        with self.lock:
            if "/events/" in topic:
                env = json.loads(msg.payload)
                self.events.append(env)
                self.arrivals.append((time.monotonic(), env["kind"], env["seq"]))
                self.raw.append(msg.payload)
                kind = env["kind"]
                self.stored[kind].add(env["seq"])
                while self.watermark[kind] + 1 in self.stored[kind]:
                    self.watermark[kind] += 1
                if self.ack:
                    self.send_ack(kind, self.watermark[kind])
            elif topic.endswith("/status"):
                self.status.append(json.loads(msg.payload) | {"retain": msg.retain})
            elif topic.endswith("/command-results"):
                self.results.append(json.loads(msg.payload))
            elif topic.endswith("/health"):
                self.health.append(json.loads(msg.payload) | {"qos": msg.qos})

    def send_ack(self, kind: str, upto: int) -> None:
        self.client.publish(f"{ROOT}/acks", json.dumps({"kind": kind, "upto": upto}), qos=1)

    def arrived(self, kind: str, seq: int) -> list[float]:
        """When each copy of ``kind`` ``seq`` reached the test HQ (monotonic)."""
        with self.lock:
            return [t for t, k, s in self.arrivals if k == kind and s == seq]

    def seqs(self, kind: str) -> list[int]:
        with self.lock:
            return [e["seq"] for e in self.events if e["kind"] == kind]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def make_hq() -> Iterator[Callable[..., Hq]]:
    made: list[Hq] = []

    def make(port: int, **kw: Any) -> Hq:
        made.append(Hq(port, **kw))
        return made[-1]

    yield make
    for hq in made:
        hq.close()


def config(port: int, **mqtt_keys: Any) -> AgentConfig:
    keys: dict[str, Any] = {"hosts": ["127.0.0.1"], "port": port, "tls": False,
                            "keepalive_s": 5, "backoff_min_s": 0.05, "backoff_max_s": 0.3,
                            "connect_timeout_s": 2.0, "ack_timeout_s": 30.0}
    keys.update(mqtt_keys)
    return AgentConfig(site={"id": SITE}, mqtt=keys)


@pytest.fixture
def make_uplink() -> Iterator[Callable[..., Uplink]]:
    made: list[Uplink] = []

    def make(cfg: AgentConfig, outbox: Any, **kw: Any) -> Uplink:
        up = Uplink(cfg, outbox, version="9.9.9", **kw)
        up.start()
        made.append(up)
        return up

    yield make
    for up in made:
        up.stop()


def connected(up: Uplink) -> bool:
    return bool(up.snapshot()["state"] == "connected")


# --------------------------------------------------------------------------- a TCP proxy we can cut


class TcpProxy:
    """Forwards a local port to the broker; ``cut()`` resets every live connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                pipe = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                self.threads.append(pipe)
                pipe.start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            # shutdown() first: close() alone does not wake the pipe thread blocked in recv().
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone does not.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.cut()
        for thread in self.threads:
            thread.join(5)


# --------------------------------------------------------------------------- pure parts


def test_ledger_keeps_room_for_sales_when_sensors_fill_the_window() -> None:
    """Bulk kinds may not use the reserved part of the window; sales may."""
    ledger = DeliveryLedger({}, max_inflight=16, hq_ack=True, ack_timeout_s=5, hold_min_s=1)
    for seq in range(1, 15):
        ledger.record_sent("sensor", seq, now=0.0)
    assert ledger.allowance("sensor", 0.0, last_seq=100) == 0
    assert ledger.allowance("sale", 0.0, last_seq=1) == 2


def test_ledger_broker_ack_deletes_only_the_contiguous_prefix() -> None:
    """In broker-ack mode a PUBACK out of order does not delete past a gap."""
    ledger = DeliveryLedger({}, max_inflight=10, hq_ack=False, ack_timeout_s=5, hold_min_s=1)
    e1, e2, e3 = (ledger.record_sent("sale", s, 0.0) for s in (1, 2, 3))
    assert ledger.puback(e2, True, 0.0) is None
    assert ledger.puback(e1, True, 0.0) == 2
    assert ledger.puback(e3, False, 0.0) is None      # refused: rewound and held back
    assert ledger.kinds["sale"].sent_upto == 2
    assert ledger.allowance("sale", 0.5, last_seq=3) == 0
    assert ledger.allowance("sale", 1.5, last_seq=3) > 0


def test_ledger_acks_only_move_forward_and_timeouts_rewind() -> None:
    """A lower ack is ignored; an ack that stalls past ack_timeout_s rewinds the kind."""
    ledger = DeliveryLedger({"sale": 4}, max_inflight=10, hq_ack=True, ack_timeout_s=5,
                            hold_min_s=1)
    for seq in (5, 6, 7):
        ledger.record_sent("sale", seq, 10.0)
    assert not ledger.hq_acked("sale", 3, 11.0)
    assert ledger.hq_acked("sale", 5, 11.0)
    assert ledger.timed_out(15.9) == []
    assert ledger.timed_out(16.0) == ["sale"]
    ledger.rewind("sale")
    assert ledger.kinds["sale"].sent_upto == 5 and ledger.resends == 0
    for seq in (6, 7, 8):
        ledger.record_sent("sale", seq, 17.0)
    assert ledger.resends == 2        # 6 and 7 went before; 8 is new


def test_ledger_ack_timeouts_back_off_and_an_advancing_ack_resets_them() -> None:
    """Each unanswered ack timeout doubles the next wait (capped, jitter only lengthens);
    an ack of resent seqs restarts the backed-off wait, one past them (Karn) resets it."""
    ledger = DeliveryLedger({}, max_inflight=10, hq_ack=True, ack_timeout_s=5, hold_min_s=1,
                            rand=lambda: 0.0)
    for seq in (1, 2):
        ledger.record_sent("sale", seq, 0.0)
    now, waits = 0.0, []
    for _ in range(5):
        assert ledger.timed_out(now + ledger.kinds["sale"].ack_wait_s - 0.01) == []
        now += ledger.kinds["sale"].ack_wait_s
        assert ledger.timed_out(now) == ["sale"]
        waits.append(ledger.ack_timed_out("sale"))
        assert ledger.kinds["sale"].sent_upto == 0      # rewound to the watermark
        for seq in (1, 2):
            ledger.record_sent("sale", seq, now)
    assert waits == [10, 20, 40, 40, 40]               # 8 x 5 s is the cap
    assert ledger.next_deadline(now) == now + 40
    assert ledger.hq_acked("sale", 1, now + 1)          # a resent seq: still backed off
    assert ledger.next_deadline(now + 1) == now + 41 and ledger.timed_out(now + 40) == []
    assert ledger.hq_acked("sale", 2, now + 2)          # the copies' seqs, all of them
    assert ledger.kinds["sale"].ack_wait_s == 40
    for seq in (3, 4):
        ledger.record_sent("sale", seq, now + 3)
    assert ledger.hq_acked("sale", 3, now + 4)          # sent once: the backoff is over
    assert ledger.kinds["sale"].ack_wait_s == 5 and ledger.next_deadline(now + 4) == now + 9
    assert ledger.timed_out(now + 9) == ["sale"]
    assert ledger.ack_timed_out("sale") == 10           # and starts over
    jittered = [backed_off_ack_wait(5, n, lambda: 0.999) for n in range(1, 6)]
    assert all(5 * min(2 ** n, ACK_BACKOFF_MAX_FACTOR) <= w <= 1.25 * 5 * min(
        2 ** n, ACK_BACKOFF_MAX_FACTOR) for n, w in zip(range(1, 6), jittered, strict=True))


def test_parse_ack_and_hosts() -> None:
    """Ack payloads are validated field by field; hosts may carry their own port."""
    assert parse_ack(b'{"kind":"sale","upto":3}').upto == 3  # type: ignore[union-attr]
    assert "kind" in parse_ack(b'{"kind":"nope","upto":3}')  # type: ignore[operator]
    assert "upto" in parse_ack(b'{"kind":"sale","upto":true}')  # type: ignore[operator]
    assert "JSON" in parse_ack(b"\xff")  # type: ignore[operator]
    assert split_host("h", 1) == ("h", 1)
    assert split_host("h:2", 1) == ("h", 2)
    assert split_host("[::1]:3", 1) == ("::1", 3)
    assert split_host("::1", 1) == ("::1", 1)


# --------------------------------------------------------------------------- against mosquitto


def test_events_flow_in_per_kind_order(broker: Broker, outbox: Any, make_hq: Any,
                                       make_uplink: Any) -> None:
    """Events arrive at HQ as the stored bytes with the outbox's epoch spliced in, each
    kind in seq order, on P/events/{kind}."""
    hq = make_hq(broker.port)
    submit(outbox, "sale", 30)
    submit(outbox, "scan", 30)
    up = make_uplink(config(broker.port), outbox)
    submit(outbox, "sale", 20, start=30)
    wait_for(lambda: len(hq.seqs("sale")) >= 50 and len(hq.seqs("scan")) >= 30,
             what="all events at HQ")
    assert hq.seqs("sale") == list(range(1, 51))
    assert hq.seqs("scan") == list(range(1, 31))
    stored = dict(outbox.read("sale", 0, 100))
    sent = hq.raw[[e["seq"] for e in hq.events if e["kind"] == "sale"].index(7)]
    assert sent == with_epoch(stored[7], outbox.epoch)
    assert up.snapshot()["unacked"]["sale"] == 50


def test_a_burst_of_commits_is_published_in_few_pump_passes(
        broker: Broker, outbox: Any, make_hq: Any, make_uplink: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits one after another (each wakes the uplink) are published at most one pump
    pass per PUMP_INTERVAL_S, not a pass per commit; every event still reaches HQ in order."""
    import agent.uplink.link as link_module

    passes: list[int] = []
    real_pump = link_module.Uplink._pump

    def counted(self: Any, client: Any, now: float) -> None:
        passes.append(1)
        real_pump(self, client, now)

    monkeypatch.setattr(link_module.Uplink, "_pump", counted)
    hq = make_hq(broker.port)
    up = make_uplink(config(broker.port), outbox)
    wait_for(lambda: connected(up), what="uplink connected")
    before = len(passes)
    started = time.monotonic()
    for i in range(300):  # 300 commits, each one event
        outbox.submit("sale", json.dumps({"n": i}), "test").result(timeout=30)
    elapsed = time.monotonic() - started
    wait_for(lambda: len(hq.seqs("sale")) == 300, what="all 300 sales at HQ")
    assert hq.seqs("sale") == list(range(1, 301))
    interval = getattr(link_module, "PUMP_INTERVAL_S", 0.005)
    # The burst's passes, plus a few for the PUBACKs after it.
    during = len(passes) - before
    assert during <= elapsed / interval + 10, (during, elapsed)


def test_hq_acks_under_a_stream_reach_the_outbox_at_most_every_ack_flush_s(
        broker: Broker, outbox: Any, make_hq: Any, make_uplink: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """HQ acking every event of a stream is handed to the outbox (a delete each) at most
    once per ACK_FLUSH_S, the latest ack per kind; the last one still empties it."""
    import agent.uplink.link as link_module

    handed: list[int] = []
    real_ack = outbox.ack

    def counted(kind: str, upto: int) -> Any:
        handed.append(upto)
        return real_ack(kind, upto)

    monkeypatch.setattr(outbox, "ack", counted)
    make_hq(broker.port, ack=True)
    up = make_uplink(config(broker.port), outbox)
    wait_for(lambda: connected(up), what="uplink connected")
    started = time.monotonic()
    for i in range(300):
        outbox.submit("sale", json.dumps({"n": i}), "test").result(timeout=30)
    wait_for(lambda: depth(outbox, "sale") == 0, 20, what="every sale acked and deleted")
    elapsed = time.monotonic() - started
    interval = getattr(link_module, "ACK_FLUSH_S", 0.1)
    assert len(handed) <= elapsed / interval + 3, (len(handed), elapsed)
    assert handed[-1] == 300


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_backlog_goes_out_in_few_socket_writes_and_its_pubacks_in_few_reads(
        broker: Broker, outbox: Any, make_hq: Any, make_uplink: Any,
        monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    """500 events published in one pump pass leave in a handful of send() calls (paho made
    one per PUBLISH), and the broker's 500 PUBACKs are read in at most a recv() each (paho
    made three: command, length, body); every PUBACK is still counted, every event at HQ."""
    calls = {"send": 0, "recv": 0}
    real_send, real_recv = mqtt.Client._sock_send, mqtt.Client._sock_recv

    def send(self: Any, buf: Any) -> int:
        sent = real_send(self, buf)
        if threading.current_thread().name == "uplink":
            calls["send"] += 1
        return sent

    def recv(self: Any, size: int) -> bytes:
        data = real_recv(self, size)   # BlockingIOError (nothing waiting) is not counted
        if threading.current_thread().name == "uplink":
            calls["recv"] += 1
        return data

    monkeypatch.setattr(mqtt.Client, "_sock_send", send)
    monkeypatch.setattr(mqtt.Client, "_sock_recv", recv)
    hq = make_hq(broker.port)
    submit(outbox, "sale", 500)
    up = make_uplink(config(broker.port, protocol=protocol), outbox)
    wait_for(lambda: up.snapshot()["pubacks"] >= 500, 20, what="500 PUBACKs counted")
    wait_for(lambda: len(hq.seqs("sale")) == 500, what="all 500 sales at HQ")
    assert hq.seqs("sale") == list(range(1, 501))
    assert up.snapshot()["pubacks"] == 500 and up.snapshot()["unacked"]["sale"] == 500
    # CONNECT, SUBSCRIBE, the online status and ~125 kB of events: a few 64 kB writes.
    assert calls["send"] <= 20, calls
    # CONNACK, SUBACK, the status's PUBACK and the events' 500.
    assert calls["recv"] <= 503, calls


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_nothing_leaves_the_outbox_until_hq_acks(broker: Broker, outbox: Any, make_hq: Any,
                                                 make_uplink: Any, protocol: str) -> None:
    """In hq-ack mode only HQ's cumulative ack deletes, and only up to the acked seq."""
    hq = make_hq(broker.port)
    up = make_uplink(config(broker.port, protocol=protocol), outbox)
    submit(outbox, "plant", 10)
    wait_for(lambda: len(hq.seqs("plant")) == 10, what="plant events at HQ")
    # Every PUBACK handled: a delete on the broker's word would have happened by now.
    wait_for(lambda: up.snapshot()["pubacks"] >= 10, what="the broker's PUBACKs")
    assert depth(outbox, "plant") == 10
    hq.send_ack("plant", 6)
    wait_for(lambda: depth(outbox, "plant") == 4, what="delete up to 6")
    snap = up.snapshot()
    assert snap["acked_upto"]["plant"] == 6 and snap["unacked"]["plant"] == 4
    assert snap["acks"] == 1 and snap["last_ack_ts"] is not None
    assert [s for s, _ in outbox.read("plant", 0, 100)] == [7, 8, 9, 10]


def test_resend_after_ack_timeout(broker: Broker, outbox: Any, make_hq: Any,
                                  make_uplink: Any) -> None:
    """With no ack for ack_timeout_s, the kind goes again from the first unacked seq, same bytes."""
    hq = make_hq(broker.port)
    up = make_uplink(config(broker.port, ack_timeout_s=0.3), outbox)
    submit(outbox, "sale", 3)
    hq.send_ack("sale", 1)  # may arrive before or after the first send: both are fine
    wait_for(lambda: hq.seqs("sale").count(3) >= 3, what="seq 3 resent twice")
    assert up.snapshot()["resends"] >= 4      # seqs 2 and 3 (at least), twice
    with hq.lock:
        copies = {e["seq"]: set() for e in hq.events}
        for env, raw in zip(hq.events, hq.raw, strict=True):
            # The oldest pending event goes out with "floor": seq - 1 spliced in right
            # after the brace (a resend after the ack of 1); else the stored bytes.
            floor = b'{"floor":%d,' % (env["seq"] - 1)
            copies[env["seq"]].add(b"{" + raw[len(floor):] if raw.startswith(floor) else raw)
    assert all(len(v) == 1 for v in copies.values()), "a resend must be byte-identical"
    hq.send_ack("sale", 3)
    wait_for(lambda: depth(outbox, "sale") == 0, what="acked")
    # Resends come only from what is in flight: nothing left there, nothing goes again.
    wait_for(lambda: up.snapshot()["unacked"]["sale"] == 0, what="nothing in flight")
    assert up.snapshot()["acked_upto"]["sale"] == 3


def test_resends_back_off_while_acks_stay_stopped(broker: Broker, outbox: Any, make_hq: Any,
                                                 make_uplink: Any) -> None:
    """No ack at all: each resend waits twice as long as the one before (0.2, 0.4, 0.8,
    1.6 s, the cap), instead of one resend every ack_timeout_s."""
    hq = make_hq(broker.port)
    up = make_uplink(config(broker.port, ack_timeout_s=0.2), outbox)
    submit(outbox, "sale", 1)
    copies = wait_for(lambda: len(t := hq.arrived("sale", 1)) >= 6 and t, timeout=20,
                      what="seq 1 resent five times")
    gaps = [b - a for a, b in itertools.pairwise(copies)]
    # A wait only ever runs long (jitter, a busy machine); 0.8 allows for broker latency.
    for i, gap in enumerate(gaps[:5]):
        assert gap >= 0.8 * 0.2 * min(2 ** i, ACK_BACKOFF_MAX_FACTOR), gaps
    assert up.snapshot()["resends"] == len(copies) - 1 >= 5
    assert depth(outbox, "sale") == 1    # nothing deleted without HQ's ack


def test_an_advancing_ack_resets_the_ack_backoff(broker: Broker, outbox: Any, make_hq: Any,
                                                 make_uplink: Any) -> None:
    """After resends backed off to 1.6 s: an ack of resent seqs restarts that wait (seq 2
    goes again 1.6 s later, not 0.2 s); an ack of a seq sent once since (Karn's rule)
    brings back the plain 0.2 s for what is still out; nothing is lost."""
    hq = make_hq(broker.port)
    make_uplink(config(broker.port, ack_timeout_s=0.2), outbox)
    submit(outbox, "sale", 2)
    copies = wait_for(lambda: len(t := hq.arrived("sale", 1)) >= 4 and t, timeout=20,
                      what="seq 1 resent three times")
    assert copies[3] - copies[2] >= 0.8 * 0.8, copies   # backed off to 0.8 s and more
    acked_at = time.monotonic()
    hq.send_ack("sale", 1)
    wait_for(lambda: depth(outbox, "sale") == 1, what="seq 1 deleted")
    after = wait_for(lambda: [t for t in hq.arrived("sale", 2) if t > acked_at],
                     timeout=10, what="seq 2 resent after the partial ack")
    assert after[0] - acked_at >= 0.8 * 1.6, "a partial ack of resent seqs reset the backoff"
    hq.send_ack("sale", 2)
    wait_for(lambda: depth(outbox, "sale") == 0, what="seq 2 acked")
    submit(outbox, "sale", 2, start=2)
    wait_for(lambda: hq.arrived("sale", 4), what="seqs 3 and 4 at HQ")
    acked_at = time.monotonic()
    hq.send_ack("sale", 3)
    fourth = wait_for(lambda: [t for t in hq.arrived("sale", 4) if t > acked_at],
                      timeout=10, what="seq 4 resent after the ack of 3")
    assert fourth[0] - acked_at < 1.0, "an ack of a fresh seq did not reset the backoff"
    hq.send_ack("sale", 4)
    wait_for(lambda: depth(outbox, "sale") == 0, what="seq 4 acked")


def test_slow_but_advancing_acks_cause_no_resend(broker: Broker, outbox: Any, make_hq: Any,
                                                 make_uplink: Any) -> None:
    """HQ acks one sale every half ack_timeout_s, 8 of them over 4 timeouts: the ack
    keeps moving, so nothing is resent (the timeout counts from the last advance)."""
    hq = make_hq(broker.port)
    up = make_uplink(config(broker.port, ack_timeout_s=0.6), outbox)
    submit(outbox, "sale", 8)
    wait_for(lambda: len(hq.seqs("sale")) == 8, what="8 sales at HQ")
    for upto in range(1, 9):
        due = time.monotonic() + 0.3
        wait_for(lambda: time.monotonic() >= due, what="the ack pace")  # noqa: B023
        hq.send_ack("sale", upto)
    wait_for(lambda: depth(outbox, "sale") == 0, what="all acked")
    assert up.snapshot()["resends"] == 0
    assert hq.seqs("sale") == list(range(1, 9))


def test_broker_killed_mid_stream(broker: Broker, outbox: Any, make_hq: Any,
                                  make_uplink: Any) -> None:
    """A SIGKILLed broker loses what it held; after it returns everything arrives and is acked."""
    hq = make_hq(broker.port, ack=True)
    up = make_uplink(config(broker.port, ack_timeout_s=1.0), outbox)
    submit(outbox, "sale", 200)
    wait_for(lambda: len(hq.seqs("sale")) >= 50, what="first events at HQ")
    broker.kill()
    submit(outbox, "sale", 200, start=200)   # accepted while the broker is down
    wait_for(lambda: up.snapshot()["state"] != "connected", what="uplink notices")
    broker.start()
    wait_for(lambda: hq.stored["sale"] >= set(range(1, 401)), timeout=20,
             what="every seq at HQ")
    wait_for(lambda: depth(outbox, "sale") == 0, timeout=10, what="everything acked")
    snap = up.snapshot()
    assert snap["reconnects"] >= 1 and snap["acked_upto"]["sale"] == 400


def test_failover_to_the_second_host(broker: Broker, outbox: Any, make_hq: Any,
                                     make_uplink: Any) -> None:
    """A dead first host is skipped and the next one in mqtt.hosts is used."""
    hq = make_hq(broker.port)
    dead = free_port()
    up = make_uplink(config(broker.port, hosts=[f"127.0.0.1:{dead}", "127.0.0.1"]), outbox)
    wait_for(lambda: connected(up), what="connected")
    assert up.snapshot()["host"] == f"127.0.0.1:{broker.port}"
    submit(outbox, "alarm", 2)
    wait_for(lambda: hq.seqs("alarm") == [1, 2], what="alarms at HQ")


def test_status_online_retained_and_will_on_a_cut_connection(
        broker: Broker, outbox: Any, make_hq: Any, make_uplink: Any) -> None:
    """P/status is retained online on connect; a cut TCP link makes the broker publish the will."""
    proxy = TcpProxy(broker.port)
    try:
        up = make_uplink(config(proxy.port), outbox)
        wait_for(lambda: connected(up), what="connected")
        hq = make_hq(broker.port)      # subscribes after: sees the retained status
        wait_for(lambda: hq.status, what="retained status")
        first = hq.status[0]
        assert first["state"] == "online" and first["retain"] and first["version"] == "9.9.9"
        proxy.cut()
        wait_for(lambda: any(s["state"] == "offline" for s in hq.status), what="the will")
        wait_for(lambda: hq.status[-1]["state"] == "online", what="back online")
        up.stop()
        wait_for(lambda: hq.status[-1]["state"] == "offline", what="offline on stop()")
    finally:
        proxy.close()


def test_tls_with_client_certificates(tmp_path: Path, make_outbox: Any,
                                     make_uplink: Any) -> None:
    """mTLS works with the client certificate; without it the refusal is reported, not raised."""
    tls = make_tls_files(str(tmp_path / "tls"))
    (tmp_path / "broker").mkdir()
    b = start_broker(str(tmp_path / "broker"), tls=tls)
    try:
        good = make_uplink(config(b.port, tls=True, ca_file=tls.ca, cert_file=tls.client_cert,
                                  key_file=tls.client_key, client_id="good"), make_outbox())
        wait_for(lambda: connected(good), what="mTLS connection")
        bare = make_uplink(config(b.port, tls=True, ca_file=tls.ca, client_id="bare"),
                           make_outbox())
        wait_for(lambda: bare.snapshot()["last_error"], what="refusal reported")
        assert bare.snapshot()["state"] != "connected"
        missing = make_uplink(config(b.port, tls=True, ca_file=tls.ca,
                                     cert_file=str(tmp_path / "nope.pem"),
                                     key_file=tls.client_key, client_id="missing"),
                              make_outbox())
        wait_for(lambda: missing.snapshot()["last_error"], what="missing file reported")
        assert "mqtt.cert_file" in missing.snapshot()["last_error"]
        assert connected(good)
    finally:
        b.stop()


def test_broker_ack_mode_deletes_on_puback(broker: Broker, outbox: Any,
                                           make_uplink: Any) -> None:
    """With delivery = broker-ack, a successful PUBACK deletes without any HQ ack."""
    up = make_uplink(config(broker.port, delivery="broker-ack"), outbox)
    submit(outbox, "print", 25)
    wait_for(lambda: depth(outbox, "print") == 0, what="deleted on PUBACK")
    assert up.snapshot()["acked_upto"]["print"] == 25


def test_publish_refused_by_acl_is_not_a_delivery(tmp_path: Path, outbox: Any,
                                                  make_uplink: Any) -> None:
    """A PUBACK with a failure reason (MQTT 5 ACL denial) counts a failure and deletes nothing."""
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {ROOT}/status\ntopic read {ROOT}/#\n"
                   f"topic write {ROOT}/events/sale\n")
    (tmp_path / "broker").mkdir()
    b = start_broker(str(tmp_path / "broker"), extra_conf=f"acl_file {acl}\n")
    try:
        # One denied event: mosquitto 2.0.x also drops the client right after a denied
        # QoS 1 publish, and a burst would turn that into a reset that eats the PUBACK.
        submit(outbox, "device", 1)
        submit(outbox, "sale", 3)
        up = make_uplink(config(b.port, delivery="broker-ack"), outbox)
        wait_for(lambda: depth(outbox, "sale") == 0, what="allowed kind deleted")
        wait_for(lambda: up.snapshot()["publish_failures"] >= 1, what="failure counted")
        assert depth(outbox, "device") == 1
        wait_for(lambda: connected(up), what="connected again")  # it reconnects, holds device back
    finally:
        b.stop()


def test_a_sale_overtakes_a_sensor_backlog(broker: Broker, outbox: Any, make_hq: Any,
                                           make_uplink: Any) -> None:
    """A sale submitted while a big sensor backlog drains reaches HQ before the backlog is done."""
    hq = make_hq(broker.port)
    backlog = 20000
    submit(outbox, "sensor", backlog)
    make_uplink(config(broker.port, delivery="broker-ack", max_inflight=64), outbox)
    wait_for(lambda: len(hq.seqs("sensor")) >= 100, what="backlog draining")
    submit(outbox, "sale", 1)
    wait_for(lambda: hq.seqs("sale") == [1], what="the sale at HQ")
    with hq.lock:
        kinds = [e["kind"] for e in hq.events]
    assert kinds.index("sale") < backlog, "the sale waited for the whole sensor backlog"
    assert depth(outbox, "sensor") > 0


def test_a_full_window_of_sensors_leaves_room_for_a_sale(broker: Broker, outbox: Any,
                                                         make_hq: Any, make_uplink: Any) -> None:
    """When unacked sensors fill the window, a sale still goes out at once (reserved room)."""
    hq = make_hq(broker.port)
    up = make_uplink(config(broker.port, max_inflight=40), outbox)
    submit(outbox, "sensor", 200)
    wait_for(lambda: len(hq.seqs("sensor")) >= 35, what="sensor window full")
    submit(outbox, "sale", 1)
    wait_for(lambda: hq.seqs("sale") == [1], timeout=2, what="the sale at HQ")
    # The sale went out after the sensors on one connection, so any sensor beyond the
    # window would have reached HQ before it: the window held at 40 less the 1/8 reserve.
    assert len(hq.seqs("sensor")) == 35
    assert up.snapshot()["unacked"]["sensor"] == 35


def test_commands_and_results(broker: Broker, outbox: Any, make_hq: Any,
                              make_uplink: Any) -> None:
    """P/commands/{name} reaches on_command; send_command_result publishes on P/command-results."""
    hq = make_hq(broker.port)
    got: list[tuple[str, bytes]] = []
    up = make_uplink(config(broker.port), outbox, on_command=lambda n, p: got.append((n, p)))
    assert up.subscribed.wait(10), "the uplink's SUBSCRIBE was never granted"
    hq.client.publish(f"{ROOT}/commands/reprint", b'{"id":"c1","args":{}}', qos=1)
    wait_for(lambda: got, what="command delivered")
    assert got == [("reprint", b'{"id":"c1","args":{}}')]
    up.send_command_result({"id": "c1", "ok": True, "result": None, "error": None})
    wait_for(lambda: hq.results, what="result at HQ")
    assert hq.results == [{"id": "c1", "ok": True, "result": None, "error": None}]


def test_malformed_acks_are_ignored(broker: Broker, outbox: Any, make_hq: Any,
                                    make_uplink: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Bad acks (junk, unknown kind, bad upto, beyond the last seq) are counted and ignored."""
    hq = make_hq(broker.port)
    up = make_uplink(config(broker.port), outbox)
    submit(outbox, "sale", 5)
    wait_for(lambda: len(hq.seqs("sale")) == 5, what="sales at HQ")
    for junk in (b"\xff\x00", b"[1]", b'{"kind":"nope","upto":1}', b'{"kind":"sale"}',
                 b'{"kind":"sale","upto":-1}', b'{"kind":"sale","upto":99}'):
        hq.client.publish(f"{ROOT}/acks", junk, qos=1)
    wait_for(lambda: up.snapshot()["bad_acks"] == 6, what="bad acks counted")
    assert depth(outbox, "sale") == 5 and connected(up)
    assert sum("malformed ack" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING") == 1
    hq.send_ack("sale", 5)
    wait_for(lambda: depth(outbox, "sale") == 0, what="a good ack still works")


def test_an_ack_for_another_epoch_or_too_big_deletes_nothing(
        broker: Broker, outbox: Any, make_hq: Any, make_uplink: Any) -> None:
    """An ack naming another epoch (an earlier run, another box) and a 10 MB or
    100,000-deep message on P/acks are counted and ignored, before any parsing for the
    big ones; an ack for the outbox's own epoch deletes."""
    hq = make_hq(broker.port)
    up = make_uplink(config(broker.port), outbox)
    submit(outbox, "sale", 5)
    wait_for(lambda: len(hq.seqs("sale")) == 5, what="sales at HQ")
    assert all(json.loads(raw)["epoch"] == outbox.epoch for raw in hq.raw)
    hq.client.publish(f"{ROOT}/acks", json.dumps({"kind": "sale", "upto": 5,
                                                  "epoch": "20200101T000000Z-old"}), qos=1)
    hq.client.publish(f"{ROOT}/acks", b'{"kind":"sale","upto":5,"x":"' + b"y" * (10 << 20)
                      + b'"}', qos=1)
    hq.client.publish(f"{ROOT}/acks", b"[" * 100_000 + b"]" * 100_000, qos=1)
    wait_for(lambda: up.snapshot()["stale_acks"] == 1
             and up.snapshot()["oversize_messages"] == 2, what="both counted")
    assert depth(outbox, "sale") == 5 and connected(up)
    hq.client.publish(f"{ROOT}/acks", json.dumps({"kind": "sale", "upto": 5,
                                                  "epoch": outbox.epoch}), qos=1)
    wait_for(lambda: depth(outbox, "sale") == 0, what="the ack for our epoch deletes")


def test_parse_ack_reads_the_epoch_and_caps_the_size() -> None:
    """parse_ack keeps an ack's epoch, refuses a non-string one and anything over 64 KiB."""
    ack = parse_ack(b'{"kind":"sale","upto":3,"epoch":"e-1"}')
    assert not isinstance(ack, str) and ack.epoch == "e-1"
    assert isinstance(parse_ack(b'{"kind":"sale","upto":3,"epoch":7}'), str)
    assert "limit" in str(parse_ack(b" " * (64 * 1024 + 1)))
    assert with_epoch(b'{"v":1}', "e-1") == b'{"epoch":"e-1","v":1}'


def test_health_is_published_every_interval(broker: Broker, outbox: Any, make_hq: Any,
                                            make_uplink: Any) -> None:
    """health() goes to P/health at QoS 0 on connect and every mqtt.health_interval_s."""
    hq = make_hq(broker.port)
    make_uplink(config(broker.port, health_interval_s=0.2), outbox,
                health=lambda: {"state": "healthy"})
    wait_for(lambda: len(hq.health) >= 3, what="three health messages")
    assert hq.health[0] == {"state": "healthy", "qos": 0}


def test_unreachable_broker_is_reported_once_and_stop_is_prompt(
        outbox: Any, make_uplink: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A dead broker logs one ERROR (repeats at DEBUG), shows in snapshot, and stop() is quick."""
    caplog.set_level(logging.DEBUG, logger="agent.uplink")
    dead = free_port()
    up = make_uplink(config(dead, backoff_min_s=0.02, backoff_max_s=0.05), outbox)
    wait_for(lambda: sum("refused" in r.getMessage() for r in caplog.records) >= 4,
             what="several attempts")
    snap = up.snapshot()
    assert snap["state"] != "connected" and "refused" in snap["last_error"]
    assert sum(r.levelname == "ERROR" for r in caplog.records) == 1
    started = time.monotonic()
    up.stop()
    assert time.monotonic() - started < 1.0
    assert up.snapshot()["state"] == "disconnected"


def test_one_reconnect_backoff_for_the_uplink_and_hq() -> None:
    """reconnect_delay (the uplink's and HQ's receivers' one formula) doubles from low to
    high, in the upper half of each step at random."""
    from agent.uplink.protocol import reconnect_delay

    assert [reconnect_delay(n, 1.0, 30.0, lambda: 1.0) for n in range(7)] == [1, 2, 4, 8, 16,
                                                                               30, 30]
    assert reconnect_delay(3, 1.0, 30.0, lambda: 0.0) == 4.0
