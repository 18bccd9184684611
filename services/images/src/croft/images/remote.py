"""Images from remote image servers: pull, cache, auto-update, expiry, refresh (LXD's
`ImageDownload`, `autoUpdateImages`, `pruneExpiredImages` and `imageRefresh`).

A pulled image is an ordinary image record (`croft.images.core`) with, as in LXD:

- `update_source`: LXD's ImageSource `{"alias", "certificate", "protocol", "server",
  "image_type"}`, kept only when the image was asked for by an alias (a fingerprint never
  changes, so there is nothing to follow);
- `auto_update`: follow `update_source` (only meaningful with one);
- `cached`: pulled to create an instance; removed once unused for
  `images.remote_cache_expiry` days.

Protocols: `simplestreams` (any static tree, `croft.images.simplestreams`), `lxd` (another
LXD's or croft's REST API, as an untrusted client: `GET /1.0/images/aliases/<alias>`,
`GET /1.0/images/<fp>`, then `GET /1.0/images/<fp>/export`, one body for a unified image or
multipart `metadata` + `rootfs` for a split one; the record is made of the server's image, as
LXD makes it), `direct` (one unified image file at a URL whose sha256 is known) and `url`
(LXD's URL source: a HEAD of the URL answers with `LXD-Image-Hash` and `LXD-Image-URL`, then
`direct`). A `certificate` in the source pins the server's certificate. Downloads run in a
thread (httpx is blocking there) straight into the blob store, which verifies and publishes
the blob or removes every partial file; the record is created after, under the blob lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import posixpath
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import quote, urljoin, urlsplit

import httpx

from croft.common.blocking import in_thread
from croft.common.config import ImagesConfig
from croft.common.errors import (
    Conflict,
    CroftError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from croft.common.events import lifecycle_metadata, publish, rfc3339_nano
from croft.common.models import ImageAliasRecord, ImageMeta, ImageRecord
from croft.common.multipart import MultipartParser, MultipartPart
from croft.common.records import RECORDS, modify, project_key
from croft.common.store import Delete, Update, dump
from croft.imageformat.format import ImageInfo, ImageType, host_architecture, parse_image
from croft.imageformat.records import ALIASES, IMAGES, NEVER_USED, image_key
from croft.imageformat.streams import StreamImage
from croft.images.blobs import BlobStore
from croft.images.core import ImagesCore
from croft.images.simplestreams import SimplestreamsClient

log = logging.getLogger(__name__)

PROTOCOLS = ("simplestreams", "direct", "url", "lxd")
SERVER_CONFIG_KEY = f"{RECORDS}server/config"  # the api's server config record (LXD's /1.0)
TASK_LOCK_KEY = "/croft/locks/images-tasks"
USER_AGENT = "LXD 5.0.2"  # what servers that sniff the client expect of an LXD
TIMEOUT = 30.0  # seconds to connect and between bytes of a download
CHUNK = 1 << 20
DEFAULT_AUTO_UPDATE_HOURS = 6
DEFAULT_CACHE_EXPIRY_DAYS = 10

ProgressText = Callable[[str], None]
_HEX = re.compile(r"[0-9a-fA-F]{1,64}")


# ---------------------------------------------------------------------------- domain objects


@dataclass(frozen=True)
class RemoteSource:
    """LXD's ImageSource: where an image comes from and how to ask for it again."""

    server: str
    protocol: str = "simplestreams"
    alias: str = ""  # an alias, a fingerprint or a unique fingerprint prefix
    certificate: str = ""  # PEM; when given, the server must present exactly this one
    image_type: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "alias": self.alias,
            "certificate": self.certificate,
            "protocol": self.protocol,
            "server": self.server,
            "image_type": self.image_type,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RemoteSource:
        return cls(
            server=str(data.get("server", "")),
            protocol=str(data.get("protocol", "") or "simplestreams"),
            alias=str(data.get("alias", "")),
            certificate=str(data.get("certificate", "")),
            image_type=str(data.get("image_type", "")),
        )

    def check(self) -> None:
        if not self.server:
            raise InvalidArgument("The image source has no server")
        if self.protocol not in PROTOCOLS:
            raise InvalidArgument(f"Unsupported protocol: {self.protocol}")
        scheme = urlsplit(self.server).scheme
        if scheme not in ("http", "https"):
            raise InvalidArgument(f"The image server {self.server!r} is not an http(s) URL")
        if self.protocol != "url" and not self.alias:
            raise InvalidArgument("must specify one of alias or fingerprint for init from image")
        if self.image_type not in ("", "container", "virtual-machine"):
            raise InvalidArgument(f"Invalid image type {self.image_type!r}")


@dataclass(frozen=True)
class PullRequest:
    """An image to download from a remote server into a project."""

    project: str
    source: RemoteSource
    auto_update: bool = False
    public: bool = False
    cached: bool = False  # for an instance: cached, last used now, expires once unused
    aliases: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)
    filename: str = ""
    prefer_cached: bool = False  # use a cached image of the same source without asking


@dataclass
class _Remote:
    """An image found on a remote server, ready to be fetched (blocking) into a blob store."""

    fingerprint: str
    by_alias: bool
    fetch: Callable[[BlobStore, Callable[[int, int], None]], ImageInfo]
    stream: StreamImage | None = None  # simplestreams: the record comes from the stream
    image: dict[str, Any] | None = None  # lxd: the record comes from the server's image
    close: Callable[[], None] = lambda: None  # the connection, when `fetch` is not called

    @property
    def meta_size(self) -> int:
        return self.stream.meta.size if self.stream is not None else 0


class _Cancelled(Exception):
    """Raised inside a download thread when the caller went away."""


# ---------------------------------------------------------------------------- progress


def byte_size(value: float) -> str:
    """LXD's units.GetByteSizeString(value, 2): `512B`, `1.50kB`, `10.25MB`."""
    if value < 1000:
        return f"{int(value)}B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 1000 or unit == "PB":
            return f"{value:.2f}{unit}"
    return f"{value:.2f}PB"


class _Meter:
    """Turns (done, total) byte counts from a download thread into LXD's progress text,
    reported when it changes: `metadata: 42% (10.50MB/s)` then `rootfs: ...` per file from an
    image server (`meta_size` bytes of metadata come first), `42% (10.50MB/s)` for a single
    file (meta_size 0). Raises _Cancelled in the thread once the caller has gone."""

    def __init__(
        self, report: ProgressText | None, cancelled: threading.Event, meta_size: int = 0
    ) -> None:
        self.report = report
        self.cancelled = cancelled
        self.meta_size = meta_size
        self.started = time.monotonic()
        self.last = ""

    def __call__(self, done: int, total: int) -> None:
        if self.cancelled.is_set():
            raise _Cancelled("the download was cancelled")
        if self.report is None or total <= 0:
            return
        label, part, size = "", done, total
        if self.meta_size:
            if done <= self.meta_size:
                label, size = "metadata: ", self.meta_size
            else:
                label, part, size = "rootfs: ", done - self.meta_size, total - self.meta_size
        percent = min(100, part * 100 // max(size, 1))
        if f"{label}{percent}" == self.last:
            return
        self.last = f"{label}{percent}"
        speed = done / max(time.monotonic() - self.started, 1e-3)
        self.report(f"{label}{percent}% ({byte_size(speed)}/s)")


def _tls(certificate: str) -> bool | ssl.SSLContext:
    """System CAs, or only `certificate` (LXD pins a given server certificate: it is the
    server's identity, whatever name the URL uses)."""
    if not certificate:
        return True
    try:
        context = ssl.create_default_context(cadata=certificate)
    except (ssl.SSLError, ValueError) as exc:
        raise InvalidArgument(
            f"The image server certificate is not a PEM certificate: {exc}"
        ) from None
    context.check_hostname = False
    return context


def _now() -> str:
    return rfc3339_nano()


def _rfc3339(moment: datetime | None) -> str:
    if moment is None:
        return "1970-01-01T00:00:00Z"
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------- fetching


def _download_direct(
    url: str,
    fingerprint: str,
    certificate: str,
    blobs: BlobStore,
    meter: Callable[[int, int], None],
) -> ImageInfo:
    """LXD's `direct` protocol: one unified image file at `url`, whose sha256 must be
    `fingerprint`. Blocking; nothing stays on failure."""
    with (
        httpx.Client(
            verify=cast(Any, _tls(certificate)),
            timeout=TIMEOUT,
            follow_redirects=True,
            headers={"User-Agent": USER_AGENT},
        ) as http,
        blobs.begin_import() as job,
    ):
        try:
            with http.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
                if response.status_code != 200:
                    raise Unavailable(
                        f'Unable to fetch "{url}": {response.status_code} {response.reason_phrase}'
                    )
                total = int(response.headers.get("content-length") or 0)
                done = 0
                for chunk in response.iter_raw(CHUNK):
                    job.write_metadata(chunk)
                    done += len(chunk)
                    meter(done, total or done)
        except httpx.TransportError as exc:
            raise Unavailable(f'Unable to fetch "{url}": {type(exc).__name__}: {exc}') from None
        if job.size == 0:
            raise InvalidArgument(f'"{url}" answered with no image')
        try:
            return job.commit(
                expected_fingerprint=fingerprint,
                filename=posixpath.basename(urlsplit(url).path),
            )
        except InvalidArgument as exc:
            raise InvalidArgument(f'The image at "{url}" is not the one announced: {exc}') from None


def _url_target(url: str) -> tuple[str, str]:
    """LXD's URL source: HEAD the URL; it answers with the image's hash and file URL."""
    headers = {
        "User-Agent": USER_AGENT,
        "LXD-Server-Architectures": host_architecture(),
        "LXD-Server-Version": "5.0.2",
    }
    try:
        with httpx.Client(timeout=TIMEOUT, follow_redirects=True) as http:
            response = http.head(url, headers=headers)
    except httpx.TransportError as exc:
        raise Unavailable(
            f'Unable to reach "{url}": {type(exc).__name__}: {exc}; nothing was stored'
        ) from None
    digest = response.headers.get("LXD-Image-Hash", "").strip().lower()
    if not digest:
        raise InvalidArgument("Missing LXD-Image-Hash header")
    target = response.headers.get("LXD-Image-URL", "").strip()
    if not target:
        raise InvalidArgument("Missing LXD-Image-URL header")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidArgument(f"LXD-Image-Hash {digest!r} is not a sha256")
    return digest, urljoin(url, target)


# ---------------------------------------------------------------------------- lxd protocol


def _header_filename(disposition: str) -> str:
    for item in disposition.split(";"):
        param, _, text = item.strip().partition("=")
        if param.lower() == "filename":
            return posixpath.basename(text.strip().strip('"'))
    return ""


class _LxdServer:
    """Another LXD's (or croft's) REST API as an untrusted client sees it: public images,
    their aliases, their files (LXD's `ConnectPublicLXD`). Blocking."""

    def __init__(self, source: RemoteSource) -> None:
        self.server = source.server.rstrip("/")
        self.http = httpx.Client(
            base_url=self.server,
            verify=cast(Any, _tls(source.certificate)),
            timeout=TIMEOUT,
            headers={"User-Agent": USER_AGENT},
        )

    def close(self) -> None:
        self.http.close()

    def _unreachable(self, exc: httpx.TransportError) -> Unavailable:
        return Unavailable(
            f"The image server {self.server} is unavailable: {type(exc).__name__}: {exc}"
        )

    def _error(self, response: httpx.Response, body: bytes) -> CroftError:
        """An error answer in LXD's envelope as a croft error; anything else says that
        the server is no LXD."""
        try:
            envelope = json.loads(body)
        except ValueError:
            envelope = None
        where = f"{self.server}{response.request.url.path}"
        if not isinstance(envelope, dict) or "error" not in envelope:
            return InvalidArgument(
                f"The image server {self.server} is not an LXD server: GET {where} answered "
                f"{response.status_code} {response.reason_phrase}"
            )
        message = str(envelope.get("error") or response.reason_phrase)
        if response.status_code == 404:
            return NotFound(message)
        return Unavailable(f"The image server {self.server} refused GET {where}: {message}")

    def get(self, path: str) -> dict[str, Any]:
        """The metadata of a sync answer; NotFound for a 404."""
        try:
            response = self.http.get(path)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code != 200:
            raise self._error(response, response.content)
        try:
            envelope = response.json()
            metadata = envelope["metadata"]
        except (ValueError, KeyError, TypeError):
            metadata = None
        if not isinstance(metadata, dict):
            raise InvalidArgument(
                f"The image server {self.server} is not an LXD server: GET {path} answered "
                "with no LXD envelope"
            )
        return metadata

    def alias_target(self, name: str, image_type: str) -> str | None:
        """The fingerprint an alias of the server names (of `image_type` when given)."""
        try:
            entry = self.get(f"/1.0/images/aliases/{quote(name, safe='')}")
        except NotFound:
            return None
        if image_type and entry.get("type", "container") != image_type:
            return None
        target = entry.get("target")
        return str(target) if target else None

    def download(
        self, image: dict[str, Any], blobs: BlobStore, meter: Callable[[int, int], None]
    ) -> ImageInfo:
        """GET /1.0/images/<fp>/export into the blob store: a unified image as one body, a
        split one as multipart `metadata` + `rootfs` (or `rootfs.img`). The files must hash
        to the fingerprint; nothing stays on failure."""
        fingerprint = image["fingerprint"]
        size = int(image.get("size") or 0)
        path = f"/1.0/images/{fingerprint}/export"
        try:
            with (
                blobs.begin_import() as job,
                self.http.stream("GET", path, headers={"Accept-Encoding": "identity"}) as response,
            ):
                if response.status_code != 200:
                    raise self._error(response, response.read())
                mime, _, params = response.headers.get("content-type", "").partition(";")
                total = int(response.headers.get("content-length") or 0) or size
                filename = _header_filename(response.headers.get("content-disposition", ""))
                write = job.write_metadata
                parts: list[str] = []
                reader = None
                if mime.strip().lower() == "multipart/form-data":
                    boundary = params.partition("boundary=")[2].split(";")[0].strip().strip('"')
                    if not boundary:
                        raise InvalidArgument("Invalid multipart image: no boundary")
                    reader = MultipartParser(boundary.encode())
                received = 0
                for chunk in response.iter_raw(CHUNK):
                    received += len(chunk)
                    if size and received > size + (64 << 10):
                        raise InvalidArgument(
                            f"The image server {self.server} sent more than the {size} bytes "
                            f"of image {fingerprint}; nothing was kept"
                        )
                    pieces: list[MultipartPart | bytes] = [chunk]
                    if reader is not None:
                        pieces = reader.feed(chunk)
                    for piece in pieces:
                        if isinstance(piece, bytes):
                            if reader is not None and not parts:
                                raise InvalidArgument("Invalid multipart image: data before a part")
                            write(piece)
                            continue
                        name, part_filename = piece.name, posixpath.basename(piece.filename)
                        expected = ("metadata",) if not parts else ("rootfs", "rootfs.img")
                        if len(parts) > 1 or name not in expected:
                            raise InvalidArgument(
                                f"Invalid multipart image: unexpected part {name!r}"
                            )
                        parts.append(name)
                        if name == "metadata":
                            filename = part_filename
                        else:
                            write = job.write_rootfs
                            write(b"")  # a rootfs part, even an empty one, makes it split
                    meter(job.size, max(total, job.size))
                if reader is not None:
                    reader.finish()
                    if len(parts) != 2:
                        raise InvalidArgument("Invalid multipart image: it needs two parts")
                if job.size == 0:
                    raise InvalidArgument(f"{self.server}{path} answered with no image")
                try:
                    return job.commit(expected_fingerprint=fingerprint, filename=filename)
                except InvalidArgument as exc:
                    raise InvalidArgument(
                        f"The image {fingerprint} from {self.server} is not the one announced: "
                        f"{exc.message}; nothing was kept"
                    ) from None
        except httpx.TransportError as exc:
            raise Unavailable(
                f"The download of image {fingerprint} from {self.server} failed: "
                f"{type(exc).__name__}: {exc}; nothing was kept"
            ) from None


def _find_lxd(source: RemoteSource) -> _Remote:
    """LXD's ImageDownload from an LXD server (public images): an alias of the server (of
    the image type asked) names a fingerprint, else `source.alias` is a fingerprint or a
    unique prefix; GET /1.0/images/<fp> then gives the image the record is made of."""
    server = _LxdServer(source)
    try:
        name = source.alias
        target = server.alias_target(name, source.image_type)
        unknown = NotFound(f"The image server {source.server} has no image or alias {name!r}")
        if target is None and not _HEX.fullmatch(name):
            raise unknown  # neither an alias nor a fingerprint (prefix)
        try:
            image = server.get(f"/1.0/images/{quote(target or name.lower(), safe='')}")
        except NotFound:
            raise unknown from None
        fingerprint = str(image.get("fingerprint", "")).lower()
        if len(fingerprint) != 64 or not fingerprint.startswith((target or name).lower()):
            raise InvalidArgument(
                f"The image server {source.server} answered for {name!r} with image {fingerprint!r}"
            )
        if source.image_type and image.get("type", "container") != source.image_type:
            raise NotFound(
                f"The image server {source.server} has no {source.image_type} image {name!r}"
            )
    except BaseException:
        server.close()
        raise
    image = {**image, "fingerprint": fingerprint}

    def fetch(blobs: BlobStore, meter: Callable[[int, int], None]) -> ImageInfo:
        try:
            return server.download(image, blobs, meter)
        finally:
            server.close()

    by_alias = not fingerprint.startswith(name.lower())
    return _Remote(fingerprint, by_alias, fetch, image=image, close=server.close)


def _find_remote(source: RemoteSource) -> _Remote:
    """Resolve the source on its server (blocking): which image, and how to fetch it."""
    if source.protocol in ("url", "direct"):
        if source.protocol == "url":
            fingerprint, target = _url_target(source.server)
        else:
            fingerprint, target = source.alias, source.server
        return _Remote(
            fingerprint,
            False,
            lambda blobs, meter: _download_direct(
                target, fingerprint, source.certificate, blobs, meter
            ),
        )
    if source.protocol == "lxd":
        return _find_lxd(source)
    client = SimplestreamsClient(
        source.server, verify=cast(Any, _tls(source.certificate)), user_agent=USER_AGENT
    )
    image_type = ImageType.VIRTUAL_MACHINE if source.image_type == "virtual-machine" else None
    try:
        try:
            image = client.resolve(source.alias, image_type=image_type or ImageType.CONTAINER)
        except NotFound:
            if image_type is not None:
                raise
            image = client.resolve(source.alias, image_type=None)
    except NotFound:
        client.close()
        raise NotFound(
            f"The image server {source.server} has no image or alias {source.alias!r}"
        ) from None
    except BaseException:
        client.close()
        raise

    def fetch(blobs: BlobStore, meter: Callable[[int, int], None]) -> ImageInfo:
        try:
            return client.import_image(image, blobs, progress=meter)
        finally:
            client.close()

    by_alias = not image.fingerprint.startswith(source.alias.lower())
    return _Remote(image.fingerprint, by_alias, fetch, image, close=client.close)


# ---------------------------------------------------------------------------- the service part


class RemoteImages:
    """Pulls images into the images core, and keeps pulled images current and trimmed."""

    def __init__(self, core: ImagesCore, config: ImagesConfig | None = None) -> None:
        self.core = core
        self.config = config or ImagesConfig()
        self._last_update: dict[str, float] = {}
        self._started = time.monotonic()

    @property
    def store(self) -> Any:
        return self.core.store

    # -- pulling ------------------------------------------------------------------------

    async def pull(
        self, request: PullRequest, progress: ProgressText | None = None
    ) -> dict[str, Any]:
        """Download the image `request.source` names and record it in `request.project`
        (with its aliases, all or nothing). An image the project already has is not
        downloaded again; one another project has is recorded without a download.

        Errors: Unavailable when the server cannot be reached, InvalidArgument when it serves
        something that is not a valid image stream or an image whose sha256 differs from the
        stream's, NotFound for an unknown alias. Nothing of a failed pull is kept."""
        source = request.source
        source.check()
        for name in request.aliases:
            if not name:
                raise InvalidArgument("An image alias needs a name")
        if request.prefer_cached:
            cached = await self._cached_for(request)
            if cached is not None:
                return cached
        remote = await in_thread(_find_remote, source)
        fingerprint = remote.fingerprint
        try:
            async with self.core._blob_lock(fingerprint):
                existing = await self.store.get(image_key(request.project, fingerprint))
                if existing is not None:
                    return await self._reuse(request, ImageRecord.model_validate(existing.json()))
                blobs = self.core.blobs
                if blobs.exists(fingerprint):
                    # Another project has it: its blob serves this record too.
                    info = await in_thread(_stored_info, blobs, fingerprint)
                else:
                    log.info("downloading image %s from %s", fingerprint, source.server)
                    info = await self._fetch(remote, progress)
                record = self._new_record(request, remote, info)
                try:
                    await self.core._create_records(request.project, record, request.aliases)
                except BaseException:
                    await self.core._drop_blob_if_unused(fingerprint)
                    raise
        finally:
            remote.close()  # when nothing was downloaded
        log.info("pulled image %s into project %s", fingerprint, request.project)
        await self._lifecycle("image-created", request.project, fingerprint, info.type.value)
        return await self.core.render(request.project, record)

    async def _fetch(self, remote: _Remote, progress: ProgressText | None) -> ImageInfo:
        """Download in a thread. When the caller is cancelled, the thread is told to stop
        and awaited (with the blob lock still held), and a blob it managed to publish in
        the meantime is removed again."""
        cancelled = threading.Event()
        download = asyncio.ensure_future(
            in_thread(remote.fetch, self.core.blobs, _Meter(progress, cancelled, remote.meta_size))
        )
        try:
            return await asyncio.shield(download)
        except asyncio.CancelledError:
            cancelled.set()
            with contextlib.suppress(BaseException):
                await download
            await self.core._drop_blob_if_unused(remote.fingerprint)
            raise

    async def _cached_for(self, request: PullRequest) -> dict[str, Any] | None:
        """LXD's PreferCached: with auto-update on, an image already cached from the same
        server, protocol and alias is used as is (auto-update keeps it current), without
        asking the server."""
        if await self._auto_update_seconds(request.project) <= 0:
            return None
        wanted = request.source
        prefix = f"{RECORDS}{IMAGES}/{request.project}/"
        best: ImageRecord | None = None
        for entry in await self.store.list(prefix):
            record = ImageRecord.model_validate(entry.json())
            origin = record.update_source
            if origin is None:
                continue
            if (origin.get("server"), origin.get("protocol"), origin.get("alias")) != (
                wanted.server,
                wanted.protocol,
                wanted.alias,
            ) or (wanted.image_type or "container") != record.type:
                continue
            if best is None or record.created_at > best.created_at:
                best = record
        if best is None or not self.core.blobs.exists(best.fingerprint):
            return None
        return await self._reuse(request, best)

    async def _reuse(self, request: PullRequest, record: ImageRecord) -> dict[str, Any]:
        """The project already has the image: apply what the request adds to it."""
        fingerprint = record.fingerprint
        changes: dict[str, Any] = {}
        if request.cached:
            changes["last_used_at"] = _now()
        if request.public:
            changes["is_public"] = True
        if request.properties:
            changes["properties"] = {**record.properties, **request.properties}
        if changes:

            def change(current: dict[str, Any]) -> dict[str, Any]:
                return ImageRecord.model_validate(current).model_copy(update=changes).dump()

            record = ImageRecord.model_validate(
                await modify(
                    self.store,
                    record.key(request.project),
                    change,
                    missing="Image not found",
                )
            )
        for name in request.aliases:
            await self.core.create_alias(request.project, name, fingerprint)
        return await self.core.render(request.project, record)

    def _new_record(self, request: PullRequest, remote: _Remote, info: ImageInfo) -> ImageRecord:
        now = _now()
        stream = remote.stream
        properties = dict(stream.properties if stream is not None else info.properties)
        properties.update(request.properties)
        times = {
            "created_at": _rfc3339(stream.created_at if stream is not None else info.created_at),
            "expires_at": _rfc3339(stream.expires_at if stream is not None else info.expires_at),
        }
        filename = request.filename or (stream.filename if stream else info.filename)
        if remote.image is not None:
            # From an LXD server, as LXD records it: the server's description of the image.
            theirs = remote.image
            given = theirs.get("properties")
            if isinstance(given, dict):
                properties = {**{str(k): str(v) for k, v in given.items()}, **request.properties}
            for key in times:
                text = str(theirs.get(key, ""))
                with contextlib.suppress(ValueError):
                    datetime.fromisoformat(text.replace("Z", "+00:00"))  # RFC 3339: kept as is
                    times[key] = text
            if not request.filename and theirs.get("filename"):
                filename = posixpath.basename(str(theirs["filename"]))
        # Every field named: `dump()` leaves out the ones that are not.
        record = ImageRecord(
            auto_update=request.auto_update and remote.by_alias,
            properties=properties,
            public=request.public,
            expires_at=times["expires_at"],
            profiles=["default"],
            architecture=info.architecture,
            cached=request.cached,
            filename=filename,
            fingerprint=info.fingerprint,
            size=info.size,
            type=str(info.type),
            created_at=times["created_at"],
            last_used_at=now if request.cached else NEVER_USED,
            uploaded_at=now,
            _croft=ImageMeta(member=self.core.member, split=info.split),
        )
        if remote.by_alias:
            record.update_source = request.source.to_json()
        return record

    # -- refreshing ---------------------------------------------------------------------

    async def refresh(
        self, project: str, fingerprint: str, progress: ProgressText | None = None
    ) -> tuple[bool, dict[str, Any]]:
        """LXD's image refresh: if the image's `update_source` now names a newer image,
        download it, give it this one's aliases, cached flag, last use and profiles, and
        delete this one (its blob too, once no project has it). Returns (refreshed, the
        image now in use). An image without a source is left as it is."""
        record, _ = await self.core.find(project, fingerprint)
        fingerprint = record.fingerprint
        origin = record.update_source
        if origin is None or not origin.get("server"):
            return False, await self.core.render(project, record)
        source = RemoteSource.from_json(origin)
        if not source.image_type:
            source = RemoteSource(**{**source.__dict__, "image_type": record.type})
        remote = await in_thread(_find_remote, source)
        remote.close()  # the pull below asks the server again
        if remote.fingerprint == fingerprint:
            return False, await self.core.render(project, record)
        new = await self.pull(
            PullRequest(
                project=project,
                source=source,
                auto_update=True,
                public=record.is_public,
            ),
            progress,
        )
        await self._replace(project, record, new["fingerprint"])
        log.info("image %s in project %s refreshed to %s", fingerprint, project, new["fingerprint"])
        await self._lifecycle("image-refreshed", project, fingerprint)
        found, _ = await self.core.find(project, new["fingerprint"])
        return True, await self.core.render(project, found)

    async def _replace(self, project: str, old: ImageRecord, new_fingerprint: str) -> None:
        """Move what belongs to the old image's place to the new image, then drop the old."""
        old_fingerprint = old.fingerprint
        keep = {
            "cached": old.cached,
            "last_used_at": old.last_used_at or NEVER_USED,
            "profiles": old.profiles if "profiles" in old.model_fields_set else ["default"],
            "auto_update": True,
        }

        def change(current: dict[str, Any]) -> dict[str, Any]:
            return ImageRecord.model_validate(current).model_copy(update=keep).dump()

        await modify(
            self.store, image_key(project, new_fingerprint), change, missing="Image not found"
        )
        async with self.core._blob_lock(old_fingerprint):
            for _ in range(10):
                entry = await self.store.get(image_key(project, old_fingerprint))
                if entry is None:
                    return
                aliases = [
                    (e, ImageAliasRecord.model_validate(e.json()))
                    for e in await self.store.list(f"{RECORDS}{ALIASES}/{project}/")
                ]
                operations: list[Any] = [
                    Update(
                        e.key,
                        dump(alias.model_copy(update={"target": new_fingerprint}).dump()),
                        revision=e.revision,
                    )
                    for e, alias in aliases
                    if alias.target == old_fingerprint
                ]
                operations.append(Delete(entry.key, revision=entry.revision))
                try:
                    await self.store.transaction(operations)
                except (Conflict, NotFound):
                    continue
                break
            else:
                raise Conflict(f"Image {old_fingerprint} kept changing while being replaced")
            await self.core._drop_blob_if_unused(old_fingerprint)
        await self._lifecycle("image-deleted", project, old_fingerprint)

    # -- background work ----------------------------------------------------------------

    async def _setting(self, project: str, key: str) -> str:
        """A project's value of an `images.*` key, else the server's, else ""."""
        found = await self.store.get_json(project_key(project))
        if found is not None:
            value = (found[0].get("config") or {}).get(key, "")
            if value != "":
                return str(value)
        server = await self.store.get_json(SERVER_CONFIG_KEY)
        if server is not None:
            return str((server[0].get("config") or {}).get(key, ""))
        return ""

    async def _auto_update_seconds(self, project: str) -> float:
        if self.config.auto_update_interval_seconds is not None:
            return self.config.auto_update_interval_seconds
        value = await self._setting(project, "images.auto_update_interval")
        try:
            return float(int(value)) * 3600 if value else DEFAULT_AUTO_UPDATE_HOURS * 3600.0
        except ValueError:
            return DEFAULT_AUTO_UPDATE_HOURS * 3600.0

    async def _cache_expiry_seconds(self, project: str) -> float:
        if self.config.remote_cache_expiry_seconds is not None:
            return self.config.remote_cache_expiry_seconds
        value = await self._setting(project, "images.remote_cache_expiry")
        try:
            return float(int(value)) * 86400 if value else DEFAULT_CACHE_EXPIRY_DAYS * 86400.0
        except ValueError:
            return DEFAULT_CACHE_EXPIRY_DAYS * 86400.0

    async def _records(self) -> list[tuple[str, ImageRecord]]:
        """Every image of every project, with its project."""
        prefix = f"{RECORDS}{IMAGES}/"
        found = []
        for entry in await self.store.list(prefix):
            project = entry.key[len(prefix) :].split("/", 1)[0]
            found.append((project, ImageRecord.model_validate(entry.json())))
        return found

    async def auto_update(self) -> list[str]:
        """Refresh every auto-update image of every project whose interval has passed since
        the last pass. Returns the fingerprints replaced. Failures are logged, not raised:
        an unreachable server must not stop the others' updates."""
        replaced: list[str] = []
        now = time.monotonic()
        due: dict[str, bool] = {}
        for project, record in await self._records():
            if not record.auto_update or not record.update_source:
                continue
            if project not in due:
                interval = await self._auto_update_seconds(project)
                last = self._last_update.get(project, self._started)
                due[project] = interval > 0 and now - last >= interval
            if not due[project]:
                continue
            try:
                refreshed, _ = await self.refresh(project, record.fingerprint)
            except CroftError as exc:
                log.warning(
                    "auto-update of image %s in project %s failed: %s",
                    record.fingerprint,
                    project,
                    exc.message,
                )
                continue
            if refreshed:
                replaced.append(record.fingerprint)
        for project, was_due in due.items():
            if was_due:
                self._last_update[project] = now
        return replaced

    async def expire(self) -> list[str]:
        """Delete cached images unused for longer than their project's cache expiry (LXD:
        last use, or upload when never used). Returns the fingerprints deleted."""
        deleted: list[str] = []
        now = time.time()
        expiry: dict[str, float] = {}
        for project, record in await self._records():
            if not record.cached:
                continue
            if project not in expiry:
                expiry[project] = await self._cache_expiry_seconds(project)
            if expiry[project] <= 0:
                continue
            used = record.last_used_at or NEVER_USED
            since = _parse_time(record.uploaded_at if used == NEVER_USED else used)
            if since is None or since + expiry[project] > now:
                continue
            fingerprint = record.fingerprint
            try:
                await self.core.delete_image(project, fingerprint)
            except (NotFound, Conflict) as exc:
                log.info("expiry of image %s skipped: %s", fingerprint, exc.message)
                continue
            log.info("expired cached image %s of project %s", fingerprint, project)
            await self._lifecycle("image-deleted", project, fingerprint)
            deleted.append(fingerprint)
        return deleted

    async def run_tasks(self, stop: asyncio.Event) -> None:
        """The background loop: every `task_interval` seconds, one replica (whichever holds
        the task lock) runs auto-update, then expiry."""
        interval = self.config.task_interval
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await self._locked(self._one_pass)
            except Exception:
                log.exception("image tasks failed")

    async def _one_pass(self) -> None:
        await self.auto_update()
        await self.expire()

    async def _locked(self, work: Callable[[], Awaitable[None]]) -> None:
        ttl = max(10, int(self.config.task_interval) * 2)
        lease = await self.store.grant_lease(ttl)
        try:
            try:
                await self.store.create(
                    TASK_LOCK_KEY, dump({"member": self.core.member}), lease=lease.id
                )
            except Conflict:
                return  # another replica is at it
            keeper = asyncio.create_task(self._keep(lease, ttl))
            try:
                await work()
            finally:
                keeper.cancel()
        finally:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(lease)

    async def _keep(self, lease: Any, ttl: int) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            with contextlib.suppress(Exception):
                await self.store.keep_alive(lease)

    async def _lifecycle(
        self, action: str, project: str, fingerprint: str, image_type: str = ""
    ) -> None:
        context = {"type": image_type} if image_type else None
        try:
            await publish(
                self.store,
                "lifecycle",
                lifecycle_metadata(action, f"/1.0/images/{fingerprint}", context),
                project=project,
            )
        except CroftError as exc:
            log.warning("could not publish %s of image %s: %s", action, fingerprint, exc)


def _stored_info(blobs: BlobStore, fingerprint: str) -> ImageInfo:
    meta, rootfs = blobs.files(fingerprint)
    return parse_image(meta, rootfs)


async def with_progress(
    work: Callable[[ProgressText], Awaitable[Any]],
) -> AsyncIterator[str | tuple[Any]]:
    """Run `work(report)` and yield each progress text it reports as it comes, then
    `(result,)`. Reports may come from any thread. Cancelling the iteration cancels `work`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()

    def report(text: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, text)

    task = asyncio.ensure_future(work(report))
    try:
        while not task.done():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        while not queue.empty():
            yield queue.get_nowait()
        yield (task.result(),)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
