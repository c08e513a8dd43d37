"""The box's own network addresses (mDNS advertising and printer discovery both need them)."""

from __future__ import annotations

import ipaddress

import ifaddr


def host_addresses(interfaces: list[str]) -> list[str]:
    """The box's unicast addresses: those in ``interfaces`` (IPs or names), else all non-loopback.

    Link-local IPv6 is left out: it needs a scope id a tablet's resolver rarely keeps.
    """
    found: list[str] = []
    wanted = set(interfaces)
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                parsed = ipaddress.ip_address(addr)
            except ValueError:
                continue
            if wanted:
                if addr not in wanted and adapter.nice_name not in wanted \
                        and adapter.name not in wanted:
                    continue
            elif parsed.is_loopback or parsed.is_link_local:
                continue
            found.append(str(parsed))
    # An address named in the config but on no adapter (yet) is still meant.
    found += [a for a in interfaces if is_ip(a) and a not in found]
    return sorted(set(found))


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (not an interface name)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
