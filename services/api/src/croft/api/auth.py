"""Who is calling, and may they: the api's side of authentication.

The local unix socket is root's and trusted, as LXD's is. Over HTTPS a client is the
certificate it presented in the handshake (`croft.api.tls`), and the auth service says
whether that certificate is trusted (answers cached for a couple of seconds per replica,
and forgotten at once when this replica changes the trust store).

An untrusted client reaches only what LXD lets it: `GET /` and `/1.0`, the public images
(`/1.0/images`, `/1.0/images/<fp>`, its `/export`, `/1.0/images/aliases/<name>`), the
simplestreams tree of the public images, and `POST /1.0/certificates` (or, with a pending
identity's token, `POST /1.0/auth/identities/tls`) to add itself with a trust token.
Anything else is LXD's 403 "not authorized". A restricted certificate is held to its
projects and kept off the server-wide endpoints.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import parse_qs

import grpc

from croft.api import responses
from croft.api.access_rules import rule_for
from croft.api.authz import GRANTS_KEY, identity_key, refusal, viewable
from croft.api.direct import FRONTED
from croft.api.domain.images import find_image, secret_grants
from croft.api.entitlements import Grants
from croft.api.identity import SCOPE_KEY, Identity
from croft.api.oidc import OidcSettings, bearer_token, oidc_identity, replica_oidc
from croft.api.services import services
from croft.api.tls import certificate_fingerprint, peer_certificate
from croft.common.clients import AuthClient
from croft.common.errors import Conflict, CroftError, NotFound, PermissionDenied, Unavailable
from croft.common.rpc import from_rpc_error
from croft.v1 import auth_pb2

log = logging.getLogger(__name__)

NOT_AUTHORIZED = "not authorized"
CACHE_SECONDS = 2.0

Scope = MutableMapping[str, Any]
P = ParamSpec("P")
R = TypeVar("R")


# ---------------------------------------------------------------------------- the auth service


async def auth_client() -> AuthClient:
    return await services().auth()


async def auth_call(
    method: Callable[Concatenate[AuthClient, P], Awaitable[R]], *args: P.args, **kwargs: P.kwargs
) -> R:
    """`method` of the auth service (`AuthClient.is_trusted`...) called with `args` and
    `kwargs`; its errors come back as croft errors."""
    client = await auth_client()
    try:
        return await method(client, *args, **kwargs)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None


Lookup = Callable[[str], Awaitable[tuple[bool, dict[str, Any] | None]]]


async def _ask_auth(fingerprint: str) -> tuple[bool, dict[str, Any] | None]:
    reply = await auth_call(AuthClient.is_trusted, auth_pb2.CertificateRef(fingerprint=fingerprint))
    return reply.trusted, json.loads(reply.certificate) if reply.certificate else None


@dataclass
class TrustCache:
    """The auth service's answers, kept `ttl` seconds per fingerprint."""

    lookup: Lookup = _ask_auth
    ttl: float = CACHE_SECONDS
    _answers: dict[str, tuple[float, bool, dict[str, Any] | None]] = field(default_factory=dict)

    async def check(self, fingerprint: str) -> tuple[bool, dict[str, Any] | None]:
        now = time.monotonic()
        cached = self._answers.get(fingerprint)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        trusted, record = await self.lookup(fingerprint)
        if len(self._answers) > 10_000:
            self._answers = {k: v for k, v in self._answers.items() if v[0] > now}
        self._answers[fingerprint] = (now + self.ttl, trusted, record)
        return trusted, record

    def forget(self, fingerprint: str | None = None) -> None:
        """Drop one cached answer (all with None): the trust store just changed."""
        if fingerprint is None:
            self._answers.clear()
        else:
            self._answers.pop(fingerprint, None)


trust_cache = TrustCache()


async def tls_identity(scope: Scope) -> Identity:
    client = scope.get("client")
    address = f"{client[0]}:{client[1]}" if client else ""
    certificate = peer_certificate(scope)
    if certificate is None:
        return Identity("tls", False, address=address)
    fingerprint = certificate_fingerprint(certificate)
    trusted, record = await trust_cache.check(fingerprint)
    record = record or {}
    return Identity(
        "tls",
        trusted,
        fingerprint=fingerprint,
        certificate=certificate,
        name=str(record.get("name", "")),
        restricted=bool(record.get("restricted", False)),
        projects=tuple(record.get("projects") or ()),
        address=address,
    )


# ---------------------------------------------------------------------------- the rules

_FP = r"[0-9a-fA-F]+"
# (method, path) an untrusted client may use; the handlers show it public things only.
_UNTRUSTED: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (method, re.compile(pattern))
    for method, pattern in (
        ("GET", r"/"),
        ("GET", r"/1\.0/?"),
        ("GET", r"/1\.0/images/?"),
        ("GET", rf"/1\.0/images/{_FP}/?"),
        ("GET", rf"/1\.0/images/{_FP}/export/?"),
        ("GET", r"/1\.0/images/aliases/.+"),
        ("POST", r"/1\.0/certificates/?"),
        # LXD 5.21's way to redeem a pending identity's token (`trust_token`).
        ("POST", r"/1\.0/auth/identities/tls/?"),
        # A joining member holds a join token, not a trusted certificate.
        ("POST", r"/internal/cluster/join"),
        ("GET", r"/streams/v1/[^/]+\.json"),
        ("GET", r"/images/.+"),
    )
)
# Server-wide endpoints a restricted certificate may not change.
_SERVER_WIDE = re.compile(r"/1\.0/?$|/1\.0/(certificates|storage-pools|projects|cluster)(/|$)")


def untrusted_may(method: str, path: str) -> bool:
    method = "GET" if method == "HEAD" else method
    return any(m == method and p.fullmatch(path) for m, p in _UNTRUSTED)


def restricted_may(who: Identity, method: str, path: str, query: str) -> bool:
    """LXD's restricted certificates: their projects only, nothing server-wide changed,
    and no view across every project (`all-projects`)."""
    params = parse_qs(query)
    if (params.get("all-projects") or [""])[0].lower() == "true":
        return False
    if path.startswith("/1.0/auth/"):
        # Groups, identities and mappings grant what the trust store does: none of its
        # business, not even to read; who it is, it may ask.
        return method in ("GET", "HEAD") and path == "/1.0/auth/identities/current"
    if _SERVER_WIDE.match(path):
        return method in ("GET", "HEAD")
    project = (params.get("project") or ["default"])[0]
    return project in who.projects


Visible = Callable[[str], bool]


def _in_projects(who: Identity) -> Visible:
    def visible(url: str) -> bool:
        project = (parse_qs(url.partition("?")[2]).get("project") or ["default"])[0]
        return project in who.projects

    return visible


def _viewable(held: Grants) -> Visible:
    def visible(url: str) -> bool:
        return viewable(held, url)

    return visible


def _filter_used_by(visible: Visible, metadata: Any) -> Any:
    """LXD's FilterUsedBy over a response's objects: no `used_by` entry the client may not
    see (of another project, for a restricted certificate)."""
    if isinstance(metadata, list):
        return [_filter_used_by(visible, item) for item in metadata]
    if isinstance(metadata, dict) and isinstance(metadata.get("used_by"), list):
        return {
            **metadata,
            "used_by": [u for u in metadata["used_by"] if not isinstance(u, str) or visible(u)],
        }
    return metadata


# The endpoints whose objects have `used_by` (the rest are not held back to filter).
_USED_BY = re.compile(r"/1\.0/(profiles|networks|storage-pools|projects)(/|$)")


def _used_by_filter(visible: Visible, send: Any) -> Any:
    """`send`, holding back a JSON response to a restricted client until it is whole, to
    take out of it what the client may not see, whichever handler made it (profiles,
    networks, pools, volumes... all name instances of every project)."""
    start: dict[str, Any] = {}
    body = bytearray()

    async def filtering(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers") or []).get(b"content-type", b"")
            if b"json" not in content_type:
                start["pass"] = True
                await send(message)
                return
            start.update(message)
            return
        if start.get("pass") or message["type"] != "http.response.body":
            await send(message)
            return
        body.extend(message.get("body", b""))
        if message.get("more_body"):
            return
        payload = bytes(body)
        try:
            document = json.loads(payload)
            if isinstance(document, dict) and "metadata" in document:
                document["metadata"] = _filter_used_by(visible, document["metadata"])
                payload = responses.render(document)
        except ValueError:
            pass
        await send(
            {
                **start,
                "headers": [
                    (k, str(len(payload)).encode() if k.lower() == b"content-length" else v)
                    for k, v in start.get("headers") or []
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return filtering


# ---------------------------------------------------------------------------- the middleware


class AccessMiddleware:
    """Puts the caller's Identity in every request's scope and turns away what they may
    not do, before any handler runs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (
            FRONTED in scope
            or scope["type"] not in ("http", "websocket")
            or scope.get("scheme")
            not in (
                "https",
                "wss",
            )
        ):
            await self.app(scope, receive, send)
            return
        oidc: OidcSettings | None = None
        bearer: Identity | None = None
        if (authorization := bearer_token(scope)) is not None:
            state = replica_oidc(scope["app"].state)
            try:
                bearer, oidc = await oidc_identity(
                    state, scope["app"].state.croft.store, scope, authorization
                )
            except CroftError as exc:
                await _refuse(scope, receive, send, exc, state.settings_now())
                return
        try:
            who = bearer or await tls_identity(scope)
        except CroftError as exc:
            log.warning("cannot check a client's certificate: %s", exc)
            await _refuse(scope, receive, send, Unavailable(f"Cannot check trust: {exc.message}"))
            return
        scope[SCOPE_KEY] = who
        method, path = scope.get("method", "GET"), scope.get("path", "")
        query = scope.get("query_string", b"").decode("latin-1")
        allowed = (
            untrusted_may(method, path)
            if not who.trusted
            else not who.restricted or restricted_may(who, method, path, query)
        )
        if not allowed:
            if not who.trusted and oidc is None:
                state = replica_oidc(scope["app"].state)
                oidc = await state.settings(scope["app"].state.croft.store)
            await _refuse(scope, receive, send, PermissionDenied(NOT_AUTHORIZED), oidc)
            return
        if not who.trusted and (export := _EXPORT.fullmatch(path)):
            try:
                await _require_public_image(scope, export.group(1), query)
            except CroftError as exc:
                await _refuse(scope, receive, send, exc)
                return
        visible: Visible | None = _in_projects(who) if who.restricted else None
        if who.trusted and not who.restricted:
            try:
                held = await held_to_grants(scope, who, method, path, query)
            except CroftError as exc:
                await _refuse(scope, receive, send, exc)
                return
            if held is not None:
                visible = _viewable(held)
        if (
            visible is not None
            and scope["type"] == "http"
            and method == "GET"
            and _USED_BY.match(path)
        ):
            send = _used_by_filter(visible, send)
        await self.app(scope, receive, send)


async def held_to_grants(
    scope: Scope, who: Identity, method: str, path: str, query: str
) -> Grants | None:
    """For a caller grants hold (`croft.api.authz`): the one question this endpoint asks
    (`access_rules.rule_for`), answered or refused; the grants are left in the scope for
    the handler's own questions (what a list shows). None for a caller grants do not hold."""
    ctx = scope["app"].state.croft
    state = await ctx.authorizer.state()
    if who.auth_method == "oidc" and ("oidc", who.id) not in state.identities:
        await _remember_oidc_user(ctx, who)
    held: Grants | None = state.grants_of(who)
    if held is None:
        return None
    scope[GRANTS_KEY] = held
    project = (parse_qs(query).get("project") or ["default"])[0]
    rule = rule_for(method, path, project)
    if rule is None:
        raise PermissionDenied("Forbidden")
    if not isinstance(rule, str):
        refusal(held, *rule)
    return held


async def _remember_oidc_user(ctx: Any, who: Identity) -> None:
    """An OIDC user is recorded at its first request, as LXD records it at its first
    login, so that `/1.0/auth/identities/oidc` lists it to be put in groups. A store that
    refuses the write now does not refuse the request: the next one tries again."""
    record = {"authentication_method": "oidc", "id": who.id, "name": who.name, "groups": []}
    try:
        await ctx.store.create_json(identity_key("oidc", who.id), record)
    except Conflict:
        pass  # another replica, or a request racing this one, wrote it
    except CroftError as exc:
        log.warning("cannot record OIDC user %s: %s", who.id, exc.message)
        return
    ctx.authorizer.changed()


# The scope key under which the middleware marks an export it allowed by an image secret.
SECRET_GRANTED = "croft.image_secret"

_EXPORT = re.compile(rf"/1\.0/images/({_FP})/export/?")


async def _require_public_image(scope: Scope, fingerprint: str, query: str) -> None:
    """LXD's export for an untrusted client: public images, or a private one whose secret
    (`?secret=`, from POST /1.0/images/<fp>/secret) it presents, once; else not found."""
    ctx = scope["app"].state.croft
    params = parse_qs(query)
    project = (params.get("project") or ["default"])[0]
    record, _ = await find_image(ctx.store, project, fingerprint.lower())
    secret = (params.get("secret") or [""])[0]
    if record.get("public"):
        return
    if not await secret_grants(ctx, project, record["fingerprint"], secret, use_up=True):
        raise NotFound(f'Image "{record["fingerprint"]}" not found')
    scope[SECRET_GRANTED] = record["fingerprint"]  # the export handler lets this one through


async def _refuse(
    scope: Scope, receive: Any, send: Any, error: CroftError, oidc: OidcSettings | None = None
) -> None:
    """Answer `error`; with OIDC on, LXD's `X-LXD-OIDC-*` headers say where to log in."""
    if scope["type"] == "websocket":
        # Closing before accepting answers the upgrade with a 403.
        await send({"type": "websocket.close", "code": 1008})
        return
    response = responses.error(error)
    if oidc is not None:
        response.headers.update(oidc.headers())
    await response(scope, receive, send)
