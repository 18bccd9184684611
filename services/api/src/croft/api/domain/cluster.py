"""What a cluster is to the api: its records (`croft.common.cluster`), a member's status
and roles as LXD shows them, join tokens, and the accepting side of a join.

A member is Online while its node agent's heartbeat is younger than
`cluster.offline_threshold` seconds, Offline ("No heartbeat for ...") after. Its roles are
what its etcd last said of itself: `database` (a voter), `database-leader`,
`database-standby` (a learner on its way to voter).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import json
import platform
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from croft.api import records
from croft.api.context import ApiContext
from croft.api.domain.instances import KIND as INSTANCE_KIND
from croft.common import cluster, cluster_join, internal_tls
from croft.common.cluster import Heartbeat, MemberRecord
from croft.common.cluster_store import add_learner, remove_member, remove_peer
from croft.common.config import load_config
from croft.common.errors import (
    Conflict,
    CroftError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from croft.common.revert import Reverter
from croft.common.store import Create, Delete, Put, Store, Update, dump

TOKEN_EXPIRY_KEY = "cluster.join_token_expiry"
OFFLINE_THRESHOLD_KEY = cluster.OFFLINE_THRESHOLD_KEY
MAX_VOTERS_KEY = cluster.MAX_VOTERS_KEY
DEFAULT_TOKEN_EXPIRY = "3H"


async def enabled(store: Store) -> bool:
    found = await store.get_json(cluster.CLUSTER_KEY)
    return bool(found and found[0].get("enabled"))


async def members(store: Store, *, pending: bool = False) -> list[MemberRecord]:
    """The cluster's members by id; a join still under way (`pending`) only when asked."""
    found = [MemberRecord.load(e.json()) for e in await store.list(cluster.MEMBERS_PREFIX)]
    return sorted((m for m in found if pending or not m.pending), key=lambda m: m.id)


async def member(store: Store, name: str) -> MemberRecord:
    found = await store.get_json(cluster.member_key(name))
    if found is None:
        raise NotFound("Cluster member not found")
    return MemberRecord.load(found[0])


async def heartbeats(store: Store) -> dict[str, Heartbeat]:
    return {
        e.key.removeprefix(cluster.HEARTBEATS_PREFIX): Heartbeat.load(e.json())
        for e in await store.list(cluster.HEARTBEATS_PREFIX)
    }


async def server_config(store: Store) -> dict[str, str]:
    found = await store.get_json(records.SERVER_CONFIG_KEY)
    config: dict[str, str] = (found[0].get("config") or {}) if found else {}
    return config


offline_threshold = cluster.offline_threshold
max_voters = cluster.max_voters


def _duration(seconds: float) -> str:
    """Go's time.Duration string, as LXD's message shows it (1m2.5s)."""
    whole = int(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    frac = seconds - whole
    text = f"{secs + frac:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes or hours:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text


@dataclass(frozen=True)
class MemberView:
    record: MemberRecord
    heartbeat: Heartbeat | None
    online: bool
    message: str

    @property
    def evacuated(self) -> bool:
        return self.record.state == cluster.STATE_EVACUATED

    @property
    def status(self) -> str:
        if not self.online:
            return "Offline"
        return "Evacuated" if self.evacuated else "Online"

    @property
    def voter(self) -> bool:
        """A voter of the store: as its etcd last said, while it beats; as its record
        says once Offline (a dead voter replaced or dropped by a recovery is none)."""
        if not self.online:
            return bool(self.record.etcd_peer_url and self.heartbeat and self.heartbeat.voter)
        return bool(self.heartbeat and self.heartbeat.voter)

    @property
    def roles(self) -> list[str]:
        beat = self.heartbeat
        if beat is None:
            return []
        if not self.online:
            return ["database"] if self.voter else []
        roles = []
        if beat.leader:
            roles.append("database-leader")
        if beat.voter:
            roles.append("database")
        if beat.learner:
            roles.append("database-standby")
        return roles

    def render(self) -> dict[str, Any]:
        member = self.record
        return {
            "server_name": member.name,
            "url": f"https://{member.address}",
            "database": self.voter,
            "status": self.status,
            "message": "Unavailable due to maintenance"
            if self.online and self.evacuated
            else self.message,
            "architecture": member.architecture,
            "roles": self.roles,
            "failure_domain": member.failure_domain,
            "description": member.description,
            "config": member.config,
            "groups": member.groups,
        }


def view(record: MemberRecord, beat: Heartbeat | None, threshold: int, now: float) -> MemberView:
    if beat is not None and now - beat.at <= threshold:
        return MemberView(record, beat, True, "Fully operational")
    last = beat.at if beat is not None else record.joined_at
    when = datetime.datetime.fromtimestamp(last, datetime.UTC)
    message = f"No heartbeat for {_duration(now - last)} ({when:%Y-%m-%d %H:%M:%S.%f} +0000 UTC)"
    return MemberView(record, beat, False, message)


async def views(store: Store) -> list[MemberView]:
    threshold = offline_threshold(await server_config(store))
    beats = await heartbeats(store)
    now = time.time()
    return [view(m, beats.get(m.name), threshold, now) for m in await members(store)]


async def online_members(store: Store) -> list[str]:
    return [v.record.name for v in await views(store) if v.online]


def architecture() -> str:
    return platform.machine()


# ---------------------------------------------------------------------------- tokens


def _expiry(config: dict[str, str]) -> datetime.datetime:
    text = config.get(TOKEN_EXPIRY_KEY, DEFAULT_TOKEN_EXPIRY).strip().upper()
    units = {"S": 1, "M": 60, "H": 3600, "D": 86400, "W": 604800}
    try:
        seconds = int(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        seconds = 3 * 3600
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def token_metadata(
    server_name: str, fingerprint: str, addresses: list[str], config: dict[str, str]
) -> dict[str, Any]:
    """The metadata of a join token operation, as LXD's clusterNodesPost makes it."""
    return {
        "serverName": server_name,
        "secret": secrets.token_hex(32),
        "fingerprint": fingerprint,
        "addresses": addresses,
        "expiresAt": _rfc3339(_expiry(config)),
    }


@dataclass(frozen=True)
class JoinToken:
    server_name: str
    fingerprint: str
    addresses: list[str]
    secret: str
    expires_at: str

    def encode(self) -> str:
        body = {
            "server_name": self.server_name,
            "fingerprint": self.fingerprint,
            "addresses": self.addresses,
            "secret": self.secret,
            "expires_at": self.expires_at,
        }
        return base64.b64encode(json.dumps(body).encode()).decode()


def decode_token_or_none(text: str) -> JoinToken | None:
    try:
        return decode_token(text) if text else None
    except InvalidArgument:
        return None


def decode_token(text: str) -> JoinToken:
    """LXD's ClusterMemberJoinToken from its base64 JSON; InvalidArgument if it is none."""
    try:
        data = json.loads(base64.b64decode(text.strip(), validate=True))
        return JoinToken(
            server_name=str(data["server_name"]),
            fingerprint=str(data["fingerprint"]),
            addresses=[str(a) for a in data["addresses"]],
            secret=str(data["secret"]),
            expires_at=str(data.get("expires_at", "")),
        )
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument("Invalid cluster join token") from None


async def token_operations(ctx: ApiContext) -> list[dict[str, Any]]:
    return [
        op
        for op in (r["operation"] for r in await ctx.operations.list("default"))
        if op.get("class") == "token"
        and op.get("status") == "Running"
        and "serverName" in (op.get("metadata") or {})
    ]


async def use_token(ctx: ApiContext, token: JoinToken) -> None:
    """Consume a join token: its operation ends (single use); PermissionDenied when no
    running token matches or it expired, as LXD's clusterMemberJoinTokenValid says."""
    for op in await token_operations(ctx):
        meta = op["metadata"]
        if meta.get("serverName") == token.server_name and meta.get("secret") == token.secret:
            try:
                await ctx.operations.cancel(op["id"], wait=0)
            except CroftError:
                break  # used at this very moment by another join
            expires = meta.get("expiresAt", "")
            if expires and _parse_time(expires) < datetime.datetime.now(datetime.UTC):
                raise PermissionDenied("Token has expired")
            return
    raise PermissionDenied("No matching cluster join operation found")


def _parse_time(text: str) -> datetime.datetime:
    head = text.rstrip("Z").split(".")[0]
    return datetime.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)


# ---------------------------------------------------------------------------- joining


@dataclass(frozen=True)
class JoinRequest:
    server_name: str
    address: str  # the joiner's cluster.https_address
    etcd_client_url: str  # where the joiner's etcd would serve clients
    etcd_peer_url: str
    architecture: str


async def accept(ctx: ApiContext, token: JoinToken, req: JoinRequest) -> dict[str, Any]:
    """The cluster's side of a join: the token used, the member recorded, and (while the
    store has fewer than cluster.max_voters voters) a learner added for its etcd. Returns
    what the joiner needs: the cluster certificate and key, and its store settings."""
    store = ctx.store
    if req.server_name != token.server_name:
        raise PermissionDenied("No matching cluster join operation found")
    current = await members(store, pending=True)
    # A join of this name that never finished (its joiner killed half-way): this retry
    # takes its place, its learner and record first removed.
    stale = next((m for m in current if m.name == req.server_name and m.pending), None)
    if stale is not None:
        current.remove(stale)
    if any(m.name == req.server_name for m in current):
        raise InvalidArgument(f"The cluster already has a member with name: {req.server_name}")
    if any(m.address == req.address for m in current):
        raise InvalidArgument(f"The cluster already has a member with address: {req.address}")
    await use_token(ctx, token)
    found = await store.get_json(cluster.CERTIFICATE_KEY)
    if found is None:
        raise InvalidArgument("This server is not clustered")
    config = await server_config(store)
    voters = [m for m in current if m.etcd_peer_url]
    endpoints = [m.etcd_client_url for m in voters]
    if stale is not None:
        await forget_join(store, stale, endpoints)
    etcd: dict[str, Any]
    record = MemberRecord(
        name=req.server_name,
        id=max((m.id for m in current), default=0) + 1,
        address=req.address,
        architecture=req.architecture,
        pending=True,
    )
    async with Reverter() as revert:
        if len(voters) < max_voters(config) and req.etcd_peer_url:
            # A learner does not count for quorum: a joiner that never starts its etcd
            # leaves the store serving.
            initial = await add_learner(
                endpoints, req.server_name, req.etcd_peer_url, store.identity
            )
            revert.add(lambda: remove_member(endpoints, req.server_name, store.identity))
            record.etcd_client_url = req.etcd_client_url
            record.etcd_peer_url = req.etcd_peer_url
            etcd = {
                "embedded": True,
                "endpoints": [req.etcd_client_url, *endpoints],
                "initial_cluster": initial,
                "initial_cluster_state": "existing",
            }
        else:
            etcd = {"embedded": False, "endpoints": endpoints}
        await store.create(cluster.member_key(record.name), dump(record.dump()))
        revert.success()
    reply: dict[str, Any] = {
        "cluster_certificate": found[0]["certificate"],
        "cluster_key": found[0]["key"],
        "etcd": etcd,
        "member_id": record.id,
    }
    if ctx.settings.state_dir is not None:
        with contextlib.suppress(FileNotFoundError):
            # The authority behind the members' etcd and gRPC certificates (internal_tls).
            certificate, key = internal_tls.read_authority(ctx.settings.state_dir)
            reply["internal_authority"] = {"certificate": certificate, "key": key}
    return reply


async def forget_join(store: Store, record: MemberRecord, endpoints: list[str]) -> None:
    """A join that never finished: its etcd member (a learner, or a voter its dead joiner
    was promoted to) leaves the store, then its record goes."""
    if record.etcd_peer_url and endpoints:
        await remove_peer(endpoints, record.etcd_peer_url, store.identity)
    for key in (cluster.member_key(record.name), cluster.heartbeat_key(record.name)):
        with contextlib.suppress(NotFound):
            await store.delete(key)


# ---------------------------------------------------------------------------- member-local


CORE_HTTPS_ADDRESS = "core.https_address"
CLUSTER_HTTPS_ADDRESS = "cluster.https_address"
MEMBER_LOCAL_KEYS = (CORE_HTTPS_ADDRESS, CLUSTER_HTTPS_ADDRESS)


async def member_local_config(store: Store, name: str) -> dict[str, str]:
    """A member's own server config keys (its addresses), as `GET /1.0` on it shows them."""
    found = await store.get_json(cluster.member_key(name))
    if found is None:
        return {}
    record = MemberRecord.load(found[0])
    return {
        CORE_HTTPS_ADDRESS: record.https_address or record.address,
        CLUSTER_HTTPS_ADDRESS: record.address,
    }


async def set_member_https_address(store: Store, name: str, address: str) -> None:
    def change(current: dict[str, Any]) -> dict[str, Any]:
        record = MemberRecord.load(current)
        record.https_address = "" if address == record.address else address
        return record.dump()

    await records.modify(
        store, cluster.member_key(name), change, missing="Cluster member not found"
    )


# ---------------------------------------------------------------------------- joining, running


async def local_instance_names(store: Store) -> list[str]:
    """The instances this (standalone) server's store holds."""
    entries = await store.list(records.RECORDS + f"{INSTANCE_KIND}/")
    return [e.key.rsplit("/", 1)[-1] for e in entries]


async def join_running(
    server_name: str,
    server_address: str,
    token: str,
    cluster_address: str,
    cluster_certificate: str,
) -> None:
    """LXD's join API on a running standalone croft: the join `croft init --preseed`
    makes (croft.common.cluster_join), then a detached `croft init --restart-joined`
    restarts this member into the cluster (its api included, hence detached)."""
    config = load_config()
    joined = await asyncio.to_thread(
        cluster_join.request_join,
        config,
        token,
        server_name=server_name,
        server_address=server_address,
        cluster_address=cluster_address,
        cluster_certificate=cluster_certificate,
    )
    cluster_join.write_joined(config, joined)
    cluster_join.mark_join_pending(config)
    # The croft command's entry point (croft.client), run as a program, not imported.
    subprocess.Popen(
        [sys.executable, "-m", "croft.client.cli", "init", "--restart-joined"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )


# ---------------------------------------------------------------------------- renaming


async def rename_member(store: Store, old: str, new: str) -> None:
    """LXD's `RenameNode`: the member's record, its heartbeat, and every record that names
    it as its location take the new name; `cluster/renamed/<old>` tells its node agent to
    restart under it (croft.yaml's `member` is overridden in its cluster.yaml)."""
    found = await store.get(cluster.member_key(old))
    if found is None:
        raise NotFound("Cluster member not found")
    if await store.get(cluster.member_key(new)) is not None:
        raise Conflict("The record already exists")
    record = MemberRecord.load(found.json())
    record.name = new
    writes: list[Create | Put | Delete | Update] = [
        Create(cluster.member_key(new), dump(record.dump())),
        Delete(cluster.member_key(old), revision=found.revision),
        Put(cluster.renamed_key(old), dump({"name": new})),
    ]
    beat = await store.get(cluster.heartbeat_key(old))
    if beat is not None:
        writes += [Put(cluster.heartbeat_key(new), beat.value), Delete(cluster.heartbeat_key(old))]
    await store.transaction(writes)
    # The records that name it: one compare-and-swap each (a record written meanwhile is
    # read again), so that no batch outgrows etcd's limit on a transaction.
    for entry in await store.list(records.RECORDS):
        if entry.key.startswith(cluster.CLUSTER_PREFIX):
            continue
        if entry.key.endswith(f"/{old}") and "/network-members/" in entry.key:
            moved = entry.key[: -len(old)] + new
            await store.transaction([Put(moved, entry.value), Delete(entry.key)])
            continue
        await _rename_references(store, entry.key, old, new)


async def _rename_references(store: Store, key: str, old: str, new: str) -> None:
    while True:
        entry = await store.get(key)
        if entry is None:
            return
        try:
            data = entry.json()
        except ValueError:
            return
        if not isinstance(data, dict) or not cluster.rename_member_references(data, old, new):
            return
        try:
            await store.update(key, dump(data), revision=entry.revision)
            return
        except Conflict:
            continue
