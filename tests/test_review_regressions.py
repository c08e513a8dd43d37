"""Regressions found reviewing the delivery core: outbox, thinning, HQ store and receiver."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.envelope import decode
from agent.errors import DiskFull, OutboxFull
from agent.outbox import Outbox
from agent.outbox.store import DB_NAME
from agent.testing.localbroker import Broker
from hq.receiver import HqReceiver
from hq.store import SqliteStore
from tests.conftest import FakeClock, wait_for
from tests.test_hq import Site, envelope, envelope_bytes, hq_config

REPO = Path(__file__).resolve().parent.parent
SITE = "co-test-01"
T0 = 1_794_999_960.0  # 2026-11-18T11:06:00Z, the start of a UTC minute


def reading(value: float) -> str:
    return json.dumps({"device": "scd41-1", "co2_ppm": value, "temp_c": value / 100})


def envelopes(ob: Outbox, kind: str) -> list[dict[str, Any]]:
    return [decode(body) for _, body in ob.read(kind, 0, 1_000_000)]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of our own (the test runs as root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI container runs as root)")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_at_open_is_not_taken_for_corruption(tiny_disk: Path) -> None:
    """Reopening a healthy outbox on a full disk keeps it (never set aside as corrupt): it
    opens on the ballast's room, pending sales stay deliverable and acks delete; new events
    are refused until space returns, then flow with the next seq."""
    path = tiny_disk / "outbox"
    ob = Outbox(str(path), SITE, max_bytes=1 << 30, ballast_bytes=256 * 1024)
    ob.open()
    for i in range(10):
        ob.submit("sale", json.dumps({"i": i, "pad": "x" * 1000}), "pos-1").result(5)
    ob.close()
    filler = tiny_disk / "filler"
    with open(filler, "wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(bytes(65536))
            fh.flush()

    ob = Outbox(str(path), SITE, max_bytes=1 << 30, ballast_bytes=256 * 1024)
    try:
        assert ob.open() == []
        assert not [n for n in os.listdir(path) if ".corrupt-" in n]
        assert [s for s, _ in ob.read("sale", 0, 100)] == list(range(1, 11))
        assert ob.state == "disk_full"
        with pytest.raises(DiskFull):
            ob.submit("sale", "{}", "pos-1").result(5)
        assert ob.ack("sale", 4).result(5) == 4
        filler.unlink()
        wait_for(lambda: ob.state == "ok", timeout=10, what="the disk_full condition to clear")
        assert ob.submit("sale", "{}", "pos-1").result(5).seq == 11
    finally:
        ob.close()


def test_an_aggregate_carries_the_lost_range_of_the_reading_it_replaces(tmp_path: Path) -> None:
    """After a corrupt-outbox reset, thinning the first sensor reading (which declares
    "lost") keeps the declaration on the aggregate, so HQ's watermark passes the range."""
    path = tmp_path / "outbox"
    clock = FakeClock(T0)
    ob = Outbox(str(path), SITE, max_bytes=1 << 30, ballast_bytes=0, clock=clock)
    ob.open()
    for i in range(5):
        ob.submit("sensor", reading(400 + i), "sensors").result(5)
    ob.ack("sensor", 2).result(5)
    ob.close()
    with open(path / DB_NAME, "r+b") as fh:
        fh.write(b"this is no longer an sqlite file" * 4)

    ob = Outbox(str(path), SITE, max_bytes=1 << 13, ballast_bytes=0, clock=clock)
    assert len(ob.open()) == 1
    try:
        for _minute in range(6):
            for i in range(12):
                ob.submit("sensor", reading(400 + i), "sensors").result(5)
            clock.now += 60
        assert ob.counters["thinned_aggregates"] > 0
        sent = envelopes(ob, "sensor")
    finally:
        ob.close()
    first = sent[0]
    assert first["seq"] == 1001 and "seq_end" in first
    assert first["lost"] == [3, 1000]
    hq = SqliteStore(str(tmp_path / "hq.db"))
    try:
        hq.store_batch([envelope(s, kind="sensor") for s in (1, 2)])
        marks = hq.store_batch(sent)
        assert marks[(SITE, "sensor", "")] == sent[-1].get("seq_end", sent[-1]["seq"])
    finally:
        hq.close()


PUBLISH_THEN_DIE = r"""
import json, os, signal, sys
from agent.outbox import Outbox
T0 = 1_794_999_960.0
ob = Outbox(sys.argv[1], "co-test-01", max_bytes=1 << 30, ballast_bytes=0, clock=lambda: T0)
ob.open()
futures = [ob.submit("sensor", json.dumps({"device": "d", "co2_ppm": 400 + i}), "s")
           for i in range(40)]
for f in futures:
    f.result(5)
ob.mark_published("sensor", 40)  # what the uplink does right before handing 1..40 to MQTT
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_readings_published_before_a_sigkill_are_never_thinned(tmp_path: Path) -> None:
    """The uplink's published mark survives kill -9: after a restart at max_bytes, thinning
    leaves alone the readings that already went to MQTT (HQ may hold and ack part of them)."""
    path = tmp_path / "outbox"
    proc = subprocess.run([sys.executable, "-c", PUBLISH_THEN_DIE, str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == -9, proc.stderr
    ob = Outbox(str(path), SITE, max_bytes=1 << 12, ballast_bytes=0, clock=lambda: T0)
    ob.open()
    try:
        # At the cap: thinning is tried, finds nothing it may touch, and the reading is refused.
        with pytest.raises(OutboxFull):
            ob.submit("sensor", reading(1), "sensors").result(5)
        sent = envelopes(ob, "sensor")
    finally:
        ob.close()
    assert [(e["seq"], e.get("seq_end")) for e in sent[:40]] == [(s, None) for s in range(1, 41)]


def test_hq_keeps_the_coverage_of_an_aggregate_whose_first_seq_came_raw(tmp_path: Path) -> None:
    """An aggregate (10..20) arriving after the raw reading 10 it starts with still covers
    11..20: once 1..9 arrive the watermark is 20, not stuck at 10."""
    hq = SqliteStore(str(tmp_path / "hq.db"))
    try:
        assert hq.store_batch([envelope(10, kind="sensor")]) == {(SITE, "sensor", ""): 0}
        hq.store_batch([envelope(10, kind="sensor", seq_end=20)])
        marks = hq.store_batch([envelope(s, kind="sensor") for s in range(1, 10)])
        assert marks == {(SITE, "sensor", ""): 20}
        assert [e["seq_end"] for e in hq.events(SITE, "sensor")][-1] == 20
    finally:
        hq.close()


def test_hq_receiver_survives_an_out_of_range_seq(broker: Broker, tmp_path: Path) -> None:
    """A message whose seq does not fit SQLite's INTEGER is dropped as malformed (and
    PUBACKed) instead of killing the receiver thread; the next event is stored and acked."""
    site = Site(broker.port)
    site.listen_acks()
    rx = HqReceiver(hq_config(broker.port, tmp_path / "hq.db"))
    stop = threading.Event()
    thread = threading.Thread(target=rx.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert rx.subscribed.wait(10)
        site.publish(envelope_bytes(2**64, ts=T0))
        site.publish(envelope_bytes(1, ts=T0, seq_end=2**70))
        site.publish(envelope_bytes(1))
        wait_for(lambda: site.upto() == 1, what="the valid event acked")
        assert thread.is_alive() and rx.counters["malformed"] == 2
    finally:
        stop.set()
        thread.join(10)
        site.close()
