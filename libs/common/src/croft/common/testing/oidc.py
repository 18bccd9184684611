"""A real OpenID provider for tests and benchmarks: npm `oidc-provider` (a certified
OpenID Provider), run by node from `tests/oidc/op.mjs` (`make setup` installs it).

    with OpenIDProvider(groups={"alice": ["devs"]}) as op:
        tokens = op.device_login("alice")      # the device-code flow, approved as alice
        op.rotate()                            # new signing key; the old one still published

The provider signs with RSA keys this helper makes, so a test can also forge tokens with
the provider's own key (`sign`): an expired one, one for another audience... Each
provider runs on a free loopback port with its log in a temporary directory, and is
killed at interpreter exit if the caller forgot to stop it.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from croft.common.testing.etcd import free_port

# tests/oidc in the source tree (op.mjs, its package.json and node_modules).
PROVIDER_DIR = Path(
    os.environ.get("CROFT_OIDC_PROVIDER_DIR")
    or Path(__file__).resolve().parents[6] / "tests" / "oidc"
)
CLIENT_ID = "croft"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_live):
        process.kill()


def available() -> str:
    """Why the provider cannot run here ("" when it can)."""
    if shutil.which("node") is None:
        return "node is not installed (make setup)"
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        return f"oidc-provider is not installed in {PROVIDER_DIR} (make setup)"
    return ""


@dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey

    @classmethod
    def new(cls) -> SigningKey:
        return cls(
            uuid.uuid4().hex[:12], rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )

    def jwk(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private))
        found.pop("key_ops", None)  # PyJWT says ["sign"]; the provider verifies with it too
        return {**found, "kid": self.kid, "use": "sig", "alg": "RS256"}


@dataclass
class OpenIDProvider:
    audience: str = "urn:croft:api"
    groups: dict[str, list[str]] = field(default_factory=dict)
    access_token_ttl: int = 3600
    # Opaque access tokens, good at the provider's userinfo endpoint only (croft asks it
    # who holds one), instead of JWTs issued for croft's API.
    opaque_tokens: bool = False
    port: int = field(default_factory=free_port)
    keys: list[SigningKey] = field(default_factory=lambda: [SigningKey.new()])
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="croft-oidc-")))
    _process: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OpenIDProvider:
        why = available()
        if why:
            raise RuntimeError(why)
        keys_file = self.directory / "keys.json"
        keys_file.write_text(json.dumps({"keys": [k.jwk() for k in self.keys]}))
        keys_file.chmod(0o600)
        env = {
            **os.environ,
            "OP_PORT": str(self.port),
            "OP_KEYS": str(keys_file),
            "OP_AUDIENCE": self.audience,
            "OP_GROUPS": json.dumps(self.groups),
            "OP_AT_TTL": str(self.access_token_ttl),
            "OP_OPAQUE": "1" if self.opaque_tokens else "",
        }
        with open(self.directory / "op.log", "ab") as log:
            self._process = subprocess.Popen(
                ["node", str(PROVIDER_DIR / "op.mjs")],
                cwd=PROVIDER_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        _live.add(self._process)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.issuer}/.well-known/openid-configuration").is_success:
                    return self
            except httpx.HTTPError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                log_text = (self.directory / "op.log").read_text()[-2000:]
                self.stop()
                raise RuntimeError(f"the OpenID provider did not start: {log_text}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            _live.discard(self._process)
            self._process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> OpenIDProvider:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def rotate(self, *, keep_old: bool = True) -> SigningKey:
        """Restart with a new signing key (first), the old ones still published unless
        not `keep_old`. What the provider held in memory (grants, refresh tokens) is gone."""
        new = SigningKey.new()
        self.keys = [new, *self.keys] if keep_old else [new]
        self.stop()
        self.start()
        return new

    # -- tokens ----------------------------------------------------------------------------

    def sign(
        self,
        claims: dict[str, Any],
        *,
        key: SigningKey | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """A token signed (RS256) with the provider's current key, or `key`."""
        key = key or self.keys[0]
        return jwt.encode(
            claims, key.private, algorithm="RS256", headers={"kid": key.kid, **(headers or {})}
        )

    def claims(self, subject: str = "alice", **changes: Any) -> dict[str, Any]:
        """The claims of a good access token for `subject`, with `changes`."""
        now = int(time.time())
        return {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience,
            "iat": now,
            "exp": now + 600,
            "email": f"{subject}@example.test",
            "groups": self.groups.get(subject, []),
            **changes,
        }

    def device_authorization(
        self, scope: str = "openid offline_access email profile"
    ) -> dict[str, Any]:
        reply = httpx.post(
            f"{self.issuer}/device/auth", data={"client_id": CLIENT_ID, "scope": scope}
        )
        reply.raise_for_status()
        found: dict[str, Any] = reply.json()
        return found

    def approve(self, user_code: str, login: str) -> None:
        """Do what a person does in the browser: enter the code, sign in as `login` (the
        dev login form takes any name), consent."""
        with httpx.Client(follow_redirects=True) as browser:
            page = browser.get(f"{self.issuer}/device")
            for _ in range(8):
                found = re.search(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', page.text, re.S)
                if found is None:
                    break
                fields = dict(re.findall(r'name="([^"]+)"\s+value="([^"]*)"', found.group(2)))
                inputs = set(re.findall(r'name="([^"]+)"', found.group(2)))
                if "user_code" in inputs:
                    fields["user_code"] = user_code
                if "login" in inputs:
                    fields.update(login=login, password="any")
                page = browser.post(httpx.URL(str(page.url)).join(found.group(1)), data=fields)
            if "success" not in page.text.lower():
                raise RuntimeError(f"the device code was not approved: {page.text[-500:]}")

    def device_login(
        self, login: str, scope: str = "openid offline_access email profile"
    ) -> dict[str, Any]:
        """The device-code flow end to end, as `login`: the token endpoint's answer."""
        started = self.device_authorization(scope)
        self.approve(started["user_code"], login)
        reply = httpx.post(
            f"{self.issuer}/token",
            data={
                "grant_type": DEVICE_GRANT,
                "device_code": started["device_code"],
                "client_id": CLIENT_ID,
            },
        )
        reply.raise_for_status()
        tokens: dict[str, Any] = reply.json()
        return tokens
