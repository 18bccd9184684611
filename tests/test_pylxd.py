"""pylxd (2.4, from PyPI) drives croft as it drives LXD: create, start, exec, files,
snapshots, restore, stop and delete of a real container (issue 3)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pylxd
import pytest
from pylxd.exceptions import NotFound

from .conftest import Croft, Lxc

# pylxd 2.4's Snapshot model knows fewer fields than LXD 5.0 sends; real LXD warns the same.
pytestmark = pytest.mark.filterwarnings("ignore:Attempted to set unknown attribute:UserWarning")


@pytest.fixture(scope="module")
def client(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> Iterator[pylxd.Client]:
    """pylxd finds croft's socket through LXD_DIR, as it finds LXD's."""
    _, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    saved = os.environ.get("LXD_DIR")
    os.environ["LXD_DIR"] = str(lxc.lxd_dir)
    try:
        yield pylxd.Client()
    finally:
        if saved is None:
            del os.environ["LXD_DIR"]
        else:
            os.environ["LXD_DIR"] = saved


def test_client_sees_the_server_images_and_default_profile(client: pylxd.Client) -> None:
    assert client.trusted
    assert client.host_info["api_extensions"]  # what croft implements, as LXD lists its own
    (image,) = client.images.all()
    assert [a["name"] for a in image.aliases] == ["busybox"]
    assert client.images.get_by_alias("busybox").fingerprint == image.fingerprint
    profile = client.profiles.get("default")
    assert profile.devices["root"]["type"] == "disk"
    assert profile.devices["root"]["path"] == "/"
    assert profile.devices["eth0"]["type"] == "nic"


def test_container_lifecycle(client: pylxd.Client, tmp_path: Path) -> None:
    instance = client.instances.create(
        {"name": "py1", "source": {"type": "image", "alias": "busybox"}}, wait=True
    )
    try:
        assert instance.status == "Stopped"
        assert client.instances.exists("py1")
        assert "py1" in [i.name for i in client.instances.all()]

        instance.start(wait=True)
        instance.sync()
        assert instance.status == "Running"
        assert instance.state().pid > 0

        result = instance.execute(["sh", "-c", "echo $((6*7))"])
        assert (result.exit_code, result.stdout, result.stderr) == (0, "42\n", "")
        failed = instance.execute(["sh", "-c", "echo oops >&2; exit 3"])
        assert (failed.exit_code, failed.stdout, failed.stderr) == (3, "", "oops\n")
        piped = instance.execute(["cat"], stdin_payload="fed through stdin\n")
        assert piped.stdout == "fed through stdin\n"

        payload = os.urandom(256 << 10)
        instance.files.put("/root/payload.bin", payload, mode="0640", uid=1000, gid=1001)
        assert instance.files.get("/root/payload.bin") == payload
        stat = instance.execute(["stat", "-c", "%a %u %g %s", "/root/payload.bin"])
        assert stat.stdout.split() == ["640", "1000", "1001", str(len(payload))]
        instance.files.mk_dir("/root/made", mode="0700")
        assert instance.execute(["stat", "-c", "%a %F", "/root/made"]).stdout == "700 directory\n"
        instance.files.delete("/root/payload.bin")
        assert instance.execute(["test", "-e", "/root/payload.bin"]).exit_code == 1

        assert instance.execute(["sh", "-c", "echo before > /root/state"]).exit_code == 0
        snapshot = instance.snapshots.create("s1", wait=True)
        assert [s.name for s in instance.snapshots.all()] == ["s1"]
        assert instance.execute(["sh", "-c", "echo after > /root/state"]).exit_code == 0
        snapshot.restore(wait=True)
        assert instance.execute(["cat", "/root/state"]).stdout == "before\n"
        snapshot.rename("s2", wait=True)
        assert [s.name for s in instance.snapshots.all()] == ["s2"]
        instance.snapshots.get("s2").delete(wait=True)
        assert instance.snapshots.all() == []

        instance.stop(wait=True)
        instance.sync()
        assert instance.status == "Stopped"
        instance.delete(wait=True)
        with pytest.raises(NotFound):
            client.instances.get("py1")
        assert not client.instances.exists("py1")
    finally:
        if client.instances.exists("py1"):
            leftover = client.instances.get("py1")
            if leftover.status == "Running":
                leftover.stop(force=True, wait=True)
            leftover.delete(wait=True)


def test_config_change_through_save(client: pylxd.Client) -> None:
    instance = client.instances.create(
        {
            "name": "py2",
            "source": {"type": "image", "alias": "busybox"},
            "config": {"limits.memory": "64MiB"},
        },
        wait=True,
    )
    try:
        assert instance.config["limits.memory"] == "64MiB"
        instance.config["limits.processes"] = "100"
        instance.description = "set through pylxd"
        instance.save(wait=True)
        again = client.instances.get("py2")
        assert again.config["limits.processes"] == "100"
        assert again.description == "set through pylxd"
    finally:
        instance.delete(wait=True)
