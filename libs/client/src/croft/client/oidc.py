"""OpenID Connect for clients of a croft (or LXD) remote: `croft login REMOTE` and the
bearer tokens it keeps.

A remote is one the `lxc` client knows (`config.yml` in `$LXD_CONF`, else ~/.config/lxc,
with its pinned certificate in `servercerts/NAME.crt`). `login` asks the remote where to
log in (the `X-LXD-OIDC-*` headers of a refused request, as LXD's lxc client does), runs
the OAuth 2.0 device authorization grant (RFC 8628) against that issuer: the user opens
the URL shown and enters the code, and the tokens are stored in
`oidctokens/NAME.json` (mode 0600, where LXD 5.21's lxc keeps them).

`OidcAuth` is an `httpx.Auth` that sends the stored access token, refreshing it with the
refresh token when it has expired (or when the remote answers 401), and storing the new
tokens; `remote_client` makes an httpx client for a remote with it. `croft query` uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from croft.client.images_cli import _lxc_remotes, lxc_config_dir
from croft.common.errors import CroftError, InvalidArgument, NotFound, Unauthenticated, Unavailable

SCOPES = "openid offline_access email profile"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
TIMEOUT = 30.0
EXPIRY_MARGIN = 10.0  # refresh this many seconds before the access token expires


@dataclass(frozen=True)
class Remote:
    name: str
    address: str  # https://host:port
    certificate: str  # PEM pinned for it ("" = the system's CAs)
    config_dir: Path

    @classmethod
    def named(cls, name: str, config_dir: Path | None = None) -> Remote:
        directory = config_dir or lxc_config_dir()
        remotes = _lxc_remotes(directory)
        if name not in remotes:
            known = ", ".join(sorted(remotes)) or "none"
            raise NotFound(f"Remote {name!r} not found in {directory} (remotes: {known})")
        address = str(remotes[name].get("addr") or "").rstrip("/")
        if not address.startswith("https://"):
            raise InvalidArgument(f"Remote {name!r} is not an https:// remote ({address!r})")
        pinned = directory / "servercerts" / f"{name}.crt"
        certificate = pinned.read_text() if pinned.is_file() else ""
        return cls(name, address, certificate, directory)

    @property
    def tokens_path(self) -> Path:
        return self.config_dir / "oidctokens" / f"{self.name}.json"

    def ssl_context(self) -> ssl.SSLContext:
        if not self.certificate:
            return ssl.create_default_context()
        # The pinned certificate is the only one trusted, whatever name it carries (as lxc).
        context = ssl.create_default_context(cadata=self.certificate)
        context.check_hostname = False
        client_cert = self.config_dir / "client.crt"
        client_key = self.config_dir / "client.key"
        if client_cert.is_file() and client_key.is_file():
            context.load_cert_chain(str(client_cert), str(client_key))
        return context


@dataclass(frozen=True)
class LoginSettings:
    """Where to log in, as the remote says (`X-LXD-OIDC-*`)."""

    issuer: str
    client_id: str
    audience: str = ""
    groups_claim: str = ""


def login_settings(remote: Remote) -> LoginSettings:
    """Ask the remote where its users log in: a request it refuses to strangers."""
    with httpx.Client(verify=remote.ssl_context(), timeout=TIMEOUT) as http:
        try:
            reply = http.get(f"{remote.address}/1.0/instances")
        except httpx.HTTPError as exc:
            raise Unavailable(f"Cannot reach {remote.address}: {exc}") from None
    issuer = reply.headers.get("X-LXD-OIDC-issuer", "")
    client_id = reply.headers.get("X-LXD-OIDC-clientid", "")
    if not issuer or not client_id:
        raise InvalidArgument(f"Remote {remote.name!r} does not offer OpenID Connect logins")
    return LoginSettings(
        issuer,
        client_id,
        reply.headers.get("X-LXD-OIDC-audience", ""),
        reply.headers.get("X-LXD-OIDC-groups-claim", ""),
    )


def _discover(http: httpx.Client, issuer: str) -> dict[str, Any]:
    try:
        reply = http.get(issuer.rstrip("/") + "/.well-known/openid-configuration")
        reply.raise_for_status()
        document: dict[str, Any] = reply.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise Unavailable(f"Cannot read the discovery document of {issuer}: {exc}") from None
    if document.get("issuer") != issuer:
        raise InvalidArgument(f"The discovery document of {issuer} names another issuer")
    return document


def _token_error(reply: httpx.Response) -> str:
    try:
        body = reply.json()
        return str(body.get("error_description") or body.get("error") or reply.status_code)
    except ValueError:
        return str(reply.status_code)


def login(
    remote: Remote,
    *,
    show: Callable[[str, str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """The device-code flow for `remote`; `show(url, code)` tells the user what to do.
    The tokens are stored and returned."""
    settings = login_settings(remote)
    with httpx.Client(timeout=TIMEOUT) as http:
        document = _discover(http, settings.issuer)
        endpoint = document.get("device_authorization_endpoint")
        if not isinstance(endpoint, str):
            raise InvalidArgument(f"{settings.issuer} offers no device authorization")
        form = {"client_id": settings.client_id, "scope": SCOPES}
        if settings.audience:
            form["audience"] = settings.audience  # as LXD's lxc (Auth0 and others need it)
        reply = http.post(endpoint, data=form)
        if not reply.is_success:
            raise InvalidArgument(f"Device authorization refused: {_token_error(reply)}")
        started = reply.json()
        url = started.get("verification_uri_complete") or started["verification_uri"]
        show(str(url), str(started["user_code"]))
        interval = float(started.get("interval") or 5)
        deadline = time.monotonic() + float(started.get("expires_in") or 600)
        while True:
            sleep(interval)
            reply = http.post(
                str(document["token_endpoint"]),
                data={
                    "grant_type": DEVICE_GRANT,
                    "device_code": started["device_code"],
                    "client_id": settings.client_id,
                },
            )
            if reply.is_success:
                break
            error = ""
            with contextlib.suppress(ValueError):
                error = str(reply.json().get("error", ""))
            if error == "slow_down":
                interval += 5
            elif error != "authorization_pending" or time.monotonic() > deadline:
                raise Unauthenticated(f"Login failed: {_token_error(reply)}")
    tokens = _stored(reply.json(), settings, str(document["token_endpoint"]))
    save_tokens(remote, tokens)
    return tokens


def _stored(
    answer: dict[str, Any], settings: LoginSettings, token_endpoint: str, refresh_token: str = ""
) -> dict[str, Any]:
    expires_in = float(answer.get("expires_in") or 0)
    expiry = datetime.fromtimestamp(time.time() + expires_in, UTC) if expires_in else None
    return {
        "access_token": answer["access_token"],
        "token_type": answer.get("token_type", "Bearer"),
        "refresh_token": answer.get("refresh_token") or refresh_token,
        "expiry": expiry.isoformat().replace("+00:00", "Z") if expiry else "",
        "id_token": answer.get("id_token", ""),
        "issuer": settings.issuer,
        "client_id": settings.client_id,
        "audience": settings.audience,
        "token_endpoint": token_endpoint,
    }


def save_tokens(remote: Remote, tokens: dict[str, Any]) -> None:
    """Write the tokens, readable by their owner only, replacing the file at once."""
    directory = remote.tokens_path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tokens-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(tokens, f, indent=2)
        os.replace(temporary, remote.tokens_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def load_tokens(remote: Remote) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = json.loads(remote.tokens_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"Cannot read {remote.tokens_path}: {exc}") from None
    return found


def expired(tokens: dict[str, Any], margin: float = EXPIRY_MARGIN) -> bool:
    expiry = tokens.get("expiry")
    if not expiry:
        return False
    when = datetime.fromisoformat(str(expiry).replace("Z", "+00:00"))
    return when.timestamp() - margin <= time.time()


def refresh(remote: Remote, tokens: dict[str, Any]) -> dict[str, Any]:
    """New tokens for the refresh token, stored; Unauthenticated when the provider says
    no (then `croft login` again)."""
    if not tokens.get("refresh_token"):
        raise Unauthenticated(
            f"The login to {remote.name!r} expired: run `croft login {remote.name}`"
        )
    settings = LoginSettings(tokens["issuer"], tokens["client_id"], tokens.get("audience", ""))
    with httpx.Client(timeout=TIMEOUT) as http:
        endpoint = (
            tokens.get("token_endpoint") or _discover(http, settings.issuer)["token_endpoint"]
        )
        reply = http.post(
            str(endpoint),
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": settings.client_id,
            },
        )
    if not reply.is_success:
        raise Unauthenticated(
            f"Refreshing the login to {remote.name!r} failed ({_token_error(reply)}): "
            f"run `croft login {remote.name}`"
        )
    new = _stored(reply.json(), settings, str(endpoint), tokens["refresh_token"])
    save_tokens(remote, new)
    return new


class OidcAuth(httpx.Auth):
    """The remote's stored access token on every request, refreshed when expired and once
    more when the remote answers 401."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        tokens = load_tokens(self.remote)
        if tokens is None:
            yield request
            return
        if expired(tokens):
            tokens = refresh(self.remote, tokens)
        request.headers["Authorization"] = f"Bearer {tokens['access_token']}"
        response = yield request
        if response.status_code == 401 and tokens.get("refresh_token"):
            tokens = refresh(self.remote, tokens)
            request.headers["Authorization"] = f"Bearer {tokens['access_token']}"
            yield request


def remote_client(remote: Remote) -> httpx.Client:
    """An httpx client for `remote`: its pinned certificate, and the OIDC login if any."""
    return httpx.Client(
        base_url=remote.address,
        verify=remote.ssl_context(),
        auth=OidcAuth(remote),
        timeout=TIMEOUT,
    )


def query(remote: Remote, method: str, path: str, data: str | None = None) -> Any:
    """`lxc query`: the response's metadata; CroftError with the remote's message."""
    with remote_client(remote) as http:
        try:
            reply = http.request(
                method, path, content=data, headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise Unavailable(f"Cannot reach {remote.address}: {exc}") from None
    try:
        body = reply.json()
    except ValueError:
        body = {}
    if reply.status_code >= 400:
        error = CroftError(str(body.get("error") or reply.reason_phrase))
        error.http_status = reply.status_code
        raise error
    return body.get("metadata") if isinstance(body, dict) else body
