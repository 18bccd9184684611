"""`core.trust_password`, as LXD 5.0 keeps and checks it.

LXD stores hex(salt + scrypt(password, salt, N=2^14, r=8, p=1, 64 bytes)) with a 32-byte
random salt, shows the key as `true` (never the hash), and trusts an untrusted client's
certificate when `POST /1.0/certificates` carries the password (`lxc remote add
--password`, pylxd's `Client.authenticate`), beside trust tokens.

Failed attempts are limited per client address (`PasswordAttempts`), on each api replica:
a guesser gets `MAX_FAILURES` tries per `WINDOW` seconds, then is refused until the oldest
failure ages out, right password or not.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque

TRUST_PASSWORD = "core.trust_password"
# Server keys whose value GET /1.0 never shows (LXD's hidden keys).
HIDDEN_KEYS = frozenset({TRUST_PASSWORD})

_SALT_BYTES = 32
_SCRYPT = {"n": 1 << 14, "r": 8, "p": 1, "dklen": 64, "maxmem": 64 << 20}

MAX_FAILURES = 5
WINDOW = 60.0


def hash_password(password: str) -> str:
    """What LXD stores for `password`: hex of a random salt followed by the scrypt hash."""
    salt = secrets.token_bytes(_SALT_BYTES)
    return (salt + hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)).hex()


def password_matches(stored: str, password: str) -> bool:
    """Whether `password` is the one `stored` (hash_password's output) was made from.
    False for no or a malformed stored value."""
    try:
        raw = bytes.fromhex(stored)
    except ValueError:
        return False
    if len(raw) <= _SALT_BYTES or not password:
        return False
    salt, expected = raw[:_SALT_BYTES], raw[_SALT_BYTES:]
    got = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return hmac.compare_digest(got, expected)


class PasswordAttempts:
    """Failed password attempts per client address, over a sliding window."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = WINDOW) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float]:
        now = time.monotonic()
        failures = self._failures.get(address, deque())
        while failures and now - failures[0] >= self.window:
            failures.popleft()
        if failures:
            self._failures[address] = failures
        else:
            self._failures.pop(address, None)
        return failures

    def blocked(self, address: str) -> bool:
        return len(self._recent(address)) >= self.max_failures

    def failed(self, address: str) -> None:
        self._recent(address)
        self._failures.setdefault(address, deque()).append(time.monotonic())

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


attempts = PasswordAttempts()
