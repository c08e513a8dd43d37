"""mDNS announcement (CONTRACT 7) with real python-zeroconf on 127.0.0.1 only.

The advertiser and an independent browser (python-zeroconf's ServiceBrowser
on its own Zeroconf instance) both bind to 127.0.0.1, so nothing is sent on
any other interface.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

from agent.config import AgentConfig
from agent.net import host_addresses
from agent.ops import advertise
from agent.ops.advertise import SERVICE_TYPE, Advertiser, service_info
from agent.testing.localsite import LocalSite
from tests.conftest import wait_for

SITE = "co-denver-01"
INSTANCE = f"edge-agent {SITE}.{SERVICE_TYPE}"


def config(**api: Any) -> AgentConfig:
    return AgentConfig(site={"id": SITE, "name": "Denver Flagship"},
                       api={"port": 18787, "advertise_interfaces": ["127.0.0.1"], **api})


class Seen(ServiceListener):
    """What the browser saw, in order: ("add" | "update" | "remove", name)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def _note(self, what: str, name: str) -> None:
        with self.lock:
            self.events.append((what, name))

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._note("add", name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._note("update", name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._note("remove", name)

    def saw(self, what: str) -> bool:
        with self.lock:
            return (what, INSTANCE) in self.events


@pytest.fixture
def browser() -> Iterator[tuple[Zeroconf, Seen]]:
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    seen = Seen()
    browsing = ServiceBrowser(zc, SERVICE_TYPE, seen)
    try:
        yield zc, seen
    finally:
        browsing.cancel()
        zc.close()


def test_browser_finds_the_site_with_its_txt_records_and_sees_it_leave(
        browser: tuple[Zeroconf, Seen]) -> None:
    """A separate ServiceBrowser finds _edge-agent._tcp with TXT site, api=v1; stop withdraws."""
    zc, seen = browser
    adv = Advertiser(config())
    adv.start()
    try:
        wait_for(lambda: seen.saw("add"), timeout=10, what="the browser to find the agent")
        info = zc.get_service_info(SERVICE_TYPE, INSTANCE, timeout=3000)
        assert info is not None
        assert info.properties[b"site"] == SITE.encode()
        assert info.properties[b"api"] == b"v1"
        assert info.properties[b"name"] == b"Denver Flagship"
        assert info.port == 18787
        assert info.parsed_addresses() == ["127.0.0.1"]
    finally:
        adv.stop()
    wait_for(lambda: seen.saw("remove"), timeout=5, what="the goodbye to reach the browser")


def test_a_changed_address_is_announced_again(browser: tuple[Zeroconf, Seen],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """When the box's addresses change the service is re-registered with the new ones."""
    monkeypatch.setattr(advertise, "ADDRESS_POLL_S", 0.1)
    zc, seen = browser
    addresses = ["127.0.0.1"]
    adv = Advertiser(config(), addresses=lambda: list(addresses))
    adv.start()
    try:
        wait_for(lambda: adv.registrations == 1 and seen.saw("add"), timeout=10,
                 what="the first announcement")
        addresses.append("127.0.0.2")   # e.g. a second address from DHCP
        wait_for(lambda: adv.registrations == 2 and adv.announced == ["127.0.0.1", "127.0.0.2"],
                 timeout=10, what="the re-registration")

        def resolved() -> list[str]:
            info = zc.get_service_info(SERVICE_TYPE, INSTANCE, timeout=1000)
            found = sorted(info.parsed_addresses()) if info else []
            return found if found == ["127.0.0.1", "127.0.0.2"] else []

        wait_for(resolved, timeout=10, what="the browser to resolve the new addresses")
    finally:
        adv.stop()


def test_no_address_means_no_announcement_and_no_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interface without an address yet is waited for, not an error that stops the agent."""
    monkeypatch.setattr(advertise, "ADDRESS_POLL_S", 0.05)
    calls: list[int] = []

    def none() -> list[str]:
        calls.append(1)
        return []

    adv = Advertiser(config(), addresses=none)
    adv.start()
    try:
        wait_for(lambda: len(calls) >= 3, timeout=5, what="the advertiser to keep looking")
        assert not adv.registered.is_set() and adv.registrations == 0
    finally:
        adv.stop()


def test_records_and_addresses_follow_the_config() -> None:
    """TXT site/api/name/version, the API port, and only the configured interface's address."""
    info = service_info(config(), ["127.0.0.1"])
    assert info.type == SERVICE_TYPE and info.name == INSTANCE
    assert info.properties[b"site"] == SITE.encode() and info.properties[b"api"] == b"v1"
    assert info.server == f"edge-agent-{SITE}.local."
    assert host_addresses(["127.0.0.1"]) == ["127.0.0.1"]
    assert "127.0.0.1" not in host_addresses([])   # all interfaces: loopback left out
    bound = Advertiser(AgentConfig(site={"id": SITE}, api={"bind": "127.0.0.1"}))
    assert bound._addresses() == ["127.0.0.1"]      # the API listens there only


@pytest.mark.e2e
def test_the_running_agent_announces_itself_and_withdraws_on_sigterm(
        tmp_path: Path, browser: tuple[Zeroconf, Seen]) -> None:
    """The real edge-agent (advertise on 127.0.0.1) is found with its port; SIGTERM says goodbye."""
    zc, seen = browser
    site = LocalSite(tmp_path / "site", agent_overrides={
        "api": {"advertise": True, "advertise_interfaces": ["127.0.0.1"]}})
    try:
        site.start()
        wait_for(lambda: seen.saw("add"), timeout=15, what="the agent's announcement")
        info = zc.get_service_info(SERVICE_TYPE, INSTANCE, timeout=3000)
        assert info is not None and info.port == site.api_port
        assert info.properties[b"site"] == SITE.encode() and info.properties[b"api"] == b"v1"
        assert site.agent is not None
        assert site.agent.terminate() == 0
        wait_for(lambda: seen.saw("remove"), timeout=5, what="the goodbye on shutdown")
    finally:
        site.stop()
