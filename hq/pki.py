"""Certificates without a PKI team: HQ's own small CA for the broker, HQ and every site.

``edge-agent hq pki init`` makes the CA (kept in ``pki/`` beside the HQ config,
its key readable by root only), HQ's client certificate (CN ``hq``, where the
HQ config's ``[mqtt]`` files say) and the broker's server certificate (the
broker host names as subject alternative names). ``edge-agent hq pki issue
SITE`` makes one site's bundle: its client certificate (CN = the site id,
which the shipped ACL uses as the MQTT username), its key, the CA, the site's
proof key (``edge-agent hq site-key``), the broker ACL lines for that site and
a ``site.json`` that ``edge-agent install --bundle DIR`` reads.

Keys are ECDSA P-256 (small, fast on an ARM box, supported by mosquitto, EMQX
and HiveMQ); certificates carry the extensions strict verifiers ask for
(basic constraints, key usage, extended key usage, subject and authority key
ids), so Python's ``VERIFY_X509_STRICT`` and OpenSSL 3 accept them.
Pure code here (time passed in); agent/cli.py does the file system.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import AgentError
from agent.ops.install import BUNDLE_MANIFEST, HQ_GROUP, Planned

CA_DAYS = 3650
# Two years and a bit: long enough that a box is not re-keyed every season, short
# enough that a lost box's certificate dies on its own (the CA/B Forum's old 825).
LEAF_DAYS = 825
HQ_CN = "hq"
CA_CN = "edge-agent HQ CA"


class PkiError(AgentError):
    """The CA or a certificate cannot be made or read (the message says which file)."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_ca(now: dt.datetime, days: int = CA_DAYS, cn: str = CA_CN) -> KeyPair:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def load_ca(cert_pem: bytes, key_pem: bytes) -> tuple[x509.Certificate,
                                                      ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the CA key is not an EC key made by 'edge-agent hq pki init'")
    return cert, key


def issue(ca: KeyPair, cn: str, now: dt.datetime, *, days: int = LEAF_DAYS,
          server_names: list[str] | None = None) -> KeyPair:
    """A leaf certificate signed by ``ca``: a client one (CN ``cn``) or, with
    ``server_names``, a server one for those DNS names and IP addresses."""
    ca_cert, ca_key = load_ca(ca.cert_pem, ca.key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names else \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [_general_name(n) for n in server_names]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::\d+)?$")


def host_of(entry: str) -> str:
    """``host``, ``host:port`` or ``[v6]:port`` (an ``mqtt.hosts`` entry) without the port."""
    match = _HOST_RE.match(entry)
    if not match:
        raise PkiError(f"{entry!r} is not a host name, host:port or [v6addr]:port")
    return match.group(1).strip("[]")


def site_acl(site: str, topic_prefix: str, shipped_acl: str) -> list[str]:
    """The broker ACL lines for one site: the shipped ACL's ``pattern`` lines with ``%u``
    set to the site id (for a broker without patterns, or to review what a site may
    do), under a ``user`` line, for ``topic_prefix``."""
    lines = [f"user {site}"]
    for raw in shipped_acl.splitlines():
        words = raw.split()
        if len(words) == 3 and words[0] == "pattern" and words[1] in ("read", "write",
                                                                      "readwrite"):
            topic = words[2].replace("%u", site)
            if topic.startswith("edge/"):
                topic = f"{topic_prefix}/{topic.removeprefix('edge/')}"
            lines.append(f"topic {words[1]} {topic}")
    if len(lines) == 1:
        raise PkiError("the shipped ACL has no 'pattern' lines to derive a site's from")
    return lines


def pki_init_plan(pki_dir: str, mqtt_files: dict[str, str], broker_hosts: list[str],
                  now: dt.datetime, *, days: int | None = None) -> list[Planned]:
    """The CA, HQ's client certificate (where ``[mqtt]`` says) and the broker's.

    Only made when there is no CA yet, so every file is written (not kept): an
    old certificate left beside a new CA would not verify."""
    ca = new_ca(now, days or CA_DAYS)
    hq = issue(ca, HQ_CN, now)
    names = sorted({host_of(h) for h in broker_hosts}) or ["localhost"]
    broker = issue(ca, names[0], now, server_names=names)
    plan = [
        Planned(f"{pki_dir}/ca.pem", ca.cert_pem, 0o644),
        Planned(f"{pki_dir}/ca.key", ca.key_pem, 0o600, secret=True),
        Planned(f"{pki_dir}/broker/ca.pem", ca.cert_pem, 0o644),
        Planned(f"{pki_dir}/broker/server.pem", broker.cert_pem, 0o644),
        Planned(f"{pki_dir}/broker/server.key", broker.key_pem, 0o600, secret=True),
    ]
    for key, data, mode, group, secret in (("ca_file", ca.cert_pem, 0o644, None, False),
                                           ("cert_file", hq.cert_pem, 0o644, None, False),
                                           ("key_file", hq.key_pem, 0o640, HQ_GROUP, True)):
        target = mqtt_files.get(key) or f"{pki_dir}/hq/{key.removesuffix('_file')}.pem"
        plan.append(Planned(target, data, mode, group, secret=secret))
    return plan


def bundle_plan(out_dir: str, *, site: str, ca: Any, now: dt.datetime, proof_key: bytes | None,
                meta: dict[str, Any], acl: list[str], days: int | None = None) -> list[Planned]:
    """One site's bundle directory (``edge-agent install --bundle DIR`` reads it)."""
    leaf = issue(ca, site, now, days=days or LEAF_DAYS)
    plan = [
        Planned(f"{out_dir}/ca.pem", ca.cert_pem, 0o644),
        Planned(f"{out_dir}/site.pem", leaf.cert_pem, 0o644),
        Planned(f"{out_dir}/site.key", leaf.key_pem, 0o600, secret=True),
        Planned(f"{out_dir}/{BUNDLE_MANIFEST}",
                (json.dumps(meta, indent=2) + "\n").encode(), 0o644),
        Planned(f"{out_dir}/acl.txt", ("\n".join(acl) + "\n").encode(), 0o644),
    ]
    if proof_key is not None:
        plan.append(Planned(f"{out_dir}/hq-proof.key", (proof_key.hex() + "\n").encode(), 0o600,
                            secret=True))
    return plan
