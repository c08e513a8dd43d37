"""HQ's store: identity by id, epochs, conflicts and rejects (issue 9; hq/store.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from hq.receiver import Heard
from hq.report import format_report, has_problems
from hq.store import Reject, SqliteStore, StoreError, event_row
from tests.conftest import make_store
from tests.test_hq import IDS, SITE, envelope


def kinds_of(report: dict[str, Any], site: str = SITE) -> dict[str, dict[str, Any]]:
    return {k["kind"]: k for s in report["sites"] if s["site"] == site for k in s["kinds"]}


@pytest.fixture
def hq(store_url: str) -> Any:
    """An empty store on each backend in turn (SQLite, PostgreSQL): the same semantics."""
    store = make_store(store_url)
    yield store
    store.close()


def test_the_same_id_again_is_a_duplicate_another_id_a_conflict(hq: SqliteStore) -> None:
    """Seq 2 again with its id is a duplicate; seq 2 with another id is stored too and
    recorded as a conflict; the report counts both rows and the conflict."""
    hq.store_batch([envelope(s) for s in (1, 2, 3)])
    hq.store_batch([envelope(2)])
    forged = envelope(2, event_id=IDS.new())
    hq.store_batch([forged])
    sale = kinds_of(hq.report())["sale"]
    assert sale["received"] == 4 and sale["duplicates"] == 1 and sale["conflicts"] == 1
    assert sorted(e["id"] for e in hq.events(SITE, "sale") if e["seq"] == 2) == \
        sorted([envelope(2)["id"], forged["id"]])
    (conflict,) = hq.conflicts()
    assert conflict["seq"] == 2 and conflict["id"] == forged["id"]
    assert conflict["other_id"] == envelope(2)["id"]
    assert has_problems(hq.report())


def test_each_epoch_is_its_own_stream(hq: SqliteStore) -> None:
    """A replaced box (new epoch, seqs from 1 again, new ids) is stored in full and acked
    on its own watermark; every clash with the old box's seqs is a conflict."""
    old = [envelope(s, event_id=IDS.new(), epoch="old-box") for s in range(1, 6)]
    assert hq.store_batch(old) == {(SITE, "sale", "old-box"): 5}
    new = [envelope(s, event_id=IDS.new(), epoch="new-box") for s in (1, 2, 4)]
    assert hq.store_batch(new) == {(SITE, "sale", "new-box"): 2}
    sale = kinds_of(hq.report())["sale"]
    assert sale["received"] == 8 and sale["conflicts"] == 3 and sale["gaps"] == []
    assert sale["epoch"] == "new-box" and sale["acked_upto"] == 2 and sale["epochs"] == 2


def test_a_resend_under_a_new_epoch_moves_the_row_and_skips_nothing(hq: SqliteStore) -> None:
    """After an agent restart (a new epoch) its pending events come again with their ids
    and the oldest carries floor: duplicates, filed under the new epoch, which acks them;
    seqs acked under the earlier epoch are not reported as skipped."""
    first = [envelope(s, epoch="run-1") for s in range(1, 11)]
    hq.store_batch(first)
    again = [dict(envelope(s, epoch="run-2"), id=first[s - 1]["id"]) for s in range(8, 11)]
    again[0]["floor"] = 7
    assert hq.store_batch(again) == {(SITE, "sale", "run-2"): 10}
    sale = kinds_of(hq.report())["sale"]
    assert sale["received"] == 10 and sale["duplicates"] == 3 and sale["conflicts"] == 0
    assert sale["skipped"] == [] and sale["epoch"] == "run-2"
    assert [e["epoch"] for e in hq.events(SITE, "sale")] == ["run-1"] * 7 + ["run-2"] * 3


def test_an_aggregate_and_its_raw_reading_are_not_a_conflict(hq: SqliteStore) -> None:
    """A thinned aggregate over a raw reading of the same epoch keeps both, no conflict."""
    hq.store_batch([envelope(1, kind="sensor")])
    hq.store_batch([envelope(1, kind="sensor", seq_end=5)])
    sensor = kinds_of(hq.report())["sensor"]
    assert sensor["conflicts"] == 0 and sensor["received"] == 2 and sensor["acked_upto"] == 5


def test_rejects_are_kept_and_counted_per_site_and_kind(hq: SqliteStore) -> None:
    """A reject is stored with its reason and first bytes; the report counts it under the
    topic's site and kind, also for a pair with no stored event, and the check fails."""
    payload = b"\xff\xfe" + b"x" * 1000
    hq.store_batch([envelope(1)], [Reject.of("edge/co-test-01/events/sale", SITE, "sale",
                                             "not UTF-8 JSON", payload)])
    hq.store_batch([], [Reject.of("edge/co-other/events/bogus", "co-other", "bogus",
                                  "kind 'bogus' is not one of ...", b"{}")])
    assert kinds_of(hq.report())["sale"]["rejected"] == 1
    other = kinds_of(hq.report(), "co-other")["bogus"]
    assert other["rejected"] == 1 and other["received"] == 0 and other["first_seq"] is None
    (first, _) = hq.rejects()
    assert first["reason"] == "not UTF-8 JSON" and first["size"] == 1002
    assert first["head"] == payload[:256]
    assert "REJECTED" in format_report(hq.report()) and has_problems(hq.report())


def test_unproven_claims_are_in_the_report(hq: SqliteStore) -> None:
    """An event stored without its unproven claims counts under unproven_claims."""
    row = event_row(envelope(1))
    hq.store_batch([row.__class__(**{**row.__dict__, "unproven": True})])
    assert kinds_of(hq.report())["sale"]["unproven_claims"] == 1
    assert has_problems(hq.report())


def test_a_bad_epoch_or_id_is_refused_naming_the_field() -> None:
    """An epoch or id that is not short printable text is a ValueError naming the field."""
    with pytest.raises(ValueError, match="'epoch'"):
        event_row(envelope(1, epoch="x" * 65))
    with pytest.raises(ValueError, match="'id'"):
        event_row(dict(envelope(1), id="\ud800"))


V1_SCHEMA = """
CREATE TABLE events (site TEXT NOT NULL, kind TEXT NOT NULL, seq INTEGER NOT NULL,
    seq_end INTEGER, id TEXT NOT NULL, ts TEXT NOT NULL, received_at TEXT NOT NULL,
    payload TEXT NOT NULL, dups INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (site, kind, seq));
CREATE TABLE marks (site TEXT NOT NULL, kind TEXT NOT NULL, upto INTEGER NOT NULL,
    PRIMARY KEY (site, kind));
CREATE TABLE lost (site TEXT NOT NULL, kind TEXT NOT NULL, from_seq INTEGER NOT NULL,
    to_seq INTEGER NOT NULL, seq INTEGER NOT NULL, ts TEXT NOT NULL,
    received_at TEXT NOT NULL, PRIMARY KEY (site, kind, from_seq, to_seq));
PRAGMA user_version = 1;
"""


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    """A store made before epochs opens with its rows, marks and lost ranges as epoch ''."""
    path = tmp_path / "hq.db"
    con = sqlite3.connect(path)
    con.executescript(V1_SCHEMA)
    env = envelope(1)
    con.execute("INSERT INTO events VALUES (?, 'sale', 1, NULL, ?, ?, ?, ?, 2)",
                (SITE, env["id"], env["ts"], env["ts"], json.dumps(env)))
    con.execute("INSERT INTO marks VALUES (?, 'sale', 1)", (SITE,))
    con.commit()
    con.close()
    store = SqliteStore(str(path))
    try:
        assert store.watermarks() == {(SITE, "sale", ""): 1}
        assert store.store_batch([envelope(1), envelope(2)]) == {(SITE, "sale", ""): 2}
        sale = kinds_of(store.report())["sale"]
        assert sale["received"] == 2 and sale["duplicates"] == 3 and sale["conflicts"] == 0
    finally:
        store.close()
    with pytest.raises(StoreError, match="not an HQ store"):
        other = tmp_path / "other.db"
        sqlite3.connect(other).executescript("CREATE TABLE t (x); PRAGMA user_version = 7;")
        SqliteStore(str(other))


def test_heard_caps_an_ack_at_the_run_the_agent_sent() -> None:
    """The ack cap is the end of the heard run holding the batch's newest seq: a far-off
    forged seq does not raise it, a late fill joins the runs around it."""
    heard = Heard()
    for first, last in ((1, 2), (4, 4), (1_000_000, 1_000_000)):
        heard.add(first, last)
    assert heard.run_end(2) == 2
    heard.add(3, 3)
    assert heard.run_end(3) == 4
    assert heard.run_end(1_000_000) == 1_000_000 and heard.run_end(7) == 7


def test_a_site_may_not_be_called_hq() -> None:
    """site.id "hq" (the ACL's HQ identity) is refused with an error naming the field."""
    from pydantic import ValidationError

    from agent.config import AgentConfig

    with pytest.raises(ValidationError, match=r"site\.id") as err:
        AgentConfig(site={"id": "hq", "name": "x", "timezone": "UTC"})
    assert "reserved" in str(err.value)


def test_each_opening_of_an_outbox_has_its_own_epoch(tmp_path: Path) -> None:
    """The outbox makes a new epoch at every open and records it, with the one before,
    in epoch.json (a restored backup restores the file, not the epoch)."""
    from agent.outbox import Outbox
    from agent.outbox.epoch import read_epoch

    epochs = []
    for _ in range(2):
        ob = Outbox(str(tmp_path / "ob"), SITE, max_bytes=1 << 20, ballast_bytes=0)
        ob.open()
        epochs.append(ob.epoch)
        ob.close()
    assert epochs[0] != epochs[1] and read_epoch(str(tmp_path / "ob")) == epochs[1]
    doc = json.loads((tmp_path / "ob" / "epoch.json").read_text())
    assert doc == {"epoch": epochs[1], "previous": epochs[0]}
