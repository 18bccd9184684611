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
    # How the caller proved who it is: "unix" (the socket), "tls" (a client certificate)
    # or "oidc" (a bearer token; then `subject` is the token's `sub`, `name` its email or
    # subject, and `groups` the identity provider's groups from `oidc.groups.claim`).
    # Authorization (groups, entitlements) keys an identity by (method, id).
    method: Literal["unix", "tls", "oidc"] | None = None
    subject: str = ""
    groups: tuple[str, ...] = ()

    @property
    def auth_method(self) -> Literal["unix", "tls", "oidc"]:
        """LXD's `auth_user_method`: the method, or the transport when none was named."""
        return self.method or self.protocol

    @property
    def id(self) -> str:
        """The identity's key for authorization: the certificate's fingerprint (tls), the
        token's subject (oidc), root on the socket."""
        if self.auth_method == "oidc":
            return self.subject
        return self.username

    @property
    def username(self) -> str:
        """LXD's requestor username: root on the socket, the fingerprint over TLS, the
        name (email) of an OIDC user."""
        if self.auth_method == "oidc":
            return self.name or self.subject
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
