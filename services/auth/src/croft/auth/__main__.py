"""`python -m croft.auth`: the auth service (the TLS trust store and trust tokens)."""

from __future__ import annotations

from croft.auth.core import TrustStore
from croft.auth.servicer import AuthServicer
from croft.common.service import ServiceContext
from croft.common.service import main as run_service
from croft.v1 import auth_pb2_grpc


async def setup(context: ServiceContext) -> None:
    servicer = AuthServicer(TrustStore(context.store))
    auth_pb2_grpc.add_AuthServicer_to_server(servicer, context.server.grpc)


def main() -> None:
    run_service("auth", setup)


if __name__ == "__main__":
    main()
