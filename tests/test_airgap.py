"""The air-gapped flow (issue 4, seed deck): a croft with no storage pool and no network
serves as the image store; images leave it as files (`lxc image export`) and enter another
croft (`lxc image import`) with the same fingerprints, and launch there. Both crofts run on
this host, each under its own directory, ports and socket, with the real `lxc` client."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Croft, Lxc, _remove_containers, free_port, make_croft


def sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _start(root: Path, extra: str = "") -> tuple[Croft, Lxc]:
    croft = make_croft(root, lease_ttl=3, extra=extra)
    (root / "home").mkdir()
    lxc = Lxc(root / "state", root / "home")
    croft.run("up")
    # `croft up` returns once the processes run; the socket may come a moment later.
    deadline = time.monotonic() + 60
    while lxc("query", "/1.0", check=False).returncode != 0:
        assert time.monotonic() < deadline, f"the api of {root} did not answer"
        time.sleep(0.2)
    return croft, lxc


def _stop(croft: Croft, lxc: Lxc) -> None:
    with contextlib.suppress(Exception):
        for name in lxc.json("list"):
            lxc("delete", "--force", name["name"], check=False)
    croft.run("down", check=False)
    _remove_containers(croft)
    if not os.environ.get("CROFT_TEST_KEEP"):
        shutil.rmtree(croft.root, ignore_errors=True)


@pytest.fixture(scope="module")
def depot_croft() -> Iterator[tuple[Croft, Lxc, str]]:
    """The image store: a croft started with no storage pool and no network, serving
    HTTPS on loopback; and its URL."""
    root = Path(tempfile.mkdtemp(prefix="croft-airgap-depot-", dir="/tmp"))
    root.chmod(0o711)
    port = free_port()
    extra = f'storage:\n  default_pool: ""\napi:\n  https_address: 127.0.0.1:{port}\n'
    croft, lxc = _start(root, extra=extra)
    try:
        yield croft, lxc, f"https://127.0.0.1:{port}"
    finally:
        _stop(croft, lxc)


@pytest.fixture(scope="module")
def depot(depot_croft: tuple[Croft, Lxc, str]) -> Lxc:
    return depot_croft[1]


@pytest.fixture(scope="module")
def site() -> Iterator[Lxc]:
    """The croft that uses the images: a storage pool, still no network (the default
    profile loses its NIC, so instances have only their loopback)."""
    root = Path(tempfile.mkdtemp(prefix="croft-airgap-site-", dir="/tmp"))
    root.chmod(0o711)
    croft, lxc = _start(root)
    try:
        lxc("profile", "device", "remove", "default", "eth0")
        yield lxc
    finally:
        _stop(croft, lxc)


@pytest.fixture(scope="module")
def split_busybox(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> list[Path]:
    """The busybox image split in two: a gzip metadata tarball and an xz rootfs tarball."""
    out = tmp_path_factory.mktemp("airgap-split")
    meta, rootfs = out / "meta.tar.gz", out / "rootfs.tar.xz"
    with (
        tarfile.open(busybox_image) as unified,
        tarfile.open(meta, "w:gz") as m,
        tarfile.open(rootfs, "w:xz") as r,
    ):
        for member in unified.getmembers():
            data = unified.extractfile(member) if member.isfile() else None
            name = member.name.removeprefix("./")
            if name == "rootfs" or name.startswith("rootfs/"):
                member.name = "." + name.removeprefix("rootfs")
                r.addfile(member, data)
            else:
                member.name = name
                m.addfile(member, data)
    return [meta, rootfs]


def test_the_depot_has_no_pool_and_no_network(depot: Lxc) -> None:
    assert json.loads(depot("query", "/1.0/storage-pools").stdout) == []
    networks = json.loads(depot("query", "/1.0/networks?recursion=1").stdout)
    assert [n["name"] for n in networks if n.get("managed")] == []


@pytest.mark.parametrize("form", ["unified", "split"])
def test_images_carried_as_files_keep_their_fingerprint_and_launch(
    depot: Lxc,
    site: Lxc,
    busybox_image: Path,
    split_busybox: list[Path],
    tmp_path: Path,
    form: str,
) -> None:
    files = [busybox_image] if form == "unified" else split_busybox
    fingerprint = sha256(*files)
    alias = f"airt-{form}"
    depot("image", "import", *map(str, files), "--alias", alias, "--public")

    carried = tmp_path / "usb-stick"
    carried.mkdir()
    depot("image", "export", alias, f"{carried}/")
    exported = sorted(carried.iterdir())
    assert len(exported) == len(files)
    assert sha256(*sorted(exported, key=lambda p: not p.name.startswith("meta-"))) == fingerprint

    ordered = sorted(exported, key=lambda p: not p.name.startswith("meta-"))
    result = site("image", "import", *map(str, ordered), "--alias", alias)
    assert fingerprint in result.stdout
    (image,) = [i for i in site.json("image", "list") if i["fingerprint"] == fingerprint]
    assert image["properties"]["os"] == "busybox"

    name = f"airt-{form}-c1"
    site("launch", alias, name)
    assert site("exec", name, "--", "cat", "/etc/hostname").stdout == f"{name}\n"
    site("delete", "--force", name)


def test_an_image_published_at_the_site_goes_back_to_the_depot(
    depot: Lxc, site: Lxc, busybox_image: Path, tmp_path: Path
) -> None:
    if "airt-unified" not in [a["name"] for a in site.json("image", "alias", "list")]:
        site("image", "import", str(busybox_image), "--alias", "airt-unified")
    site("launch", "airt-unified", "airt-golden")
    site("exec", "airt-golden", "--", "sh", "-c", "echo tuned > /etc/motd")
    site("stop", "--force", "airt-golden")
    published = site("publish", "airt-golden", "--alias", "airt-golden")
    (image,) = [i for i in site.json("image", "list") if i["fingerprint"] in published.stdout]

    carried = tmp_path / "usb-stick"
    carried.mkdir()
    site("image", "export", "airt-golden", f"{carried}/")
    (tarball,) = carried.iterdir()
    result = depot("image", "import", str(tarball), "--alias", "airt-golden", "--public")
    assert image["fingerprint"] in result.stdout
    (stored,) = [i for i in depot.json("image", "list") if i["fingerprint"] == image["fingerprint"]]
    assert stored["public"] is True
    # The depot serves it on: exported again, it is byte for byte what the site made.
    again = tmp_path / "again"
    again.mkdir()
    depot("image", "export", "airt-golden", f"{again}/")
    (copy,) = again.iterdir()
    assert copy.read_bytes() == tarball.read_bytes()


def test_lxc_image_copy_over_https_from_the_depot(
    depot_croft: tuple[Croft, Lxc, str], site: Lxc, busybox_image: Path, tmp_path: Path
) -> None:
    """Where the two are connected after all: the site copies a public image from the
    depot's simplestreams tree over HTTPS, the depot's certificate pinned by hand."""
    croft, depot, url = depot_croft
    image = tmp_path / "copy.tar.gz"
    with tarfile.open(busybox_image) as source, tarfile.open(image, "w:gz") as out:
        for member in source.getmembers():
            out.addfile(member, source.extractfile(member) if member.isfile() else None)
        stamp = tarfile.TarInfo("rootfs/etc/airgap-copy")
        stamp.size = 7
        out.addfile(stamp, io.BytesIO(b"copied\n"))
    fingerprint = sha256(image)
    depot("image", "import", str(image), "--alias", "airt-copy", "--public")

    certs = site.home / ".config/lxc/servercerts"
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copy(croft.root / "state/server.crt", certs / "depot.crt")
    site("remote", "add", "depot", url, "--protocol", "simplestreams", "--public")
    # By fingerprint: in simplestreams an alias names a product, whose newest version wins.
    site("image", "copy", f"depot:{fingerprint}", "local:", "--alias", "airt-copy")
    (copied,) = [i for i in site.json("image", "list") if i["fingerprint"] == fingerprint]
    assert [a["name"] for a in copied["aliases"]] == ["airt-copy"]
    site("launch", "airt-copy", "airt-copy-c1")
    assert site("exec", "airt-copy-c1", "--", "cat", "/etc/airgap-copy").stdout == "copied\n"
    site("delete", "--force", "airt-copy-c1")
