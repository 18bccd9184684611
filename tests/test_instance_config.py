"""Instance config and devices through the real `lxc` client: every value the api
accepts means the same in compute, and no value can write LXC configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Croft, Lxc


@pytest.fixture(scope="module")
def croft_busybox(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> tuple[Croft, Lxc, str]:
    _, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    return croft_lxc


def definition(croft: Croft, name: str) -> str:
    return (croft.root / "state" / "lxc" / name / "config").read_text()


def test_security_privileged_on_makes_a_privileged_container(
    croft_busybox: tuple[Croft, Lxc, str],
) -> None:
    """`on` is one of LXD's words for true: the api takes it, so compute must too."""
    croft, lxc, _ = croft_busybox
    lxc("launch", "busybox", "priv-on", "-c", "security.privileged=on")
    try:
        uid_map = lxc("exec", "priv-on", "--", "cat", "/proc/self/uid_map").stdout
        assert uid_map.split() == ["0", "0", "4294967295"]
        assert "lxc.idmap" not in definition(croft, "priv-on")
        # and `off` is false: back to the shifted map at the next start
        lxc("config", "set", "priv-on", "security.privileged", "off")
        lxc("restart", "--force", "priv-on")
        uid_map = lxc("exec", "priv-on", "--", "cat", "/proc/self/uid_map").stdout
        assert uid_map.split()[1] != "0"  # container root is not host root
        assert "lxc.idmap" in definition(croft, "priv-on")
    finally:
        lxc("delete", "--force", "priv-on", check=False)
