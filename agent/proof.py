"""Proof that a message on the broker came from its claimed sender (issue 9).

MQTT gives a subscriber no proof of who published: anyone with write access to
``P/acks`` could otherwise make an agent delete sales HQ never stored, or run a
command on its printers. So HQ's messages to a site carry ``"proof"``: an
HMAC-SHA256, in lower-case hex, keyed by the site's key, over

    b"edge-agent proof v1|" + site + b"|" + channel + b"|" + canonical(message)

where ``channel`` names what the message is (``acks``, ``commands/{name}``,
``claims/{kind}``), so a proof cannot be moved to another site, another
topic or another kind of message, and ``canonical`` is the JSON object minus its
``proof`` key with sorted keys and no spaces: every key is covered, including
keys added later (an ack's ``epoch``). A command's ``id`` (remembered on disk by
the agent) makes a replay of a captured command a no-op; an ack only moves
forward, so a replayed old ack changes nothing.

HQ keeps one secret, the master key; a site's key is
``HMAC-SHA256(master, "edge-agent site key v1|" + site_id)``, printed by
``edge-agent hq site-key SITE`` as 64 hex digits, which is what the agent's
``mqtt.hq_key_file`` holds. Pure code, no I/O but reading key files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from agent.errors import AgentError

PROOF_KEY = "proof"
_SITE_KEY_LABEL = b"edge-agent site key v1|"
_PROOF_LABEL = b"edge-agent proof v1|"
MIN_MASTER_BYTES = 16


class KeyFileError(AgentError):
    """A key file is missing, unreadable or malformed (the message names the config key)."""


def derive_site_key(master: bytes, site: str) -> bytes:
    """The 32-byte key HQ and the site ``site`` share."""
    return hmac.new(master, _SITE_KEY_LABEL + site.encode(), hashlib.sha256).digest()


def canonical(message: dict[str, Any]) -> bytes:
    """``message`` minus ``proof``: sorted keys, no spaces, UTF-8."""
    body = {k: v for k, v in message.items() if k != PROOF_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def compute(key: bytes, site: str, channel: str, message: dict[str, Any]) -> str:
    data = _PROOF_LABEL + site.encode() + b"|" + channel.encode() + b"|" + canonical(message)
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def sign(key: bytes, site: str, channel: str, message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with its ``proof`` added."""
    return {**message, PROOF_KEY: compute(key, site, channel, message)}


def verify(key: bytes, site: str, channel: str, message: dict[str, Any]) -> bool:
    """Whether ``message`` carries a valid proof (constant-time comparison)."""
    given = message.get(PROOF_KEY)
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("ascii", "replace"),
                               compute(key, site, channel, message).encode())


CLAIM_KEYS = ("floor", "lost", "seq_end")
CLAIM_PROOF_KEY = "claim_proof"


def claims_of(envelope: dict[str, Any]) -> dict[str, Any] | None:
    """An envelope's coverage claims (``floor``, ``lost``, ``seq_end``: what lets HQ ack
    seqs it never saw) with the ``id``, ``seq`` and ``epoch`` (when it has one: HQ acks
    per epoch) they belong to; None if it makes none. The claim proof is over this
    object, on channel ``claims/{kind}``."""
    claims = {k: envelope[k] for k in CLAIM_KEYS if k in envelope}
    if not claims:
        return None
    bound = {"id": envelope.get("id"), "seq": envelope.get("seq"), **claims}
    if "epoch" in envelope:
        bound["epoch"] = envelope["epoch"]
    return bound


def with_claim_proof(body: bytes, key: bytes, site: str) -> bytes:
    """The published envelope ``body`` with ``"claim_proof"`` spliced in first when it
    makes coverage claims; unchanged otherwise (the common case: no parse)."""
    if not (body.startswith(b'{"floor"') or b'"lost"' in body or b'"seq_end"' in body):
        return body
    try:
        env = json.loads(body)
    except (ValueError, RecursionError):
        return body
    claims = claims_of(env) if isinstance(env, dict) else None
    if claims is None or not body.startswith(b'{"'):
        return body
    mac = compute(key, site, f"claims/{env.get('kind')}", claims)
    return b'{"claim_proof":"%s",' % mac.encode() + body[1:]


def claims_proved(key: bytes, envelope: dict[str, Any]) -> bool:
    """Whether ``envelope``'s coverage claims carry a valid claim proof."""
    claims = claims_of(envelope)
    if claims is None:
        return True
    claims[PROOF_KEY] = envelope.get(CLAIM_PROOF_KEY)
    return verify(key, str(envelope.get("site")), f"claims/{envelope.get('kind')}", claims)


def read_site_key(path: str, config_key: str = "mqtt.hq_key_file") -> bytes:
    """A site key file: 64 hex digits (what ``hq site-key`` prints)."""
    text = _read(path, config_key)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise KeyFileError(f"{config_key}: {path} must hold the 64 hex digits that "
                           f"'edge-agent hq site-key SITE' prints")
    return key


def read_master_key(path: str, config_key: str = "hq.master_key_file") -> bytes:
    """HQ's master secret: the file's bytes, surrounding whitespace stripped."""
    key = _read(path, config_key).encode()
    if len(key) < MIN_MASTER_BYTES:
        raise KeyFileError(f"{config_key}: {path} holds {len(key)} bytes; use at least "
                           f"{MIN_MASTER_BYTES} random ones (openssl rand -hex 32 > {path})")
    return key


def _read(path: str, config_key: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KeyFileError(f"{config_key}: cannot read {path}: {reason}") from None
