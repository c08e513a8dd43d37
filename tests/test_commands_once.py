"""Commands once, for good (issue 9): ids on disk across restarts, retained ones ignored."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import proof
from agent.commands.handlers import CommandRouter
from agent.commands.journal import CommandJournal
from agent.testing.localsite import LocalSite
from drivers.printer import ReceiptOptions, render_receipt
from hq.command import send_command
from tests.conftest import wait_for
from tests.printer_fakes import RECEIPT_OPTIONS, SALE, FakePrinter, fake_escpos_printer

DEVICE = "counter-1-receipt"


def test_router_with_journal_runs_an_id_once_across_instances(tmp_path: Path) -> None:
    """A router on the same journal answers a known id with its first answer, not running it."""
    runs: list[dict[str, Any]] = []

    def router_once(answers: list[dict[str, Any]]) -> CommandRouter:
        router = CommandRouter(answers.append, journal=CommandJournal(tmp_path))
        router.register("count", lambda args: runs.append(args) or {"n": len(runs)})
        return router

    first: list[dict[str, Any]] = []
    router = router_once(first)
    router.dispatch("count", b'{"id": "c-1", "args": {"x": 1}}')
    wait_for(lambda: first, timeout=5)
    router.close()
    again: list[dict[str, Any]] = []
    router = router_once(again)          # "after a restart"
    router.dispatch("count", b'{"id": "c-1", "args": {"x": 1}}')
    wait_for(lambda: again, timeout=5)
    router.close()
    assert runs == [{"x": 1}]
    assert again == first == [{"id": "c-1", "ok": True, "result": {"n": 1}, "error": None}]


def test_a_command_cut_off_by_a_restart_is_not_run_again(tmp_path: Path) -> None:
    """Started but never answered (the agent died): a resend is answered as interrupted."""
    journal = CommandJournal(tmp_path)
    assert journal.start("c-2", "print-label") is None
    journal.close()                       # killed before finish()
    runs: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    router = CommandRouter(answers.append, journal=CommandJournal(tmp_path))
    router.register("print-label", lambda args: runs.append(args))
    router.dispatch("print-label", b'{"id": "c-2", "args": {}}')
    wait_for(lambda: answers, timeout=5)
    router.close()
    assert runs == []
    assert answers[0]["ok"] is False and "interrupted by an agent restart" in answers[0]["error"]


def test_a_corrupt_journal_is_moved_aside(tmp_path: Path) -> None:
    """An unreadable commands.sqlite is set aside and a fresh journal works."""
    (tmp_path / "commands.sqlite").write_bytes(b"not a database" * 100)
    journal = CommandJournal(tmp_path)
    assert journal.start("c-3", "ping") is None
    journal.close()
    assert list(tmp_path.glob("commands.sqlite.corrupt-*"))


# --------------------------------------------------------------------- real processes


@pytest.fixture
def printer() -> Iterator[FakePrinter]:
    with fake_escpos_printer() as fake:
        yield fake


@pytest.fixture
def site(tmp_path: Path, printer: FakePrinter) -> Iterator[LocalSite]:
    options = {k: v for k, v in RECEIPT_OPTIONS.items() if k != "site_name"}
    s = LocalSite(tmp_path / "site", proof_keys=True, devices=[{
        "id": DEVICE, "type": "receipt_printer", "url": printer.url, **options,
        "retry_interval_s": 0.2, "status_timeout_s": 0.5, "status_interval_s": 0.5}])
    try:
        s.start()
        yield s
    finally:
        s.stop()


def receipt(number: str) -> bytes:
    return render_receipt({**SALE, "receipt_number": number}, ReceiptOptions(**RECEIPT_OPTIONS))


def uplink(site: LocalSite) -> dict[str, Any]:
    code, body = site.request("GET", "/v1/status")
    assert code == 200, body
    return dict(body["uplink"])


def restart_agent(site: LocalSite) -> None:
    assert site.agent is not None
    site.agent.kill()
    site.start_agent()
    wait_for(lambda: uplink(site)["state"] == "connected", timeout=20)


@pytest.mark.e2e
def test_resent_print_command_prints_once_across_a_restart(site: LocalSite,
                                                           printer: FakePrinter) -> None:
    """HQ resends print-receipt with the same id after an agent SIGKILL: printed once."""
    assert site.broker is not None
    root = f"edge/{site.site_id}"
    args = {"sale": {**SALE, "receipt_number": "R-000301"}}
    first = send_command("127.0.0.1", site.broker.port, root, "print-receipt", args,
                         command_id="hq-print-301", key=site.site_key, timeout=30)
    assert first["ok"], first
    wait_for(lambda: printer.printed == [receipt("R-000301")], timeout=10)
    restart_agent(site)
    again = send_command("127.0.0.1", site.broker.port, root, "print-receipt", args,
                         command_id="hq-print-301", key=site.site_key, timeout=30)
    assert again == first
    assert printer.printed == [receipt("R-000301")]


@pytest.mark.e2e
def test_retained_print_command_never_prints(site: LocalSite, printer: FakePrinter) -> None:
    """A retained print-receipt (even with valid proof) is ignored, now and after a restart."""
    assert site.broker is not None
    root = f"edge/{site.site_id}"
    body = proof.sign(site.site_key, site.site_id, "commands/print-receipt",
                      {"id": "retained-1", "args": {"sale": {**SALE, "receipt_number": "R-9"}}})
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(site.broker.port), "-q", "1",
                    "-r", "-t", f"{root}/commands/print-receipt", "-m", json.dumps(body)],
                   check=True, timeout=10)
    wait_for(lambda: uplink(site)["retained_commands"] >= 1, timeout=10)
    restart_agent(site)                   # a new subscription gets the retained message again
    wait_for(lambda: uplink(site)["retained_commands"] >= 1, timeout=10)
    # A proven, non-retained command still prints: the printer and the path work.
    answer = send_command("127.0.0.1", site.broker.port, root, "print-receipt",
                          {"sale": {**SALE, "receipt_number": "R-000302"}}, key=site.site_key,
                          timeout=30)
    assert answer["ok"], answer
    assert printer.printed == [receipt("R-000302")]


@pytest.mark.e2e
def test_held_print_jobs_survive_a_restart_and_print_once(site: LocalSite,
                                                         printer: FakePrinter) -> None:
    """Paper out: an API job and an HQ command are held; SIGKILL; paper back: each prints once,
    and the same Idempotency-Key and command id then answer without printing again."""
    assert site.broker is not None
    root = f"edge/{site.site_id}"
    printer.set_state("paper_out")
    key = {"Idempotency-Key": "receipt-R-000311"}
    api_body = {"sale": {**SALE, "receipt_number": "R-000311"}}
    status, body = site.request("POST", "/v1/print/receipt", api_body, headers=key)
    assert (status, body["job"]["outcome"]) == (503, "held"), body
    job_id = body["job"]["job_id"]
    args = {"sale": {**SALE, "receipt_number": "R-000312"}}
    held = send_command("127.0.0.1", site.broker.port, root, "print-receipt", args,
                        command_id="hq-held-312", key=site.site_key, timeout=30)
    assert held["ok"] is False and "held" in held["error"], held
    restart_agent(site)                   # SIGKILL while both wait for paper
    assert printer.printed == []
    printer.set_state("ok")
    wait_for(lambda: printer.printed == [receipt("R-000311"), receipt("R-000312")], timeout=20)
    wait_for(lambda: {e["data"]["job_id"] for e in site.hq_events("print")
                      if e["data"]["outcome"] == "printed"} == {job_id, "hq-held-312"},
             timeout=30)
    status, body = site.request("POST", "/v1/print/receipt", api_body, headers=key)
    assert (status, body["outcome"], body["job_id"]) == (200, "printed", job_id), body
    assert site.request("GET", f"/v1/print/jobs/{job_id}")[1]["outcome"] == "printed"
    other = {"Authorization": f"Bearer {site.token}-pos"}   # the pos-1 token: not its job
    assert site.request("GET", f"/v1/print/jobs/{job_id}", headers=other)[0] == 404
    again = send_command("127.0.0.1", site.broker.port, root, "print-receipt", args,
                         command_id="hq-held-312", key=site.site_key, timeout=30)
    assert again == held
    assert printer.printed == [receipt("R-000311"), receipt("R-000312")]


@pytest.mark.e2e
def test_sigterm_with_a_print_command_waiting_on_a_dead_printer_exits_within_10_s(
        tmp_path: Path) -> None:
    """A printer that takes the connection and never answers: SIGTERM while an HQ print
    command waits on it still ends edge-agent run with 0 within the contract's 10 s."""
    dead = socket.create_server(("127.0.0.1", 0))   # accepts (backlog), never answers
    try:
        site = LocalSite(tmp_path / "site", proof_keys=True, devices=[{
            "id": DEVICE, "type": "receipt_printer",
            "url": f"tcp://127.0.0.1:{dead.getsockname()[1]}", "status_timeout_s": 25,
            "retry_interval_s": 0.2, "status_interval_s": 0}])
        try:
            site.start()
            assert site.broker is not None and site.agent is not None
            answers: list[Any] = []

            def send() -> None:
                assert site.broker is not None
                try:
                    answers.append(send_command(
                        "127.0.0.1", site.broker.port, f"edge/{site.site_id}", "print-receipt",
                        {"sale": SALE}, command_id="hq-dead-1", key=site.site_key, timeout=15))
                except Exception as exc:  # no answer: the agent stopped
                    answers.append(exc)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            wait_for(lambda: "hq-dead-1" in (tmp_path / "site" / "agent.log").read_text()
                     or _journal_has(tmp_path / "site", "hq-dead-1"), timeout=10)
            started = time.monotonic()
            assert site.agent.terminate(timeout=20) == 0
            assert time.monotonic() - started < 10
            log = (tmp_path / "site" / "agent.log").read_text()
            assert "stopped cleanly" in log and "Traceback" not in log, log[-2000:]
            sender.join(20)
        finally:
            site.stop()
    finally:
        dead.close()


def _journal_has(state: Path, command_id: str) -> bool:
    import sqlite3

    path = state / "commands.sqlite"
    if not path.exists():
        return False
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    try:
        return con.execute("SELECT 1 FROM commands WHERE id = ?", (command_id,)).fetchone() \
            is not None
    except sqlite3.Error:
        return False
    finally:
        con.close()
