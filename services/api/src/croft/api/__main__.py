"""`python -m croft.api`: the api service: LXD's REST API on the local unix socket, and
over HTTPS on `core.https_address` when it is set (croft.api.https_listener).

The first replica on a member serves `<state_dir>/unix.socket` (a unix socket has one
listener); every replica serves gRPC and runs operations, so `croft scale api=N` adds
operation and event capacity now. Every replica follows core.https_address and serves
HTTPS on it, sharing the port with SO_REUSEPORT. `api.https_address` in croft.yaml is
only core.https_address's initial value, written to the server config once.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from croft.api import services
from croft.api.app import create_app
from croft.api.context import ApiSettings
from croft.api.domain.cluster import enabled as cluster_enabled
from croft.api.https_listener import HttpsListener, seed_https_address
from croft.api.serving import UnixServer
from croft.api.tls import ensure_server_certificate
from croft.common.service import ServiceContext
from croft.common.service import main as run_service


async def setup(context: ServiceContext) -> None:
    installed = services.install(context)
    await installed.watch("compute")
    config = context.config
    # Made at first start even without HTTPS, as LXD's: `GET /1.0` shows it, and turning
    # HTTPS on later keeps the fingerprint clients may have pinned.
    certificate = ensure_server_certificate(config.state_dir)
    clustered = await cluster_enabled(context.store)
    etcd_client, etcd_peer = "", ""
    if config.etcd.embedded:
        etcd_client = config.etcd.endpoints[0]
        url = urlsplit(etcd_client)
        etcd_peer = f"{url.scheme}://{url.hostname}:{config.etcd.peer_port}"
    settings = ApiSettings(
        server_name=config.member,
        owner_id=f"{config.member}/{context.instance_id}",
        default_pool=config.storage.default_pool or "default",
        default_network=config.network.default_bridge or "croftbr0",
        https_address=config.api.https_address,
        certificate=certificate.pem,
        certificate_key=certificate.key_path.read_text(),
        location=config.member if clustered else "none",
        etcd_client_url=etcd_client,
        etcd_peer_url=etcd_peer,
        state_dir=config.state_dir,
    )
    app = create_app(context.store, settings)
    if not clustered:
        # A member of a cluster has its own address, in its member record (croft init).
        await seed_https_address(context.store, config.api.https_address)
    first = os.environ.get("CROFT_REPLICA", "1") == "1"
    # Another replica has no unix server to run the app's lifespan: its listener does.
    https = HttpsListener(app, certificate, run_lifespan=not first, member=config.member)
    https.install()
    if first:
        server = UnixServer(app, config.state_dir / "unix.socket")
        await server.start()
        context.shutdown_hooks.append(server.stop)
    await https.follow(context.store)
    # Hooks run in reverse: HTTPS stops before the unix server ends the lifespan.
    context.shutdown_hooks.append(https.stop)


def main() -> None:
    run_service("api", setup)


if __name__ == "__main__":
    main()
