"""A typed client per croft service: `compute.change_state(request)`, not
`call("ChangeState", request)`. Each wraps the `ServiceClient` transport
(`croft.common.rpc`); nothing outside this package and `rpc` names an RPC by string."""

from croft.common.clients._base import RequestStream, TypedClient
from croft.common.clients.auth import AuthClient
from croft.common.clients.compute import ComputeClient
from croft.common.clients.images import ImagesClient
from croft.common.clients.network import NetworkClient
from croft.common.clients.node import NodeClient
from croft.common.clients.storage import StorageClient

__all__ = [
    "AuthClient",
    "ComputeClient",
    "ImagesClient",
    "NetworkClient",
    "NodeClient",
    "RequestStream",
    "StorageClient",
    "TypedClient",
]
