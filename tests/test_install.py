"""`edge-agent install`, `edge-agent hq install`, `hq pki` and `check-config` on real files.

Each test runs the real console script in temporary roots (``--root DIR``), the
way an IT engineer would on a fresh HQ host and a fresh box, and looks at what
landed on disk.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from agent.ops.install import comment_from, set_toml, site_plan
from agent.testing.localsite import edge_agent_argv
from agent.web.auth import Tokens
from hq.backends import open_store

SITE = "co-denver-01"
pytestmark = pytest.mark.e2e   # the real edge-agent console script does the installing


def cli(*args: str, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT")}
    return subprocess.run([*edge_agent_argv(), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**clean, **(env or {})})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An HQ installed in one root, a site bundle issued from it, a box installed from it."""
    base = tmp_path_factory.mktemp("fleet")
    hq, box, bundle = base / "hq", base / "box", base / "bundle"
    done = cli("hq", "install", "--root", str(hq), "--broker", "127.0.0.1")
    assert done.returncode == 0, done.stdout + done.stderr
    issued = cli("hq", "pki", "issue", SITE, "--root", str(hq), "--out", str(bundle))
    assert issued.returncode == 0, issued.stdout + issued.stderr
    installed = cli("install", "--root", str(box), "--bundle", str(bundle))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    (base / "hq.out").write_text(done.stdout)
    (base / "box.out").write_text(installed.stdout)
    return {"hq": hq, "box": box, "bundle": bundle, "base": base}


def test_box_install_lays_out_every_file_with_its_mode(fleet: dict[str, Path]) -> None:
    """The box gets its config, tokens, certificates, unit, udev rules, sysusers and samples;
    secrets are 0640 (root:edge-agent after sysusers), nothing is world-readable that holds
    a secret."""
    box = fleet["box"]
    expected = {
        "etc/edge-agent/agent.toml": 0o640, "etc/edge-agent/tokens": 0o640,
        "etc/edge-agent/ca.pem": 0o644, "etc/edge-agent/site.pem": 0o644,
        "etc/edge-agent/site.key": 0o640, "etc/edge-agent/hq-proof.key": 0o640,
        "etc/systemd/system/edge-agent.service": 0o644,
        "etc/udev/rules.d/99-edge-agent.rules": 0o644,
        "etc/sysusers.d/edge-agent.conf": 0o644,
        "etc/modules-load.d/edge-agent.conf": 0o644,
        "usr/share/edge-agent/samples/sale.json": 0o644,
        "usr/share/edge-agent/samples/label.json": 0o644,
    }
    for rel, want in expected.items():
        assert mode(box / rel) == want, rel
    out = (fleet["base"] / "box.out").read_text()
    assert f"check-config /etc/edge-agent/agent.toml: valid (site {SITE}" in out
    if os.geteuid() == 0:
        # As root the install creates the users (systemd-sysusers --root) and hands the
        # secrets to the service's group.
        groups = {line.split(":")[0]: int(line.split(":")[2])
                  for line in (box / "etc/group").read_text().splitlines()}
        for rel in ("etc/edge-agent/site.key", "etc/edge-agent/tokens"):
            assert (box / rel).stat().st_gid == groups["edge-agent"], rel
            assert (box / rel).stat().st_uid == 0, rel
    else:
        assert f"chgrp edge-agent {box}/etc/edge-agent/site.key" in out


def test_tokens_have_real_entropy(fleet: dict[str, Path]) -> None:
    """The installed tokens file parses, names pos-1, tablet-1 and cli, each token distinct
    and from secrets.token_urlsafe(32) (43 characters, 256 bits)."""
    path = fleet["box"] / "etc/edge-agent/tokens"
    tokens = Tokens.load(str(path))
    assert tokens.names == ["pos-1", "tablet-1", "cli"]
    values = [line.split()[1] for line in path.read_text().splitlines()
              if line and not line.startswith("#")]
    assert len(set(values)) == 3 and all(len(v) == 43 for v in values)


def test_box_config_takes_the_bundles_site_and_broker(fleet: dict[str, Path]) -> None:
    """agent.toml carries the bundle's site id and broker; the example devices are commented
    out (a box has only its own), and the unit runs this install's console script."""
    import tomllib

    data = tomllib.loads((fleet["box"] / "etc/edge-agent/agent.toml").read_text())
    assert data["site"]["id"] == SITE
    assert data["mqtt"]["hosts"] == ["127.0.0.1"]
    assert data["mqtt"]["hq_key_file"] == "/etc/edge-agent/hq-proof.key"
    assert "devices" not in data
    unit = (fleet["box"] / "etc/systemd/system/edge-agent.service").read_text()
    assert f"ExecStart={edge_agent_argv()[0]} run --config /etc/edge-agent/agent.toml" in unit


def test_hq_install_lays_out_config_keys_and_the_ca(fleet: dict[str, Path]) -> None:
    """HQ gets hq.toml, tokens, a 64-hex-digit master key, the CA (key 0600), its own
    client certificate where [mqtt] names it, the broker's certificate, and the unit;
    hq check-config passes on it."""
    hq = fleet["hq"]
    assert len(bytes.fromhex((hq / "etc/edge-agent-hq/master.key").read_text().strip())) == 32
    assert mode(hq / "etc/edge-agent-hq/master.key") == 0o640
    assert mode(hq / "etc/edge-agent-hq/pki/ca.key") == 0o600
    assert mode(hq / "etc/edge-agent-hq/pki/broker/server.key") == 0o600
    for rel in ("etc/edge-agent-hq/ca.pem", "etc/edge-agent-hq/hq.pem",
                "etc/edge-agent-hq/hq.key", "etc/systemd/system/edge-agent-hq.service",
                "usr/share/edge-agent/mosquitto/edge-agent.acl"):
        assert (hq / rel).is_file(), rel
    checked = cli("hq", "check-config", "--root", str(hq))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "valid (HQ receiver, sqlite store" in checked.stdout


def test_check_config_recognises_an_hq_file(fleet: dict[str, Path]) -> None:
    """Plain check-config on an HQ config checks it as one (today it demanded [site])."""
    path = fleet["hq"] / "etc/edge-agent-hq/hq.toml"
    checked = cli("check-config", "--root", str(fleet["hq"]), "--config", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "HQ receiver" in checked.stdout


def test_hq_check_config_names_a_missing_master_key(tmp_path: Path) -> None:
    """An HQ config whose master key and certificates are absent fails, naming each key."""
    conf = tmp_path / "hq.toml"
    conf.write_text(f'[mqtt]\nca_file = "{tmp_path}/ca.pem"\n[hq]\n'
                    f'master_key_file = "{tmp_path}/master.key"\nhttp_port = 0\n')
    checked = cli("check-config", "--config", str(conf))
    assert checked.returncode == 2
    assert f"mqtt.ca_file: cannot read {tmp_path}/ca.pem" in checked.stderr
    assert "hq.master_key_file: cannot read" in checked.stderr


def test_rerun_keeps_config_tokens_and_keys(fleet: dict[str, Path]) -> None:
    """A second install overwrites no config, token or key (an operator edited them), and
    still ends valid."""
    box = fleet["box"]
    before = {p: (box / p).read_bytes() for p in ("etc/edge-agent/agent.toml",
                                                  "etc/edge-agent/tokens",
                                                  "etc/edge-agent/site.key")}
    again = cli("install", "--root", str(box), "--bundle", str(fleet["bundle"]))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "keep   /etc/edge-agent/tokens" in again.stdout
    for rel, data in before.items():
        assert (box / rel).read_bytes() == data, rel


def test_dry_run_writes_nothing_and_checks_what_it_would_write(tmp_path: Path,
                                                              fleet: dict[str, Path]) -> None:
    """--dry-run leaves the root empty yet runs check-config on the files it would write."""
    root = tmp_path / "root"
    done = cli("install", "--dry-run", "--root", str(root), "--bundle", str(fleet["bundle"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not root.exists()
    assert "check-config /etc/edge-agent/agent.toml: valid (site co-denver-01" in done.stdout


def test_install_without_a_bundle_says_what_is_missing(tmp_path: Path) -> None:
    """Without certificates the install ends not valid (exit 2), naming each file and where
    the bundle comes from."""
    done = cli("install", "--root", str(tmp_path), "--site", "co-boulder-02")
    assert done.returncode == 2
    assert f"mqtt.ca_file: cannot read {tmp_path}/etc/edge-agent/ca.pem" in done.stdout
    assert "edge-agent hq pki issue SITE" in done.stdout


def test_bad_bundle_is_a_clear_error(tmp_path: Path) -> None:
    """A directory that is not a bundle gets one line naming it, not a traceback."""
    done = cli("install", "--root", str(tmp_path / "r"), "--bundle", str(tmp_path))
    assert done.returncode == 1
    assert f"--bundle {tmp_path}: not a bundle" in done.stderr
    assert "Traceback" not in done.stderr


def test_pki_issue_writes_a_bundle_that_openssl_verifies(fleet: dict[str, Path]) -> None:
    """The site certificate has CN = site id, is for TLS clients, verifies strictly against
    the CA; the bundle holds the site's proof key (hq site-key) and its ACL lines."""
    bundle, hq = fleet["bundle"], fleet["hq"]
    ca = bundle / "ca.pem"
    verified = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslclient",
                               "-CAfile", str(ca), str(bundle / "site.pem")],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-in",
                              str(bundle / "site.pem")], capture_output=True, text=True)
    assert subject.stdout.strip().replace(" ", "") == f"subject=CN={SITE}"
    server = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslserver",
                             "-CAfile", str(hq / "etc/edge-agent-hq/pki/ca.pem"),
                             str(hq / "etc/edge-agent-hq/pki/broker/server.pem")],
                            capture_output=True, text=True)
    assert server.returncode == 0, server.stdout + server.stderr
    key = cli("hq", "site-key", SITE, "--config", str(hq / "etc/edge-agent-hq/hq.toml"),
              env={"EDGE_AGENT__HQ__MASTER_KEY_FILE":
                   str(hq / "etc/edge-agent-hq/master.key")})
    assert key.returncode == 0, key.stderr
    assert (bundle / "hq-proof.key").read_text().strip() == key.stdout.strip()
    assert mode(bundle / "site.key") == 0o600
    acl = (bundle / "acl.txt").read_text().splitlines()
    assert acl[0] == f"user {SITE}"
    assert f"topic write edge/{SITE}/events/#" in acl
    assert f"topic read edge/{SITE}/acks" in acl
    assert json.loads((bundle / "site.json").read_text())["site"] == SITE


@pytest.mark.parametrize("bad", ["hq", "Denver", "a/b"])
def test_pki_issue_refuses_a_name_that_is_not_a_site(fleet: dict[str, Path], bad: str,
                                                     tmp_path: Path) -> None:
    """`hq` (HQ's own CN in the ACL) and ids outside [a-z0-9-] get exit 2 and no bundle."""
    done = cli("hq", "pki", "issue", bad, "--root", str(fleet["hq"]), "--out",
               str(tmp_path / "b"))
    assert done.returncode == 2
    assert "is not a site id" in done.stderr
    assert not (tmp_path / "b").exists()


def test_pki_init_refuses_to_replace_the_ca(fleet: dict[str, Path]) -> None:
    """A second pki init would orphan every site's certificate: refused, CA untouched."""
    ca = (fleet["hq"] / "etc/edge-agent-hq/pki/ca.key").read_bytes()
    done = cli("hq", "pki", "init", "--root", str(fleet["hq"]))
    assert done.returncode == 2
    assert "the fleet has its CA" in done.stderr
    assert (fleet["hq"] / "etc/edge-agent-hq/pki/ca.key").read_bytes() == ca


def test_hq_commands_default_to_the_hq_units_config(tmp_path: Path) -> None:
    """`hq report` without --config reads /etc/edge-agent-hq/hq.toml (the HQ unit's path),
    not the site's agent.toml; under --root, that path under the root."""
    done = cli("hq", "check-config", "--root", str(tmp_path))
    assert done.returncode == 2
    assert f"{tmp_path}/etc/edge-agent-hq/hq.toml" in done.stderr


def test_set_toml_keeps_comments_and_other_sections() -> None:
    """Editing the example config replaces one value in one section, keeping its comment."""
    text = '[site]\nid = "x"   # the id\n[hq]\nid = "y"\n'
    assert set_toml(text, "site", "id", "co-a") == \
        '[site]\nid = "co-a"   # the id\n[hq]\nid = "y"\n'
    assert comment_from("a = 1\n[[devices]]\nid = 2\n", "[[devices]]", "# n") == \
        "a = 1\n# n\n# [[devices]]\n# id = 2\n"


def test_site_plan_without_bundle_has_no_certificates() -> None:
    """Without a bundle nothing pretends to be a certificate."""
    paths = {p.path for p in site_plan(site=SITE)}
    assert "/etc/edge-agent/site.key" not in paths
    assert "/etc/edge-agent/agent.toml" in paths


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`edge-agent hq report --json | head` with head gone: exit 141 (as SIGPIPE), no
    BrokenPipeError traceback on stderr."""
    conf = tmp_path / "hq.toml"
    conf.write_text(f'[hq]\nstore = "sqlite:///{tmp_path}/hq.db"\nhttp_port = 0\n')
    open_store(f"sqlite:///{tmp_path}/hq.db").close()
    read_end, write_end = os.pipe()
    os.close(read_end)   # the reader is gone before the first byte
    try:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT")}
        done = subprocess.run([*edge_agent_argv(), "hq", "report", "--json", "--config",
                               str(conf)], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60, env=clean)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141


def test_status_prints_sizes_in_units_and_an_empty_queue_as_none() -> None:
    """`edge-agent status` says "575 B of 1.0 GiB", and an empty kind "none (last 23)", not
    raw byte counts and "-..23"."""
    from agent.cli import format_status, human_bytes

    text = format_status({
        "site": SITE, "version": "0.1.0", "state": "healthy", "uplink": {"state": "connected"},
        "outbox": {"state": "ok", "bytes": 575, "max_bytes": 1 << 30, "kinds": {
            "sale": {"depth": 0, "bytes": 0, "oldest_age_s": None, "first_seq": None,
                     "last_seq": 23},
            "scan": {"depth": 2, "bytes": 1536, "oldest_age_s": 3.0, "first_seq": 7,
                     "last_seq": 8}}},
        "devices": []})
    assert "575 B of 1.0 GiB" in text
    assert "none (last 23)" in text and "-..23" not in text
    assert "7..8" in text and "1.5 KiB" in text
    assert human_bytes(5 * (1 << 40)) == "5.0 TiB"


def test_the_demos_printed_commands_paste_and_run(tmp_path: Path) -> None:
    """Each command the demo prints runs as pasted into a shell (no 'command not found'):
    given configs that do not exist, edge-agent itself answers, naming the file."""
    from agent.testing.demo import demo_commands

    missing = tmp_path / "dir with space"
    for _, command in demo_commands(missing / "agent.toml", missing / "hq.toml"):
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                              timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 2, (command, done.stderr)
        assert f"file not found: {missing}" in done.stderr


def test_the_demos_receipts_carry_the_time_of_the_sale() -> None:
    """The demo's sales are sold now (with the zone's offset), not on one fixed date."""
    import datetime as dt

    from agent.testing.demo import demo_sale

    sold = dt.datetime.fromisoformat(demo_sale(1)["sold_at"])
    assert sold.tzinfo is not None
    assert abs((dt.datetime.now(dt.UTC) - sold).total_seconds()) < 60
    later = dt.datetime(2027, 3, 1, 9, 30, tzinfo=dt.UTC)
    assert dt.datetime.fromisoformat(demo_sale(2, later)["sold_at"]) == later
