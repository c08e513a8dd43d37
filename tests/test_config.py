"""Config loading: contract keys, env overrides, error messages with key paths."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from agent.config import AgentConfig, config_path, load_agent_config
from agent.errors import ConfigError
from hq.config import load_hq_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "agent.example.toml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_example_config_has_every_contract_key() -> None:
    """config/agent.example.toml validates and carries the contract's keys and defaults."""
    cfg = load_agent_config(str(EXAMPLE))
    assert cfg.site.id == "co-denver-01"
    assert cfg.mqtt.port == 8883 and cfg.mqtt.tls and cfg.mqtt.delivery == "hq-ack"
    assert cfg.mqtt.ack_timeout_s == 30 and cfg.mqtt.keepalive_s == 30
    assert cfg.outbox.max_bytes == 1073741824
    assert cfg.compliance.report_within_h == 24
    assert cfg.api.port == 8787 and cfg.api.advertise
    assert [d.type for d in cfg.devices] == ["scanner", "sensor", "label_printer"]
    assert cfg.client_id == "edge-co-denver-01"
    assert cfg.topic_root == "edge/co-denver-01"


def test_every_error_is_reported_with_its_key_path(tmp_path: Path) -> None:
    """Several mistakes at once are all listed, each with its dotted key path."""
    path = write(tmp_path, """
[site]
id = "Denver Flagship"
[mqtt]
port = 70000
delivery = "sometimes"
prot = 1
[[devices]]
id = "x"
type = "scannr"
url = "serial:///dev/ttyACM0"
""")
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    text = str(info.value)
    assert "site.id: must match [a-z0-9-]{1,64}" in text
    assert "mqtt.port: must be 1..65535" in text
    assert "mqtt.delivery:" in text
    assert "mqtt.prot: unknown key" in text
    assert "devices[x].type:" in text


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EDGE_AGENT__SECTION__KEY wins over the TOML value; other keys in the section stay."""
    path = write(tmp_path, '[site]\nid = "a"\n[mqtt]\nport = 1883\nhosts = ["h1"]\n')
    monkeypatch.setenv("EDGE_AGENT__MQTT__PORT", "8884")
    cfg = load_agent_config(path)
    assert cfg.mqtt.port == 8884 and cfg.mqtt.hosts == ["h1"]


def test_bad_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    """Unparseable TOML and a missing file raise ConfigError naming the problem, not a traceback."""
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent_config(write(tmp_path, "[site\nid="))
    with pytest.raises(ConfigError, match="file not found"):
        load_agent_config(str(tmp_path / "nope.toml"))


def test_password_file_secret(tmp_path: Path) -> None:
    """mqtt.password_file is read for the password, trimmed."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = AgentConfig(site={"id": "a"}, mqtt={"password_file": str(secret)})
    assert cfg.mqtt.secret_password() == "s3cret"
    assert "s3cret" not in repr(cfg)


def test_config_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """--config beats $EDGE_AGENT_CONFIG, which beats /etc/edge-agent/agent.toml."""
    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    assert config_path(None) == "/etc/edge-agent/agent.toml"
    monkeypatch.setenv("EDGE_AGENT_CONFIG", "/tmp/x.toml")
    assert config_path(None) == "/tmp/x.toml"
    assert config_path("/a.toml") == "/a.toml"


def test_hq_config_ignores_agent_sections(tmp_path: Path) -> None:
    """The HQ receiver reads [mqtt] and [hq] and tolerates the agent's other sections."""
    cfg = load_hq_config(str(EXAMPLE))
    assert cfg.hq.store.startswith("sqlite:///")
    with pytest.raises(ConfigError, match=r"hq\.store"):
        load_hq_config(write(tmp_path, '[hq]\nstore = "mysql://x"\n'))


def test_hq_example_config_validates() -> None:
    """config/hq.example.toml is a valid HQ receiver config: made-up client ids, two sites."""
    cfg = load_hq_config(str(EXAMPLE.with_name("hq.example.toml")))
    assert cfg.client_id == ""
    assert [s.id for s in cfg.hq.sites] == ["co-denver-01", "wa-spokane-03"]
    assert cfg.hq.store == "sqlite:///var/lib/edge-agent-hq/hq.db"
    assert cfg.mqtt.tls and cfg.mqtt.protocol == "5"


def test_one_pass_lists_shape_and_driver_errors_together(tmp_path: Path) -> None:
    """A bad device type no longer hides another device's bad URL or a bad section's error."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"cli {secrets.token_urlsafe(32)}\n")
    path = write(tmp_path, f"""
[site]
id = "a"
[mqtt]
port = 0
[api]
tokens_file = "{tokens}"
[[devices]]
id = "scanner-1"
type = "scannr"
url = "serial:///dev/ttyACM0"
[[devices]]
id = "scanner-2"
type = "scanner"
url = "ftp://nowhere"
[[devices]]
id = "receipt-1"
type = "receipt_printer"
url = "tcp://"
""")
    from agent.cli import validated_config

    with pytest.raises(ConfigError) as info:
        validated_config(path)
    paths = [i.path for i in info.value.issues]
    assert "devices[scanner-1].type" in paths
    assert "mqtt.port" in paths
    assert "devices[scanner-2].url" in paths and "devices[receipt-1].url" in paths
    assert not any(p.startswith("devices.") for p in paths)


def test_a_device_without_a_usable_id_is_named_by_its_place(tmp_path: Path) -> None:
    """devices[#2] is the second entry when its id is missing or malformed."""
    path = write(tmp_path, """
[site]
id = "a"
[[devices]]
id = "ok"
type = "scanner"
url = "sim://x"
[[devices]]
id = "bad id!"
type = "scanner"
url = "nourl"
""")
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    paths = {i.path for i in info.value.issues}
    assert {"devices[#2].id", "devices[#2].url"} <= paths


def test_an_environment_error_names_the_variable(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad EDGE_AGENT__MQTT__PORT is reported as that variable, not as the file's mqtt.port."""
    path = write(tmp_path, '[site]\nid = "a"\n[mqtt]\nport = 1883\n[outbox]\nmax_batch = 0\n')
    monkeypatch.setenv("EDGE_AGENT__MQTT__PORT", "70000")
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    text = str(info.value)
    assert "EDGE_AGENT__MQTT__PORT (environment): must be 1..65535" in text
    assert "outbox.max_batch: must be 1..100000" in text   # the file's own error, as before
    assert "  mqtt.port" not in text


def test_an_environment_file_path_is_blamed_on_the_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing file named by EDGE_AGENT__MQTT__CA_FILE is reported against that variable."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"cli {secrets.token_urlsafe(32)}\n")
    path = write(tmp_path, f'[site]\nid = "a"\n[api]\ntokens_file = "{tokens}"\n')
    monkeypatch.setenv("EDGE_AGENT__MQTT__CA_FILE", str(tmp_path / "nope.pem"))
    from agent.cli import validated_config

    with pytest.raises(ConfigError) as info:
        validated_config(path)
    assert [str(i) for i in info.value.issues] == [
        f"EDGE_AGENT__MQTT__CA_FILE (environment): cannot read {tmp_path / 'nope.pem'}"]
