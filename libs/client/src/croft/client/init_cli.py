"""`croft init --preseed`: LXD's `lxd init --preseed`, as far as a cluster goes.

The preseed's `cluster:` section (LXD's `api.ClusterPut`) either makes this croft the
first member of a cluster (`enabled: true` and no token: through its own API, as
`lxc cluster enable` does) or joins it to a cluster with `cluster_token` (the token `lxc
cluster add` printed; LXD also takes it as `cluster_password`). A join happens before this
member's services start, because its store becomes the cluster's:

1. the token names the members to ask and the cluster certificate's fingerprint: the
   certificate each member presents must match it (and `cluster_certificate`, if given);
2. `POST /internal/cluster/join` on a member, with the token, gives the cluster certificate
   and key, and this member's store settings: an etcd voter (a learner the cluster promotes
   once it caught up) while the cluster has fewer than `cluster.max_voters`, else a client
   of the voters;
3. the certificate becomes this member's server certificate, the store settings go in
   `<state_dir>/cluster.yaml`, a standalone store left behind is moved aside, and croft
   starts.

`config:` keys (`core.https_address`...) of a bootstrap are set through the API first.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import shutil
import socket
import ssl
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
import yaml

from croft.client import node
from croft.common import internal_tls
from croft.common.config import Config, ConfigError, cluster_file, load_config
from croft.common.errors import CroftError, InvalidArgument, PermissionDenied, Unavailable


def _token(text: str) -> dict[str, Any] | None:
    import base64
    import binascii

    try:
        data = json.loads(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError):
        return None
    return data if isinstance(data, dict) and "secret" in data else None


def _host_port(address: str, default_port: int = 8443) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address.strip("[]"), default_port
    return host.strip("[]"), int(port)


def peer_certificate(address: str, timeout: float = 5.0) -> str:
    """The PEM certificate the server at HOST:PORT presents (unverified)."""
    host, port = _host_port(address)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der)


def fingerprint(pem: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def _pinned_client(pem: str, timeout: float = 30.0) -> httpx.Client:
    context = ssl.create_default_context(cadata=pem)
    context.check_hostname = False  # pinned: the certificate itself is what is trusted
    return httpx.Client(verify=context, timeout=timeout)


def join(config: Config, section: dict[str, Any], token_text: str) -> None:
    """Join this (stopped) croft to the cluster the token names; raises CroftError."""
    token = _token(token_text)
    if token is None:
        raise InvalidArgument("Invalid cluster join token")
    server_name = str(section.get("server_name") or token.get("server_name") or "")
    if server_name != config.member:
        raise InvalidArgument(
            f"This member's name is \"{config.member}\" (croft.yaml's `member`); the token "
            f'is for "{token.get("server_name")}"'
        )
    server_address = str(section.get("server_address") or "")
    if not server_address:
        raise InvalidArgument("No server address provided for this member")
    if node.agent_pid(config) is not None:
        raise InvalidArgument("croft is running on this host: stop it (`croft down`) to join")
    addresses = [str(a) for a in token.get("addresses") or []]
    if section.get("cluster_address"):
        addresses.insert(0, str(section["cluster_address"]))
    given = str(section.get("cluster_certificate") or "")
    host, _ = _host_port(server_address)
    ours = urlsplit(config.etcd.endpoints[0])
    client_port, scheme = ours.port or 2379, ours.scheme or "http"
    request = {
        "token": token_text.strip(),
        "server_name": server_name,
        "server_address": server_address,
        "etcd_client_url": f"{scheme}://{host}:{client_port}",
        "etcd_peer_url": f"{scheme}://{host}:{config.etcd.peer_port}",
        "architecture": platform.machine(),
    }
    last = ""
    for address in addresses:
        try:
            pem = peer_certificate(address)
        except OSError as exc:
            last = f"{address}: {exc}"
            continue
        if fingerprint(pem) != token.get("fingerprint"):
            raise PermissionDenied(
                f"Certificate fingerprint mismatch between join token and cluster member {address!r}"
            )
        if given and fingerprint(given) != fingerprint(pem):
            raise PermissionDenied(
                f"The cluster certificate given does not match the one {address!r} presents"
            )
        with _pinned_client(pem) as http:
            try:
                reply = http.post(f"https://{address}/internal/cluster/join", json=request)
            except httpx.HTTPError as exc:
                last = f"{address}: {exc}"
                continue
        body = reply.json()
        if reply.status_code != 200:
            error = body.get("error") or reply.text
            raise (PermissionDenied if reply.status_code == 403 else InvalidArgument)(
                f"Failed to join cluster: {error}"
            )
        _write_joined(config, body["metadata"], host)
        return
    raise Unavailable(f"Failed to join cluster: no cluster member answered ({last})")


def _write_joined(config: Config, joined: dict[str, Any], host: str) -> None:
    state = config.state_dir
    state.mkdir(parents=True, exist_ok=True)
    # The cluster's certificate is the one this member serves from now on.
    key_path, cert_path = state / "server.key", state / "server.crt"
    for path, text, mode in (
        (key_path, joined["cluster_key"], 0o600),
        (cert_path, joined["cluster_certificate"], 0o644),
    ):
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    # The members' own authority: their etcd and gRPC trust this member from now on.
    authority = joined.get("internal_authority")
    if authority:
        internal_tls.write_authority(state, authority["certificate"], authority["key"])
    # A standalone store this member ran before holds nothing of the cluster's.
    old = state / "etcd"
    if old.exists():
        shutil.move(str(old), str(state / f"etcd.standalone.{int(time.time())}"))
    overlay = {"etcd": joined["etcd"], "rpc": {"host": host}}
    cluster_file(config).write_text(yaml.safe_dump(overlay))


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
def init(preseed: bool, timeout: float) -> None:
    """Set this croft up from a preseed: bootstrap a cluster, or join one with a token."""
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
    if not token and _token(password) is not None:
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
