"""A cluster's records in the store, shared by the api (which owns them) and the node
agent (which writes its member's heartbeat).

- `cluster/config`: `{"enabled": true}` once `lxc cluster enable` made this a cluster;
- `cluster/members/<name>`: one member (`MemberRecord`): its id, address, failure
  domain, description, config, groups, and its store role as joined;
- `cluster/heartbeats/<name>`: the member's last heartbeat, written by its node agent
  every `HEARTBEAT_INTERVAL` seconds with what its etcd says of itself (voter, leader,
  learner). A member is Offline once its last heartbeat is older than
  `cluster.offline_threshold` (LXD's default, 20 s);
- `cluster/renamed/<old name>`: `{"name": <new name>}` while a renamed member has yet to
  restart under its new name (its node agent does, when it sees this);
- `cluster/groups/<name>`: a cluster group's `{"name", "description"}`; its members are
  those whose record lists it in `groups` (every member starts in `default`, which always
  exists and has no record until its description is set);
- `cluster/scale/<name>`: `{service: replicas}`, the control-plane replicas `croft scale`
  asked of that member; its node agent applies them (and again after a restart), over
  what its croft.yaml says;
- `cluster/certificate`: the certificate and key every member serves (LXD's cluster.crt),
  so that one client trust covers every member;
- `cluster/voter-request`: `{"member", "replaces", "at"}` while a spare member is asked to
  become an etcd voter (croft.common.voters), written by the node agent of the store's
  leader and carried out by the spare's.

A joining member's record is `pending` from the cluster's acceptance until its node agent
first beats: hidden from listings, and replaced by a retry of the same join.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from croft.common.records import RECORDS

CLUSTER_PREFIX = f"{RECORDS}cluster/"
CLUSTER_KEY = f"{RECORDS}cluster/config"
MEMBERS_PREFIX = f"{RECORDS}cluster/members/"
HEARTBEATS_PREFIX = f"{RECORDS}cluster/heartbeats/"
CERTIFICATE_KEY = f"{RECORDS}cluster/certificate"
RENAMED_PREFIX = f"{RECORDS}cluster/renamed/"
GROUPS_PREFIX = f"{RECORDS}cluster/groups/"
VOTER_REQUEST_KEY = f"{RECORDS}cluster/voter-request"
# The api's server config record (LXD's /1.0 config), read here for the cluster's keys.
SERVER_CONFIG_KEY = f"{RECORDS}server/config"
OFFLINE_THRESHOLD_KEY = "cluster.offline_threshold"
MAX_VOTERS_KEY = "cluster.max_voters"
SCALE_PREFIX = f"{RECORDS}cluster/scale/"
DEFAULT_GROUP = "default"
STATE_CREATED = "created"
STATE_EVACUATED = "evacuated"

HEARTBEAT_INTERVAL = 2.0
DEFAULT_OFFLINE_THRESHOLD = 20
DEFAULT_MAX_VOTERS = 3


def member_key(name: str) -> str:
    return f"{MEMBERS_PREFIX}{name}"


def heartbeat_key(name: str) -> str:
    return f"{HEARTBEATS_PREFIX}{name}"


def group_key(name: str) -> str:
    return f"{GROUPS_PREFIX}{name}"


def scale_key(name: str) -> str:
    return f"{SCALE_PREFIX}{name}"


def renamed_key(old: str) -> str:
    return f"{RENAMED_PREFIX}{old}"


def rename_member_references(record: dict[str, Any], old: str, new: str) -> bool:
    """Point a record's member references (its `location`/`locations`, croft's
    `_croft.member` and the keys of `_croft.members`) from `old` to `new`, in place;
    True if it had any. A member's rename changes nothing else of a record."""
    changed = False
    if record.get("location") == old:
        record["location"] = new
        changed = True
    locations = record.get("locations")
    if isinstance(locations, list) and old in locations:
        record["locations"] = [new if x == old else x for x in locations]
        changed = True
    meta = record.get("_croft")
    if isinstance(meta, dict):
        if meta.get("member") == old:
            meta["member"] = new
            changed = True
        members = meta.get("members")
        if isinstance(members, dict) and old in members:
            meta["members"] = {(new if k == old else k): v for k, v in members.items()}
            changed = True
    return changed


@dataclass
class MemberRecord:
    """One cluster member, as `cluster/members/<name>` holds it."""

    name: str
    id: int
    address: str  # cluster.https_address, HOST:PORT
    https_address: str = ""  # core.https_address, when not the same as `address`
    architecture: str = ""
    description: str = ""
    failure_domain: str = "default"
    config: dict[str, str] = field(default_factory=dict)
    groups: list[str] = field(default_factory=lambda: ["default"])
    # The etcd this member runs for the store ("" when it runs none: a client of the voters).
    etcd_client_url: str = ""
    etcd_peer_url: str = ""
    joined_at: float = field(default_factory=time.time)
    # LXD's member state: "created", or "evacuated" between `lxc cluster evacuate` and
    # `restore` (no instance is placed on it meanwhile).
    state: str = "created"
    # Accepted, its node agent not heard from yet (a join under way, or one that died).
    pending: bool = False

    def dump(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, data: dict[str, Any]) -> MemberRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Heartbeat:
    """A member's last sign of life, with its store role as its etcd reported it."""

    at: float
    voter: bool = False
    leader: bool = False
    learner: bool = False

    def dump(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, data: dict[str, Any]) -> Heartbeat:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def offline_threshold(config: dict[str, str]) -> int:
    """`cluster.offline_threshold` of the server config, in seconds."""
    try:
        return int(config.get(OFFLINE_THRESHOLD_KEY, DEFAULT_OFFLINE_THRESHOLD))
    except ValueError:
        return DEFAULT_OFFLINE_THRESHOLD


def max_voters(config: dict[str, str]) -> int:
    try:
        return int(config.get(MAX_VOTERS_KEY, DEFAULT_MAX_VOTERS))
    except ValueError:
        return DEFAULT_MAX_VOTERS
