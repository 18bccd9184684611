"""`python -m croft.api`: the api service: LXD's REST API on the local unix socket, and
over HTTPS on `api.https_address` when it is set.

The first replica on a member serves `<state_dir>/unix.socket` (a unix socket has one
listener); every replica serves gRPC and runs operations, so `croft scale api=N` adds
operation and event capacity now. HTTPS is served by the first replica too (more
replicas on one port with SO_REUSEPORT: not yet).
"""

from __future__ import annotations

import os

from croft.api import services
from croft.api.app import create_app
from croft.api.context import ApiSettings
from croft.api.serving import HttpsServer, UnixServer
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
    settings = ApiSettings(
        server_name=config.member,
        owner_id=f"{config.member}/{context.instance_id}",
        default_pool=config.storage.default_pool or "default",
        default_network=config.network.default_bridge or "croftbr0",
        https_address=config.api.https_address,
        certificate=certificate.pem,
    )
    app = create_app(context.store, settings)
    if os.environ.get("CROFT_REPLICA", "1") != "1":
        return
    server = UnixServer(app, config.state_dir / "unix.socket")
    await server.start()
    context.shutdown_hooks.append(server.stop)
    if config.api.https_address:
        https = HttpsServer(app, config.api.https_address, certificate)
        await https.start()
        # Hooks run in reverse: HTTPS stops before the unix server ends the lifespan.
        context.shutdown_hooks.append(https.stop)


def main() -> None:
    run_service("api", setup)


if __name__ == "__main__":
    main()
