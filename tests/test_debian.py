"""A Debian 12 container with systemd, built locally (debootstrap), launched through croft:
it boots, gets an address from croft's DHCP, and its name resolves from another container."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from croft.common.testing.waiting import wait_until

from .conftest import REPO, Croft, Lxc

IMAGES = Path("/var/lib/croft/build-images")


@pytest.fixture(scope="module")
def debian_image() -> Path:
    """scripts/build-images.sh rebuilds only when the definition changed (~1 min first)."""
    subprocess.run(
        ["bash", str(REPO / "scripts/build-images.sh"), str(IMAGES)], check=True, timeout=900
    )
    return IMAGES / "debian12.tar.gz"


@pytest.mark.slow
def test_debian_boots_systemd_and_resolves_by_name(
    croft_lxc: tuple[Croft, Lxc, str], debian_image: Path, busybox_image: Path
) -> None:
    _, lxc, _ = croft_lxc
    lxc("image", "import", str(debian_image), "--alias", "debian", timeout=300)
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    lxc("launch", "debian", "c2", timeout=300)
    lxc("launch", "busybox", "c1")

    def system_state() -> str:
        result = lxc("exec", "c2", "--", "systemctl", "is-system-running", check=False)
        state = result.stdout.strip()
        return state if state in ("running", "degraded") else ""

    wait_until(system_state, 90, "systemd in c2 to finish booting")

    def address() -> str:
        out = lxc("exec", "c2", "--", "ip", "-4", "-o", "addr", "show", "eth0", check=False)
        return out.stdout.split()[3].split("/")[0] if "inet " in out.stdout else ""

    c2_address = wait_until(address, 60, "c2 to get an IPv4 address by DHCP")

    def resolved() -> str:
        out = lxc("exec", "c1", "--", "nslookup", "c2.croft", check=False)
        return out.stdout if c2_address in out.stdout else ""

    wait_until(resolved, 60, "c2.croft to resolve from c1")
