"""The node agent's part in keeping the store's voters (croft.common.voters decides):

- `lead`: on the store leader's member, each heartbeat: forget abandoned joins, drop a
  request that took too long, and ask a spare to become a voter when one is needed;
- `become_voter`: on the spare asked: its etcd joins as a learner, is promoted, and the
  voter it replaces leaves the store; the member records follow;
- `leave_if_removed`: at start, a voter whose etcd was removed from the store while it
  was away (replaced, or dropped by a quorum-loss recovery) sets its data aside and runs
  as a client of the voters, a spare;
- `confirm_joined`: a joined member's first heartbeat ends its record's `pending`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from croft.common import cluster, voters
from croft.common.cluster import Heartbeat, MemberRecord
from croft.common.cluster_store import add_learner, list_members, remove_member, remove_peer
from croft.common.config import cluster_file, load_config
from croft.common.errors import Conflict, CroftError, NotFound, Unavailable
from croft.common.store import Store, dump

if TYPE_CHECKING:
    from croft.node.agent import Agent

log = logging.getLogger(__name__)


async def _members(store: Store) -> list[MemberRecord]:
    return [MemberRecord.load(e.json()) for e in await store.list(cluster.MEMBERS_PREFIX)]


async def _beats(store: Store) -> dict[str, Heartbeat]:
    return {
        e.key.removeprefix(cluster.HEARTBEATS_PREFIX): Heartbeat.load(e.json())
        for e in await store.list(cluster.HEARTBEATS_PREFIX)
    }


async def _server_config(store: Store) -> dict[str, str]:
    found = await store.get_json(cluster.SERVER_CONFIG_KEY)
    config: dict[str, str] = (found[0].get("config") or {}) if found else {}
    return config


def _voter_endpoints(members: list[MemberRecord], *, but: str = "") -> list[str]:
    return [m.etcd_client_url for m in members if m.etcd_client_url and m.name != but]


async def _modify_member(store: Store, name: str, change: Any) -> None:
    """Read-modify-write of a member record (compare-and-swap, retried)."""
    while True:
        found = await store.get(cluster.member_key(name))
        if found is None:
            return
        record = MemberRecord.load(found.json())
        change(record)
        try:
            await store.update(
                cluster.member_key(name), dump(record.dump()), revision=found.revision
            )
            return
        except Conflict:
            continue


# ---------------------------------------------------------------------------- the leader


async def lead(store: Store) -> None:
    """One round of the leader's care for the voters (see the module's docstring)."""
    config = await _server_config(store)
    threshold = cluster.offline_threshold(config)
    members, beats, now = await _members(store), await _beats(store), time.time()
    endpoints = _voter_endpoints(members)
    for record in voters.abandoned_joins(members, beats, threshold, now):
        log.warning("forgetting %s: its join never finished", record.name)
        if record.etcd_peer_url:
            await remove_peer(_voter_endpoints(members, but=record.name), record.etcd_peer_url,
                              store.identity)  # fmt: skip
        with contextlib.suppress(NotFound):
            await store.delete(cluster.member_key(record.name))
        return
    found = await store.get_json(cluster.VOTER_REQUEST_KEY)
    if found is not None:
        request = voters.VoterRequest.load(found[0])
        if now - request.at > voters.REQUEST_PATIENCE:
            log.warning("%s did not become a voter in time; asking again", request.member)
            asked = next((m for m in members if m.name == request.member), None)
            if asked is not None and not asked.etcd_peer_url and endpoints:
                with contextlib.suppress(CroftError):
                    await remove_member(endpoints, request.member, store.identity)
            with contextlib.suppress(NotFound):
                await store.delete(cluster.VOTER_REQUEST_KEY)
        return
    wanted = voters.plan(members, beats, threshold, cluster.max_voters(config), now)
    if wanted is not None:
        log.info("asking %s to become a voter (replacing %r)", wanted.member, wanted.replaces)
        with contextlib.suppress(Conflict):
            await store.create(cluster.VOTER_REQUEST_KEY, dump(wanted.dump()))


# ---------------------------------------------------------------------------- the spare


async def request_for(store: Store, name: str) -> voters.VoterRequest | None:
    found = await store.get_json(cluster.VOTER_REQUEST_KEY)
    if found is None:
        return None
    request = voters.VoterRequest.load(found[0])
    return request if request.member == name else None


def _write_etcd_overlay(agent: Agent, etcd: dict[str, Any]) -> None:
    """This member's store settings in its cluster.yaml (kept: its other overrides)."""
    path = cluster_file(agent.config)
    overlay: dict[str, Any] = {}
    if path.exists():
        overlay = yaml.safe_load(path.read_text()) or {}
    overlay["etcd"] = etcd
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(overlay))
    tmp.replace(path)
    agent.config = load_config()


def _set_data_aside(agent: Agent, why: str) -> None:
    data = agent.config.state_dir / "etcd"
    if data.exists():
        data.rename(agent.config.state_dir / f"etcd.{why}.{int(time.time())}")


async def become_voter(agent: Agent, request: voters.VoterRequest) -> None:
    """Carry out the leader's request: the voter it replaces leaves the store, then this
    spare's etcd joins it as a learner, promoted once caught up (Agent.start_etcd)."""
    store = agent.store
    assert store is not None
    config = agent.config
    members = await _members(store)
    endpoints = _voter_endpoints(members)
    scheme = urlsplit(config.etcd.endpoints[0]).scheme or "http"
    port = urlsplit(endpoints[0] if endpoints else config.etcd.endpoints[0]).port or 2379
    host = config.rpc.host
    client_url = f"{scheme}://{host}:{port}"
    peer_url = f"{scheme}://{host}:{config.etcd.peer_port}"
    before = cluster_file(config).read_text() if cluster_file(config).exists() else ""
    log.info("becoming a voter of the store (replacing %r)", request.replaces)
    # The voter replaced leaves first: etcd adds no member, not even a learner, while a
    # voter is unreachable ("unhealthy cluster"), and removes a dead one safely.
    if request.replaces:
        gone = next((m for m in members if m.name == request.replaces), None)
        await remove_member(endpoints, request.replaces, store.identity)
        await _modify_member(store, request.replaces, _no_etcd)
        if gone is not None and gone.etcd_client_url in endpoints:
            endpoints.remove(gone.etcd_client_url)
        log.info("%s left the store's voters, replaced by %s", request.replaces, config.member)
    # A learner left by an attempt of ours that died goes first: etcd refuses a peer
    # URL twice.
    await remove_peer(endpoints, peer_url, store.identity, learner_only=True)
    initial = await add_learner(endpoints, config.member, peer_url, store.identity)
    try:
        _set_data_aside(agent, "spare")
        _write_etcd_overlay(agent, {
            "embedded": True,
            "endpoints": [client_url, *endpoints],
            "initial_cluster": initial,
            "initial_cluster_state": "existing",
        })  # fmt: skip
        await agent.start_etcd()
    except BaseException:
        if agent.etcd is not None:
            await agent.etcd.stop()
            agent.etcd = None
        _set_data_aside(agent, "failed")
        cluster_file(config).write_text(before)
        agent.config = load_config()
        with contextlib.suppress(CroftError):
            await remove_peer(endpoints, peer_url, store.identity)
        raise

    def voter(record: MemberRecord) -> None:
        record.etcd_client_url, record.etcd_peer_url = client_url, peer_url

    await _modify_member(store, config.member, voter)
    log.info("%s is a voter of the store", config.member)
    with contextlib.suppress(NotFound):
        await store.delete(cluster.VOTER_REQUEST_KEY)


def _no_etcd(record: MemberRecord) -> None:
    record.etcd_client_url = record.etcd_peer_url = ""


# ---------------------------------------------------------------------------- at start


async def leave_if_removed(agent: Agent) -> bool:
    """At start, before its etcd: a voter the store no longer lists (replaced while it was
    away, or dropped by a recovery) becomes a client of the voters. True if it did."""
    config = agent.config
    etcd = config.etcd
    if not (etcd.embedded and len(etcd.endpoints) > 1):
        return False
    if not (config.state_dir / "etcd" / "member").exists():
        return False  # a joiner's first start: its learner is not started yet
    try:
        found = await list_members(etcd.endpoints[1:], agent.identity)
    except (Unavailable, Conflict):
        return False  # nobody to ask: start as before
    if any(m.name == config.member for m in found):
        return False
    log.warning("this member's etcd was removed from the store: running as a spare")
    _set_data_aside(agent, "removed")
    _write_etcd_overlay(agent, {
        "embedded": False,
        "endpoints": [u for m in found if not m.learner for u in m.client_urls],
        "initial_cluster": "",
        "initial_cluster_state": "new",
    })  # fmt: skip
    return True


async def sync_endpoints(agent: Agent) -> bool:
    """This member's cluster.yaml names the store's voters of now (its own etcd first):
    its next start reaches them, and finds out whether its own etcd is still one
    (`leave_if_removed`). True if it changed."""
    store = agent.store
    assert store is not None
    config = agent.config
    found = _voter_endpoints([m for m in await _members(store) if not m.pending])
    own = config.etcd.endpoints[0] if agent.etcd is not None else ""
    wanted = [own, *(u for u in found if u != own)] if own else found
    if not wanted or set(wanted) == set(config.etcd.endpoints):
        return False
    path = cluster_file(config)
    overlay: dict[str, Any] = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    _write_etcd_overlay(agent, {**(overlay.get("etcd") or {}), "endpoints": wanted})
    return True


async def confirm_joined(store: Store, name: str) -> bool:
    """A member's node agent is up: its record is no longer a join under way. True once
    its record says so."""
    found = await store.get_json(cluster.member_key(name))
    if found is None:
        return False
    if MemberRecord.load(found[0]).pending:

        def joined(record: MemberRecord) -> None:
            record.pending = False

        await _modify_member(store, name, joined)
    return True
