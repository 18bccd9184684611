"""Instance config and devices through the real `lxc` client: every value the api
accepts means the same in compute, and no value can write LXC configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from croft.common.testing.waiting import UnixHTTPConnection

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


INJECTED = "lxc.environment = INJECTED=1"


def request(croft: Croft, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    connection = UnixHTTPConnection(croft.root / "state" / "unix.socket")
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(method, url, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def lxc_files(croft: Croft) -> dict[str, str]:
    """Every LXC definition and log under croft's lxcpath (the rootfs left out)."""
    lxcpath = croft.root / "state" / "lxc"
    return {
        str(path): path.read_text(errors="replace")
        for path in lxcpath.glob("*/*")
        if path.is_file()
    }


def test_no_device_or_config_value_can_write_lxc_config(
    croft_busybox: tuple[Croft, Lxc, str], tmp_path: Path
) -> None:
    """Issue 21: a line break in a device name or value (or a config key or value) would
    have become a line of the container's LXC definition, `lxc.environment` or
    `lxc.hook.*` (run as root on the host). Each is a 400 now, through the same API the
    `lxc` client uses, and leaves the record and every LXC file as they were."""
    croft, lxc, bridge = croft_busybox
    source = tmp_path / f"src\n{INJECTED}"  # a real directory: compute would mount it
    source.mkdir()
    nic = {"type": "nic", "network": bridge, "name": "eth1"}
    bridged = {"type": "nic", "nictype": "bridged", "parent": bridge, "name": "eth1"}
    disk = {"type": "disk", "source": str(tmp_path), "path": "/mnt"}
    char = {"type": "unix-char", "source": "/dev/null", "path": "/dev/null2"}
    bad_devices = [
        {"eth1": {**nic, "name": f"eth1\n{INJECTED}"}},
        {"eth1": {**nic, "hwaddr": "00:16:3e:00:00:01\n"}},
        {"eth1": {**bridged, "parent": f"{bridge}\n{INJECTED}"}},
        {"eth1": {**nic, "network": f"{bridge}\n{INJECTED}"}},
        {"eth1": {**nic, "host_name": f"veth1\r\n{INJECTED}"}},
        {f"eth1\n{INJECTED}": {"type": "nic", "network": bridge}},
        {"d1": {**disk, "path": f"/mnt\n{INJECTED}"}},
        {"d1": {**disk, "source": str(source)}},
        {"z1": {**char, "path": f"/dev/z\n{INJECTED}"}},
        {"z1": {**char, "source": f"/dev/null\x00{INJECTED}"}},
    ]
    bad_configs = [
        {"environment.X": f"1\n{INJECTED}"},
        {"raw.lxc\n": "lxc.environment = X=1"},
        {f"user.a\n{INJECTED}": "1"},
        {"limits.memory": f"64MiB\n{INJECTED}"},
    ]
    lxc("init", "busybox", "inj")
    try:
        before = request(croft, "GET", "/1.0/instances/inj")[1]["metadata"]
        files = lxc_files(croft)
        assert any(path.endswith("/inj/config") for path in files)
        bodies = [{"devices": d} for d in bad_devices] + [{"config": c} for c in bad_configs]
        for body in bodies:
            for method, url, sent in [
                ("PATCH", "/1.0/instances/inj", body),
                ("POST", "/1.0/instances", {"name": "inj2", "source": {"type": "image",
                                            "alias": "busybox"}, **body}),
                ("POST", "/1.0/profiles", {"name": "injp", **body}),
            ]:  # fmt: skip
                status, reply = request(croft, method, url, sent)
                assert (status, reply["error_code"]) == (400, 400), (body, reply)
                assert "\n" not in reply["error"], reply["error"]
        assert request(croft, "GET", "/1.0/instances/inj")[1]["metadata"] == before
        assert request(croft, "GET", "/1.0/instances/inj2")[0] == 404
        assert request(croft, "GET", "/1.0/profiles/injp")[0] == 404
        assert lxc_files(croft) == files
        # and the instance still starts, with no environment of anyone else's
        lxc("start", "inj")
        assert "INJECTED" not in lxc("exec", "inj", "--", "env").stdout
        assert not any("INJECTED" in text for text in lxc_files(croft).values())
    finally:
        lxc("delete", "--force", "inj", check=False)


def test_raw_lxc_that_liblxc_refuses_is_refused_and_the_instance_stays_usable(
    croft_busybox: tuple[Croft, Lxc, str],
) -> None:
    """LXD loads raw.lxc into liblxc on every change: a key liblxc does not know is
    refused, rather than stored in a definition that no later change could load."""
    croft, lxc, _ = croft_busybox
    lxc("init", "busybox", "raw-bad")
    try:
        before = definition(croft, "raw-bad")
        refused = lxc("config", "set", "raw-bad", "raw.lxc", "lxc.bogus = x", check=False)
        assert refused.returncode != 0
        assert "Failed to load raw.lxc" in refused.stderr, refused.stderr
        assert definition(croft, "raw-bad") == before
        assert lxc("config", "get", "raw-bad", "raw.lxc").stdout.strip() == ""
        # the instance takes other changes and starts, as before
        lxc("config", "set", "raw-bad", "user.after", "yes")
        lxc("config", "set", "raw-bad", "raw.lxc", "lxc.environment = FROM_RAW=1")
        lxc("start", "raw-bad")
        env = lxc("exec", "raw-bad", "--", "cat", "/proc/1/environ").stdout
        assert "FROM_RAW=1" in env
    finally:
        lxc("delete", "--force", "raw-bad", check=False)
