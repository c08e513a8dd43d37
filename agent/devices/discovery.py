"""Network printers found over mDNS (CONTRACT 7): for ``/v1/status`` and ``edge-agent devices``.

A browser for the three service types printers advertise on a LAN:
``_pdl-datastream._tcp`` (raw port 9100, what ESC/POS and ZPL printers take),
``_printer._tcp`` (LPD) and ``_ipp._tcp`` (IPP). Each one found is resolved to
an address and port and listed as a :class:`FoundPrinter`, with the device URL
an operator would put in ``[[devices]]`` when there is one (``tcp://HOST:9100``).

Only listening and asking: nothing is printed, nothing is configured by itself.
The interfaces are ``api.advertise_interfaces`` (empty: all), so a box on two
networks browses only where it advertises, and tests stay on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.net import host_addresses, is_ip

log = logging.getLogger(__name__)

# service type -> the protocol it speaks
PRINTER_SERVICES: dict[str, str] = {
    "_pdl-datastream._tcp.local.": "raw",
    "_printer._tcp.local.": "lpd",
    "_ipp._tcp.local.": "ipp",
}
# Module level so tests can shrink them.
RESOLVE_TIMEOUT_S = 3.0
BROWSE_S = 3.0  # how long ``edge-agent devices`` listens
# Any host on the LAN can advertise names: past this many printers (and as many
# resolutions under way) new names are counted in ``ignored``, not kept.
MAX_FOUND = 256
# TXT keys of the Bonjour printing spec worth showing (the rest is noise).
TXT_KEYS = ("ty", "product", "note", "rp", "pdl", "usb_MFG", "usb_MDL")


@dataclass(frozen=True)
class FoundPrinter:
    """One advertised printer service, resolved."""

    name: str  # the instance name, "Zebra ZT411 (packaging)"
    service: str  # "_pdl-datastream._tcp"
    protocol: str  # raw | lpd | ipp
    host: str  # an address, IPv4 first
    port: int
    server: str  # the advertised host name, "zt411.local."
    url: str  # what a [[devices]] entry would say; "" when we cannot drive it
    txt: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.txt.get("ty") or self.txt.get("product", "").strip("()") or ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model": self.model}


def _device_url(protocol: str, host: str, port: int, txt: dict[str, str]) -> str:
    where = f"[{host}]" if ":" in host else host
    if protocol == "raw":
        return f"tcp://{where}:{port}"  # the only one our transports speak
    if protocol == "ipp":
        return f"ipp://{where}:{port}/{txt.get('rp', '')}"
    return f"lpd://{where}:{port}/{txt.get('rp', '')}"


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def found_from_info(info: AsyncServiceInfo, protocol: str) -> FoundPrinter | None:
    """A resolved service as a :class:`FoundPrinter`; None if it has no address or port."""
    addresses = info.parsed_scoped_addresses(IPVersion.V4Only) or \
        info.parsed_scoped_addresses(IPVersion.V6Only)
    if not addresses or not info.port:
        return None
    txt = {}
    for key, value in (info.properties or {}).items():
        name = _text(key)
        if name in TXT_KEYS:
            txt[name] = _text(value)
    host = addresses[0]
    service = info.type.removesuffix(".local.")
    name = info.name.removesuffix("." + info.type)
    return FoundPrinter(name, service, protocol, host, info.port, info.server or "",
                        _device_url(protocol, host, info.port, txt), txt)


def _interfaces(interfaces: Iterable[str]) -> tuple[Any, IPVersion | None]:
    chosen = list(interfaces)
    if not chosen:
        return InterfaceChoice.All, None
    if not all(is_ip(i) for i in chosen):
        # api.advertise_interfaces may name adapters ("eth0"); zeroconf wants addresses.
        # Link-local IPv6 is left out: it needs a scope id.
        chosen = [a for a in host_addresses(chosen)
                  if is_ip(a) and not ipaddress.ip_address(a).is_link_local]
        if not chosen:
            raise ValueError(f"no address on api.advertise_interfaces {list(interfaces)}")
    if all(":" not in i for i in chosen):
        return chosen, IPVersion.V4Only  # no IPv6 socket on a v4-only list
    return chosen, IPVersion.All


class PrinterBrowser:
    """Browses the printer service types on the running loop; ``found()`` any time.

    ``zc`` may be an AsyncZeroconf someone else owns (one per process is
    enough); otherwise one is opened on ``interfaces`` and closed by ``close``.
    """

    def __init__(self, interfaces: Iterable[str] = (), *, zc: AsyncZeroconf | None = None) -> None:
        self._interfaces = list(interfaces)
        self._zc = zc
        self._own_zc = zc is None
        self._browser: AsyncServiceBrowser | None = None
        self._found: dict[str, FoundPrinter] = {}  # by full service name
        self._tasks: set[asyncio.Task[None]] = set()
        self.error: str | None = None
        self.ignored = 0  # advertised names left out at MAX_FOUND

    async def start(self) -> bool:
        """Start browsing; False (and ``error`` set) when mDNS cannot run here."""
        try:
            if self._zc is None:
                interfaces, version = _interfaces(self._interfaces)
                self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=version)
            self._browser = AsyncServiceBrowser(self._zc.zeroconf, list(PRINTER_SERVICES),
                                                handlers=[self._on_change])
        except (OSError, ValueError, RuntimeError) as exc:
            # No multicast route, no such interface: the agent runs on without discovery.
            self.error = f"printer discovery (mDNS) unavailable: {exc}"
            log.warning("%s", self.error)
            await self.close()
            return False
        return True

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        # Called in the loop by zeroconf; resolving is a network round trip, so a task.
        if state_change is ServiceStateChange.Removed:
            if self._found.pop(name, None) is not None:
                log.info("printer %r no longer advertised", name)
            return
        if len(self._tasks) >= MAX_FOUND:
            self._ignore(name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        try:
            ok = await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_S * 1000)
        except (OSError, RuntimeError) as exc:  # a closed zeroconf while stopping, a bad packet
            log.debug("resolving %s failed: %s", name, exc)
            return
        found = found_from_info(info, PRINTER_SERVICES[service_type]) if ok else None
        if found is None:
            log.debug("printer service %s did not resolve", name)
            return
        if name not in self._found:
            if len(self._found) >= MAX_FOUND:
                self._ignore(name)
                return
            log.info("found printer %r at %s (%s)", found.name, found.url or found.host,
                     found.service)
        self._found[name] = found

    def _ignore(self, name: str) -> None:
        self.ignored += 1
        log.log(logging.WARNING if self.ignored == 1 else logging.DEBUG,
                "printer discovery: more than %d printers advertised; %r and later ones are "
                "not listed", MAX_FOUND, name)

    def found(self) -> list[FoundPrinter]:
        """What is advertised now, by name."""
        return sorted(self._found.values(), key=lambda f: (f.name, f.service))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            with contextlib.suppress(Exception):  # a half-started browser must not stop shutdown
                await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None and self._own_zc:
            with contextlib.suppress(Exception):
                await self._zc.async_close()
        self._zc = None


async def browse(interfaces: Iterable[str] = (), seconds: float = BROWSE_S) -> list[FoundPrinter]:
    """Listen for ``seconds`` and return the printers found (``edge-agent devices``)."""
    browser = PrinterBrowser(interfaces)
    if not await browser.start():
        raise OSError(browser.error or "mDNS unavailable")
    try:
        # A listening window, not a wait for a condition: printers answer the
        # browser's first queries within about a second; later ones are missed.
        await asyncio.sleep(seconds)
        if browser._tasks:  # resolutions still under way get their own deadline
            await asyncio.wait(set(browser._tasks), timeout=RESOLVE_TIMEOUT_S)
        return browser.found()
    finally:
        await browser.close()


def devices_main(configured: list[dict[str, Any]], interfaces: list[str], seconds: float,
                 as_json: bool, extra: dict[str, Any] | None = None) -> int:
    """``edge-agent devices``: the configured devices, then the printers advertised nearby."""
    import json
    import sys

    error = None
    try:
        found = asyncio.run(browse(interfaces, seconds))
    except OSError as exc:
        found, error = [], str(exc)
    by_url = {str(d.get("url", "")).rstrip("/"): d.get("id") for d in configured}
    discovered = [{**f.as_dict(), "configured_as": by_url.get(f.url)} for f in found]
    if as_json:
        print(json.dumps({"configured": configured, "discovered": discovered,
                          "discovery_error": error, **(extra or {})}, indent=2))
        return 0 if error is None else 1
    print(f"configured devices ({len(configured)})")
    for d in configured:
        print(f"  {d.get('id', ''):<24} {d.get('type', ''):<16} {d.get('url', '')}"
              + ("" if d.get("enabled", True) else "  (disabled)"))
    where = ", ".join(interfaces) or "all interfaces"
    if error is not None:
        print(f"printer discovery failed on {where}: {error}", file=sys.stderr)
        return 1
    print(f"network printers advertised over mDNS ({len(discovered)}, {seconds:g} s on {where})")
    for d in discovered:
        note = f"  = {d['configured_as']}" if d["configured_as"] else "  (not configured)"
        print(f"  {d['name']:<32} {d['service']:<22} {d['host']}:{d['port']:<6} "
              f"{d['url'] or '-'}  {d['model']}{note}")
    return 0
