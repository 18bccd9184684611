"""What every handler reaches through `context(request)`: the store, the operation
manager, the event hub and publisher, and the replica's settings (`ApiSettings`).

`app.create_app` builds one `ApiContext` per replica and keeps it in the app's state;
this module imports no handler, so every handler may import it.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from starlette.requests import HTTPConnection
from typing_extensions import Unpack

from croft.api.authz import Authorizer
from croft.api.events import EventHub
from croft.api.identity import identity
from croft.api.operations import OperationManager
from croft.api.records import DEFAULT_PROJECT
from croft.common.errors import CroftError
from croft.common.events import EventPublisher, lifecycle_metadata
from croft.common.store import Put, Store

log = logging.getLogger(__name__)


@dataclass
class ApiSettings:
    """What an api replica needs to know about its place in the cluster."""

    server_name: str = field(default_factory=socket.gethostname)  # the member's name
    location: str = "none"  # LXD's event/operation location ("none" when not clustered)
    owner_id: str | None = None  # identifies this process as an operation owner
    operation_lease_ttl: int = 10
    keep_finished_operations: float = 5.0
    default_pool: str = "default"
    default_network: str = "croftbr0"
    https_address: str = ""  # where HTTPS is served ("" = not served): LXD's core.https_address
    certificate: str = ""  # the server certificate, PEM (croft.api.tls)
    certificate_key: str = ""  # its key, PEM: it becomes the cluster's at `cluster enable`
    # This member's etcd, when it runs one: what a cluster records of its store voters.
    etcd_client_url: str = ""
    etcd_peer_url: str = ""
    # The member's state directory (its internal authority is given to joining members).
    state_dir: Path | None = None


class LifecycleEvent(TypedDict, total=False):
    """What a lifecycle event says besides its action and source."""

    #: The project of the source (default: the default project).
    project: str
    #: LXD's event `context` (what changed, say).
    context: dict[str, Any] | None
    #: The request that made the change: the event names its requestor.
    request: HTTPConnection | None


@dataclass
class ApiContext:
    """The shared parts of one api replica."""

    store: Store
    settings: ApiSettings
    operations: OperationManager
    hub: EventHub
    publisher: EventPublisher
    authorizer: Authorizer = field(init=False)

    def __post_init__(self) -> None:
        self.authorizer = Authorizer(self.store)

    async def lifecycle(self, action: str, source: str, **event: Unpack[LifecycleEvent]) -> None:
        """Publish a lifecycle event (`profile-created`, ...). A change already made is not
        undone because its event could not be written: that is logged instead."""
        for write in await self.lifecycle_write(action, source, **event):
            try:
                await self.publisher.store.put(write.key, write.value, lease=write.lease)
            except CroftError as exc:
                log.warning("could not publish %s for %s: %s", action, source, exc)

    async def lifecycle_write(
        self,
        action: str,
        source: str,
        *,
        project: str = DEFAULT_PROJECT,
        context: dict[str, Any] | None = None,
        request: HTTPConnection | None = None,
    ) -> list[Put]:
        """The write of a lifecycle event, to go in the transaction of the change it
        reports (an operation's `final_writes`); none when the event log cannot take it."""
        metadata = lifecycle_metadata(
            action, source, context, requestor(request) if request is not None else None
        )
        try:
            return [
                await self.publisher.event(
                    "lifecycle", metadata, project=project, location=self.settings.location
                )
            ]
        except CroftError as exc:
            log.warning("could not publish %s for %s: %s", action, source, exc)
            return []


def requestor(connection: HTTPConnection) -> dict[str, str]:
    """Who made a request, as LXD reports it in lifecycle events. The local unix socket
    is root and trusted (like LXD's); a TLS client is its certificate's fingerprint."""
    if connection.url.scheme in ("https", "wss"):
        client = connection.client
        who = identity(connection)
        # An OIDC user is named by email and "oidc", as LXD 5.21 names its requestors.
        protocol = "oidc" if who.auth_method == "oidc" else "tls"
        return {
            "username": who.username,
            "protocol": protocol,
            "address": client.host if client else "",
        }
    return {"username": "root", "protocol": "unix", "address": "@"}


def context(connection: HTTPConnection) -> ApiContext:
    """The ApiContext of the replica serving this request."""
    ctx: ApiContext = connection.app.state.croft
    return ctx
