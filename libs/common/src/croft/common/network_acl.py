"""Network ACLs as LXD 5.0 has them, independent of any network driver.

One place validates an ACL (`validate_acl`, LXD's `validateConfig` and `validateRule`,
LXD's words in every message) and turns the ACLs a network names into what a driver
enforces (`network_policy`): an ordered list of rules, drop first, then reject, then
allow (LXD's `FirewallApplyACLRules`), and the network's default action per direction.
The bridge driver writes nftables rules from a `NetworkAclPolicy`; an OVN driver can
translate the same policy into OVN ACLs.

An ACL record is `record_key("network-acls", <project>, <name>)`:
`{"name", "description", "config", "ingress": [rule...], "egress": [rule...]}`, each rule
LXD's `NetworkACLRule` (`action`, `state`, `source`, `destination`, `protocol`,
`source_port`, `destination_port`, `icmp_type`, `icmp_code`, `description`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from croft.common.errors import InvalidArgument
from croft.common.instance_config import go_quote, parse_bool
from croft.common.records import record_key, record_prefix

ACLS = "network-acls"

ACTIONS = ("allow", "drop", "reject")
STATES = ("enabled", "disabled", "logged")
PROTOCOLS = ("icmp4", "icmp6", "tcp", "udp")
DIRECTIONS = ("ingress", "egress")
# LXD's named subjects that are not ACL names.
INTERNAL_ALIASES = ("@internal",)
EXTERNAL_ALIASES = ("@external",)

RULE_FIELDS = (
    "action",
    "source",
    "destination",
    "protocol",
    "source_port",
    "destination_port",
    "icmp_type",
    "icmp_code",
    "description",
    "state",
)


def acl_prefix(project: str) -> str:
    """Where a project's ACLs are recorded."""
    return record_prefix(ACLS, project)


def acl_key(project: str, name: str) -> str:
    return record_key(ACLS, project, name)


_NAME_CHARS = re.compile(r"^[-a-zA-Z0-9]+$")


def validate_name(name: str) -> None:
    """LXD's `acl.ValidName` (which is `validate.IsHostname` with reserved prefixes)."""
    if name == "":
        raise InvalidArgument("Name is required")
    if name[0] in "@%#":
        raise InvalidArgument(f"Name cannot start with reserved character {go_quote(name[0])}")
    if not 1 <= len(name) <= 63:
        raise InvalidArgument("Name must be 1-63 characters long")
    if name.startswith("-"):
        raise InvalidArgument('Name must not start with "-" character')
    if name.endswith("-"):
        raise InvalidArgument('Name must not end with "-" character')
    if name[0].isdigit():
        raise InvalidArgument("Name must not start with a number")
    if not _NAME_CHARS.fullmatch(name):
        raise InvalidArgument("Name can only contain alphanumeric and hyphen characters")


@dataclass(frozen=True)
class AclRule:
    """One rule of an ACL, LXD's `api.NetworkACLRule` (strings as LXD keeps them)."""

    action: str = ""
    state: str = ""
    source: str = ""
    destination: str = ""
    protocol: str = ""
    source_port: str = ""
    destination_port: str = ""
    icmp_type: str = ""
    icmp_code: str = ""
    description: str = ""

    @classmethod
    def from_api(cls, value: Any) -> AclRule:
        """A rule from its JSON object; InvalidArgument for an unknown field or a value
        that is not a string (LXD's JSON decoding refuses both)."""
        if not isinstance(value, Mapping):
            raise InvalidArgument("Invalid rule: expected an object")
        for key, item in value.items():
            if key not in RULE_FIELDS:
                raise InvalidArgument(f"Unknown key: {key}")
            if not isinstance(item, str):
                raise InvalidArgument(f"Invalid rule field {key!r}: expected a string")
        return cls(**{k: v for k, v in value.items()}).normalised()

    def normalised(self) -> AclRule:
        """LXD's `Normalise`: spaces trimmed, around each list item too."""

        def items(text: str) -> str:
            return ",".join(part.strip() for part in text.split(","))

        return AclRule(
            action=self.action.strip(),
            state=self.state.strip(),
            source=items(self.source),
            destination=items(self.destination),
            protocol=self.protocol.strip(),
            source_port=items(self.source_port),
            destination_port=items(self.destination_port),
            icmp_type=self.icmp_type.strip(),
            icmp_code=self.icmp_code.strip(),
            description=self.description.strip(),
        )

    def to_api(self) -> dict[str, str]:
        """LXD's JSON: `action` and `state` always, the others when set."""
        body = {"action": self.action}
        for name in RULE_FIELDS:
            value = getattr(self, name)
            if name not in ("action", "state") and value:
                body[name] = value
        body["state"] = self.state
        return body

    def matches(self, criteria: Mapping[str, str]) -> bool:
        """Whether every field named in `criteria` has that value (`lxc network acl rule
        remove`'s filter)."""
        return all(getattr(self, k, None) == v for k, v in criteria.items())


@dataclass(frozen=True)
class Acl:
    """A validated ACL."""

    name: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)
    ingress: tuple[AclRule, ...] = ()
    egress: tuple[AclRule, ...] = ()

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Acl:
        """An ACL from its stored record (validated when it was written)."""
        return cls(
            name=str(data["name"]),
            description=str(data.get("description") or ""),
            config=dict(data.get("config") or {}),
            ingress=tuple(AclRule(**r) for r in data.get("ingress") or []),
            egress=tuple(AclRule(**r) for r in data.get("egress") or []),
        )

    def to_api(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "config": dict(self.config),
            "ingress": [r.to_api() for r in self.ingress],
            "egress": [r.to_api() for r in self.egress],
        }


def parse_acl(body: Mapping[str, Any], known: Iterable[str] = ()) -> Acl:
    """An ACL from LXD's JSON (`NetworkACLPost`/`NetworkACLPut` with its name), checked
    as LXD checks it: `known` names the project's ACLs, which rules may reference."""
    name = body.get("name", "")
    description = body.get("description") or ""
    config = body.get("config") or {}
    if not isinstance(name, str) or not isinstance(description, str):
        raise InvalidArgument("Invalid ACL: name and description must be strings")
    if not isinstance(config, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in config.items()
    ):
        raise InvalidArgument("Invalid ACL: config must map strings to strings")
    rules: dict[str, tuple[AclRule, ...]] = {}
    for direction in DIRECTIONS:
        listed = body.get(direction) or []
        if not isinstance(listed, list):
            raise InvalidArgument(f"Invalid ACL: {direction} must be a list of rules")
        rules[direction] = tuple(AclRule.from_api(r) for r in listed)
    acl = Acl(
        name=name,
        description=description,
        config=dict(config),
        ingress=rules["ingress"],
        egress=rules["egress"],
    )
    validate_acl(acl, known)
    return acl


def validate_acl(acl: Acl, known: Iterable[str] = ()) -> None:
    """LXD's `validateConfig`: config keys (only `user.*`), then each rule in order, then
    duplicates. InvalidArgument with LXD's message for the first fault."""
    for key in acl.config:
        if not key.startswith("user."):
            raise InvalidArgument(f"Invalid config option {go_quote(key)}")
    names = [*INTERNAL_ALIASES, *EXTERNAL_ALIASES, *known, acl.name]
    for direction, rules in (("ingress", acl.ingress), ("egress", acl.egress)):
        for index, rule in enumerate(rules):
            try:
                _check_rule(direction, rule, names)
            except ValueError as exc:
                raise InvalidArgument(f"Invalid {direction} rule {index}: {exc}") from None
            if any(other == rule for i, other in enumerate(rules) if i != index):
                raise InvalidArgument(f"Duplicate of {direction} rule {index}")


def _check_rule(direction: str, rule: AclRule, names: Sequence[str]) -> None:
    if rule.action not in ACTIONS:
        raise ValueError(f"Action must be one of: {', '.join(ACTIONS)}")
    if rule.state not in STATES:
        raise ValueError(f"State must be one of: {', '.join(STATES)}")
    src = dst = (False, False, False)
    if rule.source:
        try:
            src = _subjects("Source", direction, rule.source, names)
        except ValueError as exc:
            raise ValueError(f"Invalid Source: {exc}") from None
    if rule.destination:
        try:
            dst = _subjects("Destination", direction, rule.destination, names)
        except ValueError as exc:
            raise ValueError(f"Invalid Destination: {exc}") from None
    src_name, src4, src6 = src
    dst_name, dst4, dst6 = dst
    if (
        rule.source
        and rule.destination
        and (
            (src4 and not dst4 and not dst_name)
            or (dst4 and not src4 and not src_name)
            or (src6 and not dst6 and not dst_name)
            or (dst6 and not src6 and not src_name)
        )
    ):
        raise ValueError("Conflicting IP family types used for Source and Destination")
    if rule.protocol and rule.protocol not in PROTOCOLS:
        raise ValueError(f"Protocol must be one of: {', '.join(PROTOCOLS)}")
    if rule.protocol in ("tcp", "udp"):
        if rule.icmp_type:
            raise ValueError("ICMP type cannot be used with non-ICMP protocol")
        if rule.icmp_code:
            raise ValueError("ICMP code cannot be used with non-ICMP protocol")
        for label, ports in (("Source", rule.source_port), ("Destination", rule.destination_port)):
            if ports:
                try:
                    for port in ports.split(","):
                        _port_range(port)
                except ValueError as exc:
                    raise ValueError(f"Invalid {label} port: {exc}") from None
    elif rule.protocol in ("icmp4", "icmp6"):
        quoted = go_quote(rule.protocol)
        if rule.source_port:
            raise ValueError(f"Source port cannot be used with {quoted} protocol")
        if rule.destination_port:
            raise ValueError(f"Destination port cannot be used with {quoted} protocol")
        other, bad_src, bad_dst = (
            ("IPv6", src6, dst6) if rule.protocol == "icmp4" else ("IPv4", src4, dst4)
        )
        if bad_src:
            raise ValueError(f"Cannot use {other} source addresses with {quoted} protocol")
        if bad_dst:
            raise ValueError(f"Cannot use {other} destination addresses with {quoted} protocol")
        for label, value in (("type", rule.icmp_type), ("code", rule.icmp_code)):
            if value and not (value.isdigit() and int(value) <= 255):
                raise ValueError(
                    f"Invalid ICMP {label}: Invalid value for a uint8 {go_quote(value)}"
                )
    else:
        if rule.icmp_type:
            raise ValueError("ICMP type cannot be used without specifying protocol")
        if rule.icmp_code:
            raise ValueError("ICMP code cannot be used without specifying protocol")
        if rule.source_port:
            raise ValueError("Source port cannot be used without specifying protocol")
        if rule.destination_port:
            raise ValueError("Destination port cannot be used without specifying protocol")


def _port_range(value: str) -> None:
    """LXD's `IsNetworkPortRange`, with ports above 65535 refused as `IsNetworkPort`
    words it (LXD 5.0.2 stores them and then fails to apply them)."""
    parts = value.split("-", 1)
    numbers = []
    for index, part in enumerate(parts):
        if not part.isdigit():
            what = "end port number" if index else "port number"
            raise ValueError(f"Invalid {what} {go_quote(value)}")
        if int(part) > 65535:
            raise ValueError(f"Out of port number range (0-65535) {go_quote(value)}")
        numbers.append(int(part))
    if len(numbers) == 2 and numbers[0] >= numbers[1]:
        raise ValueError(f"Start port {numbers[0]} must be lower than end port {numbers[1]}")


def subject_version(subject: str) -> int:
    """4 or 6 for an address, a CIDR or a range; 0 for a name."""
    first = subject.split("-", 1)[0].split("/", 1)[0]
    try:
        return ipaddress.ip_address(first).version
    except ValueError:
        return 0


def _is_address(subject: str) -> bool:
    try:
        ipaddress.ip_address(subject)
    except ValueError:
        pass
    else:
        return True
    address, sep, length = subject.partition("/")
    if sep:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return length.isdigit() and int(length) <= ip.max_prefixlen
    start, sep, end = subject.partition("-")
    if sep:
        try:
            first, last = ipaddress.ip_address(start), ipaddress.ip_address(end)
        except ValueError:
            return False
        return first.version == last.version and first <= last  # type: ignore[operator]
    return False


def _subjects(
    label: str, direction: str, text: str, names: Sequence[str]
) -> tuple[bool, bool, bool]:
    """LXD's `validateRuleSubjects`: (has a name, has IPv4, has IPv6)."""
    named_ok = (label, direction) in (("Source", "ingress"), ("Destination", "egress"))
    has = [False, False, False]
    for subject in text.split(","):
        if _is_address(subject):
            has[1 if subject_version(subject) == 4 else 2] = True
            continue
        if subject in names or subject.startswith("@"):
            if not named_ok:
                raise ValueError(
                    f"Named subjects not allowed in {go_quote(label)} for {go_quote(direction)} rules"
                )
            has[0] = True
            continue
        raise ValueError(f"Invalid subject {go_quote(subject)}")
    return has[0], has[1], has[2]


def _action(value: str) -> object:
    if value and value not in ACTIONS:
        raise ValueError(f"Invalid value {go_quote(value)} (not one of [{' '.join(ACTIONS)}])")
    return None


def _logged(value: str) -> object:
    return parse_bool(value) if value else None


def _any(value: str) -> object:
    return None


# LXD's rules for the ACL keys of a network's config (a driver's key table takes them):
# each raises ValueError in LXD's words.
NETWORK_RULES: dict[str, Callable[[str], object]] = {
    "security.acls": _any,
    "security.acls.default.ingress.action": _action,
    "security.acls.default.egress.action": _action,
    "security.acls.default.ingress.logged": _logged,
    "security.acls.default.egress.logged": _logged,
}


def check_acls_exist(config: Mapping[str, str], known: Iterable[str]) -> None:
    """LXD's `acl.Exists` for the ACLs `security.acls` names: each exists (is in
    `known`, the project's ACLs) and is named once. InvalidArgument in LXD's words."""
    existing = set(known)
    seen: set[str] = set()
    for name in acl_names(config):
        if name not in existing:
            raise InvalidArgument(f"Network ACL {go_quote(name)} does not exist")
        if name in seen:
            raise InvalidArgument(f"Network ACL {go_quote(name)} specified multiple times")
        seen.add(name)


def acl_names(config: Mapping[str, str]) -> list[str]:
    """The ACLs `security.acls` names, in order."""
    return [n.strip() for n in config.get("security.acls", "").split(",") if n.strip()]


@dataclass(frozen=True)
class PolicyRule:
    """One rule a network enforces: its direction (`ingress`: into the network, toward
    its instances; `egress`: out of it), the rule, and a log prefix when it is logged."""

    direction: str
    rule: AclRule
    log_prefix: str = ""
    acl: str = ""  # the ACL the rule is from (OVN keeps a port group per ACL)


@dataclass(frozen=True)
class NetworkAclPolicy:
    """What a network enforces from its ACLs: the rules in the order they are tried
    (drops, then rejects, then allows), then the default action per direction."""

    rules: tuple[PolicyRule, ...] = ()
    default_ingress: str = "reject"
    default_egress: str = "reject"
    default_ingress_logged: bool = False
    default_egress_logged: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": [
                {
                    "direction": r.direction,
                    "rule": r.rule.to_api(),
                    "log_prefix": r.log_prefix,
                    "acl": r.acl,
                }
                for r in self.rules
            ],
            "default_ingress": self.default_ingress,
            "default_egress": self.default_egress,
            "default_ingress_logged": self.default_ingress_logged,
            "default_egress_logged": self.default_egress_logged,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetworkAclPolicy:
        return cls(
            rules=tuple(
                PolicyRule(
                    r["direction"], AclRule(**r["rule"]), r.get("log_prefix", ""), r.get("acl", "")
                )
                for r in data.get("rules", [])
            ),
            default_ingress=data.get("default_ingress", "reject"),
            default_egress=data.get("default_egress", "reject"),
            default_ingress_logged=bool(data.get("default_ingress_logged")),
            default_egress_logged=bool(data.get("default_egress_logged")),
        )


def network_policy(
    network: str, config: Mapping[str, str], acls: Mapping[str, Acl]
) -> NetworkAclPolicy | None:
    """The policy of a network (or NIC) whose config is `config`, its ACLs looked up in
    `acls`; None when it names no ACL (nothing is enforced, as in LXD)."""
    names = acl_names(config)
    if not names:
        return None
    ordered: dict[str, list[PolicyRule]] = {a: [] for a in ACTIONS}
    for name in names:
        acl = acls.get(name)
        if acl is None:
            raise InvalidArgument(f"Network ACL {go_quote(name)} does not exist")
        for direction, rules in (("ingress", acl.ingress), ("egress", acl.egress)):
            for index, rule in enumerate(rules):
                if rule.state == "disabled":
                    continue
                prefix = f"{network}-{direction}-{index}" if rule.state == "logged" else ""
                ordered[rule.action].append(PolicyRule(direction, rule, prefix[:29], name))

    def default(direction: str) -> tuple[str, bool]:
        action = config.get(f"security.acls.default.{direction}.action") or "reject"
        logged = config.get(f"security.acls.default.{direction}.logged") or "false"
        return action, parse_bool(logged)

    ingress, ingress_logged = default("ingress")
    egress, egress_logged = default("egress")
    return NetworkAclPolicy(
        rules=(*ordered["drop"], *ordered["reject"], *ordered["allow"]),
        default_ingress=ingress,
        default_egress=egress,
        default_ingress_logged=ingress_logged,
        default_egress_logged=egress_logged,
    )
