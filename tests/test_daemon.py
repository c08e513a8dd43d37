"""The daemon's wiring, in process: families that fail, and a clean stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent import daemon
from agent.config import AgentConfig
from agent.devices import family as services
from agent.devices.family import BaseService, ServiceContext
from agent.testing.localbroker import Broker, free_port
from agent.testing.localsite import sample_sale

TOKEN = "daemon-test-token-0123456789"


class Broken(BaseService):
    """A device family whose start raises, as a driver bug would."""

    name = "broken"

    async def start(self, ctx: ServiceContext) -> None:
        raise RuntimeError("driver exploded")


def _call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback http
        return int(r.status), json.loads(r.read())


def test_a_family_that_fails_to_start_does_not_stop_the_site(
        tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A family whose start raises is reported as an error device; sales are still taken."""
    monkeypatch.setattr(services, "SERVICE_CLASSES",
                        (*services.SERVICE_CLASSES, "tests.test_daemon:Broken"))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"cli {TOKEN}\n")
    tokens.chmod(0o600)
    port = free_port()
    cfg = AgentConfig(site={"id": "co-denver-01"},
                      mqtt={"hosts": ["127.0.0.1"], "port": broker.port, "tls": False},
                      outbox={"path": str(tmp_path / "outbox")},
                      api={"bind": "127.0.0.1", "port": port, "tokens_file": str(tokens),
                           "advertise": False})

    async def scenario() -> tuple[int, dict[str, Any], tuple[int, Any]]:
        task = asyncio.create_task(daemon.serve(cfg))
        deadline = asyncio.get_running_loop().time() + 20
        status: dict[str, Any] = {}
        while not status:
            assert not task.done(), task
            assert asyncio.get_running_loop().time() < deadline, "daemon never listened"
            try:
                status = (await asyncio.to_thread(_call, port, "GET", "/v1/status"))[1]
            except OSError:
                await asyncio.sleep(0.05)
        sale = await asyncio.to_thread(_call, port, "POST", "/v1/events/sale",
                                       {"data": sample_sale(1)})
        os.kill(os.getpid(), signal.SIGTERM)  # serve() owns SIGTERM while it runs
        return await asyncio.wait_for(task, 15), status, sale

    code, status, sale = asyncio.run(scenario())
    assert code == 0
    assert sale[0] == 202 and sale[1]["seq"] == 1
    broken = [d for d in status["devices"] if d["id"] == "broken"]
    assert broken and broken[0]["state"] == "error"
    assert "driver exploded" in broken[0]["last_fault"]
    assert any(r.startswith("device_down: broken") for r in status["reasons"])


@pytest.mark.e2e
def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """`edge-agent run` on a taken API port exits 1 naming the address and the keys to check."""
    import socket
    import subprocess

    from agent.testing.localsite import edge_agent_argv, write_toml

    tokens = tmp_path / "tokens"
    tokens.write_text(f"cli {TOKEN}\n")
    tokens.chmod(0o600)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "agent.toml"
        write_toml(config, {"site": {"id": "co-denver-01"},
                            "mqtt": {"hosts": ["127.0.0.1"], "port": free_port(), "tls": False},
                            "outbox": {"path": str(tmp_path / "outbox")},
                            "api": {"bind": "127.0.0.1", "port": port,
                                    "tokens_file": str(tokens), "advertise": False}})
        result = subprocess.run([*edge_agent_argv(), "run", "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"api: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "api.port" in result.stderr
