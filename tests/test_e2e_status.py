"""`edge-agent status` tells the truth about outages, with the real processes (issue 10)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.testing.localsite import LocalSite, edge_agent_argv, sample_sale
from tests.conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GRACE_S = 3.0


@pytest.fixture
def site(tmp_path: Path) -> Iterator[LocalSite]:
    s = LocalSite(tmp_path / "site", agent_overrides={"mqtt": {"down_grace_s": GRACE_S}})
    try:
        yield s
    finally:
        s.stop()


def cli_status(site: LocalSite) -> tuple[int, dict[str, Any]]:
    res = subprocess.run([*edge_agent_argv(), "status", "--json", "--config",
                          str(site.agent_config)], capture_output=True, text=True, timeout=30)
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else {}


def wait_exit(site: LocalSite, code: int, timeout: float) -> dict[str, Any]:
    """Poll `edge-agent status` until it exits ``code``; its JSON."""
    return wait_for(lambda: (r := cli_status(site))[0] == code and r[1], timeout=timeout,
                    interval=0.2, what=f"edge-agent status to exit {code}")


def test_status_exits_1_on_an_outage_and_0_when_it_ends(site: LocalSite) -> None:
    """Broker SIGKILLed: `edge-agent status` exits 1 within the grace + 10 s, naming the
    cause; back to 0 once the broker returns. A SIGSTOPped broker (a partition) degrades it
    too, as our keepalive timeout; 0 again after SIGCONT."""
    site.start()
    for n in range(5):
        assert site.request("POST", "/v1/events/sale", {"data": sample_sale(n)})[0] == 202
    wait_exit(site, 0, timeout=30)
    assert site.broker is not None
    site.broker.kill()
    killed = time.monotonic()
    status = wait_exit(site, 1, timeout=GRACE_S + 10)
    assert time.monotonic() - killed <= GRACE_S + 10
    down = [r for r in status["reasons"] if r.startswith("uplink_down:")]
    assert down and "cause: connection refused" in down[0], status["reasons"]
    site.broker.start()
    wait_exit(site, 0, timeout=30)

    assert site.broker.proc is not None
    os.kill(site.broker.proc.pid, signal.SIGSTOP)
    try:
        # keepalive_s = 5: the ping goes after 5 s of silence, the timeout 5 s later.
        status = wait_exit(site, 1, timeout=2 * 5 + GRACE_S + 10)
        assert [r.split(":", 1)[0] for r in status["reasons"]] == ["uplink_down"]
        # Our keepalive noticed it; the reconnects since find the port open, no CONNACK.
        assert status["uplink"]["cause"] in ("keepalive_timeout", "timeout"), status["uplink"]
    finally:
        os.kill(site.broker.proc.pid, signal.SIGCONT)
    wait_exit(site, 0, timeout=30)
    assert "keepalive timeout" in (site.workdir / "agent.log").read_text()
