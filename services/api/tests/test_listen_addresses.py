"""The addresses `GET /1.0` reports for core.https_address (LXD's util.ListenAddresses)."""

from __future__ import annotations

import ipaddress
import json
import subprocess

from croft.api.serving import listen_addresses


def _global_addresses() -> set[str]:
    """This host's addresses as `ip` lists them, less loopback, link-local and multicast."""
    found = set()
    links = json.loads(
        subprocess.run(["ip", "-j", "address", "show"], capture_output=True, check=True).stdout
    )
    for link in links:
        for info in link.get("addr_info", []):
            address = ipaddress.ip_address(info["local"])
            if not (address.is_loopback or address.is_link_local or address.is_multicast):
                found.add(str(address))
    return found


async def test_a_wildcard_address_lists_every_global_address_of_the_host_with_the_port() -> None:
    addresses = await listen_addresses(":8443")
    assert addresses, "this host has at least one global address"
    expected = {f"[{a}]:8443" if ":" in a else f"{a}:8443" for a in _global_addresses()}
    assert set(addresses) == expected


async def test_an_ipv4_wildcard_lists_only_ipv4_addresses() -> None:
    addresses = await listen_addresses("0.0.0.0:8443")
    assert addresses
    assert all(not a.startswith("[") and a.endswith(":8443") for a in addresses)


async def test_a_specific_address_is_itself() -> None:
    assert await listen_addresses("127.0.0.1:8443") == ["127.0.0.1:8443"]
    assert await listen_addresses("[::1]:8443") == ["[::1]:8443"]
