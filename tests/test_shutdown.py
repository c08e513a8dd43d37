"""Bounded, complete stops in process (issue 10): a start-up that fails halfway stops what
already runs, the outbox's close is bounded, /healthz sees a writer that is gone."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent import daemon
from agent.config import AgentConfig
from agent.outbox import Outbox
from agent.outbox.writer import Writer
from agent.testing.localbroker import Broker, free_port
from agent.web.api import create_app
from agent.web.auth import Tokens
from agent.web.context import ApiContext
from tests.conftest import wait_for

TOKEN = "shutdown-test-token-0123456789"


def agent_config(tmp_path: Path, broker: Broker, **api: Any) -> AgentConfig:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"cli {TOKEN}\n")
    tokens.chmod(0o600)
    return AgentConfig(site={"id": "co-denver-01"},
                       mqtt={"hosts": ["127.0.0.1"], "port": broker.port, "tls": False},
                       outbox={"path": str(tmp_path / "outbox")},
                       api={"bind": "127.0.0.1", "port": free_port(), "tokens_file": str(tokens),
                            "advertise": False, **api})


def component_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.is_alive() and t.name in ("uplink", "outbox-writer")]


class ExplodingAdvertiser:
    """An mDNS advertiser whose start raises, as a zeroconf bug would."""

    def __init__(self, cfg: AgentConfig) -> None:
        pass

    def start(self) -> None:
        raise RuntimeError("mdns exploded")


@pytest.mark.parametrize("failing", ["create_app", "advertiser"])
def test_a_start_that_fails_halfway_stops_what_already_runs(
        tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """create_app or the advertiser raising: the error comes out, and the uplink, the outbox
    writer and the API's port are all stopped (nothing left running in the process)."""
    assert component_threads() == []
    if failing == "create_app":
        def broken_app(ctx: ApiContext) -> Any:
            raise RuntimeError("app exploded")
        monkeypatch.setattr(daemon, "create_app", broken_app)
        cfg = agent_config(tmp_path, broker)
    else:
        monkeypatch.setattr(daemon, "Advertiser", ExplodingAdvertiser)
        cfg = agent_config(tmp_path, broker, advertise=True)
    with pytest.raises(RuntimeError, match="exploded"):
        asyncio.run(daemon.serve(cfg))
    wait_for(lambda: component_threads() == [], timeout=5, what="every component stopped")
    with socket.socket() as sock:   # the API's port is free again
        sock.bind(("127.0.0.1", cfg.api.port))


def test_outbox_close_is_bounded_by_its_timeout(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer stuck inside a batch (an fsync on a dying card) does not hold close() past
    its timeout; once it gets going again its thread ends on its own."""
    release = threading.Event()
    entered = threading.Event()
    real_append = Writer._append

    def stuck_append(self: Writer, submits: list[Any]) -> None:
        entered.set()
        release.wait(30)
        real_append(self, submits)

    monkeypatch.setattr(Writer, "_append", stuck_append)
    box = Outbox(str(tmp_path / "outbox"), "co-denver-01", max_bytes=1 << 24)
    box.open()
    future = box.submit("sale", json.dumps({"n": 1}), "pos-1")
    assert entered.wait(10)
    started = time.monotonic()
    box.close(timeout=0.5)
    assert time.monotonic() - started < 3
    assert not box.writer_alive()
    release.set()
    assert future.result(10).seq == 1   # what it held still commits
    wait_for(lambda: "outbox-writer" not in component_threads(), timeout=10,
             what="the writer thread to end")


def test_healthz_is_503_once_the_writer_thread_is_gone(tmp_path: Path) -> None:
    """/healthz answers 503 outbox_stopped when the writer thread no longer runs."""
    cfg = AgentConfig(site={"id": "co-denver-01"}, outbox={"path": str(tmp_path / "outbox")})
    box = Outbox(str(tmp_path / "outbox"), "co-denver-01", max_bytes=1 << 24)
    box.open()
    ctx = ApiContext(cfg=cfg, outbox=box, tokens=Tokens({"pos-1": TOKEN}),
                     uplink_snapshot=dict, devices_snapshot=list, started_at=time.time())
    with TestClient(create_app(ctx)) as client:
        assert client.get("/healthz").status_code == 200
        box.close()
        answer = client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json()["reason"].startswith("outbox_stopped")
