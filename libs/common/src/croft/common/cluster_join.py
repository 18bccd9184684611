"""The joining side of a cluster join, shared by its two front doors: `croft init --preseed`
(a stopped croft joins before its services start) and LXD's raw `PUT /1.0/cluster` on a
running standalone croft (its api joins, then the member restarts into the cluster).

1. the token names the members to ask and the cluster certificate's fingerprint: the
   certificate each member presents must match it (and `cluster_certificate`, if given);
2. `POST /internal/cluster/join` on a member, with the token, gives the cluster certificate
   and key, and this member's store settings: an etcd voter (a learner the cluster promotes
   once it caught up) while the cluster has fewer than `cluster.max_voters`, else a client
   of the voters;
3. the certificate becomes this member's server certificate and the store settings go in
   `<state_dir>/cluster.yaml` (`write_joined`); the standalone store left behind is moved
   aside (`set_standalone_store_aside`) while croft is stopped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import platform
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from croft.common import internal_tls
from croft.common.config import Config, cluster_file
from croft.common.errors import InvalidArgument, PermissionDenied, Unavailable


def decode_token(text: str) -> dict[str, Any] | None:
    """LXD's join token (base64 JSON with a secret), or None if `text` is none."""
    try:
        data = json.loads(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError):
        return None
    return data if isinstance(data, dict) and "secret" in data else None


def host_port(address: str, default_port: int = 8443) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address.strip("[]"), default_port
    return host.strip("[]"), int(port)


def peer_certificate(address: str, timeout: float = 5.0) -> str:
    """The PEM certificate the server at HOST:PORT presents (unverified)."""
    host, port = host_port(address)
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


@dataclass(frozen=True)
class Joined:
    """What the cluster answered: its certificate and key, this member's store settings."""

    reply: dict[str, Any]
    host: str  # this member's address, where its gRPC services listen from now on


def _post_pinned(pem: str, url: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
    context = ssl.create_default_context(cadata=pem)
    context.check_hostname = False  # pinned: the certificate itself is what is trusted
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=timeout) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.load(exc)
        except ValueError:
            return exc.code, {"error": exc.reason}


def request_join(
    config: Config,
    token_text: str,
    server_name: str,
    server_address: str,
    cluster_address: str = "",
    cluster_certificate: str = "",
    timeout: float = 60.0,
) -> Joined:
    """Ask the cluster the token names to take this member in (steps 1 and 2). Raises
    CroftError (PermissionDenied for a refused token or certificate) and changes nothing
    on this member."""
    token = decode_token(token_text)
    if token is None:
        raise InvalidArgument("Invalid cluster join token")
    server_name = server_name or str(token.get("server_name") or "")
    if server_name != config.member:
        raise InvalidArgument(
            f"This member's name is \"{config.member}\" (croft.yaml's `member`); the token "
            f'is for "{token.get("server_name")}"'
        )
    if not server_address:
        raise InvalidArgument("No server address provided for this member")
    addresses = [str(a) for a in token.get("addresses") or []]
    if cluster_address:
        addresses.insert(0, cluster_address)
    host, _ = host_port(server_address)
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
        if cluster_certificate and fingerprint(cluster_certificate) != fingerprint(pem):
            raise PermissionDenied(
                f"The cluster certificate given does not match the one {address!r} presents"
            )
        try:
            status, body = _post_pinned(
                pem, f"https://{address}/internal/cluster/join", request, timeout
            )
        except (OSError, ValueError) as exc:
            last = f"{address}: {exc}"
            continue
        if status != 200:
            error = (body or {}).get("error") or f"HTTP {status}"
            raise (PermissionDenied if status == 403 else InvalidArgument)(
                f"Failed to join cluster: {error}"
            )
        return Joined(reply=body["metadata"], host=host)
    raise Unavailable(f"Failed to join cluster: no cluster member answered ({last})")


def write_joined(config: Config, joined: Joined) -> None:
    """Step 3: the cluster's certificate becomes this member's, its store settings go in
    cluster.yaml. Read at the next start of this member's croft."""
    state = config.state_dir
    state.mkdir(parents=True, exist_ok=True)
    reply = joined.reply
    key_path, cert_path = state / "server.key", state / "server.crt"
    for path, text, mode in (
        (key_path, reply["cluster_key"], 0o600),
        (cert_path, reply["cluster_certificate"], 0o644),
    ):
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    # The members' own authority: their etcd and gRPC trust this member from now on.
    authority = reply.get("internal_authority")
    if authority:
        internal_tls.write_authority(state, authority["certificate"], authority["key"])
    overlay = {"etcd": reply["etcd"], "rpc": {"host": joined.host}}
    cluster_file(config).write_text(yaml.safe_dump(overlay))


def set_standalone_store_aside(config: Config) -> None:
    """A standalone store this member ran before holds nothing of the cluster's: moved
    aside (kept, not deleted) so its etcd starts afresh as the cluster's. Only while
    croft is stopped."""
    old = config.state_dir / "etcd"
    if old.exists():
        shutil.move(str(old), str(config.state_dir / f"etcd.standalone.{int(time.time())}"))


JOIN_PENDING = "join-pending"


def mark_join_pending(config: Config) -> None:
    """A running croft joined (`PUT /1.0/cluster`): its restart sets the old store aside."""
    (config.state_dir / JOIN_PENDING).write_text(str(time.time()))


def finish_pending_join(config: Config) -> bool:
    """At a stopped croft: if a join is pending, set the standalone store aside; True if
    one was."""
    marker = config.state_dir / JOIN_PENDING
    if not marker.exists():
        return False
    set_standalone_store_aside(config)
    marker.unlink()
    return True


def override_member_name(config: Config, name: str) -> None:
    """`lxc cluster rename` renamed this member: its cluster.yaml overrides croft.yaml's
    `member` from the next start on."""
    path = cluster_file(config)
    overlay: dict[str, Any] = {}
    if path.exists():
        overlay = yaml.safe_load(path.read_text()) or {}
    overlay["member"] = name
    path.write_text(yaml.safe_dump(overlay))
