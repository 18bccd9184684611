"""`croft init --preseed`: LXD's `lxd init --preseed`, as far as a cluster goes.

The preseed's `cluster:` section (LXD's `api.ClusterPut`) either makes this croft the
first member of a cluster (`enabled: true` and no token: through its own API, as
`lxc cluster enable` does) or joins it to a cluster with `cluster_token` (the token `lxc
cluster add` printed; LXD also takes it as `cluster_password`). A join happens before this
member's services start, because its store becomes the cluster's: the token names the
members to ask and the certificate they must present, a member hands over the cluster
certificate and this member's store settings, and croft starts as a member.

Those steps are `croft.common.cluster_join`'s (its docstring details them), which LXD's
raw join (`PUT /1.0/cluster` on a running standalone croft) uses too; that one ends with
`croft init --restart-joined`, which restarts the member into the cluster.

`config:` keys (`core.https_address`...) of a bootstrap are set through the API first.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import click
import httpx
import yaml

from croft.client import node
from croft.common import cluster_join
from croft.common.config import Config, ConfigError, load_config
from croft.common.errors import CroftError, InvalidArgument


def join(config: Config, section: dict[str, Any], token_text: str) -> None:
    """Join this (stopped) croft to the cluster the token names; raises CroftError."""
    if cluster_join.decode_token(token_text) is None:
        raise InvalidArgument("Invalid cluster join token")
    if not section.get("server_address"):
        raise InvalidArgument("No server address provided for this member")
    if node.agent_pid(config) is not None:
        raise InvalidArgument("croft is running on this host: stop it (`croft down`) to join")
    joined = cluster_join.request_join(
        config,
        token_text,
        server_name=str(section.get("server_name") or ""),
        server_address=str(section.get("server_address") or ""),
        cluster_address=str(section.get("cluster_address") or ""),
        cluster_certificate=str(section.get("cluster_certificate") or ""),
    )
    cluster_join.write_joined(config, joined)
    cluster_join.set_standalone_store_aside(config)


async def _bootstrap(config: Config, preseed: dict[str, Any]) -> None:
    section = preseed.get("cluster") or {}
    transport = httpx.AsyncHTTPTransport(uds=str(config.state_dir / "unix.socket"))
    async with httpx.AsyncClient(transport=transport, base_url="http://croft", timeout=120) as api:
        server_config = preseed.get("config") or {}
        if server_config:
            reply = await api.patch("/1.0", json={"config": server_config})
            _check(reply)
        if section.get("enabled"):
            reply = await api.put(
                "/1.0/cluster",
                json={"server_name": section.get("server_name", ""), "enabled": True},
            )
            _check(reply)
            op = reply.json().get("operation")
            if op:
                _check(await api.get(f"{op}/wait"))
                result = (await api.get(op)).json()["metadata"]
                if result.get("status") != "Success":
                    raise CroftError(f"Failed to enable clustering: {result.get('err')}")


def _check(reply: httpx.Response) -> None:
    if reply.status_code >= 400:
        raise CroftError(reply.json().get("error") or reply.text)


@click.command()
@click.option("--preseed", is_flag=True, help="read LXD's preseed YAML from standard input")
@click.option("--timeout", default=120.0, show_default=True, help="seconds to wait for health")
@click.option("--restart-joined", is_flag=True, hidden=True)
def init(preseed: bool, timeout: float, restart_joined: bool) -> None:
    """Set this croft up from a preseed: bootstrap a cluster, or join one with a token."""
    if restart_joined:
        _restart_joined(timeout)
        return
    if not preseed:
        raise click.UsageError("only `croft init --preseed` is supported")
    try:
        config = load_config()
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(2) from None
    try:
        data = yaml.safe_load(sys.stdin.read()) or {}
    except yaml.YAMLError as exc:
        click.echo(f"Error: the preseed is not valid YAML: {exc}", err=True)
        raise SystemExit(2) from None
    section = data.get("cluster") or {}
    token = str(section.get("cluster_token") or "")
    password = str(section.get("cluster_password") or "")
    if not token and cluster_join.decode_token(password) is not None:
        token = password
    try:
        if token:
            join(config, section, token)
            config = load_config()  # with the store it joined
            asyncio.run(_start(config, timeout))
        else:
            if node.agent_pid(config) is None:
                asyncio.run(_start(config, timeout))
            asyncio.run(_bootstrap(config, data))
    except CroftError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(1) from None


async def _start(config: Config, timeout: float) -> None:
    pid = node.agent_pid(config)
    if pid is None:
        pid = node.spawn_agent(config)
    await node.wait_ready(config, pid, timeout)


def _restart_joined(timeout: float) -> None:
    """The end of a `PUT /1.0/cluster` join, run detached by the api that joined: croft
    stops, its standalone store is set aside (the node agent does it at start), and it
    starts again as the cluster's member."""
    config = load_config()
    # The join operation's waiters get their answer before the api stops.
    time.sleep(1.0)

    async def go() -> None:
        pid = node.agent_pid(config)
        if pid is not None:
            await node.stop_agent(config, pid)
        await _start(load_config(), timeout)

    asyncio.run(go())
