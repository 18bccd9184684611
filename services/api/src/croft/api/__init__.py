"""croft's api service: LXD's REST API (`/1.0`) over the cluster store."""

from croft.api.app import ApiContext, ApiSettings, create_app
from croft.api.operations import OperationContext, OperationManager, WebsocketHandler
from croft.api.serving import UnixServer, serve_unix

__all__ = [
    "ApiContext",
    "ApiSettings",
    "OperationContext",
    "OperationManager",
    "UnixServer",
    "WebsocketHandler",
    "create_app",
    "serve_unix",
]
