"""Drain progress (issue 14): the rate acks empty the outbox at and the time to empty,
in status (human and JSON, so P/health too) and in the page's words."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.cli import format_status
from agent.config import AgentConfig
from agent.ops.status import build_status
from agent.outbox import Outbox
from agent.outbox.drain import DrainMeter, drain_rate, time_to_empty
from agent.web.page import drain_words, hq_link

SITE = "t-drain"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_counts_every_delete_in_the_window_but_the_first() -> None:
    """100 events every second for 10 s is 100/s; the first delete's events are not in it."""
    samples = [(float(t), 100) for t in range(10)]
    assert drain_rate(samples, now=9.0, window_s=60) == pytest.approx(100.0)
    assert drain_rate(samples[:1], now=5.0, window_s=60) == 0.0   # one delete: no rate
    assert drain_rate([], now=5.0, window_s=60) == 0.0


def test_a_drain_that_stops_decays_and_old_deletes_leave_the_window() -> None:
    """Acks that stop lower the rate as time passes; after the window it is 0."""
    clock = Clock()
    meter = DrainMeter(window_s=60, clock=clock)
    for _ in range(11):
        meter.note("sale", 50)
        clock.now += 1
    clock.now -= 1
    assert meter.rates()["sale"] == pytest.approx(50.0)
    clock.now += 10
    assert meter.rates()["sale"] == pytest.approx(500 / 20)
    clock.now += 61
    assert meter.rates()["sale"] == 0.0


def test_time_to_empty_and_progress_per_kind_and_total() -> None:
    """ETA is depth / rate; an empty kind is 0; a kind with depth and no rate is unknown."""
    assert time_to_empty(1000, 50.0) == 20.0
    assert time_to_empty(0, 0.0) == 0.0 and time_to_empty(5, 0.0) is None
    clock = Clock()
    meter = DrainMeter(window_s=60, clock=clock)
    for _ in range(3):
        meter.note("sale", 100)
        clock.now += 2
    clock.now -= 2                                   # sale: 200 events over 4 s = 50/s
    got = meter.progress({"sale": 500, "scan": 10, "plant": 0})
    assert got["kinds"]["sale"] == {"rate_eps": 50.0, "eta_s": 10.0}
    assert got["kinds"]["scan"] == {"rate_eps": 0.0, "eta_s": None}
    assert got["kinds"]["plant"] == {"rate_eps": 0.0, "eta_s": 0.0}
    assert got["rate_eps"] == 50.0 and got["eta_s"] == pytest.approx(510 / 50, abs=0.1)
    assert got["window_s"] == 60


def test_plain_words_for_the_page() -> None:
    """The page says how fast the backlog goes and when it is all sent; nothing when idle."""
    assert drain_words(500, {"rate_eps": 50.0, "eta_s": 10.0}) == \
        "sending 50 a second, all sent in under a minute"
    assert drain_words(5000, {"rate_eps": 20.0, "eta_s": 250.0}) == \
        "sending 20 a second, all sent in about 4 minutes"
    assert drain_words(3, {"rate_eps": 0.2, "eta_s": None}) == "sending one every 5 seconds"
    assert drain_words(0, {"rate_eps": 50.0, "eta_s": 0.0}) is None
    assert drain_words(10, {"rate_eps": 0.0, "eta_s": None}) is None


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(str(tmp_path / "outbox"), SITE, max_bytes=1 << 26)
    box.open()
    try:
        yield box
    finally:
        box.close()


def test_a_real_drain_shows_in_status_json_text_and_the_page(outbox: Outbox) -> None:
    """Acks deleting a backlog of a real outbox give status (so P/health) a rate and
    time to empty per kind and in total; `edge-agent status` and the page say it."""
    for f in [outbox.submit("sale", json.dumps({"n": i}), "test") for i in range(1000)]:
        f.result(timeout=30)
    idle = build_status(SimpleNamespace(  # type: ignore[arg-type]
        cfg=AgentConfig(site={"id": SITE}), outbox=outbox, uplink_snapshot=dict,
        devices_snapshot=list, started_at=time.time()))
    assert idle["outbox"]["drain"]["rate_eps"] == 0.0 and idle["outbox"]["drain"]["eta_s"] is None
    assert "draining" not in format_status(idle)
    for upto in range(100, 601, 100):                # six deletes, as HQ's acks would make
        assert outbox.ack("sale", upto).result(timeout=30) == 100
    status = build_status(SimpleNamespace(  # type: ignore[arg-type]
        cfg=AgentConfig(site={"id": SITE}), outbox=outbox, uplink_snapshot=dict,
        devices_snapshot=list, started_at=time.time()))
    drain = status["outbox"]["drain"]
    sale = drain["kinds"]["sale"]
    assert status["outbox"]["kinds"]["sale"]["depth"] == 400 and sale["rate_eps"] > 0
    assert sale["eta_s"] == pytest.approx(400 / sale["rate_eps"], rel=0.01, abs=0.1)
    assert drain["rate_eps"] == sale["rate_eps"] and drain["window_s"] == 60
    assert drain["kinds"]["scan"] == {"rate_eps": 0.0, "eta_s": 0.0}
    json.dumps(status)                                 # P/health publishes it as JSON
    text = format_status(status)
    assert "draining " in text and "empty in" in text and "sending" in text
    view = hq_link({"state": "connected", "last_ack_ts": time.time()},
                   status["outbox"]["kinds"], 30, time.time(), [], drain)
    assert view["progress"] and view["progress"].startswith("sending ")
    assert view["drain_rate_eps"] == drain["rate_eps"]
