#!/usr/bin/env python3
"""Issue 4's image figures for an LXD-compatible daemon, with the stock `lxc` client:

  import   `lxc image import` of the Debian 12 image (~68 MB, unified tar.gz), deleted
           between runs: p50 of --import-runs
  remote   launch from a simplestreams server this script serves over HTTPS on loopback (a
           static tree from croft.imageformat.streams.build_stream_tree, self-signed
           certificate): the first launch, which pulls the image, and a second launch from
           the cached image; the cached image is deleted between runs, and every run uses a
           fresh port (LXD caches a server's index per URL for an hour)
  stream   100 distinct public images imported (busybox variants, 1 MB each), then the
           latency of croft's simplestreams documents, GET /streams/v1/index.json and
           images.json over its HTTPS listener, a fresh TLS connection per request. LXD has
           no simplestreams server: its column is GET /1.0/images (for index.json) and
           GET /1.0/images?recursion=1 (for images.json) on its unix socket, the closest it
           serves. GET /1.0/images?recursion=1 is also measured on both, on the same footing.

    .venv/bin/python bench/images.py --socket /var/lib/lxd/unix.socket
    .venv/bin/python bench/images.py --compare CROFT_SOCKET /var/lib/lxd/unix.socket

It needs croft's venv (it builds the stream tree with croft.imageformat), `lxc`, `openssl`.
Both daemons get byte-identical image files. Each file is made unique to this benchmark
(an empty gzip member appended, or for the 100 variants a rewritten metadata.yaml), so its
fingerprint is one nobody else's image has, and cleanup deletes exactly those fingerprints.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lxd
from lxd import SPECS, BenchError, Daemon, Figures, Phase, Spec, describe, p50, p95, say

try:
    import yaml

    from croft.imageformat.format import parse_image
    from croft.imageformat.streams import PublishedImage, build_stream_tree
except ImportError as e:  # pragma: no cover - a usage error, said plainly
    sys.exit(f"bench/images.py needs croft's venv ({e}): run it with /work/main/.venv/bin/python")

IMAGES_DIR = Path(os.environ.get("IMAGES_DIR", "/var/lib/croft/build-images"))
BENCH_PROPERTY = "croft.bench"  # set on the 100 variants, so a person can tell them apart
# mtime of the empty gzip member appended to make a file's fingerprint this benchmark's own;
# fixed, so a run cleans up what an interrupted earlier run left behind
NONCE = {"import": 0x62656E01, "remote": 0x62656E02}

SPECS.update(
    {
        "import_debian": Spec("lxc image import debian12 (68 MB), p50", "s"),
        "import_debian_max": Spec("lxc image import debian12 (68 MB), max", "s"),
        "remote_first_busybox": Spec("launch REMOTE:busybox, first (pulls 1 MB), p50", "ms"),
        "remote_cached_busybox": Spec("launch REMOTE:busybox, image cached, p50", "ms"),
        "remote_first_debian": Spec("launch REMOTE:debian12, first (pulls 68 MB), p50", "ms"),
        "remote_cached_debian": Spec("launch REMOTE:debian12, image cached, p50", "ms"),
        "import_100": Spec("import 100 public 1 MB images, 4 at a time: wall", "s"),
        "stream_cold": Spec("first GET streams/v1/images.json after them (LXD: -)", "ms"),
        "stream_index_p50": Spec(
            "GET streams/v1/index.json, 100 img, p50 (LXD: GET /1.0/images)", "ms"
        ),
        "stream_index_p95": Spec("  same, p95", "ms"),
        "stream_products_p50": Spec(
            "GET streams/v1/images.json, 100 img, p50 (LXD: /1.0/images?recursion=1)", "ms"
        ),
        "stream_products_p95": Spec("  same, p95", "ms"),
        "images_recursion_p50": Spec("unix GET /1.0/images?recursion=1, 100 img, p50", "ms"),
        "images_recursion_p95": Spec("unix GET /1.0/images?recursion=1, 100 img, p95", "ms"),
        "transport_p50": Spec("the transport alone: GET /1.0 (croft https, LXD unix), p50", "ms"),
    }
)
IMPORT_KEYS = ("import_debian", "import_debian_max")
REMOTE_KEYS = (
    "remote_first_busybox",
    "remote_cached_busybox",
    "remote_first_debian",
    "remote_cached_debian",
)
STREAM_KEYS = (
    "import_100",
    "stream_cold",
    "stream_index_p50",
    "stream_index_p95",
    "stream_products_p50",
    "stream_products_p95",
    "images_recursion_p50",
    "images_recursion_p95",
    "transport_p50",
)


# ---------------------------------------------------------------------------------------
# the image files: made once per run, identical for both daemons


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def unique_copy(source: Path, target: Path, nonce: int) -> Path:
    """`source` with an empty gzip member appended: a gzip reader (gzip, Go's, Python's)
    yields the identical tar stream, but the file, and so the fingerprint, is new."""
    shutil.copyfile(source, target)
    with target.open("ab") as f:
        f.write(gzip.compress(b"", mtime=nonce))
    return target


def variants(base: Path, outdir: Path, count: int) -> list[Path]:
    """`count` unified images from the busybox image `base`, each its own product in a
    stream (os `benchbox`, release `bNNN`), so each has its own fingerprint. Each run makes
    new fingerprints (a run id in the properties): croft keeps a rendered stream for as
    long as the set of public images is the same, so the same 100 images imported again
    would find their stream already rendered. Leftovers of an interrupted run are known by
    the property BENCH_PROPERTY."""
    run_id = os.urandom(6).hex()
    with tarfile.open(base) as tar:
        members = []
        for member in tar.getmembers():
            data = tar.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            members.append((member, data))
    meta_index = next(
        i for i, (m, _) in enumerate(members) if m.name.lstrip("./") == "metadata.yaml"
    )
    metadata = yaml.safe_load(members[meta_index][1] or b"")
    paths = []
    for n in range(count):
        props = dict(metadata.get("properties") or {})
        props.update(
            {
                "os": "benchbox",
                "release": f"b{n:03d}",
                "description": f"croft image benchmark variant {n}",
                BENCH_PROPERTY: f"images {run_id}",
            }
        )
        text = yaml.safe_dump({**metadata, "properties": props}, sort_keys=False).encode()
        path = outdir / f"benchbox-{n:03d}.tar.gz"
        with (
            path.open("wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as out,
        ):
            for i, (member, data) in enumerate(members):
                if i == meta_index:
                    member = tarfile.TarInfo(member.name)
                    member.size, member.mode, member.mtime = len(text), 0o644, 0
                    data = text
                out.addfile(member, io.BytesIO(data) if data is not None else None)
        paths.append(path)
    return paths


@dataclass
class Files:
    """What the phases import or serve, made in `root` before the first phase."""

    root: Path
    debian: Path | None = None  # for the import phase
    remote: dict[str, Path] = field(default_factory=dict)  # kind -> file served in a stream
    hundred: list[Path] = field(default_factory=list)
    fingerprints: dict[Path, str] = field(default_factory=dict)
    cert: Path | None = None
    key: Path | None = None
    trees: dict[str, tuple[Path, str]] = field(default_factory=dict)  # kind -> (tree, alias)

    def fingerprint(self, path: Path) -> str:
        if path not in self.fingerprints:
            self.fingerprints[path] = sha256_file(path)
        return self.fingerprints[path]

    def all_fingerprints(self) -> set[str]:
        return set(self.fingerprints.values())


def prepare(args: argparse.Namespace, root: Path) -> Files:
    files = Files(root)
    phases = set(args.only.split(",")) if args.only else {"import", "remote", "stream"}
    debian_src, busybox_src = Path(args.debian_image), Path(args.busybox_image)
    started = time.perf_counter()
    if "import" in phases and debian_src.is_file():
        files.debian = unique_copy(debian_src, root / "debian12.tar.gz", NONCE["import"])
        files.fingerprint(files.debian)
    if "remote" in phases:
        sources = {"busybox": busybox_src, "debian": debian_src}
        for kind in args.remote_images.split(","):
            if kind not in sources:
                raise SystemExit(f"--remote-images: unknown {kind!r} (busybox, debian)")
            if sources[kind].is_file():
                path = unique_copy(sources[kind], root / f"remote-{kind}.tar.gz", NONCE["remote"])
                files.remote[kind] = path
                files.fingerprint(path)
        files.cert, files.key = root / "server.crt", root / "server.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
            + ["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
            + ["-addext", "subjectAltName=IP:127.0.0.1"]
            + ["-keyout", str(files.key), "-out", str(files.cert)],
            check=True,
            capture_output=True,
        )
        for kind, path in files.remote.items():
            alias = f"bench-{kind}"
            tree = root / f"tree-{kind}"
            build_stream_tree([PublishedImage(parse_image(path), (path,), None, (alias,))], tree)
            files.trees[kind] = (tree, alias)
    if "stream" in phases and busybox_src.is_file():
        (root / "hundred").mkdir()
        files.hundred = variants(busybox_src, root / "hundred", args.stream_images)
        for path in files.hundred:
            files.fingerprint(path)
    say(f"# image files prepared in {time.perf_counter() - started:.1f} s under {root}")
    return files


def image_fingerprints(daemon: Daemon) -> set[str]:
    return {url.rsplit("/", 1)[-1] for url in daemon.request("GET", "/1.0/images")}


def leftover_variants(daemon: Daemon) -> set[str]:
    """The 100-image phase's images of any run, by their BENCH_PROPERTY."""
    return {
        str(image["fingerprint"])
        for image in daemon.request("GET", "/1.0/images?recursion=1")
        if str((image.get("properties") or {}).get(BENCH_PROPERTY, "")).startswith("images")
    }


def delete_images(daemon: Daemon, fingerprints: set[str]) -> None:
    """Delete those of `fingerprints` the daemon has, a few `lxc image delete` at a time."""
    present = sorted(image_fingerprints(daemon) & fingerprints)
    if not present:
        return
    chunks = [present[i : i + 20] for i in range(0, len(present), 20)]
    lxd.run_parallel(lambda chunk: daemon.lxc("image", "delete", *chunk), chunks, 4)


def upload_image(daemon: Daemon, path: Path, timeout: int = 60) -> None:
    """POST /1.0/images with a unified tarball as the body and wait for the operation, as
    `lxc image import FILE --public` does. Used for the 100 images: LXD 5.0.2's client,
    run 4 at a time, now and then never sees its import's operation end (LXD has finished
    it) and waits forever."""
    conn = lxd.UnixHTTPConnection(daemon.socket, timeout=timeout)
    try:
        with path.open("rb") as body:
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(path.stat().st_size),
                "X-LXD-public": "true",
                "X-LXD-filename": path.name,
            }
            conn.request("POST", "/1.0/images", body=body, headers=headers)
        response = conn.getresponse()
        doc = json.loads(response.read())
    finally:
        conn.close()
    if response.status >= 400 or doc.get("type") == "error" or not doc.get("operation"):
        raise BenchError(f"{daemon.label}: POST /1.0/images {path.name}: {doc.get('error')}")
    operation = daemon.request("GET", f"{doc['operation']}/wait?timeout={timeout}")
    if operation.get("status") != "Success":
        raise BenchError(
            f"{daemon.label}: import of {path.name}: {operation.get('status')} "
            f"{operation.get('err')}"
        )


# ---------------------------------------------------------------------------------------
# import


def import_phase(files: Files, daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    if files.debian is None:
        raise BenchError(
            f"no Debian image at {args.debian_image} (`make images` in /work/main builds it)"
        )
    fingerprint = files.fingerprint(files.debian)
    size = files.debian.stat().st_size / 1e6
    samples = []
    for _ in range(args.import_runs):
        delete_images(daemon, {fingerprint})
        samples.append(daemon.timed_lxc("image", "import", str(files.debian)))
        if fingerprint not in image_fingerprints(daemon):
            raise BenchError(f"{daemon.label}: import finished but {fingerprint[:12]} is missing")
    delete_images(daemon, {fingerprint})
    say(f"  image import {size:.0f} MB    {describe(samples, 1)} s")
    out["import_debian"], out["import_debian_max"] = p50(samples), max(samples)


# ---------------------------------------------------------------------------------------
# launch from a simplestreams server


class _Handler(http.server.SimpleHTTPRequestHandler):
    served: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        self.served.append(self.path)


class StreamServer:
    """The static tree over HTTPS on a fresh loopback port, in threads of this process;
    remembers every path it was asked for."""

    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        self.served: list[str] = []
        handler = type("Handler", (_Handler,), {"served": self.served})
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def downloads(self) -> int:
        return sum(1 for path in self.served if path.startswith("/images/"))

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def add_remote(daemon: Daemon, name: str, url: str, cert: Path) -> None:
    daemon.lxc("remote", "add", name, url, "--protocol", "simplestreams", "--public")
    # The client pins a simplestreams server's certificate from here and hands it to the
    # daemon (source.certificate), which then trusts exactly that certificate.
    certs = Path(daemon.home) / ".config" / "lxc" / "servercerts"
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copy(cert, certs / f"{name}.crt")


def remote_phase(files: Files, daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    pool = ["-s", args.pool] if args.pool else []
    wanted = args.remote_images.split(",")
    missing = [kind for kind in wanted if kind not in files.trees]
    for kind in missing:
        reason = f"no {kind} image file ({args.busybox_image if kind == 'busybox' else args.debian_image})"
        lxd.fail(out, (f"remote_first_{kind}", f"remote_cached_{kind}"), reason)
    for kind in (k for k in wanted if k in files.trees):
        tree, alias = files.trees[kind]
        fingerprint = files.fingerprint(files.remote[kind])
        first, cached = [], []
        for run in range(args.remote_runs):
            delete_images(daemon, {fingerprint})
            server = StreamServer(tree, files.cert, files.key)  # type: ignore[arg-type]
            remote = f"bench-ss{run}"
            names = [f"{lxd.PREFIX}{kind[:3]}-pull{run}", f"{lxd.PREFIX}{kind[:3]}-cached{run}"]
            try:
                daemon.lxc("remote", "remove", remote, check=False)
                add_remote(daemon, remote, server.url, files.cert)
                first.append(daemon.timed_lxc("launch", f"{remote}:{alias}", names[0], *pool))
                pulled = server.downloads()
                cached.append(daemon.timed_lxc("launch", f"{remote}:{alias}", names[1], *pool))
                if not pulled:
                    raise BenchError(f"{daemon.label}: the first launch downloaded no image file")
                if server.downloads() != pulled:
                    say(f"  warning: {daemon.label}: the second launch downloaded the image again")
                if fingerprint not in image_fingerprints(daemon):
                    raise BenchError(
                        f"{daemon.label}: the pulled image {fingerprint[:12]} is missing"
                    )
            finally:
                daemon.delete(set(names) & set(daemon.instance_names()))
                delete_images(daemon, {fingerprint})
                daemon.lxc("remote", "remove", remote, check=False)
                server.stop()
        say(f"  launch {kind + ', first (pull)':24} {describe(first)} ms")
        say(f"  launch {kind + ', cached':24} {describe(cached)} ms")
        out[f"remote_first_{kind}"] = p50(first) * 1e3
        out[f"remote_cached_{kind}"] = p50(cached) * 1e3


# ---------------------------------------------------------------------------------------
# the simplestreams index with 100 public images


def https_address(daemon: Daemon, override: str | None) -> tuple[str, int] | None:
    """Where the daemon serves HTTPS (`environment.addresses`), loopback for a wildcard."""
    address = override or next(iter(daemon.environment().get("addresses") or []), None)
    if not address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return host, int(port)


def timed_https_get(
    host: str, port: int, path: str, context: ssl.SSLContext
) -> tuple[float, bytes]:
    """Wall time of one GET on a fresh TLS connection: connect, handshake, request, body."""
    started = time.perf_counter()
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise BenchError(f"GET https://{host}:{port}{path}: HTTP {response.status}: {body[:200]!r}")
    return elapsed, body


def stream_phase(files: Files, daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    if not files.hundred:
        raise BenchError(f"no busybox image at {args.busybox_image} to make the variants from")
    ours = {files.fingerprint(p) for p in files.hundred}
    delete_images(daemon, ours)
    is_croft = daemon.environment().get("server") != "lxd"
    address = https_address(daemon, args.https) if is_croft else None
    if is_croft and address is None:
        raise BenchError(
            f"{daemon.label} has no HTTPS listener for its simplestreams server "
            "(set api.https_address in its config, or pass --https HOST:PORT)"
        )

    def one(path: Path) -> None:
        upload_image(daemon, path)

    started = time.perf_counter()
    lxd.run_parallel(one, files.hundred, 4)
    out["import_100"] = time.perf_counter() - started
    if missing := ours - image_fingerprints(daemon):
        raise BenchError(f"{daemon.label}: {len(missing)} of the imported images are missing")
    total = len(image_fingerprints(daemon))
    say(f"  imported {len(ours)} public images in {out['import_100']:.1f} s ({total} in all)")
    runs = args.stream_runs

    def series(key: str, timed: Any, label: str) -> None:
        timed()  # a warm-up request: connections, caches
        samples = [timed() for _ in range(runs)]
        say(f"  {label:46} {describe(samples)} ms")
        out[f"{key}_p50"], out[f"{key}_p95"] = p50(samples) * 1e3, p95(samples) * 1e3

    if address is not None:
        host, port = address
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        elapsed, body = timed_https_get(host, port, "/streams/v1/images.json", context)
        out["stream_cold"] = elapsed * 1e3
        listed = {fp for fp in ours if fp.encode() in body}
        if listed != ours:
            raise BenchError(
                f"{daemon.label}: images.json lists {len(listed)} of the {len(ours)} public images"
            )
        say(
            f"  first GET images.json (renders the stream)    {elapsed * 1e3:.1f} ms, {len(body)} bytes"
        )
        for key, path in (("stream_index", "index.json"), ("stream_products", "images.json")):
            url = f"/streams/v1/{path}"
            series(
                key,
                lambda url=url: timed_https_get(host, port, url, context)[0],
                f"https GET {url}",
            )
        # what TLS, HTTP and the api cost before any image is looked at
        series(
            "transport", lambda: timed_https_get(host, port, "/1.0", context)[0], "https GET /1.0"
        )
    else:
        say("  LXD serves no simplestreams: its figures are GET /1.0/images on the unix socket")
        series("stream_index", lambda: daemon.timed_get("/1.0/images"), "unix GET /1.0/images")
        series(
            "stream_products",
            lambda: daemon.timed_get("/1.0/images?recursion=1"),
            "unix GET /1.0/images?recursion=1",
        )
        series("transport", lambda: daemon.timed_get("/1.0"), "unix GET /1.0")
    series(
        "images_recursion",
        lambda: daemon.timed_get("/1.0/images?recursion=1"),
        "unix GET /1.0/images?recursion=1",
    )
    delete_images(daemon, ours)


# ---------------------------------------------------------------------------------------


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debian-image", default=str(IMAGES_DIR / "debian12.tar.gz"))
    parser.add_argument("--busybox-image", default=str(IMAGES_DIR / "busybox.tar.gz"))
    parser.add_argument("--import-runs", type=int, default=5, help="Debian imports")
    parser.add_argument("--remote-runs", type=int, default=5, help="first+cached launch pairs")
    parser.add_argument(
        "--remote-images", default="busybox,debian", help="served by the stream: busybox,debian"
    )
    parser.add_argument("--stream-images", type=int, default=100, help="public images")
    parser.add_argument("--stream-runs", type=int, default=50, help="requests per figure")
    parser.add_argument("--https", help="croft's HTTPS HOST:PORT (default: from GET /1.0)")
    # launches go to the default profile's pool unless --pool names one
    parser.set_defaults(pool="")


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    arguments(parser)
    parser.add_argument("--only")
    known, _ = parser.parse_known_args()
    if {"-h", "--help"} & set(sys.argv[1:]):
        return lxd.main(__doc__ or "", [], arguments, needs_image=False)
    root = Path(tempfile.mkdtemp(prefix="bench-images-", dir="/var/tmp"))
    try:
        files: Files | None = None
        try:
            files = prepare(known, root)
        except (OSError, subprocess.CalledProcessError) as e:
            say(f"error: preparing the image files: {e}")
            return 1
        ours = files.all_fingerprints()
        phases = [
            Phase("import", IMPORT_KEYS, functools.partial(import_phase, files)),
            Phase("remote", REMOTE_KEYS, functools.partial(remote_phase, files)),
            Phase("stream", STREAM_KEYS, functools.partial(stream_phase, files)),
        ]
        return lxd.main(
            __doc__ or "",
            phases,
            arguments,
            needs_image=False,
            cleanup=lambda daemon: delete_images(daemon, ours | leftover_variants(daemon)),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
