"""`python -m croft.api`: the api service: LXD's REST API on the local unix socket.

The first replica on a member serves `<state_dir>/unix.socket` (a unix socket has one
listener); every replica serves gRPC and runs operations, so `croft scale api=N` adds
operation and event capacity now and REST capacity once HTTPS (one port, SO_REUSEPORT)
lands.
"""

from __future__ import annotations

import os

from croft.api import services
from croft.api.app import ApiSettings, create_app
from croft.api.serving import UnixServer
from croft.common.service import ServiceContext
from croft.common.service import main as run_service


async def setup(context: ServiceContext) -> None:
    installed = services.install(context)
    await installed.watch("compute")
    config = context.config
    settings = ApiSettings(
        server_name=config.member,
        owner_id=f"{config.member}/{context.instance_id}",
        default_pool=config.storage.default_pool or "default",
        default_network=config.network.default_bridge or "croftbr0",
    )
    app = create_app(context.store, settings)
    if os.environ.get("CROFT_REPLICA", "1") != "1":
        return
    server = UnixServer(app, config.state_dir / "unix.socket")
    await server.start()
    context.shutdown_hooks.append(server.stop)


def main() -> None:
    run_service("api", setup)


if __name__ == "__main__":
    main()
