"""What the uplink has sent, what HQ has acked, and what goes out next.

Pure code, time passed in, no I/O: per-kind pointers (``acked_upto``,
``sent_upto``), the bounded in-flight window shared by all kinds, the order
kinds are served in, ack timeouts and the hold-off after a refused PUBACK.
``hq_ack`` selects what frees the window: HQ's cumulative acks (CONTRACT 4,
the default), or the contiguous prefix of successful PUBACKs (broker-ack).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.kinds import BULK_KINDS, PRIORITY, QUANTUM

# The order kinds are served in each pass, and how many events of a kind one
# pass may publish. Compliance events first; a million sensor readings drain
# a quantum at a time behind them instead of starving them.
# (Both from agent/kinds.py's table.)
# High-volume kinds (BULK_KINDS) may not fill the last part of the in-flight window,
# so a sale never waits for HQ to ack a sensor backlog before it can go out.
BULK_RESERVE_FRACTION = 8          # 1/8 of mqtt.max_inflight is kept for the other kinds
PUBLISH_FAILURE_HOLD_MAX_S = 30.0  # cap of the per-kind backoff after failed PUBACKs
# The ack timeout backs off like TCP's retransmission timer (RFC 6298 5.5): each
# resend that the ack did not answer doubles the next wait, up to this many times
# mqtt.ack_timeout_s (240 s at the default 30 s), and an ack past every seq sent before
# the last timeout resets it. See ``DeliveryLedger.ack_timed_out``.
ACK_BACKOFF_MAX_FACTOR = 8
ACK_BACKOFF_JITTER = 0.25          # a backed-off wait is stretched by up to 25%, at random


def backed_off_ack_wait(base_s: float, timeouts: int, rand: Callable[[], float]) -> float:
    """The ack wait after ``timeouts`` resends in a row got no ack: ``base_s`` doubled that
    many times, capped at ``ACK_BACKOFF_MAX_FACTOR`` x ``base_s``; a backed-off wait is
    stretched by up to ``ACK_BACKOFF_JITTER`` (``rand()`` in [0, 1)) so sites that
    stalled together (an HQ outage, a reconnect storm) do not resend together."""
    if timeouts <= 0:
        return base_s
    factor = float(min(ACK_BACKOFF_MAX_FACTOR, 2 ** min(timeouts, 30)))
    return base_s * factor * (1.0 + ACK_BACKOFF_JITTER * rand())


@dataclass
class SentEvent:
    """One event handed to MQTT on this connection and not yet acknowledged."""

    kind: str
    seq: int
    delivered: bool = False   # a successful PUBACK arrived (what broker-ack deletes on)
    stale: bool = False       # its kind was rewound: a late PUBACK for it means nothing


@dataclass
class KindLedger:
    """Delivery state of one kind."""

    kind: str
    acked_upto: int              # everything <= this is gone from the outbox (or going)
    sent_upto: int               # the next read is after this seq
    inflight: deque[SentEvent] = field(default_factory=deque)
    progress_at: float = 0.0     # last time the ack advanced, or the window opened
    hold_until: float = 0.0      # no sending before this (after a failed PUBACK)
    failure_hold_s: float = 0.0
    empty_read_last_seq: int = -1  # read found nothing while last_seq was this: wait for more
    max_sent: int = 0            # highest seq ever handed to MQTT: at or below it is a resend
    # Since when events handed to MQTT wait for an ack that does not come: set by the
    # first send after everything sent was acked, moved by every ack that advances, and
    # kept through rewinds and reconnects (unlike progress_at, which a resend restarts).
    waiting_since: float | None = None
    # Ack timeouts in a row, the wait they give (``backed_off_ack_wait``), and the
    # highest seq sent before the last of them: only an ack beyond it (of an event sent
    # once since) resets the backoff, Karn's rule (see ``DeliveryLedger.ack_timed_out``).
    timeouts: int = 0
    ack_wait_s: float = 0.0
    backoff_upto: int = 0


class DeliveryLedger:
    """Per-kind pointers, the bounded in-flight window and the serving order.

    Pure: no I/O, time passed in. ``hq_ack`` selects what frees the window:
    HQ's cumulative acks, or the contiguous prefix of successful PUBACKs.
    """

    def __init__(self, start_after: dict[str, int], *, max_inflight: int, hq_ack: bool,
                 ack_timeout_s: float, hold_min_s: float,
                 rand: Callable[[], float] = random.random) -> None:
        self.kinds = {k: KindLedger(k, start_after.get(k, 0), start_after.get(k, 0),
                                    ack_wait_s=ack_timeout_s) for k in PRIORITY}
        self.rand = rand
        self.max_inflight = max_inflight
        self.hq_ack = hq_ack
        self.ack_timeout_s = ack_timeout_s
        self.hold_min_s = hold_min_s
        self.bulk_reserve = max(1, max_inflight // BULK_RESERVE_FRACTION) if max_inflight > 1 else 0
        self.resends = 0   # events handed to MQTT again (ack timeout, reconnect, refused PUBACK)

    @property
    def inflight(self) -> int:
        return sum(len(k.inflight) for k in self.kinds.values())

    def allowance(self, kind: str, now: float, last_seq: int) -> int:
        """How many events of ``kind`` may be read and published now (0: none)."""
        k = self.kinds[kind]
        if now < k.hold_until or last_seq <= k.sent_upto or last_seq == k.empty_read_last_seq:
            return 0
        room = self.max_inflight - self.inflight
        if kind in BULK_KINDS:
            room -= self.bulk_reserve
        return max(0, min(QUANTUM[kind], room))

    def read_was_empty(self, kind: str, last_seq: int) -> None:
        self.kinds[kind].empty_read_last_seq = last_seq

    def record_sent(self, kind: str, seq: int, now: float) -> SentEvent:
        k = self.kinds[kind]
        if not k.inflight:
            k.progress_at = now   # the ack clock starts when something is outstanding
        entry = SentEvent(kind, seq)
        k.inflight.append(entry)
        k.sent_upto = max(k.sent_upto, seq)
        k.empty_read_last_seq = -1
        if seq <= k.max_sent:
            self.resends += 1
        else:
            k.max_sent = seq
        if k.waiting_since is None and seq > k.acked_upto:
            k.waiting_since = now
        return entry

    def hq_acked(self, kind: str, upto: int, now: float) -> bool:
        """Apply HQ's cumulative ack; False when it does not move forward."""
        k = self.kinds[kind]
        if upto <= k.acked_upto:
            return False
        self._advance(k, upto, now)
        return True

    def _advance(self, k: KindLedger, upto: int, now: float) -> None:
        k.acked_upto = upto
        k.sent_upto = max(k.sent_upto, upto)
        while k.inflight and k.inflight[0].seq <= upto:
            k.inflight.popleft()
        k.progress_at = now
        self._acked(k, now)

    def _acked(self, k: KindLedger, now: float) -> None:
        k.waiting_since = None if k.acked_upto >= k.max_sent else now
        # The watermark moved: HQ is alive and draining this kind, and the ack wait
        # restarts from now (progress_at). Past every seq sent before the last timeout
        # the backoff is over too; an ack of resent seqs only (the originals or their
        # copies, still queued behind HQ's backlog) keeps the backed-off wait.
        if k.acked_upto > k.backoff_upto:
            k.timeouts = 0
            k.ack_wait_s = self.ack_timeout_s

    def puback(self, entry: SentEvent, ok: bool, now: float) -> int | None:
        """A PUBACK for ``entry``; returns the seq the outbox may now delete upto (broker-ack).

        A failed PUBACK rewinds the kind and holds it back for a growing while.
        """
        if entry.stale:
            return None
        k = self.kinds[entry.kind]
        if not ok:
            self.rewind(entry.kind)
            k.failure_hold_s = min(PUBLISH_FAILURE_HOLD_MAX_S,
                                   max(self.hold_min_s, k.failure_hold_s * 2))
            k.hold_until = now + k.failure_hold_s
            return None
        k.failure_hold_s = 0.0
        entry.delivered = True
        if self.hq_ack:
            return None
        upto = None
        while k.inflight and k.inflight[0].delivered:
            upto = k.inflight.popleft().seq
        if upto is not None and upto > k.acked_upto:
            k.acked_upto = upto
            k.progress_at = now
            self._acked(k, now)
            return upto
        return None

    def rewind(self, kind: str) -> None:
        """Resend ``kind`` from its first unacked seq."""
        k = self.kinds[kind]
        for entry in k.inflight:
            entry.stale = True
        k.inflight.clear()
        k.sent_upto = k.acked_upto
        k.empty_read_last_seq = -1

    def rewind_all(self) -> None:
        """After a reconnect: everything not acked goes again (HQ dedups by seq)."""
        for kind in PRIORITY:
            self.rewind(kind)

    def timed_out(self, now: float) -> list[str]:
        """Kinds whose ack has not advanced for their ack wait while events are out:
        ``ack_timeout_s``, or longer after resends that got no ack (``ack_timed_out``)."""
        return [k.kind for k in self.kinds.values()
                if k.inflight and now - k.progress_at >= k.ack_wait_s]

    def ack_timed_out(self, kind: str) -> float:
        """The ack wait of ``kind`` ran out: resend it from its first unacked seq, and
        wait twice as long (capped, jittered) for an ack before the next resend.

        Why back off rather than resend every ``ack_timeout_s``: a resend is a whole
        window (up to ``max_inflight`` events) behind everything already queued for
        HQ. When HQ is merely behind (a reconnect storm of many sites, a slow store)
        the originals are still in the broker's queue, every resend deepens that queue
        by a window and pushes the ack further out, and a fixed timer turns a slow HQ
        into a flood of duplicates (issue 12: 5.5 M for 1 M events). Doubling the wait
        (TCP's retransmission backoff) keeps a stalled kind to a handful of resends per
        outage, while a truly lost event is still resent, at the latest
        ``ACK_BACKOFF_MAX_FACTOR`` x ``ack_timeout_s`` (plus the jitter) later. The
        wait is counted from the last time the watermark moved, so acks that advance
        within it never cause a resend. An ack that advances restarts the wait; it
        resets the backoff only once it covers a seq sent after the timeout (Karn's
        rule, as TCP does): while HQ works through the originals and the copies of a
        resent window, the ack pauses whenever HQ is on copies, and a plain timeout
        there would resend again, each round adding a window. Returns the new wait.
        """
        k = self.kinds[kind]
        k.backoff_upto = k.max_sent
        self.rewind(kind)
        k.timeouts += 1
        k.ack_wait_s = backed_off_ack_wait(self.ack_timeout_s, k.timeouts, self.rand)
        return k.ack_wait_s

    def ack_waits(self, now: float) -> dict[str, float]:
        """Per kind with events sent and unacked: seconds since the ack last advanced
        (or since the first of them went out)."""
        return {k.kind: round(max(0.0, now - k.waiting_since), 3)
                for k in self.kinds.values() if k.waiting_since is not None}

    def next_deadline(self, now: float) -> float:
        """The earliest time a timeout or a hold expires (``inf``: none pending)."""
        deadline = float("inf")
        for k in self.kinds.values():
            if k.inflight:
                deadline = min(deadline, k.progress_at + k.ack_wait_s)
            if k.hold_until > now:
                deadline = min(deadline, k.hold_until)
        return deadline
