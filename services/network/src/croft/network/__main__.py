"""`python -m croft.network`: the network service of this host."""

from __future__ import annotations

from croft.common.service import ServiceContext
from croft.common.service import main as run_service
from croft.network.core import NetworkCore
from croft.network.servicer import NetworkServicer
from croft.v1 import network_pb2_grpc


async def setup(context: ServiceContext) -> None:
    core = NetworkCore(context)
    network_pb2_grpc.add_NetworkServicer_to_server(NetworkServicer(core), context.server.grpc)
    # Before the service registers: once compute finds it, the networks must be up.
    await core.start()


def main() -> None:
    run_service("network", setup)


if __name__ == "__main__":
    main()
