"""Each managed bridge's own nftables table, `inet <prefix>.<bridge>`.

A network's whole firewall is one table: it is replaced in one `nft -f` transaction (a
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

_CHAINS = {
    "pstrt": "type nat hook postrouting priority srcnat; policy accept;",
    "fwd": "type filter hook forward priority filter; policy accept;",
    "in": "type filter hook input priority filter; policy accept;",
}


def table_name(prefix: str, bridge: str) -> str:
    """The bridge's table: the service's table prefix, a dot, the bridge's name (both
    are nftables identifiers: a network name has only letters, digits, `-`, `_`, `.`)."""
    return f"{prefix}.{bridge}"


def _script(table: str, rules: BridgeRules) -> str:
    # `add` then `delete` empties whatever was there, in the same transaction.
    lines = [f"add table inet {table}", f"delete table inet {table}"]
    wanted = rules.chains()
    if wanted:
        lines.append(f"add table inet {table}")
        for kind, spec in _CHAINS.items():
            if kind not in wanted:
                continue
            chain = f"{kind}.{rules.bridge}"
            lines.append(f"add chain inet {table} {chain} {{ {spec} }}")
            lines.extend(f"add rule inet {table} {chain} {rule}" for rule in wanted[kind])
    return "\n".join(lines) + "\n"


def apply(prefix: str, rules: BridgeRules) -> None:
    """Make the bridge's table hold exactly what `rules` need (no table when nothing)."""
    run(["nft", "-f", "-"], input=_script(table_name(prefix, rules.bridge), rules).encode())
    remove_bridge_rules(prefix, rules.bridge)


def remove(prefix: str, bridge: str) -> None:
    """Delete the bridge's table, and its chains in the shared table of older crofts."""
    table = table_name(prefix, bridge)
    run(["nft", "-f", "-"], input=f"add table inet {table}\ndelete table inet {table}\n".encode())
    remove_bridge_rules(prefix, bridge)


def exists(prefix: str, bridge: str) -> bool:
    """Whether the bridge's table exists."""
    table = table_name(prefix, bridge)
    return run(["nft", "list", "table", "inet", table], check=False).returncode == 0


def tables(prefix: str) -> list[str]:
    """The tables of this prefix's networks (and the shared one of older crofts)."""
    listed = run(["nft", "list", "tables", "inet"], check=False).stdout.decode().split()
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
