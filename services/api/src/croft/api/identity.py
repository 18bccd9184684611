"""Who is calling: the `Identity` that `auth.AccessMiddleware` puts in a request's scope.

Kept apart from the middleware so that anything may ask who called (the requestor of a
lifecycle event, a handler showing public things only) without importing the checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from starlette.requests import HTTPConnection

SCOPE_KEY = "croft.identity"


@dataclass(frozen=True)
class Identity:
    """The caller of one request."""

    protocol: Literal["unix", "tls"]
    trusted: bool
    fingerprint: str = ""  # of the client certificate (tls)
    certificate: str = ""  # the client certificate, PEM (tls; "" when it sent none)
    name: str = ""
    restricted: bool = False
    projects: tuple[str, ...] = ()
    address: str = ""

    @property
    def username(self) -> str:
        """LXD's requestor username: root on the socket, the fingerprint over TLS."""
        return "root" if self.protocol == "unix" else self.fingerprint


ROOT = Identity("unix", True, name="root", address="@")


def identity(connection: HTTPConnection) -> Identity:
    """The caller of this request (the unix socket's root when no check ran)."""
    found = connection.scope.get(SCOPE_KEY)
    return found if isinstance(found, Identity) else ROOT


def may_use_project(connection: HTTPConnection, project: str) -> bool:
    """Whether the caller may see and change what project `project` holds: everyone but
    a restricted certificate, which keeps to its own projects."""
    who = identity(connection)
    return not who.restricted or project in who.projects
