"""`croft cluster recover-from-quorum-loss`: LXD's `lxd cluster recover-from-quorum-loss`.

With croft stopped on this member (a voter of the store whose other voters are gone for
good), its etcd is started once with `--force-new-cluster`: the store becomes a
one-voter store holding every record it held. The member records of the voters dropped
lose their store role (they stay, Offline, until `lxc cluster remove --force`, as LXD
keeps them), and this member's cluster.yaml names only its own etcd. `croft up` then
starts a cluster of one that answers again; new members join it, and a dropped voter
that comes back finds itself out of the store and runs as a spare (croft.node.voters).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import yaml

from croft.common import cluster, internal_tls
from croft.common.cluster import MemberRecord
from croft.common.config import Config, cluster_file
from croft.common.errors import InvalidArgument, NotFound, Unavailable
from croft.common.store import connect, dump
from croft.node.agent import _ip, etcd_argv, etcd_health

log = logging.getLogger(__name__)


async def recover_from_quorum_loss(config: Config) -> list[str]:
    """Make this member's etcd the store's only voter, keeping its data; returns the
    members that lost their voter. croft must be stopped on this member."""
    etcd = config.etcd
    if not etcd.embedded or not (config.state_dir / "etcd" / "member").exists():
        raise InvalidArgument("This cluster member has no database: it is no voter of the store")
    endpoint = etcd.endpoints[0]
    host = urlsplit(endpoint).hostname or ""
    identity = internal_tls.ensure(config.state_dir, _ip(host) or _ip(config.rpc.host))
    if await asyncio.to_thread(etcd_health, endpoint, 0.5, identity):
        raise InvalidArgument(f"an etcd already answers on {endpoint}; stop croft first")
    config.log_dir.mkdir(parents=True, exist_ok=True)
    with open(config.log_dir / "etcd.log", "ab", buffering=0) as out:
        process = await asyncio.create_subprocess_exec(
            *etcd_argv(config, identity, "--force-new-cluster"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(etcd_health, endpoint, 0.5, identity):
            if process.returncode is not None or time.monotonic() > deadline:
                raise Unavailable(f"etcd did not start; see {config.log_dir / 'etcd.log'}")
            await asyncio.sleep(0.2)
        dropped = await _drop_other_voters(config, endpoint, identity)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
    _own_store_only(config, endpoint)
    return dropped


async def _drop_other_voters(
    config: Config, endpoint: str, identity: internal_tls.Identity
) -> list[str]:
    store = await connect([endpoint], identity)
    dropped = []
    try:
        for entry in await store.list(cluster.MEMBERS_PREFIX):
            record = MemberRecord.load(entry.json())
            if record.name == config.member or not record.etcd_peer_url:
                continue
            record.etcd_client_url = record.etcd_peer_url = ""
            await store.update(entry.key, dump(record.dump()), revision=entry.revision)
            dropped.append(record.name)
        with contextlib.suppress(NotFound):
            await store.delete(cluster.VOTER_REQUEST_KEY)
    finally:
        await store.close()
    return dropped


def _own_store_only(config: Config, endpoint: str) -> None:
    """cluster.yaml's store: this member's etcd alone (croft.yaml's, for the first member)."""
    path = cluster_file(config)
    if not path.exists():
        return
    overlay: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    etcd = overlay.get("etcd")
    if not isinstance(etcd, dict):
        return
    peer = f"{urlsplit(endpoint).scheme}://{urlsplit(endpoint).hostname}:{config.etcd.peer_port}"
    etcd.update(endpoints=[endpoint], initial_cluster=f"{config.member}={peer}")
    path.write_text(yaml.safe_dump(overlay))
