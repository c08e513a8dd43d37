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
4. each changed watermark is acked to the agent on ``P/acks``: before the
   batch's PUBACKs, the latest per stream, on a connection of its own (see
   "Acks" below).

Any number of receivers share the load through the shared subscription
``$share/{group}/{prefix}/+/events/#``. Each has its own client id: the one
set in ``[hq] client_id``, with a persistent session (``clean_start`` off, a
week's expiry) so a restart finds the messages queued for it; else a unique
one made at start (``edge-hq-<hostname>-<random>``) with a clean start and a
short expiry, since no later process will ever resume that session (and a
session left in the share group would keep taking its share while nobody
reads it). Either way a receiver killed mid-stream loses nothing: what it had
not stored it never acked, so the agents resend it after ``ack_timeout_s``.
Two receivers given one client id knock each other off; the broker says so
("session taken over") and the receiver logs it once, as that.

Acks. An ack is an idempotent, cumulative watermark with its own proof, and
the ~1 s republish of every recently active stream's watermark heals a lost
one. In a reconnect storm acks on the events connection lagged the store by
hundreds of thousands of events (bench/README.md, the storm), for two reasons:
at QoS 1 each ack held a place in paho's ``mqtt.max_inflight`` until its PUBACK,
which the broker sends behind the flood of events on that connection, so newer
acks queued behind older ones; and mosquitto 2.0 reads one packet per socket
per pass, so an ack written after thousands of PUBACKs waits for all of them.
So acks go on the *ack link*: a second connection (client id + ``-acks``, the
same credentials and host, no session, no subscriptions) that carries nothing
else, at QoS 1 with at most ACK_LINK_WINDOW awaiting their PUBACK, which on
that link comes as soon as the broker has read the ack. While the link is down
(being opened, or refused) acks go on the events connection at QoS 0. Acks are
coalesced: each stream keeps at most one pending watermark (the highest), so
while the link's window or the events socket is full a newer watermark replaces
an older one that has not left yet instead of queueing behind it. A stored
batch's acks are handed over before its PUBACKs, and PUBACKs wait in the
receiver (in order) while paho has unsent bytes, so even on the events
connection an ack never queues behind a growing backlog of PUBACKs in paho.

The fleet (hq/fleet.py): every receiver also subscribes ``P/status``
(plainly: a shared subscription gets no retained messages) and, through the
share group, ``P/health``; each batch's fleet messages are written to the
fleet store after the events.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
import secrets
import select
import socket
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

from agent import proof
from agent.envelope import decode
from agent.errors import AgentError
from agent.kinds import KINDS
from agent.uplink.protocol import reconnect_delay
from hq.backends import open_store
from hq.config import HqReceiverConfig
from hq.fleet import (
    FleetStore,
    HealthMessage,
    StatusMessage,
    parse_health,
    parse_status,
    topic_site,
)
from hq.store import EventRow, Reject, Store, StoreError, Stream, event_row

log = logging.getLogger(__name__)

# Module-level timing so tests shrink them instead of sleeping.
IDLE_WAIT_S = 0.1            # longest select(); bounds how late a stop is seen
REPUBLISH_INTERVAL_S = 1.0   # re-send the watermark of recently active pairs this often
REPUBLISH_WINDOW_S = 5.0     # "recently": a message for the pair within this many seconds
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our queue this long while we are away
# A made-up client id's session: long enough to resume across a network blip,
# short enough that a dead receiver's session soon leaves the share group.
AUTO_SESSION_EXPIRY_S = 30
SESSION_TAKEN_OVER = 0x8E         # MQTT 5 disconnect reason: another client took our id
FLAP_WINDOW_S = 60.0              # accepted-then-dropped connections counted over this long
FLAP_COUNT = 3                    # this many in the window: another client has our id
MALFORMED_LOG_INTERVAL_S = 60.0   # at most one WARNING line per interval; the rest at DEBUG
STOP_FLUSH_S = 2.0           # how long a stop waits for the last packets to leave
# CONTRACT 6's cap on one event (agent/outbox/store.py MAX_EVENT_BYTES): anything
# bigger is a reject, checked before a byte of it is parsed.
MAX_EVENT_BYTES = 1 << 20
# Acks are watermarks, healed by the republish: QoS 0 (see the module docstring).
ACK_QOS = 0
# PUBACKs handed to paho at once while its socket keeps up: an ack waits behind
# at most this many in paho (4 bytes each).
PUBACK_CHUNK = 256
# Acks on a connection of their own (client id + ACK_LINK_SUFFIX), see "Acks".
ACK_LINK = True
ACK_LINK_SUFFIX = "-acks"
ACK_LINK_RETRY_S = 5.0       # a failed ack link is tried again this often
# On the link acks go at QoS 1, at most this many awaiting the broker's PUBACK: the
# link carries nothing else, so a PUBACK comes as soon as the broker has read the
# ack, and the rest wait coalesced (one per stream) until the broker keeps up.
ACK_LINK_QOS = 1
ACK_LINK_WINDOW = 64


class Heard:
    """The seqs one stream sent recently, as merged inclusive ranges (pure, small).

    An ack never goes past the end of the run of recently heard seqs that holds
    the batch's newest event: the agent sent that run, so it has every seq in it,
    whatever a forged ``floor`` or a forged far-off seq did to the watermark.
    """

    MAX_RANGES = 64   # isolated forgeries beyond this evict the lowest ranges

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []
        self.cap = 0   # the last cap computed for a batch (what a re-send may ack)

    def add(self, first: int, last: int) -> None:
        merged: list[list[int]] = []
        for a, b in sorted([*self.ranges, [first, last]]):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.ranges = merged[-self.MAX_RANGES:]

    def run_end(self, seq: int) -> int:
        """The end of the heard run holding ``seq`` (``seq`` itself if none does)."""
        for a, b in self.ranges:
            if a <= seq <= b:
                return b
        return seq


class ReceiverError(AgentError):
    """The HQ receiver cannot be set up (TLS files, password file)."""


def auto_client_id() -> str:
    """A client id no other receiver has: ``edge-hq-<hostname>-<8 hex>`` (<= 64 chars)."""
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())
    return f"edge-hq-{host[:40] or 'host'}-{secrets.token_hex(4)}"


class HqReceiver:
    """The HQ consumer (CONTRACT 8); ``run(stop)`` blocks until ``stop`` is set.

    ``counters`` (received, stored, duplicates, malformed (= rejected),
    conflicts, acks_sent, acks_coalesced (an ack replaced by a newer watermark
    before it left), connects, store_failures) may be read from any thread.
    ``subscribed`` is set while the shared subscription is granted. ``fatal``
    holds the error that stopped :meth:`run`, if one did (a bug: ``edge-agent hq``
    then exits non-zero so systemd restarts it).
    """

    def __init__(self, cfg: HqReceiverConfig, *, store: Store | None = None,
                 fleet: FleetStore | None = None, metrics: Any = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.cfg = cfg
        self.client_id = cfg.client_id or auto_client_id()
        self._persistent = bool(cfg.client_id)
        # The client first: bad TLS files must not leave a store open behind them.
        self._client = self._make_client()
        # HQ's one secret: every ack carries proof made with the site's derived key.
        self._master: bytes | None = None
        self._site_keys: dict[str, bytes] = {}
        if cfg.hq.master_key_file:
            try:
                self._master = proof.read_master_key(cfg.hq.master_key_file)
            except proof.KeyFileError as exc:
                raise ReceiverError(str(exc)) from None
        else:
            log.warning("hq receiver: hq.master_key_file is not set: acks go out without "
                        "proof, and agents that check proof will ignore them")
        self._owns_store = store is None
        self.store: Store = store if store is not None else open_store(cfg.hq.store)
        self._owns_fleet = fleet is None
        self.fleet: FleetStore | None = fleet if fleet is not None else self._open_fleet()
        self.metrics = metrics  # hq.metrics.HqMetrics, or None
        self._rand = rand
        self._prefix = cfg.mqtt.topic_prefix
        self.topic = f"$share/{cfg.hq.share_group}/{self._prefix}/+/events/#"
        self.fleet_topics = [(f"{self._prefix}/+/status", 1),
                             (f"$share/{cfg.hq.share_group}/{self._prefix}/+/health", 0)]
        self.counters: dict[str, int] = dict.fromkeys(
            ("received", "stored", "duplicates", "malformed", "rejected", "conflicts",
             "acks_sent", "acks_coalesced", "connects", "store_failures", "taken_over",
             "fleet_messages", "fleet_malformed", "fleet_failures", "unproven_claims"), 0)
        self.fatal: BaseException | None = None
        self._registered = frozenset(s.id for s in cfg.hq.sites)
        self._fleet_batch: list[StatusMessage | HealthMessage] = []
        self._takeover_logged = False
        self._taken_over = False
        self._flapping = False
        self._drops: list[float] = []
        self._connected_at = 0.0
        self._lost_warned_at = -FLAP_WINDOW_S
        self._claims_logged_at = -MALFORMED_LOG_INTERVAL_S
        self.subscribed = threading.Event()
        # The batch of the current read burst: PUBACK ids in arrival order (the
        # broker expects PUBACKs in that order) and the well-formed envelopes.
        self._mids: list[int] = []
        self._envelopes: list[EventRow] = []
        self._rejects: list[Reject] = []
        # Per stream (site, kind, epoch) heard from recently: the monotonic time of its
        # last message and what it sent meanwhile (the ack's cap).
        self._active: dict[Stream, tuple[float, Heard]] = {}
        self._next_republish = 0.0
        # The ack each stream is owed and paho has not been handed yet (the highest), and
        # the PUBACKs of stored batches paho has not been handed yet, oldest first.
        self._pending_acks: dict[Stream, int] = {}
        self._pubacks: collections.deque[int] = collections.deque()
        # The ack link: a second connection that carries only acks (see "Acks").
        self._link: mqtt.Client | None = self._make_client(ack_link=True) if ACK_LINK else None
        self._link_ready = False
        self._link_next_try = 0.0
        self._link_inflight = 0   # acks on the link the broker has not PUBACKed yet
        self._malformed_logged_at = -MALFORMED_LOG_INTERVAL_S
        self._connack_ok = False
        self._store_failing = False
        self._drop_reason: str | None = None
        self._host = ""

    # -- setup -----------------------------------------------------------

    def _open_fleet(self) -> FleetStore | None:
        from hq.fleet_store import open_fleet_store

        try:
            return open_fleet_store(self.cfg.hq.store)
        except StoreError as exc:
            log.warning("hq receiver: no fleet state: %s", exc)
            return None

    def _make_client(self, ack_link: bool = False) -> mqtt.Client:
        """The events connection, or (``ack_link``) the one that only publishes acks:
        same broker, credentials and TLS, its own client id, never a session."""
        m = self.cfg.mqtt
        v5 = m.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{self.client_id}{ACK_LINK_SUFFIX}" if ack_link else self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # 3.1.1 has no session expiry: a persistent session is clean_session=False.
            clean_session=None if v5 else (ack_link or not self._persistent),
            manual_ack=True,
            reconnect_on_failure=False,
        )
        client.connect_timeout = m.connect_timeout_s
        if not ack_link:
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
        if ack_link:
            client.max_inflight_messages_set(ACK_LINK_WINDOW)
            client.on_connect = self._on_link_connect
            client.on_disconnect = self._on_link_disconnect
            client.on_publish = self._on_link_puback
            return client
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # -- the ack link ----------------------------------------------------

    def _on_link_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                         reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.debug("hq receiver: the broker refused the ack link: %s", reason_code)
            return
        self._link_ready = True
        self._link_inflight = 0

    def _on_link_puback(self, client: mqtt.Client, userdata: Any, mid: int,
                        reason_code: ReasonCode, properties: Properties | None) -> None:
        self._link_inflight = max(0, self._link_inflight - 1)

    def _on_link_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                            reason_code: ReasonCode, properties: Properties | None) -> None:
        self._link_ready = False

    def _link_up(self) -> None:
        """Open the ack link to the events connection's host, at most every ACK_LINK_RETRY_S."""
        link = self._link
        if link is None or link.socket() is not None:
            return
        now = time.monotonic()
        if now < self._link_next_try:
            return
        self._link_next_try = now + ACK_LINK_RETRY_S
        m = self.cfg.mqtt
        try:
            if m.protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = 0
                link.connect(self._host, m.port, m.keepalive_s, clean_start=True,
                             properties=props)
            else:
                link.connect(self._host, m.port, m.keepalive_s)
        except (OSError, ValueError) as exc:
            log.debug("hq receiver: no ack link to %s:%d (acks go on the events "
                      "connection): %s", self._host, m.port, exc)

    def _link_service(self, readable: bool) -> None:
        """Read (CONNACK, PINGRESP), write and keep alive the ack link; on any failure
        it is closed, and acks go on the events connection until it is back."""
        link = self._link
        if link is None or link.socket() is None:
            return
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        if (readable and link.loop_read() != ok) or \
                (link.want_write() and link.loop_write() != ok) or link.loop_misc() != ok:
            self._link_down()

    def _link_down(self) -> None:
        self._link_ready = False
        link = self._link
        if link is not None and link.socket() is not None:
            # paho closes the socket once the DISCONNECT is written (or the write fails).
            link.disconnect()
            link.loop_write()

    # -- paho callbacks (all in the run() thread, inside loop_read) -------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._drop_reason = f"broker {self._host} refused the connection: {reason_code}"
            return
        self._connack_ok = True
        self._connected_at = time.monotonic()
        self.counters["connects"] += 1
        log.info("hq receiver connected to %s:%d as %s (session present: %s)", self._host,
                 self.cfg.mqtt.port, self.client_id, bool(flags.session_present))
        client.subscribe([(self.topic, 1), *self.fleet_topics])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        if not reason_codes or reason_codes[0].is_failure:
            code = reason_codes[0] if reason_codes else "no reason code"
            self._drop_reason = (f"broker refused the subscription {self.topic!r}: {code} "
                                 "(check the broker's ACL for this client)")
            return
        for (topic, _), rc in zip(self.fleet_topics, reason_codes[1:], strict=False):
            if rc.is_failure:  # events still flow: the fleet view is what is missing
                log.warning("hq receiver: broker refused the subscription %r: %s; the fleet "
                            "view will lack it (check the broker's ACL)", topic, rc)
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self.subscribed.clear()
        if reason_code == SESSION_TAKEN_OVER:
            self._taken_over = True
            self.counters["taken_over"] += 1
            self._drop_reason = (f"another client connected with this receiver's client id "
                                 f"{self.client_id!r} (session taken over)")
            if not self._takeover_logged:
                self._takeover_logged = True
                log.error("hq receiver: another client connected with our client id %r and "
                          "the broker disconnected us (session taken over). Two receivers "
                          "with one id knock each other off in a loop: give each its own "
                          "[hq] client_id, or leave it empty for a unique one. Further "
                          "takeovers are logged at DEBUG.", self.client_id)

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        # Decode only: storing is per batch, after the read burst.
        if message.qos > 0:
            self._mids.append(message.mid)
        if message.topic.endswith(("/status", "/health")):
            self._on_fleet(message.topic, bytes(message.payload))
            return
        self.counters["received"] += 1
        payload = bytes(message.payload)
        try:
            self._envelopes.append(self.parse(message.topic, payload))
        except ValueError as exc:
            self._reject(message.topic, payload, str(exc))
        except (RecursionError, MemoryError, OverflowError) as exc:
            # What no message may do: take the receiver down (and the broker would
            # redeliver it to the next one, forever).
            self._reject(message.topic, payload, f"cannot be parsed: {type(exc).__name__}")

    def _topic_levels(self, topic: str) -> tuple[str, str]:
        """(site, kind) of ``{prefix}/{site}/events/{kind}``; empty strings if not that."""
        rest = topic[len(self._prefix) + 1:].split("/") if topic.startswith(
            self._prefix + "/") else []
        if len(rest) == 3 and rest[1] == "events":
            return rest[0], rest[2]
        return "", ""

    def _reject(self, topic: str, payload: bytes, reason: str) -> None:
        """Keep a message that cannot be stored, with why: written with the batch, so
        it is on disk before its PUBACK (never dropped silently, never redelivered)."""
        site, kind = self._topic_levels(topic)
        self._rejects.append(Reject.of(topic, site, kind, reason, payload))
        self.counters["rejected"] += 1
        self._malformed(topic, reason)

    def parse(self, topic: str, payload: bytes) -> EventRow:
        """The checked envelope of one event message; ``ValueError`` says what is wrong.

        The envelope must agree with its topic: with per-site broker ACLs, this
        is what stops one site from writing events into another's record. The
        size is checked before anything is parsed; the kind must be one of
        CONTRACT 4's, and the site registered when ``[[hq.sites]]`` lists any.
        """
        site, kind = self._topic_levels(topic)
        if not site:
            raise ValueError("topic is not {prefix}/{site}/events/{kind}")
        if len(payload) > MAX_EVENT_BYTES:
            raise ValueError(f"message of {len(payload)} bytes is over the "
                             f"{MAX_EVENT_BYTES}-byte event limit")
        if kind not in KINDS:
            raise ValueError(f"kind {kind[:32]!r} is not one of {', '.join(KINDS)}")
        if self._registered and site not in self._registered:
            raise ValueError(f"site {site[:64]!r} is not registered in [[hq.sites]]")
        env = decode(payload)
        # decode() proved it UTF-8 JSON; the store keeps the agent's own bytes.
        row = event_row(env, payload.decode("utf-8"))
        if self._master is not None and (row.floor is not None or row.lost is not None
                                         or row.seq_end is not None):
            row = self._checked_claims(topic, env, row)
        if (row.site, row.kind) != (site, kind):
            raise ValueError(f"envelope site/kind {row.site}/{row.kind} does not match the "
                             f"topic's {site}/{kind}")
        return row

    def _checked_claims(self, topic: str, env: dict[str, Any], row: EventRow) -> EventRow:
        """Coverage claims (floor, lost, seq_end) are honoured only with valid proof:
        a forged one would make HQ ack seqs it never saw. An unproven claim is an
        anomaly (counted, logged on edges); the event itself is still stored."""
        key = self._site_key(row.site)
        if proof.claims_proved(key, env):
            return row
        self.counters["unproven_claims"] += 1
        now = time.monotonic()
        if now - self._claims_logged_at >= MALFORMED_LOG_INTERVAL_S:
            self._claims_logged_at = now
            log.warning("hq receiver: %s %s seq %d (id %s) on %s claims %s without valid "
                        "proof: stored, claim ignored (%d so far; forged, or the site's "
                        "mqtt.hq_key_file is not its 'hq site-key')", row.site, row.kind,
                        row.seq, row.id[:64], topic, [k for k in proof.CLAIM_KEYS if k in env],
                        self.counters["unproven_claims"])
        else:
            log.debug("hq receiver: unproven claim on %s seq %d", topic, row.seq)
        return dataclasses.replace(row, floor=None, lost=None, seq_end=None, unproven=True)

    def _site_key(self, site: str) -> bytes:
        assert self._master is not None
        key = self._site_keys.get(site)
        if key is None:
            key = self._site_keys[site] = proof.derive_site_key(self._master, site)
        return key

    def _on_fleet(self, topic: str, payload: bytes) -> None:
        """A ``P/status`` or ``P/health`` message: parsed now, stored with the batch."""
        self.counters["fleet_messages"] += 1
        try:
            site = topic_site(self._prefix, topic, "status")
            if site is not None:
                self._fleet_batch.append(parse_status(site, payload))
                return
            site = topic_site(self._prefix, topic, "health")
            if site is not None:
                self._fleet_batch.append(parse_health(site, payload))
                return
            raise ValueError("topic is not {prefix}/{site}/status or /health")
        except (ValueError, RecursionError, MemoryError) as exc:
            self.counters["fleet_malformed"] += 1
            levels = topic[len(self._prefix) + 1:].split("/")
            reason = str(exc) if isinstance(exc, ValueError) else \
                f"cannot be parsed: {type(exc).__name__}"
            self._rejects.append(Reject.of(topic, levels[0] if len(levels) == 2 else "",
                                           levels[-1] if len(levels) == 2 else "", reason,
                                           payload))
            self._malformed(topic, reason, counter=None)

    def _malformed(self, topic: str, reason: str, counter: str | None = "malformed") -> None:
        if counter is not None:
            self.counters[counter] += 1
        now = time.monotonic()
        if now - self._malformed_logged_at >= MALFORMED_LOG_INTERVAL_S:
            self._malformed_logged_at = now
            log.warning("rejected a message on %.200s: %s (%d since start; more within "
                        "%.0fs are logged at DEBUG)", topic, reason,
                        self.counters["malformed"] + self.counters["fleet_malformed"],
                        MALFORMED_LOG_INTERVAL_S)
        else:
            log.debug("rejected a message on %.200s: %s", topic, reason)

    # -- the loop --------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Connect (failing over across ``mqtt.hosts``), consume, reconnect, until ``stop``."""
        try:
            self._run(stop)
        except Exception as exc:  # a bug: logged with its traceback, then the process exits
            # A bug, not a message (those become rejects): say it and let
            # ``edge-agent hq`` exit non-zero, so systemd restarts it.
            self.fatal = exc
            log.critical("hq receiver stopped by an unexpected error", exc_info=True)
        finally:
            self._shutdown()

    def _run(self, stop: threading.Event) -> None:
        m = self.cfg.mqtt
        attempt = 0
        host_index = 0
        warned = False  # one WARNING per streak of failures; the rest at DEBUG
        while not stop.is_set():
            self._host = m.hosts[host_index % len(m.hosts)]
            error = self._connect()
            if error is None:
                self._serve(stop)
                error = self._drop_reason
                if self._connack_ok:  # it worked for a while: start the backoff afresh
                    attempt = 0
                    warned = self._dropped_again(stop)
            if stop.is_set():
                break
            if not self._connack_ok:
                host_index += 1  # failover: this host did not take us
            reason = error or f"lost the connection to {self._host}"
            if self._taken_over or self._flapping:
                # Already said, once and as what it is (_on_disconnect, _dropped_again).
                log.debug("hq receiver: %s", reason)
            elif not warned:
                warned = True
                log.warning("hq receiver: %s; retrying (%d host(s))", reason, len(m.hosts))
            else:
                log.debug("hq receiver: %s", reason)
            stop.wait(reconnect_delay(attempt, m.backoff_min_s, m.backoff_max_s, self._rand))
            attempt += 1

    def _dropped_again(self, stop: threading.Event) -> bool:
        """Note a dropped connection that had been accepted; whether the drop is already
        said (so the caller logs it at DEBUG).

        A broker that takes a client id over tells the old client so (DISCONNECT
        0x8E, handled in ``_on_disconnect``), but some (mosquitto 2.0) just close
        its socket. Connections accepted and then closed by the broker again and
        again, FLAP_COUNT times within FLAP_WINDOW_S, are said once as what they
        almost always are: another receiver with this client id.
        """
        if stop.is_set():
            return True
        now = time.monotonic()
        if self._flapping and now - self._connected_at > FLAP_WINDOW_S:
            self._flapping = False  # that connection lasted: a later drop is news again
        self._drops = [t for t in self._drops if now - t <= FLAP_WINDOW_S] + [now]
        if self._taken_over or self._flapping:
            return True
        if len(self._drops) >= FLAP_COUNT:
            self._flapping = True
            self.counters["taken_over"] += 1
            if not self._takeover_logged:
                self._takeover_logged = True
                log.error("hq receiver: the broker closed our connection %d times within %.0fs "
                          "right after accepting it: most likely another client connects with "
                          "our client id %r (session taken over). Two receivers with one id "
                          "knock each other off in a loop: give each its own [hq] client_id, "
                          "or leave it empty for a unique one.", len(self._drops),
                          FLAP_WINDOW_S, self.client_id)
            return True
        # A single drop is worth one WARNING per FLAP_WINDOW_S, not one per reconnect.
        if now - self._lost_warned_at < FLAP_WINDOW_S:
            return True
        self._lost_warned_at = now
        return False

    def _connect(self) -> str | None:
        """Open a connection to the current host; the error text if that failed."""
        m = self.cfg.mqtt
        self._connack_ok = False
        self._drop_reason = None
        self._taken_over = False
        self._mids.clear()  # ids of an old connection mean nothing on a new one
        self._pubacks.clear()
        try:
            if m.protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = (SESSION_EXPIRY_S if self._persistent
                                               else AUTO_SESSION_EXPIRY_S)
                # A made-up id is resumed only by this process: a clean start the
                # first time, the session on a reconnect.
                clean = not self._persistent and self.counters["connects"] == 0
                self._client.connect(self._host, m.port, m.keepalive_s, clean_start=clean,
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
            if self._connack_ok and not self._link_ready:
                self._link_up()
            link = self._link
            link_sock = link.socket() if link is not None else None
            # TLS may hold decrypted bytes that select() cannot see.
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                readable, link_readable = True, False
            else:
                rlist = [sock] if link_sock is None else [sock, link_sock]
                wlist = [sock] if client.want_write() else []
                if link is not None and link_sock is not None and link.want_write():
                    wlist.append(link_sock)
                r, _, _ = select.select(rlist, wlist, [], self._idle_wait())
                readable, link_readable = sock in r, link_sock is not None and link_sock in r
            if link_sock is not None:
                self._link_service(link_readable)
            if readable and not self._read_burst(sock):
                break
            if self._mids or self._envelopes or self._rejects or self._fleet_batch:
                try:
                    self._flush()
                except StoreError as exc:
                    self._store_failed(exc)
                    # Nothing of the batch is PUBACKed: reconnecting makes the
                    # broker redeliver it from our session.
                    self._drop_reason = str(exc)
                    self._envelopes.clear()  # the broker's redelivery is the retry
                    self._rejects.clear()
                    self._mids.clear()
                    break
            if client.want_write() and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            self._republish()
            self._send_acks()
        self.subscribed.clear()
        if stop.is_set() and client.socket() is not None:
            self._flush_quietly()
            return   # _shutdown sends the rest and closes the ack link
        self._link_down()   # it follows the events connection (a failover moves both)
        if self._envelopes or self._rejects:
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
        """Store the batch (events and rejects), then PUBACK it, then ack its streams."""
        envelopes, rejects, mids = self._envelopes, self._rejects, self._mids
        marks: dict[Stream, int] = {}
        caps: dict[Stream, int] = {}
        if envelopes or rejects:
            before = dict(self.store.counters)
            started = time.perf_counter()
            marks = self._store(envelopes, rejects)  # committed when it returns
            if self.metrics is not None:
                self.metrics.store_seconds.observe(time.perf_counter() - started)
            if self._store_failing:
                self._store_failing = False
                log.info("hq receiver: storing again")
            for key in ("stored", "duplicates", "conflicts"):
                self.counters[key] += self.store.counters.get(key, 0) - before.get(key, 0)
            now = time.monotonic()
            newest: dict[Stream, int] = {}
            for row in envelopes:
                if not self._active:
                    self._next_republish = now + REPUBLISH_INTERVAL_S
                heard = self._active.get(row.stream, (now, None))[1] or Heard()
                heard.add(row.seq, row.end)
                self._active[row.stream] = (now, heard)
                newest[row.stream] = max(newest.get(row.stream, 0), row.end)
            for stream, top in newest.items():
                heard = self._active[stream][1]
                heard.cap = caps[stream] = heard.run_end(top)
        self._envelopes, self._rejects, self._mids = [], [], []
        self._store_fleet()
        for stream, upto in marks.items():
            # Never past the run of seqs the agent just sent (see Heard).
            self._publish_ack(stream, min(upto, caps.get(stream, 0)))
        if self._client.socket() is None:
            return
        self._pubacks.extend(mids)
        self._send_acks()

    def _store(self, envelopes: list[EventRow], rejects: list[Reject]) -> dict[Stream, int]:
        """``store_batch``, and if a message breaks it in a way SQLite did not (a bug
        it triggers), the batch again one by one with the culprits as rejects: one
        bad message must not stop the receiver or come back forever."""
        try:
            return self.store.store_batch(envelopes, rejects)
        except StoreError:
            raise
        except Exception as exc:  # any row's bug: the batch is split to find it
            log.exception("hq receiver: a batch of %d failed to store (%s); retrying one "
                          "by one", len(envelopes), exc)
        marks: dict[Stream, int] = {}
        culprits: list[Reject] = []
        for row in envelopes:
            try:
                marks.update(self.store.store_batch([row]))
            except StoreError:
                raise
            except Exception as exc:  # this row's bug: it becomes a reject, the rest is stored
                topic = f"{self._prefix}/{row.site}/events/{row.kind}"
                culprits.append(Reject.of(topic, row.site, row.kind,
                                          f"cannot be stored: {type(exc).__name__}: {exc}",
                                          row.payload.encode("utf-8", "replace")))
        if rejects or culprits:
            self.store.store_batch([], rejects + culprits)
        self.counters["rejected"] += len(culprits)
        return marks

    def _store_fleet(self) -> None:
        """Write the batch's status and health messages; a failure loses only a snapshot
        (the status is retained, the health comes again), so it is counted, not retried."""
        batch, self._fleet_batch = self._fleet_batch, []
        if not batch or self.fleet is None:
            return
        try:
            self.fleet.record(batch, time.time())
        except StoreError as exc:
            self.counters["fleet_failures"] += 1
            log.warning("hq receiver: fleet state not stored: %s", exc)

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

    def _publish_ack(self, stream: Stream, upto: int) -> None:
        """Owe ``stream`` the ack ``upto``: it replaces a lower one not yet handed to paho
        (:meth:`_send_acks` sends it)."""
        if upto <= 0:
            return
        pending = self._pending_acks.get(stream)
        if pending is not None:
            self.counters["acks_coalesced"] += 1
            if pending >= upto:
                return
        self._pending_acks[stream] = upto

    def _send_acks(self, *, force: bool = False) -> None:
        """Hand paho the pending acks, then the pending PUBACKs, PUBACK_CHUNK at a time
        while the socket takes them all, but only while paho holds no bytes the socket
        has not taken (``force``: stopping, everything at once).

        So an ack on the events connection queues behind at most one chunk of PUBACKs
        in paho, never behind a growing backlog of them, and while the socket (or the
        link's window) is full a newer watermark of a stream replaces the older one
        instead of queueing behind it. Each ack is
        ``{"kind", "upto", "epoch"}`` (the epoch only when the agent sent one) on the
        site's ``P/acks``, with proof when HQ has a master key: on the ack link (QoS 1,
        at most ACK_LINK_WINDOW awaiting PUBACK) when it is up, else on the events
        connection at QoS 0. PUBACKs keep the order their messages came in (MQTT 4.6).
        """
        client = self._client
        if client.socket() is None:
            return
        if self._pending_acks:
            link = self._link
            if self._link_ready and link is not None and link.socket() is not None:
                self._publish_pending_acks(link, ACK_LINK_QOS,
                                           ACK_LINK_WINDOW - self._link_inflight)
            if force or (self._pending_acks and not self._link_ready
                         and not client.want_write()):
                self._publish_pending_acks(client, ACK_QOS, len(self._pending_acks))
        pubacks = self._pubacks
        while pubacks and (force or not client.want_write()):
            for _ in range(min(len(pubacks), PUBACK_CHUNK)):
                client.ack(pubacks.popleft(), 1)

    def _publish_pending_acks(self, client: mqtt.Client, qos: int, room: int) -> None:
        """Publish up to ``room`` pending acks on ``client``, the longest waiting first."""
        pending = self._pending_acks
        for _ in range(min(room, len(pending))):
            (site, kind, epoch), upto = stream_upto = next(iter(pending.items()))
            del pending[stream_upto[0]]
            ack: dict[str, Any] = {"kind": kind, "upto": upto}
            if epoch:
                ack["epoch"] = epoch
            if self._master is not None:
                ack = proof.sign(self._site_key(site), site, "acks", ack)
            info = client.publish(f"{self._prefix}/{site}/acks",
                                  json.dumps(ack, separators=(",", ":")), qos=qos)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.counters["acks_sent"] += 1
                if client is self._link and qos:
                    self._link_inflight += 1

    def _republish(self) -> None:
        """Re-send the ack of streams heard from recently.

        An agent whose ack got lost (it was reconnecting) would otherwise wait
        ``ack_timeout_s`` and resend. The marks are read from the store, so a
        stream another receiver advanced is acked at its true height (capped,
        as in :meth:`_flush`, at the highest seq heard from it here).
        """
        now = time.monotonic()
        if not self._active or now < self._next_republish:
            return
        self._next_republish = now + REPUBLISH_INTERVAL_S
        for stream in [k for k, (t, _) in self._active.items()
                       if now - t > REPUBLISH_WINDOW_S]:
            del self._active[stream]
        if not self._active:
            return
        try:
            marks = self.store.watermarks()
        except StoreError as exc:
            log.debug("hq receiver: cannot re-read watermarks: %s", exc)
            return
        for stream, (_, heard) in self._active.items():
            self._publish_ack(stream, min(marks.get(stream, 0), heard.cap))
        self._send_acks()

    def _shutdown(self) -> None:
        """Let the last PUBACKs and acks leave, disconnect (a set client id's session
        stays; a made-up one's ends), close."""
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

        self._send_acks(force=True)
        drain()
        link = self._link
        while link is not None and link.want_write() and time.monotonic() < deadline:
            link_sock = link.socket()
            if link_sock is None:
                break
            select.select([], [link_sock], [], 0.05)
            if link.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self._link_down()
        if client.socket() is not None:
            props = None
            if not self._persistent and self.cfg.mqtt.protocol == "5":
                # A made-up id's session is never resumed: end it now. Left to expire,
                # it stays in the share group and the broker queues this receiver's
                # share of the events for nobody until then.
                props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = 0
            client.disconnect(properties=props)
            drain()
        self.subscribed.clear()
        if self._owns_store:
            self.store.close()
        if self._owns_fleet and self.fleet is not None:
            self.fleet.close()
