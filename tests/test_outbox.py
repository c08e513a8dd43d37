"""The durable outbox on real files: group commit, seq, idempotency, limits, faults."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.envelope import decode, parse_iso
from agent.errors import DiskFull, EventTooLarge, OutboxError, OutboxFull
from agent.outbox import Accepted, Outbox
from agent.outbox.seqmark import SEQMARK_NAME
from agent.outbox.store import DB_NAME, MAX_EVENT_BYTES
from tests.conftest import FakeClock, wait_for

SITE = "test-site"
T0 = 1_794_999_960.0  # 2026-11-18T11:06:00Z, the start of a UTC minute


OpenOutbox = Callable[..., Outbox]


@pytest.fixture
def open_outbox(tmp_path: Path) -> Iterator[OpenOutbox]:
    """Opens outboxes (default: tmp_path/outbox) and closes them all afterwards."""
    opened: list[Outbox] = []

    def _open(path: Path | None = None, **kwargs: Any) -> Outbox:
        kwargs.setdefault("max_bytes", 1 << 30)
        kwargs.setdefault("ballast_bytes", 64 * 1024)
        ob = Outbox(str(path or tmp_path / "outbox"), SITE, **kwargs)
        ob.reports = ob.open()  # type: ignore[attr-defined]
        opened.append(ob)
        return ob

    yield _open
    for ob in opened:
        ob.close()


def sale(n: int) -> str:
    return json.dumps({"receipt_number": f"R-{n}", "total": "10.00"})


def reading(value: float, device: str = "scd41-1") -> str:
    return json.dumps({"device": device, "co2_ppm": value, "temp_c": value / 100, "ok": True})


def events(ob: Outbox, kind: str) -> list[dict[str, Any]]:
    return [decode(body) for _, body in ob.read(kind, 0, 1_000_000)]


def test_group_commit_resolves_each_future_only_after_its_commit(open_outbox: OpenOutbox,
                                                                 tmp_path: Path) -> None:
    """8 producers share few synchronous=FULL commits; a future resolves only once its row is
    visible to another connection (committed)."""
    ob = open_outbox()
    probe = sqlite3.connect(tmp_path / "outbox" / DB_NAME, check_same_thread=False)
    not_visible: list[int] = []

    def check_committed(fut: concurrent.futures.Future[Accepted]) -> None:
        # Runs in the writer thread at the moment the future resolves.
        seq = fut.result().seq
        row = probe.execute("SELECT 1 FROM Cache WHERE key = ?", (f"e:sale:{seq:012d}",))
        if row.fetchone() is None:
            not_visible.append(seq)

    def producer(p: int) -> list[int]:
        futures = []
        for i in range(250):
            fut = ob.submit("sale", sale(p * 1000 + i), f"pos-{p}")
            fut.add_done_callback(check_committed)
            futures.append(fut)
        return [f.result(timeout=20).seq for f in futures]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        seqs = [s for r in pool.map(producer, range(8)) for s in r]
    probe.close()
    assert not not_visible
    assert sorted(seqs) == list(range(1, 2001))
    assert 1 <= ob.counters["commits"] < 2000
    con = sqlite3.connect(tmp_path / "outbox" / DB_NAME)
    setting = "SELECT value FROM Settings WHERE key = 'sqlite_synchronous'"
    assert con.execute(setting).fetchone() == (2,)  # FULL
    assert con.execute("SELECT count(*) FROM Cache WHERE mode != 1 OR filename IS NOT NULL"
                       ).fetchone() == (0,)  # every value inline, none pickled
    con.close()


def test_seq_is_per_kind_contiguous_and_survives_reopen(open_outbox: OpenOutbox,
                                                       tmp_path: Path) -> None:
    """Each kind counts 1, 2, 3... on its own, and carries on after close and reopen."""
    ob = open_outbox()
    got = [ob.submit(k, sale(i), "pos-1").result(5) for i, k in
           enumerate(["sale", "plant", "sale", "sale", "plant", "alarm"])]
    assert [(a.kind, a.seq) for a in got] == [("sale", 1), ("plant", 1), ("sale", 2),
                                              ("sale", 3), ("plant", 2), ("alarm", 1)]
    ob.ack("sale", 3).result(5)  # even with every sale deleted, seq goes on
    ob.close()
    ob2 = open_outbox()
    assert ob2.submit("sale", sale(9), "pos-1").result(5).seq == 4
    assert ob2.submit("plant", sale(9), "pos-1").result(5).seq == 3
    assert ob2.stats()["sale"].last_seq == 4
    assert ob2.stats()["scan"].last_seq == 0


def test_envelope_fields_and_read_ranges(open_outbox: OpenOutbox) -> None:
    """read() returns (seq, envelope bytes) with seq > after_seq ascending, up to limit."""
    clock = FakeClock(T0)
    ob = open_outbox(clock=clock)
    for i in range(10):
        ob.submit("scan", json.dumps({"code": f"C{i}"}), "scanner-1").result(5)
    ob.submit("sale", sale(1), "pos-1").result(5)
    page = ob.read("scan", 3, 4)
    assert [seq for seq, _ in page] == [4, 5, 6, 7]
    env = decode(page[0][1])
    assert env["site"] == SITE and env["kind"] == "scan" and env["seq"] == 4
    assert env["source"] == "scanner-1" and env["data"] == {"code": "C3"}
    assert env["ts"] == "2026-11-18T11:06:00.000Z" and parse_iso(env["ts"]) == T0
    assert env["id"][14] == "7"  # UUIDv7
    assert ob.read("scan", 10, 5) == []
    assert [s for s, _ in ob.read("sale", 0, 100)] == [1]


@contextlib.contextmanager
def writer_held(ob: Outbox) -> Iterator[None]:
    """Keeps the writer busy inside a batch, so what is queued meanwhile forms the next batch."""
    gate, inside = threading.Event(), threading.Event()
    writer = ob._writer
    assert writer is not None
    real_append = writer._append

    def gated(submits: Any) -> None:
        writer._append = real_append  # type: ignore[method-assign]
        inside.set()
        gate.wait(10)
        real_append(submits)

    writer._append = gated  # type: ignore[method-assign]
    blocker = ob.submit("print", "{}", "writer-held")
    wait_for(inside.is_set, what="the writer inside the held batch")
    try:
        yield
    finally:
        gate.set()
        blocker.result(5)


def test_idempotency_key_returns_first_answer_and_writes_nothing(open_outbox: OpenOutbox
                                                                 ) -> None:
    """A repeated Idempotency-Key (across batches and within one batch) gets the first answer
    with replay=True, and no second event is written."""
    ob = open_outbox()
    first = ob.submit("sale", sale(1), "pos-1", idem_key="k-1").result(5)
    again = ob.submit("sale", sale(2), "pos-1", idem_key="k-1").result(5)
    assert again == Accepted(first.id, first.seq, "sale", first.ts, replay=True)
    assert not first.replay and ob.stats()["sale"].depth == 1

    with writer_held(ob):  # so the next two requests land in one batch together
        a = ob.submit("sale", sale(3), "pos-1", idem_key="k-2")
        b = ob.submit("sale", sale(4), "pos-1", idem_key="k-2")
    ra, rb = a.result(5), b.result(5)
    assert (ra.seq, ra.replay) == (2, False) and (rb.id, rb.seq, rb.replay) == (ra.id, 2, True)
    assert [e["data"]["receipt_number"] for e in events(ob, "sale")] == ["R-1", "R-3"]
    assert ob.counters["replayed"] == 2
    ob.close()
    ob2 = open_outbox()  # the answers are durable, in the same transaction as the events
    assert ob2.submit("sale", sale(5), "pos-1", idem_key="k-1").result(5).seq == first.seq


def test_ack_deletes_up_to_seq_and_only_moves_forward(open_outbox: OpenOutbox) -> None:
    """ack(kind, upto) deletes seq <= upto; a lower ack is ignored; one past the end clamps."""
    ob = open_outbox()
    for i in range(10):
        ob.submit("sale", sale(i), "pos-1").result(5)
    assert ob.ack("sale", 4).result(5) == 4
    assert ob.ack("sale", 2).result(5) == 0
    assert [s for s, _ in ob.read("sale", 0, 100)] == list(range(5, 11))
    assert ob.ack("plant", 3).result(5) == 0  # nothing of that kind
    assert ob.ack("sale", 99).result(5) == 6
    assert ob.stats()["sale"].depth == 0
    # The clamped ack did not pre-acknowledge seqs not yet handed out.
    ob.submit("sale", sale(11), "pos-1").result(5)
    assert [s for s, _ in ob.read("sale", 0, 100)] == [11]
    assert ob.ack("sale", 10).result(5) == 0


def test_a_big_ack_deletes_in_chunks_between_other_work(open_outbox: OpenOutbox,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An ack covering many events is deleted a chunk per transaction, with events submitted
    meanwhile committed between chunks; its future resolves once all are gone."""
    import agent.outbox.writer as writer_module

    monkeypatch.setattr(writer_module, "DELETE_CHUNK", 10)
    ob = open_outbox()
    futures = [ob.submit("sensor", reading(i), "sensors") for i in range(95)]
    assert futures[-1].result(5).seq == 95
    depth_at_sale_commit: list[int] = []
    ob.add_listener(lambda: depth_at_sale_commit.append(ob.stats()["sensor"].depth)
                    if ob.stats()["sale"].depth else None)
    with writer_held(ob):  # the ack and the sales form one batch
        ack = ob.ack("sensor", 95)
        sales = [ob.submit("sale", sale(i), "pos-1") for i in range(3)]
    assert [f.result(5).seq for f in sales] == [1, 2, 3]
    assert ack.result(5) == 95
    assert depth_at_sale_commit == [85]  # one chunk gone, the sales in, then the rest
    assert ob.stats()["sensor"].depth == 0 and ob.stats()["sensor"].bytes == 0
    assert ob.counters["acked"] == 95


def test_acks_under_a_stream_of_events_are_held_not_one_delete_per_commit(
        open_outbox: OpenOutbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """While events keep arriving, acks are deleted at most every ACK_HOLD_S rather than
    one delete transaction (an fsync) per group commit; once the stream stops every held
    ack is applied."""
    import agent.outbox.writer as writer_module

    ob = open_outbox()
    deletes: list[int] = []
    real_delete = writer_module.Writer._delete

    def counted(self: Any, work: dict[str, int]) -> dict[str, int]:
        deletes.append(1)
        return real_delete(self, work)

    monkeypatch.setattr(writer_module.Writer, "_delete", counted)
    # HQ acking everything committed so far after every commit, as under load.
    ob.add_listener(lambda: ob.ack("sale", ob.stats()["sale"].last_seq))
    stop = threading.Event()

    def producer(p: int) -> None:
        i = 0
        while not stop.is_set():
            ob.submit("sale", sale(p * 1_000_000 + i), "pos-1").result(5)
            i += 1

    threads = [threading.Thread(target=producer, args=(p,)) for p in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    wait_for(lambda: ob.counters["commits"] >= 60, 30, what="60 group commits")
    stop.set()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - started
    # The old writer deleted once per commit: 60+ here, however fast the disk.
    hold = getattr(writer_module, "ACK_HOLD_S", 0.2)
    assert len(deletes) <= elapsed / hold + 2, (len(deletes), elapsed)
    last = ob.stats()["sale"].last_seq
    wait_for(lambda: ob.stats()["sale"].depth == 0, 10, what="the held acks to be applied")
    assert ob.counters["acked"] == last


def test_stats_depth_bytes_and_oldest(open_outbox: OpenOutbox, tmp_path: Path) -> None:
    """stats() tracks depth, bytes, oldest accepted time and seq range per kind, and agrees
    with a fresh open (SQL aggregates) after reopen."""
    clock = FakeClock(T0)
    ob = open_outbox(clock=clock)
    for i in range(5):
        clock.now = T0 + i
        ob.submit("plant", json.dumps({"action": "observe", "i": i}), "tablet-1").result(5)
    sizes = [len(body) for _, body in ob.read("plant", 0, 100)]
    st = ob.stats()["plant"]
    assert (st.depth, st.bytes, st.oldest_ts, st.first_seq, st.last_seq) == \
        (5, sum(sizes), T0, 1, 5)
    assert ob.total_bytes == sum(sizes)
    assert set(ob.stats()) == {"sale", "plant", "scan", "sensor", "print", "device", "alarm"}
    ob.ack("plant", 2).result(5)
    st = ob.stats()["plant"]
    assert (st.depth, st.bytes, st.oldest_ts, st.first_seq) == (3, sum(sizes[2:]), T0 + 2, 3)
    ob.close()
    assert open_outbox(clock=clock).stats()["plant"] == st
    with Outbox.inspect(str(tmp_path / "outbox")) as view:  # the CLI's view agrees too
        assert view.stats()["plant"] == st


def fill_sensor_minutes(ob: Outbox, clock: FakeClock, minutes: int, per_minute: int) -> None:
    """Readings every 60/per_minute seconds for ``minutes`` minutes, values 0, 1, 2..."""
    n = 0
    for m in range(minutes):
        for i in range(per_minute):
            clock.now = T0 + 60 * m + i * (60 / per_minute)
            ob.submit("sensor", reading(400 + n), "sensors").result(5)
            n += 1


def test_max_bytes_refuses_sales_after_thinning_unpublished_sensor_readings(
        open_outbox: OpenOutbox) -> None:
    """At max_bytes, sensor readings never published are folded into per-minute aggregates
    (seq_end, stats) to make room; when nothing is left to fold, sales are refused with
    OutboxFull, state "full", an alarm condition, and alarm events still fit in the headroom."""
    clock = FakeClock(T0)
    ob = open_outbox(clock=clock, max_bytes=1 << 16)
    fill_sensor_minutes(ob, clock, minutes=10, per_minute=12)  # 120 readings, ~19 KB
    published = 24  # the first two minutes went out already: never thinned
    ob.mark_published("sensor", published)
    raw = {e["seq"]: e for e in events(ob, "sensor")}
    clock.now = T0 + 3600
    n, refused = 0, None
    while refused is None and n < 1000:
        try:
            ob.submit("sale", sale(n), "pos-1").result(5)
        except OutboxFull as exc:
            refused = exc
        n += 1
    assert isinstance(refused, OutboxFull) and refused.kind == "sale"
    assert "outbox full" in str(refused) and refused.max_bytes == 1 << 16
    assert ob.state == "full" and ob.counters["refused_full"] == 1
    assert [a["code"] for a in ob.status_alarms()] == ["outbox_full"]

    sensor = events(ob, "sensor")
    assert [e["seq"] for e in sensor[:published]] == list(range(1, published + 1))
    assert all("seq_end" not in e for e in sensor[:published])
    aggregates = [e for e in sensor if "seq_end" in e]
    assert len(aggregates) == 8 == ob.counters["thinned_aggregates"]
    assert ob.counters["thinned_events"] == 96
    first = aggregates[0]
    assert (first["seq"], first["seq_end"]) == (25, 36)
    data = first["data"]
    assert data["aggregate"] == "1m" and data["minute"] == "2026-11-18T11:08:00Z"
    assert (data["count"], data["from_seq"], data["to_seq"]) == (12, 25, 36)
    values = [raw[s]["data"]["co2_ppm"] for s in range(25, 37)]
    assert data["series"]["scd41-1"]["co2_ppm"] == {
        "mean": sum(values) / 12, "min": min(values), "max": max(values), "count": 12}
    assert set(data["series"]["scd41-1"]) == {"co2_ppm", "temp_c"}  # bools are not numbers
    # Coverage is whole: every seq 1..120 is either a raw reading or inside an aggregate.
    covered = [s for e in sensor for s in range(e["seq"], e.get("seq_end", e["seq"]) + 1)]
    assert covered == list(range(1, 121))
    assert ob.stats()["sensor"].depth == published + 8
    assert ob.stats()["sensor"].bytes == sum(len(b) for _, b in ob.read("sensor", 0, 1000))

    # Nothing is left to fold: a sensor reading is refused as well...
    with pytest.raises(OutboxFull):
        ob.submit("sensor", reading(1), "sensors").result(5)
    # ...but the alarm saying so fits in the headroom above max_bytes.
    alarm_json = json.dumps({"code": "outbox_full", "detail": "x" * 400})
    alarm = ob.submit("alarm", alarm_json, "edge-agent").result(5)
    assert alarm.seq == 1 and ob.max_bytes < ob.total_bytes <= ob.max_bytes * 1.01


def test_sensor_readings_at_the_cap_thin_older_ones_instead_of_being_refused(
        open_outbox: OpenOutbox) -> None:
    """A sensor reading arriving at max_bytes folds older unpublished readings and is
    accepted; the outbox stays under the cap while minutes of readings keep coming."""
    clock = FakeClock(T0)
    ob = open_outbox(clock=clock, max_bytes=1 << 16)
    fill_sensor_minutes(ob, clock, minutes=60, per_minute=12)  # ~180 KB of raw readings
    assert ob.counters["refused_full"] == 0
    assert ob.counters["thinned_aggregates"] > 0
    assert ob.total_bytes <= ob.max_bytes and ob.state == "ok"
    sensor = events(ob, "sensor")
    covered = [s for e in sensor for s in range(e["seq"], e.get("seq_end", e["seq"]) + 1)]
    assert covered == list(range(1, 721))


def test_idempotency_answers_expire(open_outbox: OpenOutbox,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An Idempotency-Key answer lives for the TTL (24 h in production); after it, the same
    key makes a new event."""
    import agent.outbox.writer as writer_module

    monkeypatch.setattr(writer_module, "IDEMPOTENCY_TTL_S", 0.2)
    ob = open_outbox()
    first = ob.submit("sale", sale(1), "pos-1", idem_key="k").result(5)

    def fresh_answer() -> Accepted | None:
        answer = ob.submit("sale", sale(2), "pos-1", idem_key="k").result(5)
        return None if answer.replay else answer

    later = wait_for(fresh_answer, timeout=5, what="the answer to expire")
    assert later is not None and later.seq == first.seq + 1
    assert ob.stats()["sale"].depth == 2


def test_mark_published_waits_for_a_thinning_transaction(open_outbox: OpenOutbox) -> None:
    """mark_published() returns only after an open thinning transaction committed, so the
    uplink's next read sees the aggregate instead of raw readings it replaced."""
    clock = FakeClock(T0)
    ob = open_outbox(clock=clock, max_bytes=1 << 16)
    fill_sensor_minutes(ob, clock, minutes=20, per_minute=12)
    folding, release = threading.Event(), threading.Event()
    writer = ob._writer
    assert writer is not None
    real_fold = writer._fold

    def slow_fold(*args: Any) -> int:
        freed = real_fold(*args)
        folding.set()
        release.wait(10)
        return freed

    writer._fold = slow_fold  # type: ignore[method-assign,assignment]
    futures: list[concurrent.futures.Future[Accepted]] = []
    while not folding.is_set():  # sales up to the cap, until one makes the writer thin
        futures.append(ob.submit("sale", sale(len(futures)), "pos-1"))
        if len(futures) % 20 == 0:
            wait_for(lambda: folding.is_set() or futures[-1].done(), what="a sale commit")
    seen: list[dict[str, Any]] = []

    def uplink() -> None:  # what the uplink does: mark first, then read
        ob.mark_published("sensor", 240)
        seen.append(decode(ob.read("sensor", 0, 1)[0][1]))

    reader = threading.Thread(target=uplink)
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and not seen  # held while the fold is not committed
    writer._fold = real_fold  # type: ignore[method-assign]
    release.set()
    reader.join(5)
    assert (seen[0]["seq"], seen[0]["seq_end"]) == (1, 12)  # the aggregate, not raw seq 1


def test_outbox_accepts_sales_again_after_acks(open_outbox: OpenOutbox) -> None:
    """Once HQ's acks bring the outbox under max_bytes, sales are accepted again and the
    full condition clears."""
    ob = open_outbox(max_bytes=1 << 16)
    last = 0
    with pytest.raises(OutboxFull):
        for n in range(1000):
            last = ob.submit("sale", sale(n), "pos-1").result(5).seq
    assert ob.state == "full"
    assert ob.ack("sale", last // 2).result(5) == last // 2
    assert ob.state == "ok" and ob.status_alarms() == []
    assert ob.submit("sale", sale(0), "pos-1").result(5).seq == last + 1


def corrupt_header(db: Path) -> None:
    with open(db, "r+b") as fh:
        fh.write(b"this is no longer an sqlite file" * 4)


def corrupt_page(db: Path) -> None:
    # Page 2 onwards hold the Cache table and its indexes; scribble over several pages.
    with open(db, "r+b") as fh:
        fh.seek(4096 * 3)
        fh.write(os.urandom(4096 * 4))


def truncate(db: Path) -> None:
    with open(db, "r+b") as fh:
        fh.truncate(0)


@pytest.mark.parametrize("damage", [corrupt_header, corrupt_page, truncate],
                         ids=["header", "page", "truncated"])
def test_corrupt_file_is_set_aside_and_seq_continues_past_the_reservation(
        open_outbox: OpenOutbox, tmp_path: Path, damage: Callable[[Path], None]) -> None:
    """A database SQLite cannot trust is moved aside as cache.db.corrupt-<UTC>, reported,
    and a fresh one opened; each kind continues past its reserved seqs (never reused) and
    its first event says which seqs may have been lost."""
    ob = open_outbox()
    for i in range(300):
        ob.submit("sale", sale(i) + " " * 200, "pos-1").result(5)
    ob.submit("plant", sale(0), "tablet-1").result(5)
    ob.ack("sale", 120).result(5)
    ob.close()
    marks = json.loads((tmp_path / "outbox" / SEQMARK_NAME).read_text())["kinds"]
    assert marks["sale"]["reserved"] >= 300 and marks["sale"]["acked"] == 120
    damage(tmp_path / "outbox" / DB_NAME)

    ob2 = open_outbox()
    [report] = ob2.reports  # type: ignore[attr-defined]
    assert report.moved_to.startswith(str(tmp_path / "outbox" / "cache.db.corrupt-"))
    assert os.path.exists(report.moved_to) and "moved aside" in str(report)
    assert ob2.counters["corrupt_moved"] == 1
    assert [a["code"] for a in ob2.status_alarms()] == ["outbox_corrupt"]
    reserved = marks["sale"]["reserved"]
    a = ob2.submit("sale", sale(1), "pos-1").result(5)
    b = ob2.submit("sale", sale(2), "pos-1").result(5)
    assert (a.seq, b.seq) == (reserved + 1, reserved + 2)
    first, second = events(ob2, "sale")
    assert first["lost"] == [121, reserved] and "lost" not in second
    assert events_lost(ob2, "plant") == [1, marks["plant"]["reserved"]]
    assert ob2.submit("scan", "{}", "scanner-1").result(5).seq == 1  # never used: no jump
    ob2.close()
    ob3 = open_outbox()  # the lost range was used up with that first event; not repeated
    assert ob3.reports == []  # type: ignore[attr-defined]
    ob3.submit("sale", sale(3), "pos-1").result(5)
    assert "lost" not in events(ob3, "sale")[-1]


def events_lost(ob: Outbox, kind: str) -> list[int] | None:
    ob.submit(kind, "{}", "test").result(5)
    lost: list[int] | None = events(ob, kind)[0].get("lost")
    return lost


def test_reservation_is_written_before_its_seqs_are_used(open_outbox: OpenOutbox,
                                                         tmp_path: Path) -> None:
    """seqmark.json always covers every seq committed, through several reservation blocks."""
    ob = open_outbox()
    path = tmp_path / "outbox" / SEQMARK_NAME
    for _ in range(26):
        futures = [ob.submit("scan", "{}", "s") for _i in range(100)]
        last = max(f.result(5).seq for f in futures)
        assert json.loads(path.read_text())["kinds"]["scan"]["reserved"] >= last


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of our own (the test runs as root), unmounted afterwards.

    Request it before ``open_outbox`` so the outboxes on it are closed first.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI container runs as root)")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_refuses_cleanly_and_recovers_after_acks(tiny_disk: Path,
                                                           open_outbox: OpenOutbox) -> None:
    """On a full filesystem a sale fails with DiskFull (nothing half-written, state
    "disk_full"); acks still delete (the ballast makes room), and the outbox then accepts
    sales again with the next seq, ballast restored."""
    ob = open_outbox(tiny_disk / "outbox", ballast_bytes=256 * 1024)
    ballast = tiny_disk / "outbox" / "ballast"
    assert ballast.stat().st_size == 256 * 1024
    big = json.dumps({"receipt_number": "R", "pad": "x" * 3000})
    accepted: list[int] = []
    error: BaseException | None = None
    while error is None and len(accepted) < 2000:
        try:
            accepted.append(ob.submit("sale", big, "pos-1").result(10).seq)
        except OutboxError as exc:
            error = exc
    assert isinstance(error, DiskFull), error
    assert "disk full" in str(error)
    assert ob.state == "disk_full" and ob.counters["refused_disk"] >= 1
    assert [a["code"] for a in ob.status_alarms()] == ["outbox_disk_full"]
    with pytest.raises(DiskFull):  # still refused, still no crash
        ob.submit("sale", big, "pos-1").result(10)
    # Every accepted sale is there, whole; the failed ones left nothing behind.
    assert [s for s, _ in ob.read("sale", 0, 10_000)] == accepted == list(
        range(1, len(accepted) + 1))

    assert ob.ack("sale", accepted[-1]).result(10) == len(accepted)
    wait_for(lambda: ob.state == "ok", timeout=10, what="the disk_full condition to clear")
    nxt = ob.submit("sale", big, "pos-1").result(10)
    assert nxt.seq > accepted[-1] and ob.state == "ok"
    wait_for(lambda: ballast.exists() and ballast.stat().st_size == 256 * 1024, timeout=10,
             what="the ballast to be put back")
    ob.close()
    reopened = open_outbox(tiny_disk / "outbox")
    seqs = [s for s, _ in reopened.read("sale", 0, 10_000)]
    assert seqs == sorted(seqs) and seqs[-1] == reopened.stats()["sale"].last_seq


def test_room_freed_by_the_ballast_is_kept_for_deletes(tiny_disk: Path,
                                                       open_outbox: OpenOutbox) -> None:
    """When something else fills the disk, acks still delete (the ballast is given up for
    them) but new events stay refused until the ballast fits again; then they flow."""
    ob = open_outbox(tiny_disk / "outbox", ballast_bytes=256 * 1024)
    for i in range(10):
        ob.submit("sale", json.dumps({"i": i, "pad": "x" * 1000}), "pos-1").result(5)
    filler = tiny_disk / "filler"
    with open(filler, "wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(bytes(65536))
            fh.flush()
    with pytest.raises(DiskFull):
        ob.submit("sale", json.dumps({"pad": "y" * 3000}), "pos-1").result(5)
    assert ob.ack("sale", 10).result(5) == 10
    assert not (tiny_disk / "outbox" / "ballast").exists()
    with pytest.raises(DiskFull):
        ob.submit("sale", sale(1), "pos-1").result(5)
    filler.unlink()
    assert ob.submit("sale", sale(2), "pos-1").result(5).seq == 11
    assert ob.state == "ok" and (tiny_disk / "outbox" / "ballast").exists()


PRODUCER = r"""
import json, sys
from agent.outbox import Outbox
ob = Outbox(sys.argv[1], "test-site", max_bytes=1 << 30, ballast_bytes=0)
ob.open()
n = 0
while True:
    futures = [ob.submit("sale", json.dumps({"n": n + i}), "pos-1") for i in range(50)]
    n += 50
    for f in futures:
        a = f.result()
        sys.stdout.write(f"{a.seq}\n")
    sys.stdout.flush()
"""


def test_sigkill_mid_stream_loses_no_resolved_event(open_outbox: OpenOutbox,
                                                    tmp_path: Path) -> None:
    """A producer process killed with SIGKILL: every event whose future resolved before the
    kill is there after reopen, seqs contiguous; the CLI view reads it without creating files."""
    path = tmp_path / "outbox"
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, str(path)], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parent.parent, text=True)
    assert proc.stdout is not None
    acknowledged: list[int] = []
    try:
        for line in proc.stdout:
            acknowledged.append(int(line))
            if len(acknowledged) >= 3000:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(acknowledged) >= 3000
    before = sorted(os.listdir(path))
    with Outbox.inspect(str(path)) as view:
        pending = view.stats()["sale"].depth
        out = io.StringIO()
        assert view.export(out) == pending >= len(acknowledged)
        assert [json.loads(line)["seq"] for line in out.getvalue().splitlines()[:3]] == [1, 2, 3]
        assert view.peek("sale", 2)[1]["seq"] == 2
    assert sorted(os.listdir(path)) == before

    ob = open_outbox(path)
    stored = [s for s, _ in ob.read("sale", 0, 1_000_000)]
    assert set(acknowledged) <= set(stored)
    assert stored == list(range(1, len(stored) + 1))
    assert ob.submit("sale", "{}", "pos-1").result(5).seq == len(stored) + 1


def test_inspect_is_read_only_and_refuses_a_missing_outbox(open_outbox: OpenOutbox,
                                                           tmp_path: Path) -> None:
    """The CLI view of a cleanly closed outbox creates no file; a missing outbox is an error
    naming the path."""
    ob = open_outbox()
    for i in range(3):
        ob.submit("sale", sale(i), "pos-1").result(5)
    ob.submit("alarm", "{}", "edge-agent").result(5)
    ob.close()
    before = sorted(os.listdir(tmp_path / "outbox"))
    with Outbox.inspect(str(tmp_path / "outbox")) as view:
        assert [e["kind"] for e in view.peek(None, 10)] == ["alarm", "sale", "sale", "sale"]
        assert [e["seq"] for e in view.peek("sale", 2)] == [1, 2]
        assert view.stats()["sale"].last_seq == 3
    assert sorted(os.listdir(tmp_path / "outbox")) == before
    with pytest.raises(OutboxError, match="no outbox database at"):
        Outbox.inspect(str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()


def test_close_commits_queued_events_then_refuses(open_outbox: OpenOutbox) -> None:
    """close() commits everything already queued; submit or ack after close raise OutboxError."""
    ob = open_outbox()
    futures = [ob.submit("scan", "{}", "s") for _ in range(500)]
    ob.close()
    assert [f.result(0).seq for f in futures] == list(range(1, 501))
    with pytest.raises(OutboxError):
        ob.submit("scan", "{}", "s")
    with pytest.raises(OutboxError):
        ob.ack("scan", 1)
    with pytest.raises(OutboxError):
        ob.read("scan", 0, 1)


def test_listeners_hear_commits_and_bad_requests_are_refused(open_outbox: OpenOutbox) -> None:
    """Listeners are called after a commit that added events; an oversized event gets
    EventTooLarge and an unknown kind a ValueError, neither consuming a seq."""
    ob = open_outbox()
    calls: list[int] = []
    ob.add_listener(lambda: calls.append(ob.stats()["sale"].depth))
    ob.submit("sale", sale(1), "pos-1").result(5)
    wait_for(lambda: calls, what="a listener call")
    assert calls[0] == 1
    with pytest.raises(EventTooLarge):
        ob.submit("sale", json.dumps({"pad": "x" * MAX_EVENT_BYTES}), "pos-1").result(5)
    with pytest.raises(ValueError, match="unknown event kind"):
        ob.submit("refund", "{}", "pos-1")
    assert ob.submit("sale", sale(2), "pos-1").result(5).seq == 2


def test_append_is_awaitable(open_outbox: OpenOutbox) -> None:
    """append() is the asyncio face of submit()."""
    import asyncio

    ob = open_outbox()
    accepted = asyncio.run(ob.append("device", json.dumps({"state": "up"}), "printer-1"))
    assert (accepted.kind, accepted.seq) == ("device", 1)


def test_appends_of_one_group_commit_wake_their_loop_once(open_outbox: OpenOutbox) -> None:
    """Eight append()s committed together are answered on their loop by one
    call_soon_threadsafe, not one each; each gets its own seq; a cancelled append whose
    event was not written yet is dropped by the writer."""
    import asyncio

    ob = open_outbox()

    async def main() -> tuple[list[int], int, bool]:
        loop = asyncio.get_running_loop()
        calls: list[Any] = []
        real = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(args[0])
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        with writer_held(ob):
            tasks = [asyncio.ensure_future(ob.append("sale", sale(i), "pos-1"))
                     for i in range(8)]
            dropped = asyncio.ensure_future(ob.append("sale", sale(99), "pos-1"))
            await asyncio.sleep(0)  # every append has submitted and waits
            dropped.cancel()
            await asyncio.sleep(0)
        accepted = await asyncio.gather(*tasks)
        return [a.seq for a in accepted], len(calls), dropped.cancelled()

    seqs, wakes, cancelled = asyncio.run(main())
    assert seqs == list(range(1, 9))
    assert wakes == 1
    assert cancelled and ob.stats()["sale"].last_seq == 8


def test_appends_of_one_loop_pass_reach_the_writer_in_one_put(tmp_path: Path) -> None:
    """Fifty append()s made in one pass of the event loop reach the writer thread as one
    queue put (not a put, and a writer wake, each) and commit together, in call order;
    an append after close is refused at once."""
    import asyncio
    import queue

    puts: list[object] = []

    class Counted(queue.SimpleQueue):  # type: ignore[type-arg]
        def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
            puts.append(item)
            super().put(item, block, timeout)

    ob = Outbox(str(tmp_path / "outbox"), SITE, max_bytes=1 << 30, ballast_bytes=64 * 1024)
    ob._queue = Counted()
    ob.open()
    try:
        async def main() -> list[Accepted]:
            return await asyncio.gather(*(ob.append("sale", sale(i), "pos-1")
                                          for i in range(50)))

        accepted = asyncio.run(main())
        assert [a.seq for a in accepted] == list(range(1, 51))
        assert len(puts) == 1, len(puts)
        assert ob.counters["commits"] == 1
    finally:
        ob.close()
    with pytest.raises(OutboxError, match="not open"):
        asyncio.run(ob.append("sale", sale(51), "pos-1"))


def test_a_commit_wakes_the_answers_loop_before_its_listeners(tmp_path: Path) -> None:
    """After a group commit the writer signals the loop awaiting the answers before it
    calls the commit listeners (the uplink's wake), so the 202s do not wait behind a
    pump pass for the GIL."""
    import asyncio

    order: list[str] = []
    ob = Outbox(str(tmp_path / "outbox"), SITE, max_bytes=1 << 30, ballast_bytes=64 * 1024)
    real = ob._waiters.round_done

    def round_done() -> None:
        if ob._waiters._due:
            order.append("answers")
        real()

    ob._waiters.round_done = round_done  # type: ignore[method-assign]
    ob.add_listener(lambda: order.append("listener"))
    ob.open()
    try:
        accepted = asyncio.run(ob.append("sale", sale(1), "pos-1"))
        assert accepted.seq == 1
        assert order[:2] == ["answers", "listener"], order
    finally:
        ob.close()


def test_a_loop_pass_larger_than_max_batch_commits_in_rounds_in_order(
        open_outbox: OpenOutbox) -> None:
    """25 append()s of one loop pass with max_batch 10: three group commits of at most
    10, every event in call order; none left waiting."""
    import asyncio

    ob = open_outbox(max_batch=10)

    async def main() -> list[Accepted]:
        return await asyncio.gather(*(ob.append("sale", sale(i), "pos-1") for i in range(25)))

    accepted = asyncio.run(main())
    assert [a.seq for a in accepted] == list(range(1, 26))
    assert ob.counters["commits"] == 3
    assert [decode(b)["data"]["receipt_number"] for _s, b in ob.read("sale", 0, 100)] \
        == [f"R-{i}" for i in range(25)]


def test_thinning_counts_invalid_readings_instead_of_averaging_them() -> None:
    """A reading marked valid=false is counted per reason in the aggregate, not averaged in."""
    from agent.outbox.thinning import MinuteRun

    def env(seq: int, temp: float, valid: bool = True, reason: str | None = None) -> dict:
        return {"ts": "2026-11-22T17:03:11.482Z", "source": "climate",
                "data": {"device": "flower-2", "temperature_c": temp, "valid": valid,
                         "reason": reason}}

    run = MinuteRun(1, env(1, 24.0), 100)
    run.add(2, env(2, 99.0, valid=False, reason="spike"), 100)
    run.add(3, env(3, 26.0), 100)
    data = run.data()
    assert data["count"] == 3
    assert data["series"]["flower-2"]["temperature_c"] == {"mean": 25.0, "min": 24.0,
                                                           "max": 26.0, "count": 2}
    assert data["invalid"] == {"flower-2": {"spike": 1}}
