"""The `croft` command."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from croft.client import auth_cli, cluster_cli, images_cli, init_cli, node, oidc
from croft.common import discovery, internal_tls, rpc
from croft.common.config import Config, ConfigError, load_config
from croft.common.errors import CroftError, NotFound
from croft.common.service import connect_store, internal_identity
from croft.v1 import node_pb2

console = Console()


def _config() -> Config:
    try:
        return load_config()
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(2) from None


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except CroftError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(1) from None


@click.group()
def main() -> None:
    """croft: system containers and virtual machines, your own low-touch cloud."""


@main.command()
@click.option("--timeout", default=90.0, show_default=True, help="seconds to wait for health")
def up(timeout: float) -> None:
    """Start croft on this host (etcd and every service) and wait until all are healthy."""
    config = _config()

    async def go() -> None:
        pid = node.agent_pid(config)
        if pid is None:
            pid = node.spawn_agent(config)
        await node.wait_ready(config, pid, timeout)
        await _print_status(config, "table")

    _run(go())


@main.command()
def down() -> None:
    """Stop every croft process on this host, in order."""
    config = _config()
    pid = node.agent_pid(config)
    if pid is None:
        console.print("croft is not running")
        return
    _run(node.stop_agent(config, pid))
    console.print("croft stopped")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def status(fmt: str) -> None:
    """Show every service instance, its address, health and uptime, from discovery."""
    healthy = _run(_print_status(_config(), fmt))
    if not healthy:
        sys.exit(1)


@main.command()
@click.option("--member", default=None, help="the cluster member to scale on (default: this one)")
@click.argument("assignments", nargs=-1, required=True)
def scale(member: str | None, assignments: tuple[str, ...]) -> None:
    """Run N replicas of a control-plane service: croft scale images=2 api=2

    With --member, on another member of the cluster (0 stops the service there, as long as
    another member runs it). The count is recorded and kept across restarts."""
    config = _config()
    wanted: list[tuple[str, int]] = []
    for item in assignments:
        service, _, count = item.partition("=")
        if not count.isdigit():
            raise click.BadParameter(f"{item!r}: expected SERVICE=REPLICAS, e.g. images=2")
        wanted.append((service, int(count)))

    async def go() -> None:
        pid = node.agent_pid(config)
        if pid is None:
            raise CroftError("croft is not running (start it with `croft up`)")
        if member is None or member == config.member:
            for service, count in wanted:
                await node.agent(config).scale(
                    node_pb2.ScaleRequest(service=service, replicas=count)
                )
            await node.wait_ready(config, pid, 60)
        else:
            await _scale_elsewhere(config, member, wanted)
        await _print_status(config, "table")

    _run(go())


async def _scale_elsewhere(config: Config, member: str, wanted: list[tuple[str, int]]) -> None:
    """Record the replicas for another member, and wait until its node agent runs them."""
    from croft.common import cluster
    from croft.node.agent import record_scale

    store = await connect_store(config, wait=5)
    try:
        if await store.get(cluster.member_key(member)) is None:
            raise NotFound(f'Cluster member "{member}" not found')
        for service, count in wanted:
            await record_scale(store, member, service, count)
        deadline = time.monotonic() + 90
        while True:
            live = await discovery.resolve(store, None, member)
            if all(sum(i.service == s for i in live) == n for s, n in wanted):
                return
            if time.monotonic() > deadline:
                raise CroftError(f"{member} did not reach the recorded replicas within 90 s")
            await asyncio.sleep(0.5)
    finally:
        await store.close()


async def _collect(config: Config) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    endpoint = config.etcd.endpoints[0]
    identity = internal_identity(config)
    etcd_ok = await asyncio.to_thread(_etcd_health, endpoint, identity)
    rows.append(
        {
            "service": "etcd",
            "member": config.member,
            "id": "-",
            "address": endpoint.split("://", 1)[-1],
            "health": "SERVING" if etcd_ok else "UNREACHABLE",
            "uptime": None,
            "pid": 0,
        }
    )
    if not etcd_ok:
        return rows
    store = await connect_store(config, wait=2)
    try:
        instances = await discovery.resolve(store, None)
    finally:
        await store.close()

    async def describe(instance: discovery.Instance) -> dict[str, Any]:
        health = await rpc.health_of(instance.address, identity=identity)
        uptime = None
        if health == "SERVING":
            try:
                uptime = (await rpc.status_of(instance.address, identity=identity)).uptime
            except Exception:
                health = "UNREACHABLE"
        return {
            "service": instance.service,
            "member": instance.member,
            "id": instance.id,
            "address": instance.address,
            "health": health,
            "uptime": uptime,
            "pid": instance.pid,
        }

    rows += await asyncio.gather(*(describe(i) for i in instances))
    order = {name: n for n, name in enumerate(["etcd", *node_services()])}
    rows.sort(key=lambda r: (order.get(r["service"], 99), r["member"], r["id"]))
    return rows


def node_services() -> tuple[str, ...]:
    from croft.node.agent import SERVICES

    return SERVICES


def _etcd_health(endpoint: str, identity: internal_tls.Identity | None) -> bool:
    from croft.node.agent import etcd_health

    return etcd_health(endpoint, identity=identity)


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


async def _print_status(config: Config, fmt: str) -> bool:
    """Print the instances; True when every one is healthy."""
    rows = await _collect(config)
    healthy = all(r["health"] == "SERVING" for r in rows)
    if fmt == "json":
        print(json.dumps({"time": time.time(), "instances": rows}, indent=2))
        return healthy
    table = Table(box=None, header_style="bold")
    for column in ("SERVICE", "MEMBER", "ID", "ADDRESS", "HEALTH", "UPTIME"):
        table.add_column(column)
    for row in rows:
        colour = "green" if row["health"] == "SERVING" else "red"
        table.add_row(
            row["service"],
            row["member"],
            row["id"],
            row["address"],
            f"[{colour}]{row['health']}[/{colour}]",
            _uptime(row["uptime"]),
        )
    console.print(table)
    return healthy


@main.command()
@click.argument("remote")
def login(remote: str) -> None:
    """Log in to REMOTE (a remote of the lxc client) with OpenID Connect: open the URL
    shown, enter the code, and the tokens are kept for croft and its HTTP clients."""

    def show(url: str, code: str) -> None:
        click.echo(f"URL: {url}\nCode: {code}\n", nl=True)
        sys.stdout.flush()

    try:
        oidc.login(oidc.Remote.named(remote), show=show)
    except CroftError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(1) from None
    click.echo(f"Logged in to {remote}")


@main.command()
@click.argument("target")
@click.option("-X", "--request", "method", default="GET", show_default=True)
@click.option("-d", "--data", default=None, help="the request's JSON body")
def query(target: str, method: str, data: str | None) -> None:
    """Send a raw request to REMOTE:PATH, as `lxc query`, as the remote's OIDC login."""
    remote, sep, path = target.partition(":")
    if not sep or not path.startswith("/"):
        raise click.BadParameter(f"{target!r}: expected REMOTE:/1.0/...")
    try:
        found = oidc.query(oidc.Remote.named(remote), method.upper(), path, data)
    except CroftError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(1) from None
    if found is not None:
        click.echo(json.dumps(found, indent=4, sort_keys=True))


main.add_command(images_cli.image)
main.add_command(auth_cli.auth)
main.add_command(init_cli.init)
main.add_command(cluster_cli.cluster)

if __name__ == "__main__":
    main()
