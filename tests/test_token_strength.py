"""API tokens carry at least 128 bits (issue 10): judged from their alphabet and length,
made-up ones (one letter, a repeated pattern) refused, the line and caller named."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.testing.localsite import edge_agent_argv, write_toml
from agent.web.auth import Tokens, token_weakness


@pytest.mark.parametrize("token", [
    secrets.token_urlsafe(16),          # 22 base64url characters: 132 bits
    secrets.token_hex(16),              # 32 hex digits: 128 bits
    secrets.token_hex(24),              # what the error message suggests
    "daemon-test-token-0123456789",
])
def test_strong_tokens_pass(token: str) -> None:
    """Random tokens of 128 bits or more are accepted."""
    assert token_weakness(token) is None
    assert Tokens.parse(f"pos-1 {token}\n").check(token) == "pos-1"


@pytest.mark.parametrize(("token", "why"), [
    ("a" * 16, "carry about 64 bits"),                   # accepted before issue 10
    ("a" * 40, "only 1 distinct characters"),
    (secrets.token_hex(16)[:31], "31 hex digits carry about 124 bits"),
    ("Zk3vQ9mX2pL7wR4tY8uB1", "21 base64 characters"),
    ("abcdefgh" * 4, "repeats a 8-character pattern"),
])
def test_weak_tokens_are_refused(token: str, why: str) -> None:
    """Too short for its alphabet, too few distinct characters, or a repeated pattern."""
    weakness = token_weakness(token)
    assert weakness is not None and why in weakness
    with pytest.raises(ConfigError) as err:
        Tokens.parse(f"# callers\npos-2 {token}\n")
    (issue,) = err.value.issues
    assert issue.path == "line 2" and "the token of 'pos-2' is too weak" in issue.message
    assert token not in str(err.value)


@pytest.mark.e2e
def test_check_config_names_the_weak_token(tmp_path: Path) -> None:
    """The real `edge-agent check-config`: exit 2 naming the file's key, line and caller."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"cli {secrets.token_hex(24)}\npos-1 {'x' * 16}\n")
    tokens.chmod(0o600)
    config = tmp_path / "agent.toml"
    write_toml(config, {"site": {"id": "co-denver-01"},
                        "mqtt": {"hosts": ["127.0.0.1"], "tls": False},
                        "outbox": {"path": str(tmp_path / "outbox")},
                        "api": {"tokens_file": str(tokens), "advertise": False}})
    result = subprocess.run([*edge_agent_argv(), "check-config", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "api.tokens_file.line 2: the token of 'pos-1' is too weak" in result.stderr
    assert "x" * 16 not in result.stderr
