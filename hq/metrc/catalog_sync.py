"""Packages from Metrc to the counter: each licence's active packages become the
site's catalog (agent/devices/catalog.py), so a package the state does not know is
flagged at the scan, before the sale, not refused by Metrc the next morning.

Every ``catalog_sync_interval_s`` (one receiver per site at a time: the sync is
claimed in ``metrc_sync`` with a lease), for each registered site with a
``license_number``: page through ``GET /packages/v2/active``, compare with what
HQ last put in the site's catalog (``metrc_catalog``), and send the difference
with ``catalog-put`` / ``catalog-remove`` (proved with the site's key when
``hq.master_key_file`` is set). The first sync of a site is a ``replace``, so
the catalog becomes exactly Metrc's. ``metrc_catalog`` changes only after the
site answered ok, so a site that was offline gets the same difference next
time. A Metrc answer with no packages never empties a site's catalog (a glitch
would stop every sale at the counter); it is logged and retried.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent.config import HqSiteConfig
from agent.errors import AgentError
from agent.pipeline.schemas import is_package_tag
from hq.config import HqReceiverConfig
from hq.metrc.client import MetrcError
from hq.store import StoreError

if TYPE_CHECKING:
    from hq.metrc.forwarder import Forwarder

log = logging.getLogger(__name__)

CHUNK = 5000          # tags per command: well under the agent's 256 KiB payload limit
CHECK_INTERVAL_S = 1.0

Sender = Callable[[str, str, dict[str, Any], str], dict[str, Any]]  # site, name, args, id


class SyncError(AgentError):
    """A site's catalog could not be synced (the message says where it stopped)."""


def mqtt_sender(cfg: HqReceiverConfig) -> Sender:
    """Send a command the way ``hq send`` does: over ``[mqtt]``, failing over hosts."""
    from hq.command import send_command
    from hq.fleet_cli import _Tls

    m = cfg.mqtt
    tls = _Tls(m.ca_file or None, m.cert_file or None, m.key_file or None) if m.tls else None
    master = None
    if cfg.hq.master_key_file:
        from agent.proof import read_master_key

        master = read_master_key(cfg.hq.master_key_file)

    def send(site: str, name: str, args: dict[str, Any], command_id: str) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if m.username:
            extra["auth"] = (m.username, m.secret_password())
        if master is not None:
            from agent.proof import derive_site_key

            extra["key"] = derive_site_key(master, site)
        last: Exception | None = None
        for host in m.hosts:
            try:
                return send_command(host, m.port, f"{m.topic_prefix}/{site}", name, args,
                                    command_id=command_id, timeout=cfg.metrc.command_timeout_s,
                                    tls=tls, **extra)
            except (AgentError, OSError, ValueError) as exc:
                last = exc
        raise SyncError(f"{name} to {site}: no answer: {last}")

    return send


def _chunks(tags: Sequence[str]) -> list[list[str]]:
    return [list(tags[i:i + CHUNK]) for i in range(0, len(tags), CHUNK)]


def command_id(site: str, name: str, tags: Sequence[str], replace: bool) -> str:
    """The same difference gets the same id: a resend is answered, never applied twice."""
    digest = hashlib.sha256("\n".join([site, name, str(replace), *tags]).encode()).hexdigest()
    return f"hq-metrc-{digest[:24]}"


def sync_site(fw: Forwarder, entry: HqSiteConfig, send: Sender) -> dict[str, int]:
    """One site: Metrc's active packages against the site's catalog; what changed."""
    client = fw.client(entry.state)
    labels = {p.get("Label") for p in client.active_packages(entry.license_number,
                                                             fw.m.catalog_page_size)}
    metrc = {t for t in labels if isinstance(t, str) and is_package_tag(t)}
    store = fw.store
    known = store.catalog(entry.id)
    # Never synced successfully (``packages`` is kept only from a good sync): replace.
    first = store.sync_states().get(entry.id, {}).get("packages") is None
    if not metrc:
        raise SyncError(f"Metrc lists no active packages for licence {entry.license_number}; "
                        "the site's catalog is left as it is")
    added = sorted(metrc - known) if not first else sorted(metrc)
    removed = sorted(known - metrc) if not first else []
    for i, chunk in enumerate(_chunks(added)):
        replace = first and i == 0
        args: dict[str, Any] = {"tags": chunk, **({"replace": True} if replace else {})}
        result = send(entry.id, "catalog-put", args,
                      command_id(entry.id, "catalog-put", chunk, replace))
        if result.get("ok") is not True:
            raise SyncError(f"catalog-put to {entry.id} failed: {result.get('error')}")
        store.catalog_apply(entry.id, chunk, [], replace=replace)
    for chunk in _chunks(removed):
        result = send(entry.id, "catalog-remove", {"tags": chunk},
                      command_id(entry.id, "catalog-remove", chunk, False))
        if result.get("ok") is not True:
            raise SyncError(f"catalog-remove to {entry.id} failed: {result.get('error')}")
        store.catalog_apply(entry.id, [], chunk)
    return {"packages": len(metrc), "added": len(added), "removed": len(removed)}


class CatalogSync:
    """The sync thread of one forwarder."""

    def __init__(self, fw: Forwarder) -> None:
        self.fw = fw
        self._send: Sender | None = fw._sender

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for entry in self.fw.sites.values():
                if stop.is_set():
                    return
                if entry.license_number:
                    self.once(entry)
            stop.wait(CHECK_INTERVAL_S)

    def once(self, entry: HqSiteConfig) -> bool:
        """Sync ``entry`` if it is due and ours to do; whether it ran."""
        fw = self.fw
        interval = fw.m.catalog_sync_interval_s
        lease = fw.m.command_timeout_s * 4 + fw.m.timeout_s * 10
        try:
            if not fw.store.claim_sync(fw.owner, entry.id, fw._clock(), interval, lease):
                return False
        except StoreError as exc:
            log.warning("metrc catalog: %s", exc)
            return False
        packages = None
        error = None
        try:
            if self._send is None:
                self._send = mqtt_sender(fw.cfg)
            changed = sync_site(fw, entry, self._send)
            packages = changed["packages"]
            fw.count("catalog_syncs")
            if changed["added"] or changed["removed"]:
                log.info("metrc catalog: %s: %d active package(s) at Metrc; sent %d new, "
                         "%d removed", entry.id, packages, changed["added"], changed["removed"])
        except (MetrcError, AgentError, OSError) as exc:
            error = str(exc)
            fw.count("catalog_failures")
            fw._warn(entry.id, "catalog", f"metrc catalog: {entry.id}: {error}")
        try:
            fw.store.synced(fw.owner, entry.id, fw._clock(), packages, error)
        except StoreError as exc:
            log.warning("metrc catalog: %s", exc)
        return True
