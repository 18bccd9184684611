"""OpenID Connect: who a bearer token says the caller is, as LXD 5.21 checks it.

The server keys `oidc.issuer`, `oidc.client.id`, `oidc.audience` and `oidc.groups.claim`
(LXD's names) turn it on: with an issuer and a client ID set, a request over HTTPS that
carries `Authorization: Bearer <access token>` is the token's subject, once the token is
verified offline against the issuer's discovery document and keys (JWKS):

- the signature, by a key the issuer publishes, with an asymmetric algorithm the key is
  made for (`alg: none`, HMAC with the public key as the secret, and a key of another type
  are refused before any signature is computed);
- `iss` is the configured issuer, `aud` holds `oidc.audience` when that is set (as LXD,
  no audience check without it), `exp` is in the future and `nbf` (if any) in the past,
  within `LEEWAY` seconds; `sub` is present.

A token naming a key id (`kid`) the cached JWKS lacks makes the verifier fetch the JWKS
again (the issuer rotated its keys), at most once per `REFETCH_INTERVAL`, so that made-up
key ids cannot make croft hammer the provider. The JWKS and the discovery document are
fetched again after `KEYS_TTL` anyway, so a key the issuer withdrew stops working.

Identity-provider groups come from the token's `oidc.groups.claim`. A token without
that claim (many providers keep groups out of access tokens) has them from the issuer's
userinfo endpoint instead, asked once with the token itself, as LXD asks it; a provider
that will not answer leaves the user in no provider group (fewer rights, never more).

An access token that is not a JWT (an opaque token) cannot be checked offline: as LXD 6
does with every bearer token, croft asks the issuer's userinfo endpoint who holds it
(its `sub`, `email` and groups claim), and trusts the answer for `USERINFO_TTL` seconds.
Only without `oidc.audience`: an opaque token cannot show that it was issued for croft,
so with an audience configured it is refused as malformed.

A verified token is remembered until it expires: the next request with it costs a dict
lookup and a clock read (bench/oidc.py). The settings are read from the server config
(the api's in-memory mirror of the store) on every bearer request, so a change through
`PUT /1.0` applies at once on every replica; a new issuer gets a new verifier.

A refused token is LXD's 401 with the `X-LXD-OIDC-*` headers that tell a client where to
log in (the device-code flow of `croft login`); nothing of the token is echoed back.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from croft.api.identity import Identity
from croft.api.records import SERVER_CONFIG_KEY
from croft.common.errors import PermissionDenied, Unauthenticated
from croft.common.store import Entry, Store

log = logging.getLogger(__name__)

ISSUER = "oidc.issuer"
CLIENT_ID = "oidc.client.id"
AUDIENCE = "oidc.audience"
GROUPS_CLAIM = "oidc.groups.claim"
KEYS = (ISSUER, CLIENT_ID, AUDIENCE, GROUPS_CLAIM)

# Signature algorithms a token may use: asymmetric only. HS* would let anyone who knows
# the public key (everyone) sign; "none" signs nothing.
ALGORITHMS = frozenset(
    ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
)
LEEWAY = 5.0  # seconds of clock skew allowed on exp, nbf and iat
REFETCH_INTERVAL = 5.0  # at most one JWKS fetch for unknown key ids per this many seconds
KEYS_TTL = 3600.0  # the discovery document and the JWKS are fetched again after this
FETCH_TIMEOUT = 10.0
USERINFO_TTL = 60.0  # seconds an opaque token's userinfo answer is trusted
CACHE_SIZE = 10_000  # verified tokens remembered


# ---------------------------------------------------------------------------- settings


def check_issuer(value: str) -> None:
    """`oidc.issuer`: an http(s) URL with a host, no query or fragment."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("Must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or any(c.isspace() for c in value):
        raise ValueError("Must be a URL without a query, fragment or blanks")


def check_token_field(value: str) -> None:
    """`oidc.client.id`, `oidc.audience`, `oidc.groups.claim`: printable, no blanks."""
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError("Must not contain blanks or control characters")


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    client_id: str
    audience: str = ""
    groups_claim: str = ""

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> OidcSettings | None:
        """The settings in a server config; None unless an issuer and a client ID are set
        (LXD turns OIDC on only with both)."""
        issuer, client_id = str(config.get(ISSUER) or ""), str(config.get(CLIENT_ID) or "")
        if not issuer or not client_id:
            return None
        return cls(
            issuer, client_id, str(config.get(AUDIENCE) or ""), str(config.get(GROUPS_CLAIM) or "")
        )

    def headers(self) -> dict[str, str]:
        """What LXD tells a client that must log in (its lxc client reads these)."""
        return {
            "X-LXD-OIDC-issuer": self.issuer,
            "X-LXD-OIDC-clientid": self.client_id,
            "X-LXD-OIDC-audience": self.audience,
            "X-LXD-OIDC-groups-claim": self.groups_claim,
        }


# ---------------------------------------------------------------------------- verification


class TokenRefused(Exception):
    """The token does not prove who the caller is (401); the message says why, in words
    that hold nothing of the token."""


class ProviderUnreachable(Exception):
    """The issuer's discovery document or keys could not be had (403, as LXD)."""


@dataclass(frozen=True)
class TokenUser:
    """What a verified token says."""

    subject: str
    name: str
    groups: tuple[str, ...]
    expires: float
    not_before: float
    # An opaque token's user: past `expires` the userinfo endpoint is asked again (a
    # JWT's user past its `exp` is refused).
    recheck: bool = False


@dataclass
class Verifier:
    """Verifies access tokens of one issuer with one set of settings."""

    settings: OidcSettings
    refetch_interval: float = REFETCH_INTERVAL
    keys_ttl: float = KEYS_TTL
    _keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    _explicit: dict[str, bool] = field(default_factory=dict)  # the JWK says its "alg"
    _keys_fetched: float = 0.0  # monotonic time of the last JWKS fetch (0: never)
    _jwks_uri: str = ""
    _userinfo_uri: str = ""  # the discovery document's userinfo_endpoint ("" if none)
    _fetch_error: str = ""  # why the last fetch failed ("" if it did not)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _verified: dict[str, TokenUser] = field(default_factory=dict)
    jwks_fetches: int = 0  # how many times the JWKS was fetched (tests, the bench)

    async def verify(self, token: str) -> TokenUser:
        """The token's user; TokenRefused or ProviderUnreachable."""
        now = time.time()
        known = self._verified.get(token)
        if known is not None:
            if known.not_before - LEEWAY <= now < known.expires + LEEWAY:
                return known
            del self._verified[token]
            if not known.recheck:
                raise TokenRefused("Token has expired")
        user = await self._verify(token)
        if len(self._verified) >= CACHE_SIZE:
            self._verified = {t: u for t, u in self._verified.items() if u.expires + LEEWAY > now}
            if len(self._verified) >= CACHE_SIZE:
                self._verified.clear()
        self._verified[token] = user
        return user

    async def _verify(self, token: str) -> TokenUser:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            if token.count(".") == 2 or self.settings.audience:
                raise TokenRefused("Malformed token") from None
            return await self._opaque_user(token)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise TokenRefused("Token signing algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRefused("Malformed token")
        key = await self._key(kid or "")
        if key is None:
            raise TokenRefused("Token signed by an unknown key")
        if key.algorithm_name != algorithm and self._explicit.get(kid or "", False):
            # The JWK names its algorithm; otherwise PyJWT refuses a key of another type.
            raise TokenRefused("Token signing algorithm does not match its key")
        settings = self.settings
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                issuer=settings.issuer,
                audience=settings.audience or None,
                leeway=LEEWAY,
                options={
                    "require": ["exp", "iss", "sub"],
                    "verify_aud": bool(settings.audience),
                },
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused("Token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("Token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused(
                "Provided OIDC token doesn't allow the configured audience"
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenRefused("Token was issued by another issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("Token signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused(f'Token lacks the "{exc.claim}" claim') from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise TokenRefused("Token is invalid") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenRefused("Token has no subject")
        email = claims.get("email")
        name = email if isinstance(email, str) and email else subject
        groups = self._groups(claims)
        if settings.groups_claim and settings.groups_claim not in claims:
            groups = await self._groups_from_userinfo(token, subject)
        return TokenUser(
            subject=subject,
            name=name,
            groups=groups,
            expires=float(claims["exp"]),
            not_before=float(claims.get("nbf") or 0),
        )

    async def _groups_from_userinfo(self, token: str, subject: str) -> tuple[str, ...]:
        """The groups claim as the userinfo endpoint tells it for a verified token that
        lacks it; none when the endpoint will not tell (the token stays good)."""
        try:
            claims = await self._userinfo(token)
        except (TokenRefused, ProviderUnreachable) as exc:
            log.warning("OIDC: no groups for %s from the userinfo endpoint: %s", subject, exc)
            return ()
        if claims.get("sub") != subject:
            log.warning("OIDC: the userinfo endpoint named another subject than the token")
            return ()
        return self._groups(claims)

    async def _opaque_user(self, token: str) -> TokenUser:
        """Who holds an opaque access token, as the issuer's userinfo endpoint says."""
        claims = await self._userinfo(token)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenRefused("The user info endpoint named no subject")
        email = claims.get("email")
        return TokenUser(
            subject=subject,
            name=email if isinstance(email, str) and email else subject,
            groups=self._groups(claims),
            expires=time.time() + USERINFO_TTL,
            not_before=0.0,
            recheck=True,
        )

    async def _userinfo(self, token: str) -> dict[str, Any]:
        """The userinfo endpoint's claims for `token`. TokenRefused when the provider
        refuses the token, ProviderUnreachable when it cannot be asked."""
        uri = await self._userinfo_endpoint()
        async with httpx.AsyncClient(
            verify=_tls_context(), timeout=FETCH_TIMEOUT, follow_redirects=False
        ) as http:
            try:
                reply = await http.get(uri, headers={"Authorization": f"Bearer {token}"})
            except httpx.HTTPError as exc:
                raise ProviderUnreachable(f"Cannot reach the user info endpoint: {exc}") from None
        if reply.status_code in (400, 401, 403):
            raise TokenRefused("Failed calling user info endpoint with given access token")
        if not reply.is_success:
            raise ProviderUnreachable(f"The user info endpoint answered {reply.status_code}")
        try:
            claims = reply.json()
        except json.JSONDecodeError:
            raise ProviderUnreachable("The user info endpoint answered no JSON") from None
        if not isinstance(claims, dict):
            raise ProviderUnreachable("The user info endpoint answered no JSON object")
        return claims

    async def _userinfo_endpoint(self) -> str:
        if not self._userinfo_uri:
            async with self._lock:
                if not self._userinfo_uri:
                    since = time.monotonic() - self._keys_fetched
                    if not self._keys_fetched or since >= self.refetch_interval:
                        await self._fetch_keys(rediscover=True)
        if not self._userinfo_uri:
            raise ProviderUnreachable("The discovery document has no userinfo_endpoint")
        return self._userinfo_uri

    def _groups(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        claim = self.settings.groups_claim
        if not claim:
            return ()
        found = claims.get(claim)
        if not isinstance(found, list):
            if found is not None:
                log.warning("OIDC groups claim %r is not a list; ignored", claim)
            return ()
        return tuple(g for g in found if isinstance(g, str))

    async def _key(self, kid: str) -> jwt.PyJWK | None:
        key = self._keys.get(kid)
        stale = time.monotonic() - self._keys_fetched > self.keys_ttl
        if key is not None and not stale:
            return key
        async with self._lock:
            key = self._keys.get(kid)
            since = time.monotonic() - self._keys_fetched
            if key is not None and since <= self.keys_ttl:
                return key  # another request fetched meanwhile
            if self._keys_fetched and since < self.refetch_interval:
                # An unknown kid: fetched a moment ago already (or failed to be).
                if key is None and self._fetch_error:
                    raise ProviderUnreachable(self._fetch_error)
                return key
            try:
                await self._fetch_keys(rediscover=stale or not self._jwks_uri)
            except ProviderUnreachable as exc:
                self._fetch_error = str(exc)
                if key is not None:
                    log.warning("OIDC: %s; keeping the keys fetched before", exc)
                    return key
                raise
            self._fetch_error = ""
            return self._keys.get(kid)

    async def _fetch_keys(self, *, rediscover: bool) -> None:
        self._keys_fetched = time.monotonic()  # a failed fetch counts too: rate-limited
        issuer = self.settings.issuer
        async with httpx.AsyncClient(
            verify=_tls_context(), timeout=FETCH_TIMEOUT, follow_redirects=False
        ) as http:
            try:
                if rediscover or not self._jwks_uri:
                    found = await http.get(issuer.rstrip("/") + "/.well-known/openid-configuration")
                    found.raise_for_status()
                    document = found.json()
                    if not isinstance(document, dict) or document.get("issuer") != issuer:
                        raise ProviderUnreachable(
                            "The discovery document names another issuer than oidc.issuer"
                        )
                    uri = document.get("jwks_uri")
                    if not isinstance(uri, str) or urlsplit(uri).scheme not in ("http", "https"):
                        raise ProviderUnreachable("The discovery document has no jwks_uri")
                    self._jwks_uri = uri
                    userinfo = document.get("userinfo_endpoint")
                    if isinstance(userinfo, str) and urlsplit(userinfo).scheme in (
                        "http",
                        "https",
                    ):
                        self._userinfo_uri = userinfo
                reply = await http.get(self._jwks_uri)
                reply.raise_for_status()
                jwks = reply.json()
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                raise ProviderUnreachable(f"Cannot get the OpenID provider's keys: {exc}") from None
        self.jwks_fetches += 1
        keys: dict[str, jwt.PyJWK] = {}
        explicit: dict[str, bool] = {}
        for item in jwks.get("keys", []) if isinstance(jwks, dict) else []:
            if not isinstance(item, dict) or item.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(item)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue  # a key type or algorithm croft does not verify with
            if key.algorithm_name not in ALGORITHMS:
                continue
            keys[str(item.get("kid", ""))] = key
            explicit[str(item.get("kid", ""))] = "alg" in item
        self._keys, self._explicit = keys, explicit


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The system's CAs, loaded once (a new httpx client would load them each time)."""
    return ssl.create_default_context()


# ---------------------------------------------------------------------------- per replica


@dataclass
class Oidc:
    """One replica's OIDC state: the settings last read and their verifier."""

    _entry: bytes | None = None
    _settings: OidcSettings | None = None
    _verifier: Verifier | None = None

    def settings_of(self, entry: Entry | None) -> OidcSettings | None:
        value = entry.value if entry is not None else None
        if value != self._entry:
            config = json.loads(value).get("config", {}) if value else {}
            self._settings = OidcSettings.of(config)
            self._entry = value
        return self._settings

    def settings_now(self) -> OidcSettings | None:
        """The settings last read (no store read)."""
        return self._settings

    async def settings(self, store: Store) -> OidcSettings | None:
        return self.settings_of(await store.get(SERVER_CONFIG_KEY))

    def verifier(self, settings: OidcSettings) -> Verifier:
        if self._verifier is None or self._verifier.settings != settings:
            self._verifier = Verifier(settings)
        return self._verifier


def replica_oidc(state: Any) -> Oidc:
    """The replica's OIDC state, kept on its app's `state` (one for both ways in:
    croft.api.direct's front and FastAPI)."""
    found = getattr(state, "oidc", None)
    if not isinstance(found, Oidc):
        found = Oidc()
        state.oidc = found
    return found


def bearer_token(scope: MutableMapping[str, Any]) -> str | None:
    """The request's `Authorization` header's value; None without one."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None


async def oidc_identity(
    oidc: Oidc, store: Store, scope: MutableMapping[str, Any], authorization: str
) -> tuple[Identity | None, OidcSettings | None]:
    """The caller a bearer token proves, and the OIDC settings; (None, settings) when OIDC
    is off (None): the request is then judged by its certificate, as LXD does.

    Raises Unauthenticated (a bad token) or PermissionDenied (the provider cannot be
    reached), with LXD's messages."""
    settings = await oidc.settings(store)
    if settings is None:
        return None, None
    scheme, _, token = authorization.partition(" ")
    if scheme != "Bearer" or not token.strip():
        raise Unauthenticated(
            "Failed OIDC Authentication: Failed to authenticate: "
            "Bad authorization token, expected a Bearer token"
        )
    try:
        user = await oidc.verifier(settings).verify(token.strip())
    except TokenRefused as exc:
        raise Unauthenticated(
            f"Failed OIDC Authentication: Failed to authenticate: "
            f"Failed to verify access token: {exc}"
        ) from None
    except ProviderUnreachable as exc:
        log.warning("OIDC: %s", exc)
        raise PermissionDenied(f"Failed OIDC Authentication: Authorization failed: {exc}") from None
    client = scope.get("client")
    return (
        Identity(
            "tls",
            True,
            name=user.name,
            address=f"{client[0]}:{client[1]}" if client else "",
            method="oidc",
            subject=user.subject,
            groups=user.groups,
        ),
        settings,
    )
