"""Announcing the agent on the LAN over mDNS (CONTRACT 7), so tablets need no address typed.

``_edge-agent._tcp.local.`` with TXT ``site=<id>``, ``api=v1`` (plus ``name``
and ``version`` for a picker), on ``api.port``, from the addresses of
``api.advertise_interfaces`` (empty: every interface), or only ``api.bind``
when the API listens on one address.

The advertiser runs in a thread of its own: python-zeroconf's registration
probes the network for a second or two and must not hold up the event loop or
the daemon's start. It re-registers when the box's addresses change (DHCP
renew, a cable moved to another switch) and sends goodbyes on :meth:`stop`.
A failure to announce is logged and retried; it never stops the daemon.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable

from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, Zeroconf

from agent import __version__
from agent.config import AgentConfig
from agent.net import host_addresses

log = logging.getLogger(__name__)

SERVICE_TYPE = "_edge-agent._tcp.local."
# How often addresses are compared; module constants so tests shrink them.
ADDRESS_POLL_S = 10.0
RETRY_S = 30.0
UNSPECIFIED = ("0.0.0.0", "::", "")  # noqa: S104 - the bind values that mean "all"


def service_info(cfg: AgentConfig, addresses: list[str]) -> ServiceInfo:
    """The record set we announce; pure."""
    instance = f"edge-agent {cfg.site.id}"
    return ServiceInfo(
        SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}",
        port=cfg.api.port,
        parsed_addresses=addresses,
        properties={"site": cfg.site.id, "api": "v1", "name": cfg.site.name or cfg.site.id,
                    "version": __version__},
        # Not the box's hostname: avahi, where it runs, owns that name.
        server=f"edge-agent-{cfg.site.id}.local.",
    )


class Advertiser:
    """Registers the agent's service while running; thread-safe start/stop."""

    def __init__(self, cfg: AgentConfig,
                 addresses: Callable[[], list[str]] | None = None) -> None:
        self.cfg = cfg
        self._interfaces = list(cfg.api.advertise_interfaces)
        bind = cfg.api.bind
        if not self._interfaces and bind not in UNSPECIFIED:
            self._interfaces = [bind]   # the API listens there only: announce only that
        self._addresses = addresses or (lambda: host_addresses(self._interfaces))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self.registered = threading.Event()  # for tests and status: announced now
        self.announced: list[str] = []
        self.registrations = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mdns-advertiser",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Withdraw the announcement (goodbye packets) and close; bounded by ``timeout``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            wait = ADDRESS_POLL_S
            try:
                addresses = self._addresses()
                if addresses != self.announced or self._zc is None:
                    self._withdraw()
                    if addresses:
                        self._register(addresses)
                    elif not failing:
                        log.warning("mdns: no address to announce on %s; waiting for one",
                                    self._interfaces or "any interface")
                    failing = not addresses
                if failing:
                    wait = min(wait, RETRY_S)
            except Exception as exc:  # OSError from sockets, zeroconf's own errors
                if not failing:
                    log.error("mdns: cannot announce %s (%s); retrying every %g s",
                              SERVICE_TYPE, exc, RETRY_S)
                failing = True
                self._withdraw()
                wait = RETRY_S
            self._stop.wait(wait)
        self._withdraw()

    def _register(self, addresses: list[str]) -> None:
        # Named interfaces: send on their IPv4 addresses only (tests: 127.0.0.1, and
        # nothing anywhere else); else every interface, as zeroconf picks them.
        interfaces: list[str] | InterfaceChoice = InterfaceChoice.All
        if self._interfaces:
            interfaces = [a for a in addresses if ipaddress.ip_address(a).version == 4]
        zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        info = service_info(self.cfg, addresses)
        try:
            # allow_name_change: a second box with the same site id is a mistake, but
            # both must stay reachable; the log says which name this one took.
            zc.register_service(info, allow_name_change=True)
        except BaseException:
            zc.close()
            raise
        self._zc, self._info, self.announced = zc, info, addresses
        self.registrations += 1
        self.registered.set()
        log.info("mdns: announced %s on %s port %d (site %s)", info.name,
                 ", ".join(addresses), self.cfg.api.port, self.cfg.site.id)

    def _withdraw(self) -> None:
        zc, info = self._zc, self._info
        self._zc, self._info, self.announced = None, None, []
        self.registered.clear()
        if zc is None:
            return
        with contextlib.suppress(Exception):  # best effort: the records expire anyway
            if info is not None:
                zc.unregister_service(info)
        with contextlib.suppress(Exception):
            zc.close()

