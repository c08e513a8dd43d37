"""HQ's acks and commands carry proof (issue 9): the MAC itself, and forgeries on a real site."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import proof
from agent.testing.localsite import LocalSite, edge_agent_argv, sample_sale
from hq.command import send_command
from tests.conftest import wait_for

MASTER = b"0123456789abcdef0123456789abcdef"


def test_site_keys_differ_per_site_and_are_stable() -> None:
    """A site key is a pure function of (master, site): stable, different per site and master."""
    a = proof.derive_site_key(MASTER, "co-denver-01")
    assert a == proof.derive_site_key(MASTER, "co-denver-01")
    assert len(a) == 32
    assert a != proof.derive_site_key(MASTER, "co-denver-02")
    assert a != proof.derive_site_key(MASTER[::-1], "co-denver-01")


def test_proof_covers_every_key_and_binds_site_and_channel() -> None:
    """Changing any key (even a later one like epoch), the site or the channel breaks the proof."""
    key = proof.derive_site_key(MASTER, "s1")
    ack = proof.sign(key, "s1", "acks", {"kind": "sale", "upto": 15, "epoch": "e1"})
    assert proof.verify(key, "s1", "acks", ack)
    # Key order and spacing do not matter (canonical JSON)...
    assert proof.verify(key, "s1", "acks", json.loads(json.dumps(dict(reversed(ack.items())))))
    # ...but every value does.
    for changed in ({"upto": 16}, {"kind": "plant"}, {"epoch": "e2"}, {"extra": 1}):
        assert not proof.verify(key, "s1", "acks", {**ack, **changed})
    assert not proof.verify(key, "s2", "acks", ack)
    assert not proof.verify(proof.derive_site_key(MASTER, "s2"), "s2", "acks", ack)
    assert not proof.verify(key, "s1", "commands/ping", ack)
    assert not proof.verify(key, "s1", "acks", {"kind": "sale", "upto": 15, "epoch": "e1"})
    assert not proof.verify(key, "s1", "acks", {**ack, "proof": 12})
    assert not proof.verify(key, "s1", "acks", {**ack, "proof": "é" * 64})


def test_key_files_are_checked(tmp_path: Path) -> None:
    """A site key file holds 64 hex digits, a master >= 16 bytes; errors name the key."""
    good = tmp_path / "site.key"
    good.write_text(proof.derive_site_key(MASTER, "s").hex() + "\n")
    assert proof.read_site_key(str(good)) == proof.derive_site_key(MASTER, "s")
    bad = tmp_path / "bad.key"
    bad.write_text("not hex")
    with pytest.raises(proof.KeyFileError, match=r"mqtt\.hq_key_file"):
        proof.read_site_key(str(bad))
    with pytest.raises(proof.KeyFileError, match="cannot read"):
        proof.read_site_key(str(tmp_path / "missing"))
    short = tmp_path / "master.key"
    short.write_text("short")
    with pytest.raises(proof.KeyFileError, match=r"hq\.master_key_file"):
        proof.read_master_key(str(short))


# --------------------------------------------------------------------- real processes


@pytest.fixture
def site(tmp_path: Path) -> Iterator[LocalSite]:
    s = LocalSite(tmp_path / "site", proof_keys=True)
    try:
        yield s
    finally:
        s.stop()


def status(site: LocalSite) -> dict[str, Any]:
    code, body = site.request("GET", "/v1/status")
    assert code == 200, body
    return dict(body)


def mosquitto_pub(site: LocalSite, topic: str, payload: str, *extra: str) -> None:
    assert site.broker is not None
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(site.broker.port), "-q", "1",
                    "-t", topic, "-m", payload, *extra], check=True, timeout=10)


def post_sales(site: LocalSite, count: int) -> None:
    for n in range(1, count + 1):
        code, body = site.request("POST", "/v1/events/sale", {"data": sample_sale(n)})
        assert code == 202, body


@pytest.mark.e2e
def test_forged_ack_deletes_nothing(site: LocalSite) -> None:
    """A forged {"kind":"sale","upto":15} on P/acks deletes nothing; HQ's proven ack drains."""
    site.start_broker()
    site.write_configs()
    site.start_agent()          # no HQ yet: nothing can ack for real
    post_sales(site, 20)
    root = f"edge/{site.site_id}"
    wait_for(lambda: status(site)["uplink"]["state"] == "connected", timeout=15)
    mosquitto_pub(site, f"{root}/acks", '{"kind":"sale","upto":15}')
    snap = wait_for(lambda: (s := status(site))["uplink"]["forged_acks"] >= 1 and s, timeout=10)
    assert snap["outbox"]["kinds"]["sale"]["depth"] == 20
    assert snap["uplink"]["acks_refused"] == {"sale": 1}
    assert snap["uplink"]["acked_upto"]["sale"] == 0
    assert any(r.startswith("acks_refused:") for r in snap["reasons"])
    code, metrics = site.request("GET", "/metrics")
    assert code == 200
    assert 'edge_forged_acks_total 1.0' in metrics
    assert 'edge_acks_refused_total{kind="sale"} 1.0' in metrics
    # The real HQ, with the master key, proves its acks: everything drains.
    site.start_hq()
    wait_for(lambda: status(site)["outbox"]["kinds"]["sale"]["depth"] == 0, timeout=30)
    assert [e["seq"] for e in site.hq_events("sale")] == list(range(1, 21))
    log = (site.workdir / "agent.log").read_text()
    assert log.count("without valid proof") == 1          # one WARNING per streak
    assert site.site_key.hex() not in log


@pytest.mark.e2e
def test_forged_command_changes_nothing(site: LocalSite) -> None:
    """A command without proof (or with another site's) is not run; HQ's proven one is."""
    site.start()
    root = f"edge/{site.site_id}"
    assert site.broker is not None
    results: list[dict[str, Any]] = []
    got = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        results.append(json.loads(msg.payload))
        got.set()

    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watcher")
    watcher.on_message = on_message
    watcher.connect("127.0.0.1", site.broker.port)
    watcher.subscribe(f"{root}/command-results", qos=1)
    watcher.loop_start()
    try:
        other = proof.derive_site_key(site.master_key, "another-site")
        forged = [json.dumps({"id": "forged-1", "args": {"echo": 1}}),
                  json.dumps(proof.sign(other, "another-site", "commands/ping",
                                        {"id": "forged-2", "args": {"echo": 2}}))]
        for body in forged:
            mosquitto_pub(site, f"{root}/commands/ping", body)
        wait_for(lambda: status(site)["uplink"]["forged_commands"] >= 2, timeout=10)
        answer = send_command("127.0.0.1", site.broker.port, root, "ping", {"echo": 3},
                              key=site.site_key)
        assert answer["ok"] and answer["result"]["echo"] == 3
        wait_for(lambda: any(r["id"] == answer["id"] for r in results), timeout=5)
        assert not [r for r in results if r["id"].startswith("forged")]
        # `edge-agent hq send` signs with the key it derives from hq.master_key_file.
        sent = subprocess.run([*edge_agent_argv(), "hq", "send", "ping", "--site", site.site_id,
                               "--args", '{"echo": 4}', "--config", str(site.hq_config)],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
    finally:
        watcher.loop_stop()
        watcher.disconnect()


@pytest.mark.e2e
def test_hq_site_key_prints_what_the_agent_needs(site: LocalSite) -> None:
    """`edge-agent hq site-key SITE` prints the agent's key file content; a bad id exits 2."""
    site.start_broker()
    site.write_configs()
    out = subprocess.run([*edge_agent_argv(), "hq", "site-key", site.site_id, "--config",
                          str(site.hq_config)], capture_output=True, text=True, timeout=30,
                         check=True)
    assert out.stdout.strip() == (site.workdir / "site.key").read_text().strip()
    assert bytes.fromhex(out.stdout.strip()) == site.site_key
    bad = subprocess.run([*edge_agent_argv(), "hq", "site-key", "Bad Site", "--config",
                          str(site.hq_config)], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "SITE" in bad.stderr


def test_claim_proof_covers_floor_lost_and_seq_end() -> None:
    """The agent's claim proof verifies at HQ; a changed or added claim, or none, does not."""
    key = proof.derive_site_key(MASTER, "s1")
    body = (b'{"v":1,"id":"e1","site":"s1","kind":"sensor","seq":7,"ts":"t","source":"x",'
            b'"seq_end":9,"lost":[3,4],"data":{}}')
    plain = b'{"v":1,"id":"e1","site":"s1","kind":"sale","seq":7,"data":{"note":"seq_end"}}'
    assert proof.with_claim_proof(plain, key, "s1") == plain    # no claim keys, no proof
    proved = json.loads(proof.with_claim_proof(body, key, "s1"))
    assert proof.claims_proved(key, proved)
    for changed in ({"seq_end": 10**9}, {"lost": [1, 4]}, {"floor": 6}, {"seq": 8},
                    {"id": "e2"}, {"kind": "sale"}, {"site": "s2"}):
        assert not proof.claims_proved(key, {**proved, **changed}), changed
    assert not proof.claims_proved(key, json.loads(body))
    floored = json.loads(proof.with_claim_proof(b'{"floor":6,' + body[1:], key, "s1"))
    assert proof.claims_proved(key, floored)
    assert not proof.claims_proved(proof.derive_site_key(MASTER, "s2"), floored)


@pytest.mark.e2e
def test_forged_floor_does_not_wedge(site: LocalSite) -> None:
    """A forged event with a huge floor is stored, its floor ignored; real sales still drain."""
    site.start()
    root = f"edge/{site.site_id}"
    post_sales(site, 3)
    wait_for(lambda: status(site)["outbox"]["kinds"]["sale"]["depth"] == 0, timeout=30)
    forged = {"v": 1, "id": "forged-floor-1", "site": site.site_id, "kind": "sale",
              "seq": 1_000_000, "ts": "2026-11-22T17:03:11.482Z", "source": "attacker",
              "floor": 999_999, "data": {}}
    mosquitto_pub(site, f"{root}/events/sale", json.dumps(forged))
    wait_for(lambda: any(e["id"] == "forged-floor-1" for e in site.hq_events("sale")),
             timeout=15)
    for n in range(4, 7):
        code, body = site.request("POST", "/v1/events/sale", {"data": sample_sale(n)})
        assert code == 202, body
    wait_for(lambda: status(site)["outbox"]["kinds"]["sale"]["depth"] == 0, timeout=30)
    snap = status(site)
    assert snap["uplink"]["acks_refused"] == {}
    assert [e["seq"] for e in site.hq_events("sale")] == [1, 2, 3, 4, 5, 6, 1_000_000]
    assert "claims ['floor'] without valid proof" in (site.workdir / "hq.log").read_text()


@pytest.mark.e2e
def test_proved_floor_lets_a_fresh_hq_store_ack(site: LocalSite) -> None:
    """The agent's own floor carries proof, so a fresh HQ store still acks past it."""
    site.start()
    post_sales(site, 3)
    wait_for(lambda: status(site)["outbox"]["kinds"]["sale"]["depth"] == 0, timeout=30)
    assert site.hq is not None
    site.hq.terminate()
    for path in site.hq_db.parent.glob("hq.db*"):
        path.unlink()
    for n in range(4, 6):
        code, body = site.request("POST", "/v1/events/sale", {"data": sample_sale(n)})
        assert code == 202, body
    site.start_hq()
    wait_for(lambda: status(site)["outbox"]["kinds"]["sale"]["depth"] == 0, timeout=30)
    assert [e["seq"] for e in site.hq_events("sale")] == [4, 5]
    assert "without valid proof" not in (site.workdir / "hq.log").read_text()
