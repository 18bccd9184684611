"""`core.https_address` through the real `lxc` client, as on LXD: setting it opens the
HTTPS listener at once, changing it moves it, unsetting it closes it, and a restart
keeps what was set. `api.https_address` in croft.yaml is only the initial value."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Croft, Lxc, free_port, make_croft


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def croft_with_yaml_address() -> Iterator[tuple[Croft, Lxc, int]]:
    root = Path(tempfile.mkdtemp(prefix="croft-https-address-", dir="/tmp"))
    initial = free_port()
    croft = make_croft(root, extra=f"api:\n  https_address: 127.0.0.1:{initial}\n")
    (root / "home").mkdir()
    lxc = Lxc(root / "state", root / "home")
    croft.run("up")
    try:
        yield croft, lxc, initial
    finally:
        croft.run("down", check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_core_https_address_opens_moves_and_closes_the_listener(
    croft_with_yaml_address: tuple[Croft, Lxc, int],
) -> None:
    croft, lxc, initial = croft_with_yaml_address
    # croft.yaml's address is the key's initial value.
    assert lxc("config", "get", "core.https_address").stdout.strip() == f"127.0.0.1:{initial}"
    assert listening(initial)

    first = free_port()
    lxc("config", "set", "core.https_address", f"127.0.0.1:{first}")
    assert listening(first)
    assert not listening(initial)

    token = lxc("config", "trust", "add", "--name", "laptop", "-q").stdout.strip()
    laptop = Lxc(croft.root / "no-socket", croft.root / "laptop-home")
    laptop.home.mkdir()
    laptop("remote", "add", "croft", token)  # the token names 127.0.0.1:<first>
    assert "auth: trusted" in laptop("info", "croft:").stdout

    # Moved: the old port is closed, the new one serves the same trusted client.
    second = free_port()
    lxc("config", "set", "core.https_address", f"127.0.0.1:{second}")
    assert listening(second)
    assert not listening(first)
    laptop("remote", "set-url", "croft", f"https://127.0.0.1:{second}")
    assert "auth: trusted" in laptop("info", "croft:").stdout

    # An address nobody can listen on is refused, and nothing changes.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        refused = lxc("config", "set", "core.https_address", f"127.0.0.1:{busy}", check=False)
        assert refused.returncode != 0
        assert f"Failed to listen on 127.0.0.1:{busy}" in refused.stderr
    assert lxc("config", "get", "core.https_address").stdout.strip() == f"127.0.0.1:{second}"
    assert listening(second)

    # A restart keeps the key's value, not croft.yaml's.
    croft.run("down")
    assert not listening(second)
    croft.run("up")
    assert listening(second)
    assert not listening(initial)
    assert "auth: trusted" in laptop("info", "croft:").stdout

    # Unset: closed, and still closed after a restart.
    lxc("config", "unset", "core.https_address")
    assert not listening(second)
    croft.run("down")
    croft.run("up")
    assert lxc("config", "get", "core.https_address").stdout.strip() == ""
    assert not listening(second)
    assert not listening(initial)
