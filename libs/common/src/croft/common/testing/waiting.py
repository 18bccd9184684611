"""Small helpers that tests and benchmarks share: polling for a condition, and plain
HTTP over a unix socket (where the `lxc` client talks to croft and LXD)."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable
from os import PathLike
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call `predicate` until it returns something true, and return that; fail with what
    was awaited (and the last value) once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to a server's unix socket (croft's or LXD's), as the `lxc` client speaks it."""

    def __init__(self, path: str | PathLike[str], timeout: float = 60.0) -> None:
        super().__init__("lxd", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock
