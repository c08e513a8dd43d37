"""Config loading: contract keys, env overrides, error messages with key paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, config_path, load_agent_config, load_hq_config
from agent.errors import ConfigError

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
    assert "devices.0.type:" in text


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
