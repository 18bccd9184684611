"""Which member should hold an etcd voter, as LXD rebalances its database roles.

The store keeps `cluster.max_voters` (3) voters. The node agent of the store's leader
decides, on each of its heartbeats, from the member records and heartbeats:

- a voter offline past `cluster.offline_threshold` is replaced by an online spare (a
  member running no etcd), one of the dead voter's failure domain first, then the lowest
  id; once the spare is a voter the dead one leaves the store;
- with fewer voters than `cluster.max_voters` (a voter removed, a cluster recovered from
  quorum loss), an online spare becomes one;
- a join that never finished (its record `pending`, no heartbeat, accepted longer than
  `join_grace` ago) is forgotten: its learner leaves the store, its record goes.

It asks one spare at a time through `cluster/voter-request`; the spare's node agent
carries the request out (its etcd a learner, promoted, then the dead voter removed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from croft.common.cluster import Heartbeat, MemberRecord

# How long a spare may take to become a voter before its request is dropped (and made
# again, to it or another).
REQUEST_PATIENCE = 180.0


def join_grace(threshold: int) -> float:
    """How long a pending join may go without its node agent's first heartbeat."""
    return max(60.0, 4.0 * threshold)


@dataclass(frozen=True)
class VoterRequest:
    member: str  # the spare asked to become a voter
    replaces: str  # the offline voter it replaces ("" when a voter is missing)
    at: float

    def dump(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, data: dict[str, Any]) -> VoterRequest:
        return cls(str(data["member"]), str(data.get("replaces", "")), float(data["at"]))


def _online(member: MemberRecord, beats: dict[str, Heartbeat], threshold: int, now: float) -> bool:
    beat = beats.get(member.name)
    return beat is not None and now - beat.at <= threshold


def plan(
    members: list[MemberRecord],
    beats: dict[str, Heartbeat],
    threshold: int,
    max_voters: int,
    now: float,
) -> VoterRequest | None:
    """The spare to make a voter now, and the voter it replaces; None if none is needed
    or no spare is online."""
    settled = sorted((m for m in members if not m.pending), key=lambda m: m.id)
    voters = [m for m in settled if m.etcd_peer_url]
    spares = [m for m in settled if not m.etcd_peer_url and _online(m, beats, threshold, now)]
    if not spares:
        return None
    dead = [m for m in voters if not _online(m, beats, threshold, now)]
    if dead:
        gone = dead[0]
        pick = min(spares, key=lambda m: (m.failure_domain != gone.failure_domain, m.id))
        return VoterRequest(pick.name, gone.name, now)
    if len(voters) < max_voters:
        return VoterRequest(spares[0].name, "", now)
    return None


def abandoned_joins(
    members: list[MemberRecord], beats: dict[str, Heartbeat], threshold: int, now: float
) -> list[MemberRecord]:
    """Pending members whose joiner has not beaten within `join_grace` of its acceptance."""
    grace = join_grace(threshold)
    return [m for m in members if m.pending and m.name not in beats and now - m.joined_at > grace]
