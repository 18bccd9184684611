"""Images out of croft with the real `lxc` client: `lxc image export` (unified and split
images, re-imported with the same fingerprint) and `lxc publish` of instances and snapshots
(issue 4)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from .conftest import Croft, Lxc


def sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def api(croft_lxc: tuple[Croft, Lxc, str], method: str, path: str, body: object = None) -> dict:
    """A raw request on croft's unix socket, as `lxc query` would make it."""
    _, lxc, _ = croft_lxc
    argv = ["curl", "-s", "--unix-socket", str(lxc.lxd_dir / "unix.socket"), "-X", method]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    out = subprocess.run([*argv, f"http://croft{path}"], capture_output=True, check=True)
    return json.loads(out.stdout)


def wait_operation(croft_lxc: tuple[Croft, Lxc, str], reply: dict) -> dict:
    assert reply["type"] == "async", reply
    return api(croft_lxc, "GET", f"{reply['operation']}/wait?timeout=120")["metadata"]


def image_fingerprints(lxc: Lxc) -> set[str]:
    return {i["fingerprint"] for i in lxc.json("image", "list")}


def wait_for_api(lxc: Lxc, timeout: float = 60) -> None:
    """`croft up` returns once the processes run; the api's socket may come a little later
    on a loaded host."""
    deadline = time.monotonic() + timeout
    while lxc("query", "/1.0", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the api did not answer on its unix socket"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def busybox(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> str:
    _, lxc, _ = croft_lxc
    wait_for_api(lxc)
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    return sha256(busybox_image)


@pytest.fixture(scope="module")
def split_image(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> tuple[Path, Path]:
    """The busybox image as a split image: an xz metadata tarball and a gzip rootfs tarball."""
    out = tmp_path_factory.mktemp("split")
    meta, rootfs = out / "meta.tar.xz", out / "rootfs.tar.gz"
    with (
        tarfile.open(busybox_image) as unified,
        tarfile.open(meta, "w:xz") as m,
        tarfile.open(rootfs, "w:gz") as r,
    ):
        for member in unified.getmembers():
            data = unified.extractfile(member) if member.isfile() else None
            name = member.name.removeprefix("./")
            if name == "rootfs" or name.startswith("rootfs/"):
                member.name = "." + name.removeprefix("rootfs") or "."
                r.addfile(member, data)
            else:
                member.name = name
                m.addfile(member, data)
    return meta, rootfs


# ---------------------------------------------------------------------------- export


def test_export_of_a_unified_image_reimports_with_the_same_fingerprint(
    croft_lxc: tuple[Croft, Lxc, str], busybox: str, busybox_image: Path, tmp_path: Path
) -> None:
    _, lxc, _ = croft_lxc
    out = tmp_path / "out"
    out.mkdir()
    lxc("image", "export", "busybox", f"{out}/")
    (exported,) = out.iterdir()
    assert exported.name == f"{busybox}.tar.gz"
    assert exported.read_bytes() == busybox_image.read_bytes()

    lxc("image", "delete", "busybox")
    lxc("image", "import", str(exported), "--alias", "busybox")
    (image,) = [i for i in lxc.json("image", "list") if i["fingerprint"] == busybox]
    assert [a["name"] for a in image["aliases"]] == ["busybox"]


def test_export_answers_like_lxd(croft_lxc: tuple[Croft, Lxc, str], busybox: str) -> None:
    _, lxc, _ = croft_lxc
    head = subprocess.run(
        ["curl", "-s", "-D", "-", "-o", "/dev/null", "--unix-socket",
         str(lxc.lxd_dir / "unix.socket"), f"http://croft/1.0/images/{busybox[:12]}/export"],
        capture_output=True, text=True, check=True,
    ).stdout.lower()  # fmt: skip
    assert "content-type: application/octet-stream" in head
    assert f"content-disposition: inline;filename={busybox}.tar.gz" in head
    missing = api(croft_lxc, "GET", "/1.0/images/" + "0" * 64 + "/export")
    assert (missing["error_code"], missing["error"]) == (404, "Image not found")


def test_export_of_a_split_image_gives_both_files_and_reimports(
    croft_lxc: tuple[Croft, Lxc, str], split_image: tuple[Path, Path], tmp_path: Path
) -> None:
    _, lxc, _ = croft_lxc
    meta, rootfs = split_image
    fingerprint = sha256(meta, rootfs)
    lxc("image", "import", str(meta), str(rootfs), "--alias", "pubt-split")
    out = tmp_path / "out"
    out.mkdir()
    lxc("image", "export", "pubt-split", f"{out}/")
    exported_meta = out / f"meta-{fingerprint}.tar.xz"
    exported_rootfs = out / f"{fingerprint}.tar.gz"
    assert sorted(out.iterdir()) == sorted([exported_meta, exported_rootfs])
    assert exported_meta.read_bytes() == meta.read_bytes()
    assert exported_rootfs.read_bytes() == rootfs.read_bytes()

    lxc("image", "delete", "pubt-split")
    assert fingerprint not in image_fingerprints(lxc)
    result = lxc("image", "import", str(exported_meta), str(exported_rootfs))
    assert fingerprint in result.stdout
    assert fingerprint in image_fingerprints(lxc)
    lxc("image", "delete", fingerprint)


# ---------------------------------------------------------------------------- publish


@pytest.fixture(scope="module")
def c1(croft_lxc: tuple[Croft, Lxc, str], busybox: str) -> str:
    """A container whose rootfs has a file owned by a non-root user of the container."""
    _, lxc, _ = croft_lxc
    lxc("launch", "busybox", "pubt-c1")
    lxc("exec", "pubt-c1", "--", "sh", "-c",
        "echo published > /root/marker && chown 1000:1001 /root/marker")  # fmt: skip
    return "pubt-c1"


def test_a_running_instance_is_not_published(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> None:
    _, lxc, _ = croft_lxc
    before = image_fingerprints(lxc)
    refused = lxc("publish", c1, "--alias", "pubt-running", check=False)
    assert refused.returncode != 0
    assert "The instance is currently running" in refused.stderr
    # The server refuses too, like LXD, for clients that do not check first.
    reply = api(croft_lxc, "POST", "/1.0/images", {"source": {"type": "instance", "name": c1}})
    op = wait_operation(croft_lxc, reply)
    assert op["status"] == "Failure"
    assert op["err"] == "Cannot export a running instance as an image"
    assert image_fingerprints(lxc) == before


def test_publish_then_launch_gives_the_published_files(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    _, lxc, _ = croft_lxc
    lxc("stop", "--force", c1)
    result = lxc("publish", c1, "--alias", "pubt-mine")
    (image,) = [
        i for i in lxc.json("image", "list") if [a["name"] for a in i["aliases"]] == ["pubt-mine"]
    ]
    assert image["fingerprint"] in result.stdout
    # No properties asked for: the instance's metadata.yaml (the image's) is kept.
    assert image["properties"]["os"] == "busybox"
    assert image["architecture"] == "x86_64"

    lxc("launch", "pubt-mine", "pubt-c2")
    assert lxc("exec", "pubt-c2", "--", "cat", "/root/marker").stdout == "published\n"
    owner = lxc("exec", "pubt-c2", "--", "stat", "-c", "%u:%g", "/root/marker").stdout
    assert owner == "1000:1001\n"
    assert lxc("exec", "pubt-c2", "--", "stat", "-c", "%u", "/bin/busybox").stdout == "0\n"
    # The image's templates came along: the create template names c2, not c1.
    assert lxc("exec", "pubt-c2", "--", "cat", "/etc/hostname").stdout == "pubt-c2\n"
    lxc("delete", "--force", "pubt-c2")


def test_the_published_tarball_keeps_xattrs(
    croft_lxc: tuple[Croft, Lxc, str], c1: str, tmp_path: Path
) -> None:
    croft, lxc, _ = croft_lxc
    (rootfs,) = (croft.root / "state").glob(f"**/containers/{c1}/rootfs")
    target = rootfs / "root" / "marker"
    subprocess.run(["setfattr", "-n", "user.croft", "-v", "kept", str(target)], check=True)
    published = lxc("publish", c1, "description=xattr").stdout
    (info,) = [i for i in lxc.json("image", "list") if i["fingerprint"] in published]
    out = tmp_path / "out"
    out.mkdir()
    lxc("image", "export", info["fingerprint"], f"{out}/")
    (tarball,) = out.iterdir()
    with tarfile.open(tarball) as tar:
        member = tar.getmember("rootfs/root/marker")
        assert (member.uid, member.gid) == (1000, 1001)
        assert member.pax_headers.get("SCHILY.xattr.user.croft") == "kept"
        metadata = tar.extractfile("metadata.yaml")
        assert metadata is not None
        assert b"description: xattr" in metadata.read()
    assert info["properties"] == {"description": "xattr"}
    lxc("image", "delete", info["fingerprint"])


def test_publish_a_snapshot_with_properties(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> None:
    _, lxc, _ = croft_lxc
    lxc("snapshot", c1, "s0")
    lxc("start", c1)
    lxc("exec", c1, "--", "sh", "-c", "echo changed > /root/marker")
    # A snapshot is published while its instance runs.
    result = lxc("publish", f"{c1}/s0", "--alias", "pubt-snap", "description=from s0", "os=bb")
    (image,) = [
        i for i in lxc.json("image", "list") if [a["name"] for a in i["aliases"]] == ["pubt-snap"]
    ]
    assert image["fingerprint"] in result.stdout
    assert image["properties"] == {"description": "from s0", "os": "bb"}
    lxc("launch", "pubt-snap", "pubt-c3")
    assert lxc("exec", "pubt-c3", "--", "cat", "/root/marker").stdout == "published\n"
    lxc("delete", "--force", "pubt-c3")


@pytest.mark.parametrize(
    "source, error",
    [
        ({"type": "instance", "name": "pubt-nothing"}, "Instance not found"),
        ({"type": "snapshot", "name": "pubt-c1/nothing"}, "Snapshot not found"),
    ],
)
def test_publishing_what_does_not_exist_fails_and_stores_nothing(
    croft_lxc: tuple[Croft, Lxc, str], c1: str, source: dict, error: str
) -> None:
    _, lxc, _ = croft_lxc
    before = image_fingerprints(lxc)
    reply = api(croft_lxc, "POST", "/1.0/images", {"source": source, "aliases": [{"name": "x"}]})
    op = wait_operation(croft_lxc, reply)
    assert (op["status"], op["err"]) == ("Failure", error)
    assert image_fingerprints(lxc) == before
    assert "x" not in [a["name"] for a in lxc.json("image", "alias", "list")]


def test_bad_publish_requests_are_refused(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> None:
    bad = api(croft_lxc, "POST", "/1.0/images", {"source": {"type": "snapshot", "name": c1}})
    assert bad["error_code"] == 400
    assert "is not a snapshot name" in bad["error"]
    bad = api(
        croft_lxc,
        "POST",
        "/1.0/images",
        {"source": {"type": "instance", "name": c1}, "compression_algorithm": "lz4000"},
    )
    assert bad["error_code"] == 400
    assert 'Unsupported compression algorithm "lz4000"' in bad["error"]


def test_export_streams_a_tarball_of_the_right_size(
    croft_lxc: tuple[Croft, Lxc, str], busybox: str, busybox_image: Path
) -> None:
    """The unified body matches its Content-Length and the stored bytes."""
    _, lxc, _ = croft_lxc
    body = subprocess.run(
        ["curl", "-sf", "--unix-socket", str(lxc.lxd_dir / "unix.socket"),
         f"http://croft/1.0/images/{busybox}/export"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert hashlib.sha256(body).hexdigest() == busybox
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert tar.getmember("metadata.yaml").isfile()
