"""Images between crofts (issue 4): croft A serves its public images over HTTPS, croft B
takes them, with the real `lxc` 5.0.2 client aimed at B and A added as a remote the way a
user adds one:

- `lxc remote add R https://A --public --accept-certificate` (LXD's own protocol), then
  `lxc image copy R:busybox local:` and `lxc launch R:busybox x`: B pulls from A's REST API
  (`/1.0/images/aliases/<alias>`, `/1.0/images/<fp>`, `/1.0/images/<fp>/export`), unified
  and split images alike, the certificate pinned;
- `lxc remote add SS https://A --protocol simplestreams --public`, then
  `lxc image copy SS:busybox local:` and `lxc launch SS:debian/12 d1` (slow);
- `croft image copy SERVER NAME`, the same pulls from croft's own command line, and against
  the real LXD daemon as the local side when one runs here.

Both crofts run on this host, each under its own directory, ports and socket."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from croft.imageformat.streams import split_container_image

from .conftest import CROFT, REPO, Croft, Lxc, _remove_containers, free_port, make_croft

BUILT_IMAGES = Path("/var/lib/croft/build-images")
LXD_SOCKET = Path("/var/lib/lxd/unix.socket")


def sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def repack(image: Path, out: Path, stamp: str) -> Path:
    """Another image (another fingerprint) with the same contents and one file more."""
    with tempfile.TemporaryDirectory(prefix="c2c-repack-") as tmp:
        subprocess.run(["tar", "-C", tmp, "--numeric-owner", "-xzf", str(image)], check=True)
        (Path(tmp) / "rootfs/etc/c2c-stamp").write_text(stamp + "\n")
        subprocess.run(["tar", "-C", tmp, "--numeric-owner", "-czf", str(out), "."], check=True)
    return out


@dataclass
class Depot:
    """Croft A: no storage pool, no network; serves HTTPS on loopback."""

    croft: Croft
    lxc: Lxc
    url: str
    busybox: str  # public, alias busybox: unified
    split: str  # public, alias c2c-split: lxd.tar.xz + root.squashfs
    private: str  # not public, alias c2c-hidden

    @property
    def certificate(self) -> Path:
        return self.croft.root / "state" / "server.crt"


def _wait_for_api(lxc: Lxc, what: str) -> None:
    deadline = time.monotonic() + 60
    while lxc("query", "/1.0", check=False).returncode != 0:
        assert time.monotonic() < deadline, f"the api of {what} did not answer"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def depot(busybox_image: Path) -> Iterator[Depot]:
    root = Path(tempfile.mkdtemp(prefix="c2c-depot-", dir="/tmp"))
    root.chmod(0o711)
    port = free_port()
    extra = f'storage:\n  default_pool: ""\napi:\n  https_address: 127.0.0.1:{port}\n'
    croft = make_croft(root, lease_ttl=3, extra=extra)
    (root / "home").mkdir()
    lxc = Lxc(root / "state", root / "home")
    croft.run("up")
    try:
        _wait_for_api(lxc, "the depot")
        lxc("image", "import", str(busybox_image), "--alias", "busybox", "--public")
        meta, rootfs = split_container_image(busybox_image, root / "split")
        lxc("image", "import", str(meta), str(rootfs), "--alias", "c2c-split", "--public")
        # Its own product in the simplestreams tree, so that `busybox` there names exactly
        # one image (of a product, the newest serial wins).
        split = sha256(meta, rootfs)
        properties = json.loads(lxc("query", f"/1.0/images/{split}").stdout)["properties"]
        change = {"properties": {**properties, "os": "c2csplit"}}
        lxc("query", "-X", "PATCH", f"/1.0/images/{split}", "-d", json.dumps(change))
        private = repack(busybox_image, root / "private.tar.gz", "private")
        lxc("image", "import", str(private), "--alias", "c2c-hidden")
        yield Depot(
            croft,
            lxc,
            f"https://127.0.0.1:{port}",
            busybox=sha256(busybox_image),
            split=split,
            private=sha256(private),
        )
    finally:
        croft.run("down", check=False)
        _remove_containers(croft)
        if not os.environ.get("CROFT_TEST_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def site(croft_lxc: tuple[Croft, Lxc, str], depot: Depot) -> tuple[Croft, Lxc]:
    """Croft B (a pool and a bridge), its `lxc` client with the depot as two remotes."""
    croft, lxc, _ = croft_lxc
    _wait_for_api(lxc, "the site")
    lxc("remote", "add", "c2c-lxd", depot.url, "--public", "--accept-certificate")
    lxc("remote", "add", "c2c-ss", depot.url, "--protocol", "simplestreams", "--public")
    # A simplestreams remote's self-signed certificate is pinned by hand (the client asks no
    # questions for simplestreams), as for any private image server.
    shutil.copy(depot.certificate, lxc.home / ".config/lxc/servercerts/c2c-ss.crt")
    return croft, lxc


def images(lxc: Lxc) -> dict[str, dict[str, Any]]:
    return {i["fingerprint"]: i for i in lxc.json("image", "list")}


@pytest.fixture
def clean_site(site: tuple[Croft, Lxc], depot: Depot) -> Iterator[tuple[Croft, Lxc]]:
    """The site without the depot's images before and after a test."""
    croft, lxc = site

    def clear() -> None:
        for instance in lxc.json("list"):
            if instance["name"].startswith("c2c-"):
                lxc("delete", "--force", instance["name"], check=False)
        for fingerprint in images(lxc):
            lxc("image", "delete", fingerprint, check=False)

    clear()
    yield croft, lxc
    clear()


def blobs(croft: Croft) -> list[str]:
    """What the site's images service has on disk (a partial download shows here too)."""
    directory = croft.root / "state" / "images"
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_file())


# ---------------------------------------------------------------------------- LXD protocol


def test_lxc_image_copy_from_a_croft_remote_keeps_the_fingerprint_and_launches(
    clean_site: tuple[Croft, Lxc], depot: Depot
) -> None:
    croft, lxc = clean_site
    lxc("image", "copy", "c2c-lxd:busybox", "local:", "--alias", "c2c-bb", timeout=300)

    copied = images(lxc)[depot.busybox]
    assert [a["name"] for a in copied["aliases"]] == ["c2c-bb"]
    served = json.loads(depot.lxc("query", f"/1.0/images/{depot.busybox}").stdout)
    # As LXD records it: the server's description of the image.
    for key in ("properties", "architecture", "size", "type", "created_at", "filename"):
        assert copied[key] == served[key], key
    assert copied["cached"] is False and copied["public"] is False
    assert blobs(croft) == [depot.busybox]

    lxc("launch", "c2c-bb", "c2c-copied")
    assert lxc("exec", "c2c-copied", "--", "cat", "/etc/hostname").stdout == "c2c-copied\n"


def test_lxc_image_copy_of_a_split_image_over_lxd_protocol(
    clean_site: tuple[Croft, Lxc], depot: Depot, tmp_path: Path
) -> None:
    croft, lxc = clean_site
    lxc("image", "copy", "c2c-lxd:c2c-split", "local:", timeout=300)

    assert list(images(lxc)) == [depot.split]
    # The site stores it split, as the depot does: exported again, the two files hash
    # to the fingerprint.
    lxc("image", "export", depot.split, f"{tmp_path}/")
    exported = sorted(tmp_path.iterdir(), key=lambda p: not p.name.startswith("meta-"))
    assert len(exported) == 2
    assert sha256(*exported) == depot.split
    assert sorted(blobs(croft)) == [depot.split, f"{depot.split}.rootfs"]


def test_lxc_launch_from_a_croft_remote_caches_the_image(
    clean_site: tuple[Croft, Lxc], depot: Depot
) -> None:
    _, lxc = clean_site
    lxc("launch", "c2c-lxd:busybox", "c2c-l1", timeout=300)

    (instance,) = lxc.json("list", "c2c-l1")
    assert instance["status"] == "Running"
    assert instance["config"]["volatile.base_image"] == depot.busybox
    cached = images(lxc)[depot.busybox]
    assert cached["cached"] is True
    assert cached["update_source"]["protocol"] == "lxd"
    assert cached["update_source"]["server"] == depot.url
    assert cached["update_source"]["alias"] == "busybox"
    # Pinned: the depot's certificate, as `lxc remote add --accept-certificate` saved it.
    pem = (lxc.home / ".config/lxc/servercerts/c2c-lxd.crt").read_text()
    assert cached["update_source"]["certificate"].strip() == pem.strip()

    # A second instance takes the cached image.
    lxc("launch", "c2c-lxd:busybox", "c2c-l2", timeout=300)
    assert list(images(lxc)) == [depot.busybox]


def test_a_private_image_of_the_depot_cannot_be_copied(
    clean_site: tuple[Croft, Lxc], depot: Depot
) -> None:
    croft, lxc = clean_site
    for name in ("c2c-hidden", depot.private):
        result = lxc("image", "copy", f"c2c-lxd:{name}", "local:", check=False, timeout=300)
        assert result.returncode != 0, name
    assert images(lxc) == {}
    assert blobs(croft) == []


def _post_image(lxc: Lxc, source: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`POST /1.0/images` from a remote on the site, as `lxc image copy` sends it."""
    body = {"source": {"type": "image", "mode": "pull", **source}}
    return lxc("query", "--wait", "-X", "POST", "/1.0/images", "-d", json.dumps(body), check=False)


def test_the_servers_certificate_is_pinned(
    clean_site: tuple[Croft, Lxc], depot: Depot, tmp_path: Path
) -> None:
    croft, lxc = clean_site
    # Another self-signed certificate for the same address: not the depot's.
    other = tmp_path / "other.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-keyout", str(tmp_path / "other.key"), "-out", str(other)],
        check=True,
        capture_output=True,
    )
    source = {"server": depot.url, "protocol": "lxd", "fingerprint": "busybox"}
    for certificate in ("", other.read_text()):
        result = _post_image(lxc, {**source, "certificate": certificate})
        assert result.returncode != 0
        assert "certificate" in result.stderr.lower(), result.stderr
    assert images(lxc) == {}
    assert blobs(croft) == []

    pulled = _post_image(lxc, {**source, "certificate": depot.certificate.read_text()})
    assert pulled.returncode == 0, pulled.stderr
    assert list(images(lxc)) == [depot.busybox]


def test_an_unknown_image_or_a_server_that_is_down_keeps_nothing(
    clean_site: tuple[Croft, Lxc], depot: Depot
) -> None:
    croft, lxc = clean_site
    pem = depot.certificate.read_text()
    missing = _post_image(
        lxc, {"server": depot.url, "protocol": "lxd", "fingerprint": "nosuch", "certificate": pem}
    )
    assert missing.returncode != 0
    assert "has no image or alias 'nosuch'" in missing.stderr
    down = f"https://127.0.0.1:{free_port()}"
    gone = _post_image(lxc, {"server": down, "protocol": "lxd", "fingerprint": "busybox"})
    assert gone.returncode != 0
    assert down in gone.stderr and "unavailable" in gone.stderr
    assert images(lxc) == {}
    assert blobs(croft) == []


def test_an_image_that_does_not_hash_to_its_fingerprint_keeps_nothing(
    clean_site: tuple[Croft, Lxc], depot: Depot, busybox_image: Path, tmp_path: Path
) -> None:
    """The depot's copy of an image rots on its disk: it serves bytes that are not the
    image its REST API describes. The site refuses them and keeps nothing."""
    croft, lxc = clean_site
    image = repack(busybox_image, tmp_path / "rot.tar.gz", "rot")
    fingerprint = sha256(image)
    depot.lxc("image", "import", str(image), "--alias", "c2c-rot", "--public")
    try:
        blob = depot.croft.root / "state" / "images" / fingerprint
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, other bytes
        blob.write_bytes(bytes(data))

        result = lxc("image", "copy", "c2c-lxd:c2c-rot", "local:", check=False, timeout=300)

        assert result.returncode != 0
        assert f"The image {fingerprint} from {depot.url} is not the one announced" in (
            result.stderr
        )
        assert images(lxc) == {}
        assert blobs(croft) == []
    finally:
        depot.lxc("image", "delete", "c2c-rot", check=False)


# ---------------------------------------------------------------------------- simplestreams


def test_lxc_image_copy_from_a_croft_simplestreams_remote(
    clean_site: tuple[Croft, Lxc], depot: Depot
) -> None:
    _, lxc = clean_site
    lxc("image", "copy", "c2c-ss:busybox", "local:", "--alias", "c2c-ssbb", timeout=300)

    copied = images(lxc)[depot.busybox]
    assert [a["name"] for a in copied["aliases"]] == ["c2c-ssbb"]
    assert copied["properties"]["os"] == "busybox"
    lxc("launch", "c2c-ssbb", "c2c-ss1")
    assert lxc("exec", "c2c-ss1", "--", "cat", "/etc/hostname").stdout == "c2c-ss1\n"


@pytest.fixture(scope="module")
def debian_image() -> Path:
    """Built by `make images` (scripts/build-images.sh; rebuilt only when its definition
    changed)."""
    subprocess.run(
        ["bash", str(REPO / "scripts/build-images.sh"), str(BUILT_IMAGES)],
        check=True,
        timeout=900,
    )
    return BUILT_IMAGES / "debian12.tar.gz"


@pytest.mark.slow
def test_lxc_launch_debian_12_from_a_croft_simplestreams_remote(
    clean_site: tuple[Croft, Lxc], depot: Depot, debian_image: Path
) -> None:
    _, lxc = clean_site
    fingerprint = sha256(debian_image)
    if fingerprint not in {i["fingerprint"] for i in depot.lxc.json("image", "list")}:
        depot.lxc("image", "import", str(debian_image), "--public", timeout=600)
    listed = {i["fingerprint"]: i for i in lxc.json("image", "list", "c2c-ss:")}
    assert listed[fingerprint]["properties"]["os"] == "debian"

    lxc("launch", "c2c-ss:debian/12", "c2c-d1", timeout=600)

    pulled = images(lxc)[fingerprint]
    assert pulled["cached"] is True
    assert pulled["properties"]["os"] == "debian"
    assert pulled["properties"]["release"] == "bookworm"
    assert pulled["update_source"]["protocol"] == "simplestreams"
    assert pulled["update_source"]["alias"] == "debian/12"

    deadline = time.monotonic() + 120
    state = ""
    while time.monotonic() < deadline:
        result = lxc("exec", "c2c-d1", "--", "systemctl", "is-system-running", check=False)
        state = result.stdout.strip()
        if state in ("running", "degraded"):
            break
        time.sleep(1)
    assert state in ("running", "degraded"), state


# ---------------------------------------------------------------------------- croft image copy


def croft_image_copy(
    croft: Croft, *args: str, socket: Path | None = None, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(croft.env)
    if home is not None:
        env["HOME"] = str(home)
    command = ["image", "copy", *args] + (["--socket", str(socket)] if socket else [])
    return subprocess.run(
        [*CROFT, *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("protocol", ["lxd", "simplestreams"])
def test_croft_image_copy_from_an_address(
    clean_site: tuple[Croft, Lxc], depot: Depot, protocol: str
) -> None:
    croft, lxc = clean_site
    result = croft_image_copy(
        croft,
        depot.url,
        "c2c-split" if protocol == "lxd" else "busybox",
        "--protocol",
        protocol,
        "--certificate",
        str(depot.certificate),
        "--alias",
        "c2c-cli",
    )
    assert result.returncode == 0, result.stderr
    expected = depot.split if protocol == "lxd" else depot.busybox
    assert result.stdout == f"Image copied with fingerprint: {expected}\n"
    copied = images(lxc)[expected]
    assert [a["name"] for a in copied["aliases"]] == ["c2c-cli"]


def test_croft_image_copy_from_an_lxc_remote_and_its_errors(
    clean_site: tuple[Croft, Lxc], depot: Depot
) -> None:
    croft, lxc = clean_site
    result = croft_image_copy(croft, "c2c-lxd", "busybox", home=lxc.home)
    assert result.returncode == 0, result.stderr
    assert list(images(lxc)) == [depot.busybox]

    unknown = croft_image_copy(croft, "c2c-nowhere", "busybox", home=lxc.home)
    assert unknown.returncode == 1
    assert "'c2c-nowhere' is neither an https:// URL nor a remote" in unknown.stderr
    taken = croft_image_copy(croft, "c2c-lxd", "c2c-split", "--alias", "c2c-x", home=lxc.home)
    assert taken.returncode == 0, taken.stderr
    again = croft_image_copy(croft, "c2c-ss", "c2c-split", "--alias", "c2c-x", home=lxc.home)
    assert again.returncode == 1
    assert again.stderr.startswith("Error: ")
    assert sorted(images(lxc)) == sorted([depot.busybox, depot.split])


def _lxd_running() -> bool:
    if not LXD_SOCKET.exists():
        return False
    result = subprocess.run(
        ["lxc", "info"],
        env={**os.environ, "LXD_DIR": str(LXD_SOCKET.parent)},
        capture_output=True,
        timeout=20,
    )
    return result.returncode == 0


@pytest.mark.lxd_interop
def test_croft_image_copy_into_the_real_lxd(depot: Depot, tmp_path: Path) -> None:
    """The same command against LXD 5.0.2 as the local side: LXD pulls the split image
    from the depot over its own protocol (what croft implements as the puller too)."""
    if not _lxd_running():
        pytest.skip("no LXD daemon at /var/lib/lxd")
    lxd = Lxc(LXD_SOCKET.parent, tmp_path)
    alias = f"c2c-{uuid.uuid4().hex[:6]}"
    assert depot.split not in {i["fingerprint"] for i in lxd.json("image", "list")}
    result = subprocess.run(
        [*CROFT, "image", "copy"]
        + [depot.url, "c2c-split", "--certificate", str(depot.certificate)]
        + ["--alias", alias, "--socket", str(LXD_SOCKET)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"Image copied with fingerprint: {depot.split}\n"
        (copied,) = lxd.json("image", "list", alias)
        assert copied["fingerprint"] == depot.split
    finally:
        with contextlib.suppress(Exception):
            lxd("image", "delete", depot.split, check=False)
