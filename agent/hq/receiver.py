"""``edge-agent hq``: consume every site's events, store them once, ack the watermark.

One thread owns the paho client and drives it with paho's external-loop API
(``select`` on ``client.socket()``, then ``loop_read`` / ``loop_write`` /
``loop_misc``), so reading, storing, PUBACKing and publishing acks all happen in
that thread, in that order:

1. a read burst: ``on_message`` only decodes and appends to the batch;
2. ``store.store_batch`` commits the batch (``synchronous=FULL``);
3. only then the broker gets its PUBACKs (``manual_ack=True``), so a receiver
   killed before step 2 leaves the messages unacknowledged in its persistent
   session and the broker redelivers them when it comes back;
4. each changed watermark is acked to the agent on ``P/acks`` (QoS 1).

Any number of receivers share the load through the shared subscription
``$share/{group}/{prefix}/+/events/#``. Each needs its own stable client id
(``[hq] client_id``): the broker keeps a session per id (``clean_start`` off,
a session expiry), which is what makes a restart lossless.
"""

from __future__ import annotations

import json
import logging
import random
import select
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import HqReceiverConfig
from agent.envelope import decode
from agent.errors import AgentError
from agent.hq.store import EventRow, Pair, Store, StoreError, event_row, open_store

log = logging.getLogger(__name__)

# Module-level timing so tests shrink them instead of sleeping.
IDLE_WAIT_S = 0.1            # longest select(); bounds how late a stop is seen
REPUBLISH_INTERVAL_S = 1.0   # re-send the watermark of recently active pairs this often
REPUBLISH_WINDOW_S = 5.0     # "recently": a message for the pair within this many seconds
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our queue this long while we are away
MALFORMED_LOG_INTERVAL_S = 60.0   # at most one WARNING line per interval; the rest at DEBUG
STOP_FLUSH_S = 2.0           # how long a stop waits for the last packets to leave


class ReceiverError(AgentError):
    """The HQ receiver cannot be set up (TLS files, password file)."""


def _backoff(attempt: int, low: float, high: float, rand: Callable[[], float]) -> float:
    """Capped exponential backoff with jitter: a fleet of receivers must not reconnect in step."""
    delay: float = min(high, low * (2 ** min(attempt, 30)))
    return delay * (0.5 + rand() / 2)


class HqReceiver:
    """The HQ consumer (CONTRACT 8); ``run(stop)`` blocks until ``stop`` is set.

    ``counters`` (received, stored, duplicates, malformed, acks_sent,
    connects, store_failures) may be read from any thread. ``subscribed`` is set
    while the shared subscription is granted.
    """

    def __init__(self, cfg: HqReceiverConfig, *, store: Store | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.cfg = cfg
        # The client first: bad TLS files must not leave a store open behind them.
        self._client = self._make_client()
        self._owns_store = store is None
        self.store: Store = store if store is not None else open_store(cfg.hq.store)
        self._rand = rand
        self._prefix = cfg.mqtt.topic_prefix
        self.topic = f"$share/{cfg.hq.share_group}/{self._prefix}/+/events/#"
        self.counters: dict[str, int] = dict.fromkeys(
            ("received", "stored", "duplicates", "malformed", "acks_sent", "connects",
             "store_failures"), 0)
        self.subscribed = threading.Event()
        # The batch of the current read burst: PUBACK ids in arrival order (the
        # broker expects PUBACKs in that order) and the well-formed envelopes.
        self._mids: list[int] = []
        self._envelopes: list[EventRow] = []
        self._published: dict[Pair, int] = {}   # highest upto we acked per pair
        self._active: dict[Pair, float] = {}    # monotonic time of the pair's last message
        self._next_republish = 0.0
        self._malformed_logged_at = -MALFORMED_LOG_INTERVAL_S
        self._connack_ok = False
        self._store_failing = False
        self._drop_reason: str | None = None
        self._host = ""

    # -- setup -----------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        m = self.cfg.mqtt
        v5 = m.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # 3.1.1 has no session expiry: a persistent session is clean_session=False.
            clean_session=None if v5 else False,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        client.connect_timeout = m.connect_timeout_s
        client.max_inflight_messages_set(m.max_inflight)
        if m.tls:
            try:
                client.tls_set(ca_certs=m.ca_file or None, certfile=m.cert_file or None,
                               keyfile=m.key_file or None)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ReceiverError(f"mqtt TLS setup failed (mqtt.ca_file={m.ca_file!r}, "
                                    f"mqtt.cert_file={m.cert_file!r}, mqtt.key_file="
                                    f"{m.key_file!r}): {exc}") from None
        if m.username:
            try:
                password = m.secret_password()
            except OSError as exc:
                raise ReceiverError(f"mqtt.password_file {m.password_file!r} cannot be read: "
                                    f"{exc}") from None
            client.username_pw_set(m.username, password or None)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # -- paho callbacks (all in the run() thread, inside loop_read) -------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._drop_reason = f"broker {self._host} refused the connection: {reason_code}"
            return
        self._connack_ok = True
        self.counters["connects"] += 1
        log.info("hq receiver connected to %s:%d as %s (session present: %s)", self._host,
                 self.cfg.mqtt.port, self.cfg.client_id, bool(flags.session_present))
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            self._drop_reason = (f"broker refused the subscription {self.topic!r}: {failed[0]} "
                                 "(check the broker's ACL for this client)")
            return
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self.subscribed.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        # Decode only: storing is per batch, after the read burst.
        self.counters["received"] += 1
        if message.qos > 0:
            self._mids.append(message.mid)
        try:
            self._envelopes.append(self.parse(message.topic, bytes(message.payload)))
        except ValueError as exc:
            self._malformed(message.topic, str(exc))

    def parse(self, topic: str, payload: bytes) -> EventRow:
        """The checked envelope of one event message; ``ValueError`` says what is wrong.

        The envelope must agree with its topic: with per-site broker ACLs, this
        is what stops one site from writing events into another's record.
        """
        rest = topic[len(self._prefix) + 1:].split("/") if topic.startswith(
            self._prefix + "/") else []
        if len(rest) != 3 or rest[1] != "events":
            raise ValueError("topic is not {prefix}/{site}/events/{kind}")
        env = decode(payload)
        # decode() proved it UTF-8 JSON; the store keeps the agent's own bytes.
        row = event_row(env, payload.decode("utf-8"))
        if (row.site, row.kind) != (rest[0], rest[2]):
            raise ValueError(f"envelope site/kind {row.site}/{row.kind} does not match the "
                             f"topic's {rest[0]}/{rest[2]}")
        return row

    def _malformed(self, topic: str, reason: str) -> None:
        self.counters["malformed"] += 1
        now = time.monotonic()
        if now - self._malformed_logged_at >= MALFORMED_LOG_INTERVAL_S:
            self._malformed_logged_at = now
            log.warning("dropped a malformed message on %s: %s (%d dropped since start; "
                        "more within %.0fs are logged at DEBUG)", topic, reason,
                        self.counters["malformed"], MALFORMED_LOG_INTERVAL_S)
        else:
            log.debug("dropped a malformed message on %s: %s", topic, reason)

    # -- the loop --------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Connect (failing over across ``mqtt.hosts``), consume, reconnect, until ``stop``."""
        m = self.cfg.mqtt
        attempt = 0
        host_index = 0
        warned = False  # one WARNING per streak of failures; the rest at DEBUG
        try:
            while not stop.is_set():
                self._host = m.hosts[host_index % len(m.hosts)]
                error = self._connect()
                if error is None:
                    self._serve(stop)
                    error = self._drop_reason
                    if self._connack_ok:  # it worked for a while: start the backoff afresh
                        attempt = 0
                        warned = False
                if stop.is_set():
                    break
                if not self._connack_ok:
                    host_index += 1  # failover: this host did not take us
                reason = error or f"lost the connection to {self._host}"
                if not warned:
                    warned = True
                    log.warning("hq receiver: %s; retrying (%d host(s))", reason, len(m.hosts))
                else:
                    log.debug("hq receiver: %s", reason)
                stop.wait(_backoff(attempt, m.backoff_min_s, m.backoff_max_s, self._rand))
                attempt += 1
        finally:
            self._shutdown()

    def _connect(self) -> str | None:
        """Open a connection to the current host; the error text if that failed."""
        m = self.cfg.mqtt
        self._connack_ok = False
        self._drop_reason = None
        self._mids.clear()  # ids of an old connection mean nothing on a new one
        try:
            if m.protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                self._client.connect(self._host, m.port, m.keepalive_s, clean_start=False,
                                     properties=props)
            else:
                self._client.connect(self._host, m.port, m.keepalive_s)
        except (OSError, ValueError) as exc:  # ssl.SSLError and socket.gaierror are OSErrors
            return f"cannot connect to {self._host}:{m.port}: {exc}"
        return None

    def _serve(self, stop: threading.Event) -> None:
        """Drive one connection until it drops or ``stop`` is set."""
        client = self._client
        connack_deadline = time.monotonic() + self.cfg.mqtt.connect_timeout_s
        while not stop.is_set():
            sock = client.socket()
            if sock is None:
                break
            if self._drop_reason is not None:
                break
            if not self._connack_ok and time.monotonic() > connack_deadline:
                self._drop_reason = f"no CONNACK from {self._host} within " \
                                    f"{self.cfg.mqtt.connect_timeout_s}s"
                break
            # TLS may hold decrypted bytes that select() cannot see.
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                readable = True
            else:
                wlist = [sock] if client.want_write() else []
                r, _, _ = select.select([sock], wlist, [], self._idle_wait())
                readable = bool(r)
            if readable and not self._read_burst(sock):
                break
            if self._mids or self._envelopes:
                try:
                    self._flush()
                except StoreError as exc:
                    self._store_failed(exc)
                    # Nothing of the batch is PUBACKed: reconnecting makes the
                    # broker redeliver it from our session.
                    self._drop_reason = str(exc)
                    self._envelopes.clear()  # the broker's redelivery is the retry
                    self._mids.clear()
                    break
            if client.want_write() and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            self._republish()
        self.subscribed.clear()
        if stop.is_set() and client.socket() is not None:
            self._flush_quietly()
        elif self._envelopes:
            # The connection is gone, so no PUBACKs; storing what arrived still
            # spares the redelivery a round trip (it will count as duplicates).
            self._mids.clear()
            self._flush_quietly()

    def _idle_wait(self) -> float:
        return max(0.0, min(IDLE_WAIT_S, self._next_republish - time.monotonic())) \
            if self._active else IDLE_WAIT_S

    def _read_burst(self, sock: Any) -> bool:
        """Read while bytes are waiting, up to ``batch_max`` events; False if the link dropped."""
        client = self._client
        limit = self.cfg.hq.batch_max
        while True:
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                return False
            if len(self._mids) >= limit or len(self._envelopes) >= limit:
                return True
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                continue
            r, _, _ = select.select([sock], [], [], 0)
            if not r:
                return True

    def _flush(self) -> None:
        """Store the batch, then PUBACK it, then ack changed watermarks to the agents."""
        envelopes, mids = self._envelopes, self._mids
        marks: dict[Pair, int] = {}
        if envelopes:
            before = dict(self.store.counters)
            marks = self.store.store_batch(envelopes)  # committed when it returns
            if self._store_failing:
                self._store_failing = False
                log.info("hq receiver: storing again")
            self.counters["stored"] += self.store.counters["stored"] - before["stored"]
            self.counters["duplicates"] += (self.store.counters["duplicates"]
                                            - before["duplicates"])
            now = time.monotonic()
            for pair in marks:
                if not self._active:
                    self._next_republish = now + REPUBLISH_INTERVAL_S
                self._active[pair] = now
        self._envelopes, self._mids = [], []
        if self._client.socket() is None:
            return
        for mid in mids:
            self._client.ack(mid, 1)
        for pair, upto in marks.items():
            if upto > self._published.get(pair, 0):
                self._publish_ack(pair, upto)

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except StoreError as exc:
            self._store_failed(exc)

    def _store_failed(self, exc: StoreError) -> None:
        self.counters["store_failures"] += 1
        if self._store_failing:
            log.debug("hq receiver: still cannot store: %s", exc)
        else:
            self._store_failing = True
            log.error("hq receiver: %s; not acknowledged, the broker will redeliver it", exc)

    def _publish_ack(self, pair: Pair, upto: int) -> None:
        site, kind = pair
        info = self._client.publish(f"{self._prefix}/{site}/acks",
                                    json.dumps({"kind": kind, "upto": upto}), qos=1)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.counters["acks_sent"] += 1
            self._published[pair] = max(upto, self._published.get(pair, 0))

    def _republish(self) -> None:
        """Re-send the watermark of pairs heard from recently.

        An agent whose ack got lost (it was reconnecting) would otherwise wait
        ``ack_timeout_s`` and resend; and a resend of stored events does not
        move the watermark, so it would get no ack from ``_flush`` at all. The
        marks are read from the store, so a pair another receiver advanced is
        acked at its true height.
        """
        now = time.monotonic()
        if not self._active or now < self._next_republish:
            return
        self._next_republish = now + REPUBLISH_INTERVAL_S
        for pair in [p for p, t in self._active.items() if now - t > REPUBLISH_WINDOW_S]:
            del self._active[pair]
        if not self._active:
            return
        try:
            marks = self.store.watermarks()
        except StoreError as exc:
            log.debug("hq receiver: cannot re-read watermarks: %s", exc)
            return
        for pair in self._active:
            upto = marks.get(pair, 0)
            if upto > 0:
                self._publish_ack(pair, upto)

    def _shutdown(self) -> None:
        """Let the last PUBACKs and acks leave, disconnect (the session stays), close."""
        client = self._client
        deadline = time.monotonic() + STOP_FLUSH_S

        def drain() -> None:
            while client.want_write() and time.monotonic() < deadline:
                sock = client.socket()
                if sock is None:
                    return
                select.select([], [sock], [], 0.05)
                if client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return

        drain()
        if client.socket() is not None:
            client.disconnect()
            drain()
        self.subscribed.clear()
        if self._owns_store:
            self.store.close()
