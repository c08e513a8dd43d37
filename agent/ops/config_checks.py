"""Config checks that read files or judge values, for ``check-config`` and ``run``.

pydantic (agent/config.py) checks shapes; these check what a shape cannot say:
that a PEM file really holds a certificate or a key (parsed with the ``ssl``
module, the same OpenSSL the uplink connects with), and that a password is
never sent in clear text to a broker off this machine. Every issue names its key.
"""

from __future__ import annotations

import ipaddress
import re
import ssl

from agent.config import MqttConfig
from agent.errors import ConfigIssue
from agent.uplink.protocol import split_host

CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
KEY_RE = re.compile(r"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----.+?"
                    r"-----END \1-----", re.S)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None   # reported as "cannot read" by the caller


def _certificates(key: str, path: str) -> list[ConfigIssue]:
    """Every PEM block in ``path`` parses as an X.509 certificate, and there is one."""
    text = _read(path)
    if text is None:
        return []
    blocks = CERT_RE.findall(text)
    if not blocks:
        return [ConfigIssue(key, f"{path} holds no PEM certificate "
                                 "('-----BEGIN CERTIFICATE-----' block)")]
    for number, block in enumerate(blocks, start=1):
        try:
            der = ssl.PEM_cert_to_DER_cert(block)
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=der)
        except (ValueError, ssl.SSLError) as exc:
            return [ConfigIssue(key, f"{path}: certificate {number} is not a valid X.509 "
                                     f"certificate ({getattr(exc, 'reason', None) or exc})")]
    return []


def _key_pair(cert: str, key: str) -> list[ConfigIssue]:
    text = _read(key)
    if text is None or _read(cert) is None:
        return []
    if not KEY_RE.search(text):
        return [ConfigIssue("mqtt.key_file", f"{key} holds no PEM private key "
                                             "('-----BEGIN PRIVATE KEY-----' block)")]
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password="")
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "MISMATCH" in str(reason).upper():
            return [ConfigIssue("mqtt.key_file", f"{key} is not the key of the certificate "
                                                 f"in mqtt.cert_file {cert}")]
        return [ConfigIssue("mqtt.key_file", f"{key} is not a usable private key ({reason}; "
                                             "an encrypted key needs decrypting first)")]
    return []


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a name: it may resolve to anything


def mqtt_issues(mq: MqttConfig) -> list[ConfigIssue]:
    """TLS files that do not parse; a password sent in clear text off this machine."""
    issues: list[ConfigIssue] = []
    if mq.tls:
        if mq.ca_file:
            issues += _certificates("mqtt.ca_file", mq.ca_file)
        if mq.cert_file:
            cert_issues = _certificates("mqtt.cert_file", mq.cert_file)
            issues += cert_issues
            if mq.key_file and not cert_issues:
                issues += _key_pair(mq.cert_file, mq.key_file)
    elif (mq.password or mq.password_file) and not mq.allow_cleartext_password:
        remote = [h for h, _ in (split_host(e, mq.port) for e in mq.hosts) if not _loopback(h)]
        if remote:
            issues.append(ConfigIssue(
                "mqtt.tls", f"false while a password is set: it would cross the network in "
                            f"clear text to {', '.join(remote)}; set tls = true (or "
                            "allow_cleartext_password = true for a network you trust)"))
    return issues
