"""The simplestreams client: read an image server (``http(s)://``, ``file://`` or a
directory) as LXD's client does, and download its images verified into the blob store.

The documents themselves (what LXD 5.0 accepts, how a split image's fingerprint is carried)
are ``croft.imageformat.streams``'s, which the api shares to serve croft's own stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from croft.common.errors import InvalidArgument, NotFound, Unavailable
from croft.imageformat.format import (
    ImageInfo,
    ImageType,
    fingerprint_files,
    host_architecture,
    normalize_architecture,
    parse_image,
)
from croft.imageformat.streams import (
    INDEX_PATH,
    StreamFile,
    StreamImage,
    lxd_order,
    parse_index,
    parse_products,
    rootfs_preference,
)
from croft.images.blobs import BlobStore

CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0

Progress = Callable[[int, int], None]
"""Called as bytes arrive: (bytes done, bytes total) over all files of one image."""


class SimplestreamsClient:
    """Read a simplestreams image server: an ``http(s)://`` URL, a ``file://`` URL or a
    local directory. The index and product files are fetched once and cached in memory until
    ``refresh()``.

    Errors: Unavailable (naming the URL) when the server cannot be reached or answers with
    an HTTP error; InvalidArgument when it serves something that is not a simplestreams
    stream, or a file whose sha256 or size differs from the stream's; NotFound for an alias
    or fingerprint the stream does not have.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        verify: bool | str = True,
        user_agent: str = "croft",
    ) -> None:
        text = os.fspath(url)
        parts = urlsplit(text)
        self._dir: Path | None = None
        self._http: httpx.Client | None = None
        if parts.scheme in ("http", "https"):
            self.url = text.rstrip("/")
            self._http = httpx.Client(
                timeout=timeout,
                verify=verify,
                follow_redirects=True,
                headers={"User-Agent": user_agent},
            )
        elif parts.scheme in ("", "file"):
            self._dir = Path(parts.path if parts.scheme == "file" else text)
            self.url = str(self._dir)
        else:
            raise InvalidArgument(
                f"unsupported image server address {text!r} (expected http://, https://, "
                "file:// or a directory)"
            )
        self._images: list[StreamImage] | None = None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> SimplestreamsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- transport

    def _where(self, path: str) -> str:
        return f"{self.url}/{path}"

    @contextlib.contextmanager
    def _open(self, path: str, *, raw: bool = False) -> Iterator[Iterator[bytes]]:
        """The bytes of a stream file, in chunks; Unavailable if it cannot be had. ``raw``:
        the file's own bytes, never a content-decoded body (image files are hashed as
        stored, and a server may label a .tar.gz as gzip-encoded)."""
        where = self._where(path)
        if self._dir is not None:
            target = self._dir / path
            if not self._dir.is_dir():
                raise Unavailable(f"image server {self.url} is unavailable: no such directory")
            try:
                f = open(target, "rb")  # noqa: SIM115
            except OSError as exc:
                raise Unavailable(f"cannot read {where}: {exc.strerror}") from None
            with f:
                yield iter(lambda: f.read(CHUNK), b"")
            return
        assert self._http is not None
        try:
            headers = {"Accept-Encoding": "identity"} if raw else None
            with self._http.stream("GET", where, headers=headers) as response:
                if response.status_code != 200:
                    raise Unavailable(
                        f"image server {self.url}: GET {where} answered "
                        f"{response.status_code} {response.reason_phrase}"
                    )
                yield response.iter_raw(CHUNK) if raw else response.iter_bytes(CHUNK)
        except httpx.TransportError as exc:
            raise Unavailable(
                f"image server {self.url} is unavailable: {type(exc).__name__}: {exc}"
            ) from None

    def _read(self, path: str) -> bytes:
        with self._open(path) as chunks:
            return b"".join(chunks)

    # ----------------------------------------------------------------- listing

    def refresh(self) -> None:
        """Forget the cached index, so the next call reads the server again."""
        self._images = None

    def images(self) -> list[StreamImage]:
        """Every image the server offers, sorted as LXD sorts them (os, release, variant,
        newest serial first, architecture)."""
        if self._images is None:
            images: list[StreamImage] = []
            for path in parse_index(self._read(INDEX_PATH), self._where(INDEX_PATH)):
                images.extend(parse_products(self._read(path), self._where(path)))
            images.sort(key=lxd_order)
            self._images = images
        return list(self._images)

    def aliases(
        self,
        *,
        architecture: str | None = None,
        image_type: ImageType | None = ImageType.CONTAINER,
    ) -> dict[str, StreamImage]:
        """Each alias (and ``alias/arch``) the server answers to -> the image it resolves to."""
        result: dict[str, StreamImage] = {}
        for image in self.images():
            for alias in image.aliases:
                for name in (alias, f"{alias}/{image.stream_architecture}"):
                    if name not in result:
                        result[name] = self.resolve(
                            name, architecture=architecture, image_type=image_type
                        )
        return result

    def resolve(
        self,
        name: str,
        *,
        architecture: str | None = None,
        image_type: ImageType | None = ImageType.CONTAINER,
    ) -> StreamImage:
        """The image an alias or a (partial) fingerprint names.

        For an alias: the newest serial, of ``architecture`` (default: this host's) if the
        alias has that one, of the image type asked (None: any). NotFound otherwise.
        """
        arch = normalize_architecture(architecture) if architecture else host_architecture()
        images = [i for i in self.images() if image_type is None or i.type == image_type]
        matches = [i for i in images if i.answers_to(name)]
        if matches:
            native = [i for i in matches if i.architecture == arch]
            pool = native or matches
            return max(pool, key=lambda i: (i.serial, -rootfs_preference(i)))
        return self.image(name, image_type=image_type)

    def image(self, fingerprint: str, *, image_type: ImageType | None = None) -> StreamImage:
        """The image with this fingerprint or unique fingerprint prefix; NotFound if none."""
        prefix = fingerprint.lower()
        found = {
            i.fingerprint: i
            for i in self.images()
            if prefix
            and i.fingerprint.startswith(prefix)
            and (image_type is None or i.type == image_type)
        }
        if not found:
            raise NotFound(f"image server {self.url} has no image or alias {fingerprint!r}")
        if len(found) > 1:
            raise InvalidArgument(f"{fingerprint!r} matches more than one image on {self.url}")
        return next(iter(found.values()))

    def newer(self, image: StreamImage | str) -> StreamImage | None:
        """The newest image of the same product, architecture and type as ``image`` (a
        StreamImage, or a fingerprint that the stream still lists) if its serial is higher;
        else None. This is what an image auto-update asks."""
        current = image if isinstance(image, StreamImage) else self.image(image)
        candidates = [
            i
            for i in self.images()
            if i.product == current.product
            and i.type == current.type
            and i.serial > current.serial
            and (i.rootfs.ftype if i.rootfs else "")
            == (current.rootfs.ftype if current.rootfs else "")
        ]
        return max(candidates, key=lambda i: i.serial) if candidates else None

    # ----------------------------------------------------------------- downloads

    def _fetch_file(
        self,
        file: StreamFile,
        sink: Callable[[bytes], object],
        done: int,
        total: int,
        progress: Progress | None,
    ) -> int:
        digest = hashlib.sha256()
        size = 0
        where = self._where(file.path)
        with self._open(file.path, raw=True) as chunks:
            for chunk in chunks:
                size += len(chunk)
                if size > file.size:
                    raise InvalidArgument(
                        f"{where} is larger than the {file.size} bytes the stream lists; "
                        "nothing was kept"
                    )
                digest.update(chunk)
                sink(chunk)
                if progress is not None:
                    progress(done + size, total)
        if size != file.size:
            raise InvalidArgument(
                f"{where} has {size} bytes, the stream lists {file.size}; nothing was kept"
            )
        if digest.hexdigest() != file.sha256:
            raise InvalidArgument(
                f"{where} does not match the stream: sha256 {digest.hexdigest()}, expected "
                f"{file.sha256}; nothing was kept"
            )
        return size

    def download(
        self,
        image: StreamImage,
        dest_dir: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
    ) -> tuple[Path, Path | None]:
        """Download an image's files into ``dest_dir`` under their stream names, each checked
        against the stream's sha256 and size and the pair against the image's fingerprint.
        Returns (metadata or unified file, rootfs file or None). On any failure no file of
        this download is left in ``dest_dir``."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        done = 0
        try:
            for file in image.files:
                target = dest / file.name
                partial = dest / f".{file.name}.{os.getpid()}.part"
                written.append(partial)
                with open(partial, "wb") as f:
                    done += self._fetch_file(file, f.write, done, image.size, progress)
                os.rename(partial, target)
                written[-1] = target
            fingerprint, _ = fingerprint_files(*written)
            if fingerprint != image.fingerprint:
                raise InvalidArgument(
                    f"the files of image {image.fingerprint} from {self.url} hash to "
                    f"{fingerprint}; nothing was kept"
                )
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return written[0], written[1] if len(written) > 1 else None

    def import_image(
        self, image: StreamImage, store: BlobStore, *, progress: Progress | None = None
    ) -> ImageInfo:
        """Download an image straight into a blob store, verified against the stream (each
        file's sha256 and size) and validated (the fingerprint LXD computes must equal the
        stream's, and the image must pass croft's checks). Already stored: no download. On
        any failure nothing is stored."""
        if store.exists(image.fingerprint):
            meta, rootfs = store.files(image.fingerprint)
            return parse_image(meta, rootfs, filename=image.filename)
        with store.begin_import() as job:
            done = self._fetch_file(image.meta, job.write_metadata, 0, image.size, progress)
            if image.rootfs is not None:
                self._fetch_file(image.rootfs, job.write_rootfs, done, image.size, progress)
            return job.commit(expected_fingerprint=image.fingerprint, filename=image.filename)
