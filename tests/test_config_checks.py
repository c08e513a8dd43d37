"""check-config reads what the shapes cannot say (issue 10): PEM files that really hold
certificates and keys, and no password in clear text to a broker off this machine."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.config import MqttConfig
from agent.ops.config_checks import mqtt_issues
from agent.testing.localbroker import TlsFiles, make_tls_files
from agent.testing.localsite import edge_agent_argv, write_toml


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A real CA, server and client certificate made with the openssl CLI."""
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


def issues(**mqtt: Any) -> list[tuple[str, str]]:
    return [(i.path, i.message) for i in mqtt_issues(MqttConfig(**mqtt))]


def test_real_tls_files_pass(tls: TlsFiles) -> None:
    """The CA, the client certificate and its key parse and match: no issue."""
    assert issues(ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key) == []


def test_garbage_pem_files_are_refused_naming_the_key(tls: TlsFiles, tmp_path: Path) -> None:
    """Not PEM, a PEM block of garbage, a key that is not the certificate's, a key file
    with no key: each an issue on its own key."""
    text = tmp_path / "text.pem"
    text.write_text("hello, I am not a certificate\n")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAAbm90IGEgY2VydA==\n"
                       "-----END CERTIFICATE-----\n")
    assert [p for p, _ in issues(ca_file=str(text))] == ["mqtt.ca_file"]
    found = issues(ca_file=str(garbage))
    assert found[0][0] == "mqtt.ca_file" and "not a valid X.509" in found[0][1]
    found = issues(cert_file=tls.client_cert, key_file=tls.server_key)
    assert found == [("mqtt.key_file", f"{tls.server_key} is not the key of the certificate "
                                       f"in mqtt.cert_file {tls.client_cert}")]
    found = issues(cert_file=tls.client_cert, key_file=str(text))
    assert found[0][0] == "mqtt.key_file" and "no PEM private key" in found[0][1]
    assert [p for p, _ in issues(cert_file=str(garbage), key_file=tls.client_key)] == \
        ["mqtt.cert_file"]


def test_a_cleartext_password_off_this_machine_is_refused() -> None:
    """tls = false with a password: refused toward a remote host, fine on loopback or
    when the network is declared trusted."""
    remote = issues(tls=False, hosts=["10.0.0.5", "127.0.0.1"], username="site",
                    password="secret-password")
    assert [p for p, _ in remote] == ["mqtt.tls"] and "10.0.0.5" in remote[0][1]
    assert "127.0.0.1" not in remote[0][1]
    assert issues(tls=False, hosts=["localhost", "[::1]:1883"], password="x") == []
    assert issues(tls=False, hosts=["hq.example.com"]) == []   # no password: nothing leaks
    assert issues(tls=False, hosts=["hq.example.com"], password="x",
                  allow_cleartext_password=True) == []


@pytest.mark.e2e
def test_check_config_exits_2_on_a_garbage_ca_file(tmp_path: Path) -> None:
    """The real `edge-agent check-config`: exit 2, the key and the file named."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("cli Zk3vQ9mX2pL7wR4tY8uB1nC6\n")
    tokens.chmod(0o600)
    config = tmp_path / "agent.toml"
    write_toml(config, {"site": {"id": "co-denver-01"},
                        "mqtt": {"hosts": ["127.0.0.1"], "tls": True, "ca_file": str(ca)},
                        "outbox": {"path": str(tmp_path / "outbox")},
                        "api": {"tokens_file": str(tokens), "advertise": False}})
    result = subprocess.run([*edge_agent_argv(), "check-config", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"mqtt.ca_file: {ca} holds no PEM certificate" in result.stderr
