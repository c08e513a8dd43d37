"""The MQTT uplink: drains the outbox to HQ and takes acks and commands back.

One thread owns the paho-mqtt client (paho is not thread-safe): it connects,
publishes and drives the network loop through paho's external-loop API,
``select`` on the client socket plus a wakeup socketpair. The outbox's commit
listener and :meth:`Uplink.send_command_result` only write a byte to that
socketpair, so a committed event is on the wire a millisecond or two later.

Delivery (CONTRACT 4). Per kind, events go out in seq order, as the stored
envelope bytes, QoS 1 on ``P/events/{kind}``. With ``delivery = "hq-ack"`` an
event leaves the outbox only when HQ's cumulative ack on ``P/acks`` covers it;
when the ack stops advancing for ``ack_timeout_s`` while events are out, and on
every reconnect, the kind is resent from its first unacked seq (the stored bytes, so
HQ deduplicates by seq). Each timeout resend that gets no ack doubles the next wait
(capped at 8 x ``ack_timeout_s``, jittered); an ack past what was sent before the
timeout resets it (``DeliveryLedger.ack_timed_out`` says why). The event that is
the oldest in the outbox goes out with ``"floor": seq - 1`` spliced in (README,
"Envelope extensions"): a fresh HQ store that never saw the seqs an earlier store
acked can then ack the rest.
With ``"broker-ack"`` the contiguous prefix of successful PUBACKs is deleted.
A PUBACK with a failure reason (an ACL denial under MQTT 5) is not a delivery:
the kind is resent after a backoff.

Sessions. Every connection uses a fresh paho client with a clean session: the
outbox is the only queue (paho's in-flight state would only duplicate it), so
commands HQ publishes while the site is offline are not kept by the broker;
HQ re-issues what got no result. Hosts are tried in order; after a whole round
failed (or a connection died within ``STABLE_CONNECTION_S``) the next round
waits a capped exponential backoff with jitter. Failures are logged on edges:
one ERROR when the link goes down, one INFO when it is back, DEBUG between.

The bookkeeping (pointers, the in-flight window, the order kinds are served in)
is :mod:`agent.uplink.ledger`, pure code with time passed in; ack parsing and
error wording are :mod:`agent.uplink.protocol`; this module is the I/O.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import proof
from agent.config import AgentConfig
from agent.errors import OutboxError
from agent.kinds import KINDS, PRIORITY
from agent.uplink.ledger import DeliveryLedger, SentEvent
from agent.uplink.protocol import (
    CAUSES,
    MAX_DOWNLINK_BYTES,
    AckMessage,
    TlsSetupError,
    connect_error_cause,
    describe_connect_error,
    describe_refusal,
    parse_ack,
    reconnect_delay,
    split_host,
    status_payload,
    with_epoch,
    with_floor,
)
from agent.uplink.wire import BatchingClient

if TYPE_CHECKING:
    from agent.outbox import Outbox

log = logging.getLogger("agent.uplink")

PUMP_BUDGET = 1024                 # events published per loop turn before reads/acks get a turn
MISC_INTERVAL_S = 0.5              # paho loop_misc (keepalive pings, ping timeouts)
# Pump passes at most this often (but at once after a quiet spell, or when the last
# pass stopped on its budget): under load every group commit wakes the uplink, and a
# pass per commit competed with the API for the GIL for a handful of events each.
PUMP_INTERVAL_S = 0.005
# Acks (HQ's, or the broker's deletable prefix) go to the outbox at most this often,
# the latest per kind: under load HQ acks every few events, and each hand-over woke
# the outbox writer for a delete (which it holds anyway, see ACK_HOLD_S there).
ACK_FLUSH_S = 0.1
STABLE_CONNECTION_S = 10.0         # a connection lost sooner counts as a failed round (backoff)
GOODBYE_TIMEOUT_S = 2.0            # how long stop() waits for the offline status PUBACK
MAX_PENDING_RESULTS = 1000         # command results kept while HQ is unreachable


class Uplink:
    """Forwards the outbox to HQ over MQTT; see the module docstring."""

    def __init__(self, cfg: AgentConfig, outbox: Outbox, *, version: str,
                 health: Callable[[], dict[str, Any]] | None = None,
                 on_command: Callable[[str, bytes], None] | None = None) -> None:
        self.cfg = cfg
        self.mq = cfg.mqtt
        self.outbox = outbox
        self.version = version
        self.health = health
        self.on_command = on_command
        root = cfg.topic_root
        self.topic_status = f"{root}/status"
        self.topic_health = f"{root}/health"
        self.topic_acks = f"{root}/acks"
        self.topic_commands = f"{root}/commands/"
        self.topic_results = f"{root}/command-results"
        self.topic_events = {k: f"{root}/events/{k}" for k in KINDS}
        self.hq_ack = self.mq.delivery == "hq-ack"
        self.hosts = [split_host(h, self.mq.port) for h in self.mq.hosts]

        self._lock = threading.Lock()          # guards what snapshot() reads
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closed = False
        self._results: deque[bytes] = deque()  # command results waiting for a connection
        self._results_lock = threading.Lock()

        self.ledger: DeliveryLedger | None = None
        # snapshot fields
        self._state = "disconnected"
        self._host = ""
        self._since = time.time()
        self._last_ack_ts: float | None = None
        self._last_error: str | None = None
        self._cause: str | None = None        # a CAUSES code while the link is down
        # Wall time of the first failure of the current outage (None while up): status
        # counts the grace from here, not from the last reconnect attempt.
        self._down_since: float | None = time.time()
        self.counters = {"acks": 0, "reconnects": 0, "publish_failures": 0, "bad_acks": 0,
                         "forged_acks": 0, "forged_commands": 0, "retained_commands": 0,
                         "pubacks": 0, "stale_acks": 0, "oversize_messages": 0}
        # Acks refused per kind (beyond what was sent, or without valid proof): a
        # kind whose acks keep being refused does not drain (status degrades on it).
        self.acks_refused: dict[str, int] = {}
        # The key HQ proves its acks and commands with (agent/proof.py); read once.
        self.hq_key: bytes | None = (proof.read_site_key(self.mq.hq_key_file)
                                     if self.mq.hq_key_file else None)
        self._forgery_logged: set[str] = set()   # channels in a streak of forgeries
        self._retained_logged = False

        # owned by the uplink thread
        self._client: BatchingClient | None = None
        self._connected = False
        self._connected_at = 0.0
        self._connack_deadline = 0.0
        self._refusal: str | None = None      # set by on_connect when CONNACK says no
        self._lost: str | None = None         # set by on_disconnect
        self._lost_cause = "closed"           # its CAUSES code
        self._paho_error: str | None = None   # last error paho logged (e.g. a TLS alert)
        self._host_index = 0
        self._failed_rounds = 0
        self._next_attempt = 0.0
        self._link_up: bool | None = None     # for logging on edges only
        self._ever_connected = False
        self._outbox_error: str | None = None  # last read/ack failure, logged on edges
        self._event_mids: dict[int, SentEvent] = {}
        self._result_mids: dict[int, bytes] = {}
        self._goodbye_mid: int | None = None
        # Set once the broker granted this connection's SUBSCRIBE (acks and commands
        # flow only after that); cleared with the connection. Any thread may wait on it.
        self.subscribed = threading.Event()
        self._subscribe_mid: int | None = None
        self._goodbye_acked = False
        self._early_pubacks: dict[int, ReasonCode] = {}
        self._ack_due: dict[str, int] = {}
        self._last_ack_flush = 0.0            # monotonic time acks last went to the outbox
        self._next_misc = 0.0
        self._next_health = 0.0
        self._more = False                    # the pump stopped on its budget: go again soon
        self._last_pump = 0.0                 # monotonic time of the last pump pass
        self._pump_waiting = False            # a pass put off by PUMP_INTERVAL_S
        self._failure_logged: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        """Start the thread that owns the MQTT client."""
        if self._thread is not None:
            raise RuntimeError("uplink already started")
        if self.hq_key is None:
            log.warning("uplink: mqtt.hq_key_file is not set: acks and commands on %s are "
                        "not authenticated, so anyone who can publish there can delete "
                        "events from the outbox or run commands", self.cfg.topic_root)
        stats = self.outbox.stats()
        start_after = {}
        for kind in KINDS:
            s = stats[kind]
            # Everything still in the outbox is unacked; an empty kind starts after its last seq.
            start_after[kind] = s.first_seq - 1 if s.depth and s.first_seq else s.last_seq
        self.ledger = DeliveryLedger(start_after, max_inflight=self.mq.max_inflight,
                                     hq_ack=self.hq_ack, ack_timeout_s=self.mq.ack_timeout_s,
                                     hold_min_s=self.mq.backoff_min_s)
        self.outbox.add_listener(self._on_commit)
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the offline status, disconnect, join the thread."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("uplink thread did not stop within %.1fs", timeout)
                return
        self._closed = True
        self._wake_r.close()
        self._wake_w.close()

    def send_command_result(self, payload: dict[str, Any]) -> None:
        """Queue a command result for ``P/command-results`` (any thread)."""
        body = json.dumps(payload, separators=(",", ":"), default=str).encode()
        with self._results_lock:
            if len(self._results) >= MAX_PENDING_RESULTS:
                dropped = self._results.popleft()
                log.warning("command results pile up while HQ is unreachable; dropped the "
                            "oldest (%d bytes)", len(dropped))
            self._results.append(body)
        self._wake()

    def snapshot(self) -> dict[str, Any]:
        """The uplink's state for status, metrics and P/health (a copy; any thread)."""
        with self._lock:
            ledger = self.ledger
            unacked = {k: len(v.inflight) for k, v in ledger.kinds.items()} if ledger else {}
            acked = {k: v.acked_upto for k, v in ledger.kinds.items()} if ledger else {}
            return {
                "state": self._state, "host": self._host, "since": self._since,
                "down_since": None if self._state == "connected" else self._down_since,
                "cause": None if self._state == "connected" else self._cause,
                "ack_wait_s": ledger.ack_waits(time.monotonic()) if ledger else {},
                "last_ack_ts": self._last_ack_ts, "unacked": unacked, "acked_upto": acked,
                "acks": self.counters["acks"],
                "resends": ledger.resends if ledger else 0,
                "reconnects": self.counters["reconnects"],
                "publish_failures": self.counters["publish_failures"],
                "bad_acks": self.counters["bad_acks"],
                "forged_acks": self.counters["forged_acks"],
                "forged_commands": self.counters["forged_commands"],
                "retained_commands": self.counters["retained_commands"],
                "pubacks": self.counters["pubacks"],
                "stale_acks": self.counters["stale_acks"],
                "oversize_messages": self.counters["oversize_messages"],
                "epoch": self.outbox.epoch,
                "acks_refused": dict(self.acks_refused),
                "last_error": self._last_error,
            }

    # ------------------------------------------------------------------ thread

    def _wake(self) -> None:
        # Called from the outbox writer and producers: must never block or raise.
        if self._closed:
            return
        # BlockingIOError: a wake is already pending; OSError: closing down.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _on_commit(self) -> None:
        # The outbox writer, after each commit (its stats already updated): no wake
        # when a pump pass is already due (PUMP_INTERVAL_S), which reads them anyway.
        if not self._pump_waiting:
            self._wake()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._client is None:
                    self._attempt_connect()
                else:
                    self._turn()
            except Exception as exc:  # the uplink must outlive its own bugs
                log.exception("uplink: unexpected error; reconnecting")
                self._drop(f"internal error: {type(exc).__name__}: {exc}", "internal",
                           failed=True)
        try:
            self._goodbye()
        except Exception:  # logged, never raised into the thread
            log.exception("uplink: error while disconnecting")
        self._set_state("disconnected", self._host)

    def _set_state(self, state: str, host: str) -> None:
        with self._lock:
            if state != self._state or host != self._host:
                self._state, self._host, self._since = state, host, time.time()

    # ------------------------------------------------------------------ connecting

    def _attempt_connect(self) -> None:
        now = time.monotonic()
        if now < self._next_attempt:
            self._set_state("disconnected", "")
            self._wait_wake(self._next_attempt - now)
            return
        host, port = self.hosts[self._host_index]
        where = f"{host}:{port}"
        self._set_state("connecting", where)
        self._refusal = self._lost = self._paho_error = None
        self._lost_cause = "closed"
        try:
            client = self._new_client()
            client.connect(host, port, keepalive=self.mq.keepalive_s)
        except Exception as exc:  # mapped to one line below
            self._attempt_failed(describe_connect_error(exc, where, self.mq.connect_timeout_s),
                                 connect_error_cause(exc))
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # paho leaves Nagle on: a lone QoS 1 event would wait for the ack of the last one.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._client = client
        self._connack_deadline = time.monotonic() + self.mq.connect_timeout_s
        self._next_misc = time.monotonic() + MISC_INTERVAL_S

    def _new_client(self) -> BatchingClient:
        # A fresh client per connection: no paho session state (queued or
        # in-flight messages, mids) survives a reconnect; the outbox is the
        # only queue, and the ledger resends from it.
        v5 = self.mq.protocol == "5"
        # Its writes wait for this thread's loop_write and are joined; reads are
        # buffered (agent/uplink/wire.py).
        client = BatchingClient(CallbackAPIVersion.VERSION2, client_id=self.cfg.client_id,
                                protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                clean_session=None if v5 else True)
        client.connect_timeout = self.mq.connect_timeout_s
        # The ledger bounds what is in flight. paho's own limit would be redundant and
        # costly: with one set, every PUBACK scans all of paho's pending messages
        # (_update_inflight). Its queue cap stays, as a memory bound: the window plus
        # rewound events still awaiting their PUBACK, status and command results.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(2 * self.mq.max_inflight + 256)
        if self.mq.username:
            client.username_pw_set(self.mq.username, self.mq.secret_password() or None)
        if self.mq.tls:
            for key in ("ca_file", "cert_file", "key_file"):
                path = getattr(self.mq, key)
                if path and not os.path.isfile(path):
                    raise TlsSetupError(2, f"mqtt.{key} {path} not found", path)
            try:
                client.tls_set(ca_certs=self.mq.ca_file or None,
                               certfile=self.mq.cert_file or None,
                               keyfile=self.mq.key_file or None)
            except ssl.SSLError as exc:
                raise TlsSetupError(f"cannot load the TLS files (mqtt.ca_file/cert_file/key_file): "
                              f"{exc.reason or exc}") from None
        client.will_set(self.topic_status, self._status("offline"), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_log = self._on_log
        return client

    def _attempt_failed(self, message: str, cause: str) -> None:
        """One host did not work out; after a whole round of hosts, back off."""
        self._close_client()
        self._note_down(message, cause)
        self._host_index += 1
        if self._host_index >= len(self.hosts):
            self._host_index = 0
            self._failed_rounds += 1
            self._next_attempt = time.monotonic() + self._backoff()

    def _backoff(self) -> float:
        return reconnect_delay(self._failed_rounds - 1, self.mq.backoff_min_s,
                               self.mq.backoff_max_s)

    def _note_down(self, message: str, cause: str, *, new_outage: bool = False) -> None:
        with self._lock:
            self._last_error = message
            self._cause = cause if cause in CAUSES else "closed"
            if self._down_since is None or new_outage:
                self._down_since = time.time()
        if self._link_up is not False:
            log.error("uplink: %s", message)
            self._link_up = False
        else:
            log.debug("uplink (still down): %s", message)

    def _note_up(self, where: str) -> None:
        if self._link_up is not True:
            log.info("uplink: connected to %s", where)
            self._link_up = True

    def _drop(self, message: str, cause: str, *, failed: bool = False) -> None:
        """The connection is gone (or unusable): log the edge, schedule the reconnect."""
        was_connected = self._connected
        lived = time.monotonic() - self._connected_at
        self._close_client()
        if not was_connected:
            self._attempt_failed(message, cause)
            return
        # A connection that lived a while ends an outage and this starts a new one; one
        # lost within STABLE_CONNECTION_S is the same outage going on (a flapping link).
        self._note_down(f"lost the connection to {self._host}: {message}", cause,
                        new_outage=lived >= STABLE_CONNECTION_S)
        self._host_index = 0   # a new round, starting at the preferred host
        if failed or lived < STABLE_CONNECTION_S:
            # A broker that accepts and then drops us at once must not be hammered.
            self._failed_rounds += 1
            self._next_attempt = time.monotonic() + self._backoff()
        else:
            self._failed_rounds = 0
            self._next_attempt = 0.0

    def _close_client(self) -> None:
        client, self._client = self._client, None
        self._connected = False
        self.subscribed.clear()
        self._subscribe_mid = None
        self._event_mids.clear()
        if self._result_mids:
            # Results still waiting for their PUBACK go again, first, on the next connection.
            with self._results_lock:
                self._results.extendleft(reversed(list(self._result_mids.values())))
            self._result_mids.clear()
        self._early_pubacks.clear()
        if client is not None:
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._set_state("disconnected", self._host)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            self._refusal = describe_refusal(reason, self._host)
            return
        self._connected = True
        self._connected_at = time.monotonic()
        with self._lock:
            self.counters["reconnects"] += 1 if self._ever_connected else 0
            self._last_error = None
            self._cause = None
            # Not cleared yet: a connection lost again within STABLE_CONNECTION_S
            # continues this outage (see _drop); a stable one starts the next afresh.
        self._ever_connected = True
        self._set_state("connected", self._host)
        self._note_up(self._host)
        assert self.ledger is not None
        with self._lock:
            self.ledger.rewind_all()   # HQ dedups by seq; whatever was in flight goes again
        if self.mq.protocol == "5":
            # retainAsPublished: a command someone publishes retained while we are
            # connected arrives marked retained too (and is ignored, see _on_message).
            topics: list[tuple[str, Any]] = [(self.topic_commands + "+", SubscribeOptions(
                qos=1, retainAsPublished=True))]
            if self.hq_ack:
                topics.append((self.topic_acks, SubscribeOptions(qos=1)))
        else:
            topics = [(self.topic_commands + "+", 1)]
            if self.hq_ack:
                topics.append((self.topic_acks, 1))
        self._subscribe_mid = client.subscribe(topics)[1]
        client.publish(self.topic_status, self._status("online"), qos=1, retain=True)
        self._next_health = 0.0

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Properties | None) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            # The broker's ACL may refuse acks or commands: say so once per connection.
            log.error("uplink: the broker refused our subscriptions (%s): HQ's acks or "
                      "commands will not arrive; check the broker ACL", ", ".join(refused))
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any,
                       flags: mqtt.DisconnectFlags, reason: ReasonCode,
                       properties: Properties | None) -> None:
        if flags.is_disconnect_packet_from_server:
            self._lost = f"the broker disconnected us: {reason}"
            self._lost_cause = "broker_disconnect"
        elif str(reason) == "Keep alive timeout":
            # Our own check: the broker did not answer a ping within the keepalive, so
            # the path to it (or the broker process) is stalled. Nobody closed anything.
            self._lost = (f"keepalive timeout: no answer from {self._host} within "
                          f"mqtt.keepalive_s ({self.mq.keepalive_s} s) of our ping; the "
                          "network or the broker is stalled")
            self._lost_cause = "keepalive_timeout"
        else:
            self._lost = self._paho_error or "the connection was closed (by the broker or network)"
            self._lost_cause = "closed"

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._paho_error = message
        log.debug("paho: %s", message)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        entry = self._event_mids.pop(mid, None)
        if entry is not None:
            self._event_puback(entry, reason)
        elif self._result_mids.pop(mid, None) is not None:
            pass
        elif mid == self._goodbye_mid:
            self._goodbye_acked = True
        else:
            # on_publish may run before publish() returned the mid (always so for QoS 0):
            # keep it for _publish to claim.
            self._early_pubacks[mid] = reason

    def _event_puback(self, entry: SentEvent, reason: ReasonCode) -> None:
        ok = not reason.is_failure
        if not ok:
            with self._lock:
                self.counters["publish_failures"] += 1
            key = (entry.kind, str(reason))
            if key not in self._failure_logged:
                self._failure_logged.add(key)
                log.error("uplink: the broker refused %s seq %d: %s (check the broker ACL "
                          "for %s); will retry", entry.kind, entry.seq, reason,
                          self.topic_events[entry.kind])
        assert self.ledger is not None
        with self._lock:
            self.counters["pubacks"] += 1
            upto = self.ledger.puback(entry, ok, time.monotonic())
            if upto is not None:   # broker-ack: the deletable prefix grew
                self.counters["acks"] += 1
                self._last_ack_ts = time.time()
        if upto is not None:
            self._ack_due[entry.kind] = upto

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if len(msg.payload) > MAX_DOWNLINK_BYTES:
            # Before any parsing: a huge or absurdly deep message must cost nothing.
            with self._lock:
                self.counters["oversize_messages"] += 1
                count = self.counters["oversize_messages"]
            (log.warning if count == 1 else log.debug)(
                "uplink: ignored a message of %d bytes on %.200s (acks and commands are "
                "at most %d bytes; %d ignored so far)", len(msg.payload), topic,
                MAX_DOWNLINK_BYTES, count)
            return
        if topic == self.topic_acks:
            self._hq_ack(bytes(msg.payload))
        elif topic.startswith(self.topic_commands):
            name = topic[len(self.topic_commands):]
            if msg.retain:
                # A retained command would run again on every (re)subscription: HQ never
                # retains commands, so one that is retained was put there by someone else.
                with self._lock:
                    self.counters["retained_commands"] += 1
                (log.debug if self._retained_logged else log.warning)(
                    "uplink: ignored a retained command %r on %s (commands are never "
                    "retained; clear it with an empty retained publish)", name[:64], topic)
                self._retained_logged = True
                return
            if not self._proved(f"commands/{name}", bytes(msg.payload), "forged_commands"):
                return
            if self.on_command is None:
                log.warning("uplink: command %r received but no command handler is set", name)
                return
            try:
                self.on_command(name, bytes(msg.payload))
            except Exception:  # a handler bug must not take the uplink down
                log.exception("uplink: command handler failed for %r", name)

    def _proved(self, channel: str, payload: bytes, counter: str) -> bool:
        """Whether a message from HQ may be acted on: always without a key; with one,
        only with valid proof. A forgery is counted and logged on edges: one WARNING
        when a streak starts, DEBUG while it lasts, INFO when proven messages resume."""
        key = self.hq_key
        if key is None:
            return True
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict) and proof.verify(key, self.cfg.site.id, channel, body):
            family = channel.split("/", 1)[0]
            if family in self._forgery_logged:
                self._forgery_logged.discard(family)
                log.info("uplink: %s with valid proof again", family)
            return True
        with self._lock:
            self.counters[counter] += 1
            count = self.counters[counter]
        family = channel.split("/", 1)[0]
        if isinstance(body, dict) and family == "acks" and body.get("kind") in KINDS:
            self._refused_ack(str(body["kind"]))
        first = family not in self._forgery_logged
        self._forgery_logged.add(family)
        (log.warning if first else log.debug)(
            "uplink: ignored a message on %s/%s without valid proof (%d so far; is "
            "mqtt.hq_key_file the key 'edge-agent hq site-key %s' prints? or someone "
            "else publishes there)", self.cfg.topic_root, channel, count, self.cfg.site.id)
        return False

    def _refused_ack(self, kind: str) -> None:
        with self._lock:
            self.acks_refused[kind] = self.acks_refused.get(kind, 0) + 1

    def _hq_ack(self, payload: bytes) -> None:
        if not self._proved("acks", payload, "forged_acks"):
            return
        parsed = parse_ack(payload)
        if isinstance(parsed, AckMessage) and parsed.epoch is not None \
                and parsed.epoch != self.outbox.epoch:
            # An ack for another run of this outbox (or another box with this site id):
            # what it covers says nothing about the events this run sent.
            with self._lock:
                self.counters["stale_acks"] += 1
            log.debug("uplink: ignored an ack for epoch %.64r (ours is %s)", parsed.epoch,
                      self.outbox.epoch)
            return
        if isinstance(parsed, AckMessage):
            last_seq = self.outbox.stats()[parsed.kind].last_seq
            if parsed.upto > last_seq:
                # Acking seqs never assigned would skip every future event up to it.
                self._refused_ack(parsed.kind)
                parsed = f"upto {parsed.upto} is beyond the last {parsed.kind} seq {last_seq}"
        if isinstance(parsed, str):
            with self._lock:
                self.counters["bad_acks"] += 1
                first = self.counters["bad_acks"] == 1
            (log.warning if first else log.debug)(
                "uplink: ignored a malformed ack on %s: %s (%r)", self.topic_acks, parsed,
                payload[:200])
            return
        assert self.ledger is not None
        with self._lock:
            moved = self.ledger.hq_acked(parsed.kind, parsed.upto, time.monotonic())
            if moved:
                self.counters["acks"] += 1
                self._last_ack_ts = time.time()
        if moved:
            self._ack_due[parsed.kind] = parsed.upto

    # ------------------------------------------------------------------ one loop turn

    def _turn(self) -> None:
        client = self._client
        assert client is not None
        sock = client.socket()
        if sock is None:
            self._drop(self._lost or self._paho_error or "connection closed", self._lost_cause)
            return
        now = time.monotonic()
        timeout = self._next_misc - now
        if not self._connected:
            timeout = min(timeout, self._connack_deadline - now)
        else:
            timeout = min(timeout, self._next_health - now)
            assert self.ledger is not None
            timeout = min(timeout, self.ledger.next_deadline(now) - now)
        if self._pump_waiting:
            timeout = min(timeout, self._last_pump + PUMP_INTERVAL_S - now)
        if self._ack_due:
            timeout = min(timeout, self._last_ack_flush + ACK_FLUSH_S - now)
        tls_pending = getattr(sock, "pending", None)

        def pending() -> bool:
            # Bytes already read that select can't see: TLS's decrypted ones, our buffer's.
            return client.buffered() > 0 or (tls_pending is not None and tls_pending() > 0)

        if self._more or pending():
            timeout = 0.0   # more to send, or bytes already read waiting for paho
        wlist = [sock] if client.want_write() else []
        readable, _, _ = select.select([sock, self._wake_r], wlist, [], max(0.0, timeout))
        if self._wake_r in readable:
            self._drain_wake()
        if (sock in readable or pending()) and (
                client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None):
            self._lost_or_refused()
            return
        if self._refusal is not None:
            self._attempt_failed(self._refusal, "broker_refused")
            return
        if client.want_write() and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost_or_refused()
            return
        now = time.monotonic()
        if now >= self._next_misc:
            self._next_misc = now + MISC_INTERVAL_S
            if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._lost_or_refused()
                return
        if not self._connected:
            if now >= self._connack_deadline:
                self._attempt_failed(f"{self._host}: no CONNACK within "
                                     f"{self.mq.connect_timeout_s:g}s (mqtt.connect_timeout_s)",
                                     "timeout")
            return
        self._flush_acks()
        if self._stopping.is_set():
            return
        self._timers(client, now)
        self._send_results(client)
        if self._more or now - self._last_pump >= PUMP_INTERVAL_S:
            self._pump_waiting = False
            self._last_pump = now
            self._pump(client, now)
        else:
            self._pump_waiting = True
        # What this turn published (status, results, events) leaves in one write.
        if client.want_write() and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost_or_refused()
            return
        if client.socket() is None:
            self._lost_or_refused()

    def _lost_or_refused(self) -> None:
        if self._refusal is not None:
            self._attempt_failed(self._refusal, "broker_refused")
            return
        reason = self._lost or self._paho_error or "connection closed"
        cause = self._lost_cause
        if not self._connected:
            if any(word in reason.upper() for word in ("SSL", "TLS", "CERTIFICATE")):
                cause = "tls"
            if "CERTIFICATE_REQUIRED" in reason.upper().replace(" ", "_"):
                # TLS 1.3: the server checks the client certificate after the handshake,
                # so a missing one shows up as an alert on the first read.
                reason = (f"{self._host}: the broker requires a client certificate; set "
                          f"mqtt.cert_file and mqtt.key_file ({reason})")
            else:
                reason = f"{self._host}: connection closed before CONNACK ({reason})"
        self._drop(reason, cause)

    def _wait_wake(self, seconds: float) -> None:
        readable, _, _ = select.select([self._wake_r], [], [], max(0.0, seconds))
        if readable:
            self._drain_wake()

    def _flush_acks(self) -> None:
        """Hand the acks gathered to the outbox, one delete per kind, at most every
        ACK_FLUSH_S (at once after a quiet spell, and when stopping)."""
        if not self._ack_due:
            return
        now = time.monotonic()
        if now - self._last_ack_flush < ACK_FLUSH_S and not self._stopping.is_set():
            return
        self._last_ack_flush = now
        due, self._ack_due = self._ack_due, {}
        for kind, upto in due.items():
            try:
                future = self.outbox.ack(kind, upto)
            except OutboxError as exc:   # closed under us; the next start reads the outbox
                self._outbox_failed(f"deleting acked {kind} events failed: {exc}")
                continue
            future.add_done_callback(functools.partial(self._ack_done, kind=kind, upto=upto))

    @staticmethod
    def _ack_done(future: Future[int], *, kind: str, upto: int) -> None:
        exc = future.exception()
        if exc is not None:
            log.error("uplink: could not delete %s events up to seq %d from the outbox: %s",
                      kind, upto, exc)

    def _timers(self, client: mqtt.Client, now: float) -> None:
        assert self.ledger is not None
        with self._lock:
            late = {kind: self.ledger.kinds[kind].ack_wait_s
                    for kind in self.ledger.timed_out(now)}
            waits = {kind: self.ledger.ack_timed_out(kind) for kind in late}
        for kind, waited in late.items():
            log.info("uplink: no ack for %s within %.3gs; resending from seq %d (next resend "
                     "after %.3gs without an ack)", kind, waited,
                     self.ledger.kinds[kind].acked_upto + 1, waits[kind])
        if now >= self._next_health:
            self._next_health = now + self.mq.health_interval_s
            if self.health is not None:
                try:
                    body = json.dumps(self.health(), separators=(",", ":"), default=str)
                except Exception:  # a status bug must not stop the uplink
                    log.exception("uplink: health snapshot failed")
                else:
                    self._publish(client, self.topic_health, body.encode(), qos=0)

    def _send_results(self, client: mqtt.Client) -> None:
        while True:
            with self._results_lock:
                if not self._results:
                    return
                body = self._results.popleft()
            info, early = self._publish(client, self.topic_results, body, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                with self._results_lock:
                    self._results.appendleft(body)
                return
            if early is None:
                self._result_mids[info.mid] = body

    def _pump(self, client: mqtt.Client, now: float) -> None:
        """Publish what the window allows: kinds by priority, a quantum each per pass."""
        ledger = self.ledger
        assert ledger is not None
        stats = self.outbox.stats()
        sent_total = 0
        self._more = False
        progress = True
        while progress:
            progress = False
            for kind in PRIORITY:
                last_seq = stats[kind].last_seq
                limit = ledger.allowance(kind, now, last_seq)
                if limit <= 0:
                    continue
                try:
                    rows = self._read_chunk(kind, ledger.kinds[kind].sent_upto, limit, last_seq)
                except OutboxError as exc:
                    # Retried on the next turn (at the latest MISC_INTERVAL_S away).
                    self._outbox_failed(f"reading {kind} events from the outbox failed: {exc}")
                    return
                if not rows:
                    with self._lock:
                        ledger.read_was_empty(kind, last_seq)
                    continue
                oldest = stats[kind].first_seq
                epoch = self.outbox.epoch
                for seq, body in rows:
                    # The outbox's epoch first, floor before it: HQ acks per epoch.
                    body = with_epoch(body, epoch)
                    if seq == oldest and seq > 1:
                        # The oldest event in the outbox (what a connect or an ack timeout
                        # resends first): tell HQ nothing below it will ever come, so a
                        # fresh HQ store can ack. ``stats`` may be a moment old, but
                        # first_seq only grows and this row exists, so it is the oldest.
                        body = with_floor(body, seq - 1)
                    if self.hq_key is not None:
                        # floor, lost and seq_end let HQ ack seqs it never saw: prove them.
                        body = proof.with_claim_proof(body, self.hq_key, self.cfg.site.id)
                    info, early = self._publish(client, self.topic_events[kind], body, qos=1)
                    if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        # Not connected any more, or paho's queue is full (the window plus
                        # rewound events awaiting PUBACKs): PUBACKs arriving wake us again.
                        return
                    with self._lock:
                        entry = ledger.record_sent(kind, seq, now)
                    if early is not None:
                        self._event_puback(entry, early)
                    else:
                        self._event_mids[info.mid] = entry
                sent_total += len(rows)
                progress = True
                if sent_total >= PUMP_BUDGET:
                    self._more = True
                    return

    def _read_chunk(self, kind: str, after: int, limit: int,
                    last_seq: int) -> list[tuple[int, bytes]]:
        """The next events of ``kind``, marked published *before* they are read.

        Thinning folds only never-published sensor readings; marking first keeps
        it off rows between this read and their PUBLISH. (A thinning transaction
        already under way can still race: that needs the outbox's help, and in
        hq-ack mode the ack timeout heals it by resending from the first unacked.)
        """
        mark = min(after + limit, last_seq)
        self.outbox.mark_published(kind, mark)
        rows = self.outbox.read(kind, after, limit)
        if rows and rows[0][0] > mark:
            # A gap wider than the chunk (thinned or lost seqs): mark what we saw, read again.
            mark = rows[-1][0]
            self.outbox.mark_published(kind, mark)
            rows = self.outbox.read(kind, after, limit)
        if self._outbox_error is not None:
            log.info("uplink: reading the outbox works again")
            self._outbox_error = None
        return [row for row in rows if row[0] <= mark]

    def _outbox_failed(self, message: str) -> None:
        if message != self._outbox_error:
            log.error("uplink: %s", message)
        self._outbox_error = message

    def _publish(self, client: mqtt.Client, topic: str, body: bytes, *, qos: int,
                 retain: bool = False) -> tuple[mqtt.MQTTMessageInfo, ReasonCode | None]:
        """paho's publish, plus the PUBACK if on_publish already ran inside it."""
        self._early_pubacks.clear()
        info = client.publish(topic, body, qos=qos, retain=retain)
        return info, self._early_pubacks.pop(info.mid, None)

    # ------------------------------------------------------------------ shutdown

    def _status(self, state: str) -> bytes:
        return status_payload(state, self.version, time.time())

    def _goodbye(self) -> None:
        """Offline status (retained, QoS 1, PUBACK awaited briefly), then DISCONNECT."""
        client = self._client
        if client is None:
            return
        if self._connected:
            self._goodbye_acked = False
            info, early = self._publish(client, self.topic_status,
                                        self._status("offline"), qos=1, retain=True)
            self._goodbye_mid = info.mid
            self._goodbye_acked = early is not None
            deadline = time.monotonic() + GOODBYE_TIMEOUT_S
            while (not self._goodbye_acked and client.socket() is not None
                   and time.monotonic() < deadline):
                sock = client.socket()
                assert sock is not None
                wlist = [sock] if client.want_write() else []
                readable, writable, _ = select.select(
                    [sock], wlist, [], 0.0 if client.buffered() else 0.05)
                if writable:
                    client.loop_write()
                if readable or client.buffered():
                    client.loop_read()
            if not self._goodbye_acked:
                log.warning("uplink: no PUBACK for the offline status within %gs",
                            GOODBYE_TIMEOUT_S)
            client.disconnect()
            deadline = time.monotonic() + 0.5
            while client.socket() is not None and client.want_write() \
                    and time.monotonic() < deadline:
                if client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        self._close_client()
