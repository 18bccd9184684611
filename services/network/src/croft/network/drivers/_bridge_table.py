"""Each managed bridge's own nftables table, `inet <prefix>.<bridge>`.

A network's whole firewall is one table (and, for NIC MAC/IP filters, which work on
frames, a `bridge`-family table of the same name): it is replaced in one `nft -f` transaction (a
failed load leaves the previous rules in place), and deleting the network deletes the
table, so nothing of a deleted network can stay behind in a table another network
shares. Chains keep LXD's names (`pstrt.<bridge>`, `fwd.<bridge>`, `in.<bridge>`); their rules are
`_bridge_nft.BridgeRules`'. Chains an older croft put in the shared `inet <prefix>`
table for this bridge are removed when the bridge's own table is written.
"""

from __future__ import annotations

from croft.common.proc import run
from croft.network.drivers._bridge_nft import BridgeRules, remove_bridge_rules

__all__ = ["BridgeRules", "apply", "remove", "table_name"]

# In the order they are added: a chain others jump to (`acl`, no hook) comes first.
_CHAINS = {
    "acl": "",
    "prert": "type nat hook prerouting priority dstnat; policy accept;",
    "out": "type nat hook output priority -100; policy accept;",
    "pstrt": "type nat hook postrouting priority srcnat; policy accept;",
    "fwd": "type filter hook forward priority filter; policy accept;",
    "in": "type filter hook input priority filter; policy accept;",
    "aclin": "type filter hook input priority filter; policy accept;",
    "aclout": "type filter hook output priority filter; policy accept;",
    "aclfwd": "type filter hook forward priority filter; policy accept;",
}
# The bridge-family table's chains (NIC MAC/IP filters, LXD's priority -200).
_BRIDGE_CHAINS = {
    "in": "type filter hook input priority -200; policy accept;",
    "fwd": "type filter hook forward priority -200; policy accept;",
}


def table_name(prefix: str, bridge: str) -> str:
    """The bridge's table: the service's table prefix, a dot, the bridge's name (both
    are nftables identifiers: a network name has only letters, digits, `-`, `_`, `.`)."""
    return f"{prefix}.{bridge}"


def _table_lines(
    family: str, table: str, bridge: str, specs: dict[str, str], wanted: dict[str, list[str]]
) -> list[str]:
    # `add` then `delete` empties whatever was there, in the same transaction.
    lines = [f"add table {family} {table}", f"delete table {family} {table}"]
    if wanted:
        lines.append(f"add table {family} {table}")
        for kind, spec in specs.items():
            if kind not in wanted:
                continue
            chain = f"{kind}.{bridge}"
            body = f" {{ {spec} }}" if spec else ""
            lines.append(f"add chain {family} {table} {chain}{body}")
            lines.extend(f"add rule {family} {table} {chain} {rule}" for rule in wanted[kind])
    return lines


def _script(table: str, rules: BridgeRules) -> str:
    lines = _table_lines("inet", table, rules.bridge, _CHAINS, rules.chains())
    lines += _table_lines("bridge", table, rules.bridge, _BRIDGE_CHAINS, rules.bridge_chains())
    return "\n".join(lines) + "\n"


def apply(prefix: str, rules: BridgeRules) -> None:
    """Make the bridge's table hold exactly what `rules` need (no table when nothing)."""
    run(["nft", "-f", "-"], input=_script(table_name(prefix, rules.bridge), rules).encode())
    remove_bridge_rules(prefix, rules.bridge)


def remove(prefix: str, bridge: str) -> None:
    """Delete the bridge's table, and its chains in the shared table of older crofts."""
    table = table_name(prefix, bridge)
    script = "".join(
        f"add table {family} {table}\ndelete table {family} {table}\n"
        for family in ("inet", "bridge")
    )
    run(["nft", "-f", "-"], input=script.encode())
    remove_bridge_rules(prefix, bridge)


def exists(prefix: str, bridge: str) -> bool:
    """Whether the bridge's table exists."""
    table = table_name(prefix, bridge)
    return run(["nft", "list", "table", "inet", table], check=False).returncode == 0


def tables(prefix: str, family: str = "inet") -> list[str]:
    """The tables of this prefix's networks (and the shared one of older crofts)."""
    listed = run(["nft", "list", "tables", family], check=False).stdout.decode().split()
    return sorted(name for name in listed if name == prefix or name.startswith(f"{prefix}."))


def list_chains(prefix: str, bridge: str) -> dict[str, str]:
    """Chain name -> its text (`nft list chain`), for the bridge's table."""
    table = table_name(prefix, bridge)
    result = run(["nft", "list", "table", "inet", table], check=False)
    if result.returncode != 0:
        return {}
    chains: dict[str, str] = {}
    current = ""
    for line in result.stdout.decode().splitlines():
        words = line.split()
        if words[:1] == ["chain"] and len(words) >= 2:
            current = words[1]
            chains[current] = ""
        elif current:
            chains[current] += line + "\n"
    return chains
