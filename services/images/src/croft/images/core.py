"""The images service's core: image and alias records in the store, image blobs on disk.

Records, in LXD's API shapes:

- `/croft/records/images/<project>/<fingerprint>`: LXD's Image without `aliases` (those are
  worked out from the alias records whenever an image is read), plus croft's own
  `_croft: {"member": <where the blob is>, "split": <metadata and rootfs in two files>}`
  (`croft.common.models.ImageRecord`, whose `_croft` is an `ImageMeta`).
- `/croft/records/image-aliases/<project>/<name>`: LXD's ImageAliasesEntry
  `{"name", "description", "target", "type"}`, `target` always a full fingerprint
  (`ImageAliasRecord`).

The records are the truth and any number of replicas write them: every write is an atomic
create or a compare-and-swap, so two replicas can never both create one image or alias.
Blobs live in `<state_dir>/images` (`croft.images.blobs`) of the member that received the
upload, shared by every project with a record of that fingerprint; the blob goes with the
last such record. Replicas on one member serialize the import and the deletion of one
fingerprint with a lock file, so that a deletion never removes a blob that a concurrent
import has just recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from croft.common.blocking import in_thread
from croft.common.clients import ImagesClient
from croft.common.errors import Conflict, InvalidArgument, NotFound, Unavailable
from croft.common.events import rfc3339_nano
from croft.common.models import ImageAliasRecord, ImageMeta, ImageRecord
from croft.common.projects import owning_project
from croft.common.records import RECORDS, modify, record_key, record_prefix
from croft.common.store import Create, Delete, Store, dump
from croft.imageformat.format import ImageInfo
from croft.imageformat.records import (
    ALIAS_NOT_FOUND,
    ALIASES,
    IMAGE_NOT_FOUND,
    IMAGES,
    NEVER_USED,
    alias_key,
    find,
    image_key,
    lookup,
    used_lately,
)
from croft.images.blobs import BlobStore, ImageImport
from croft.v1 import images_pb2

log = logging.getLogger(__name__)

NO_EXPIRY = "1970-01-01T00:00:00Z"  # LXD's time.Unix(0, 0) for an image without expiry

DUPLICATE_IMAGE = "Image with same fingerprint already exists"

_LOCK_POLL = 0.02


def _rfc3339(moment: datetime | None) -> str:
    if moment is None:
        return NO_EXPIRY
    return rfc3339_nano(int(moment.timestamp()) * 1_000_000_000)


# ---------------------------------------------------------------------------- domain objects


@dataclass(frozen=True)
class ImportRequest:
    """What an upload says about itself (LXD's X-LXD-* headers)."""

    project: str
    filename: str = ""
    expected_fingerprint: str = ""  # "" accepts whatever arrives
    public: bool = False
    properties: dict[str, str] = field(default_factory=dict)  # over metadata.yaml's
    aliases: tuple[str, ...] = ()  # created with the image, all or nothing
    split: bool = False  # metadata part, then a RootfsStart, then the rootfs part


@dataclass(frozen=True)
class RootfsStart:
    """In an upload of a split image: the metadata part ended, the rootfs part follows."""

    filename: str = ""


Upload = AsyncIterator[bytes | RootfsStart]


@dataclass(frozen=True)
class ImagePut:
    """LXD's ImagePut: what a PUT of an image can change."""

    public: bool = False
    auto_update: bool = False
    properties: dict[str, str] = field(default_factory=dict)
    expires_at: str = ""  # RFC 3339; "" or Go's zero time keeps the current expiry
    profiles: tuple[str, ...] = ("default",)

    @classmethod
    def from_json(cls, data: Any) -> ImagePut:
        if not isinstance(data, dict):
            raise InvalidArgument("an image update must be a JSON object")
        public_ = data.get("public", False)
        auto_update = data.get("auto_update", False)
        if not isinstance(public_, bool) or not isinstance(auto_update, bool):
            raise InvalidArgument("public and auto_update must be true or false")
        properties = data.get("properties") or {}
        if not isinstance(properties, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in properties.items()
        ):
            raise InvalidArgument("properties must map names to strings")
        expires_at = data.get("expires_at") or ""
        if not isinstance(expires_at, str):
            raise InvalidArgument("expires_at must be an RFC 3339 time")
        if expires_at.startswith("0001-01-01T00:00:00"):
            expires_at = ""
        if expires_at:
            try:
                datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
            except ValueError:
                raise InvalidArgument(
                    f"expires_at {expires_at!r} is not an RFC 3339 time"
                ) from None
        profiles = data.get("profiles")
        if profiles is None:
            profiles = ["default"]
        if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
            raise InvalidArgument("profiles must be a list of profile names")
        return cls(public_, auto_update, dict(properties), expires_at, tuple(profiles))


@dataclass(frozen=True)
class ImageFiles:
    """Where an image's files are on this member."""

    metadata_path: Path  # the unified tarball, or the metadata tarball of a split image
    rootfs_path: Path | None  # None for a unified image
    record: ImageRecord


def new_image_record(
    info: ImageInfo, request: ImportRequest, member: str, filename: str
) -> ImageRecord:
    """The stored record of a freshly imported image (every field named: `dump()` leaves
    out the ones that are not)."""
    return ImageRecord(
        auto_update=False,
        properties={**info.properties, **request.properties},
        public=request.public,
        expires_at=_rfc3339(info.expires_at),
        profiles=["default"],
        architecture=info.architecture,
        cached=False,
        filename=filename,
        fingerprint=info.fingerprint,
        size=info.size,
        type=str(info.type),
        created_at=_rfc3339(info.created_at),
        last_used_at=NEVER_USED,
        uploaded_at=rfc3339_nano(),
        _croft=ImageMeta(member=member, split=info.split),
    )


# ---------------------------------------------------------------------------- the core


class ImagesCore:
    """Images and aliases of every project; blobs of the images uploaded to this member."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        member: str,
        peer: Callable[[str], Awaitable[ImagesClient]] | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.member = member
        # The images service on another member (a cluster's): where a blob stored there
        # is fetched from.
        self.peer = peer
        self._locks = blobs.root / ".locks"
        self._locks.mkdir(mode=0o700, exist_ok=True)

    # -- reading ------------------------------------------------------------------------

    async def find(self, project: str, fingerprint: str) -> tuple[ImageRecord, int]:
        """The image a fingerprint or a unique prefix of one names, and its revision."""
        record, revision = await find(self.store, project, fingerprint)
        return ImageRecord.model_validate(record), revision

    async def aliases(self, project: str) -> list[ImageAliasRecord]:
        return [
            ImageAliasRecord.model_validate(e.json())
            for e in await self.store.list(record_prefix(ALIASES, project))
        ]

    async def render(self, project: str, record: ImageRecord) -> dict[str, Any]:
        """The image as LXD shows it: without croft's keys, with its aliases."""
        shown = record.public()
        shown["aliases"] = [
            {"name": a.name, "description": a.description}
            for a in await self.aliases(project)
            if a.target == record.fingerprint
        ]
        return shown

    async def resolve(self, project: str, name: str, *, mark_used: bool = False) -> dict[str, Any]:
        """The image an alias, a fingerprint or a unique fingerprint prefix names, the way
        `lxc launch NAME` looks it up: the alias first (a full fingerprint is looked up as
        one first: that is what a launch sends). NotFound("Image not found").

        `mark_used` (an instance is being made from it) sets its last_used_at and leaves
        the aliases out of the answer."""
        found = await lookup(self.store, project, name)
        if mark_used:
            return (await self._mark_used(project, found)).public()
        return await self.render(project, ImageRecord.model_validate(found[0]))

    async def _mark_used(self, project: str, found: tuple[dict[str, Any], int]) -> ImageRecord:
        """Set last_used_at, from the record and revision just read. A use within the
        same second as the recorded one changes nothing (10 launches at once would
        otherwise fight over the record for no visible difference)."""
        record = ImageRecord.model_validate(found[0])
        if used_lately(found[0]):
            return record

        def change(current: dict[str, Any]) -> dict[str, Any]:
            used = ImageRecord.model_validate(current)
            return used.model_copy(update={"last_used_at": rfc3339_nano()}).dump()

        try:
            changed = await modify(
                self.store,
                record.key(project),
                change,
                missing=IMAGE_NOT_FOUND,
                current=found,
            )
        except (Conflict, Unavailable) as exc:
            # Bookkeeping only: the instance creation it accompanies goes on.
            log.warning("could not mark image %s used: %s", record.fingerprint, exc)
            return record
        return ImageRecord.model_validate(changed)

    async def files(self, project: str, fingerprint: str, member: str) -> ImageFiles:
        """Local paths of an image's files for the storage service of `member`.

        Only a member holding the blob can be given paths. A storage service on another
        member would need the files streamed to it (not written yet: one node for now).
        A project without `features.images` has `default`'s images."""
        project = await owning_project(self.store, project, "images")
        record, _ = await self.find(project, fingerprint)
        fingerprint = record.fingerprint
        holder = record.croft.member or self.member
        if (
            holder != self.member
            and (not member or member == self.member)
            and self.peer is not None
            and not await in_thread(self.blobs.exists, fingerprint)
        ):
            await self._fetch(project, fingerprint, holder)
            holder = self.member
        if holder != self.member and await in_thread(self.blobs.exists, fingerprint):
            holder = self.member  # fetched before from the member that imported it
        if holder != self.member or (member and member != self.member):
            raise Unavailable(
                f"image {fingerprint} is stored on member {holder!r}; serving it to member "
                f"{member or self.member!r} from images on {self.member!r} needs streaming, "
                "which croft does not do yet"
            )
        try:
            metadata, rootfs = await in_thread(self.blobs.files, fingerprint)
        except NotFound:
            raise NotFound(
                f"the files of image {fingerprint} are missing from {self.blobs.root}"
            ) from None
        return ImageFiles(metadata, rootfs, record)

    async def _fetch(self, project: str, fingerprint: str, holder: str) -> None:
        """Copy an image's blob from the images service on `holder` (a cluster member)
        into this member's blob store, checked against its fingerprint."""
        assert self.peer is not None
        async with self._blob_lock(fingerprint):
            if await in_thread(self.blobs.exists, fingerprint):
                return
            client = await self.peer(holder)
            stream = client.export_image(
                images_pb2.ImageRef(project=project, fingerprint=fingerprint), timeout=600
            )
            with self.blobs.begin_import() as job:
                left = 0
                async for chunk in stream:
                    if chunk.WhichOneof("part") == "header":
                        left = chunk.header.metadata_size
                        continue
                    data = chunk.data
                    if left > 0:
                        head, data = data[:left], data[left:]
                        left -= len(head)
                        await in_thread(job.write_metadata, head)
                    if data:
                        await in_thread(job.write_rootfs, data)
                await in_thread(job.commit, expected_fingerprint=fingerprint)
            log.info("fetched image %s from member %s", fingerprint, holder)

    # -- importing ----------------------------------------------------------------------

    async def import_image(self, request: ImportRequest, upload: Upload) -> dict[str, Any]:
        """Receive an image, validate it, store its blob and create its record (and the
        requested aliases) atomically. Returns the image as LXD shows it.

        On any failure, a cancelled upload included, nothing of it stays: no temporary
        file, no blob (unless another record already used that blob), no record, no alias.
        """
        for name in request.aliases:
            if not name:
                raise InvalidArgument("An image alias needs a name")
        digest = hashlib.sha256()
        rootfs_filename = ""
        with self.blobs.begin_import() as job:
            in_rootfs = False
            async for part in upload:
                if isinstance(part, RootfsStart):
                    if not request.split:
                        raise InvalidArgument("a unified image has no separate rootfs part")
                    if in_rootfs:
                        raise InvalidArgument("the rootfs part of the image started twice")
                    in_rootfs = True
                    rootfs_filename = part.filename
                    continue
                if part:
                    await in_thread(_write, job, digest, part, in_rootfs)
            if request.split and not in_rootfs:
                raise InvalidArgument("the split image has no rootfs part")
            fingerprint = digest.hexdigest()
            filename = (rootfs_filename or request.filename) if request.split else request.filename
            async with self._blob_lock(fingerprint):
                if await self.store.get(image_key(request.project, fingerprint)) is not None:
                    raise Conflict(DUPLICATE_IMAGE)
                info = await in_thread(
                    job.commit,
                    expected_fingerprint=request.expected_fingerprint or None,
                    filename=filename,
                )
                record = new_image_record(info, request, self.member, filename)
                try:
                    await self._create_records(request.project, record, request.aliases)
                except BaseException:
                    await self._drop_blob_if_unused(fingerprint)
                    raise
        log.info("imported image %s into project %s", fingerprint, request.project)
        return await self.render(request.project, record)

    async def _create_records(
        self, project: str, record: ImageRecord, aliases: tuple[str, ...]
    ) -> None:
        fingerprint = record.fingerprint
        operations: list[Create] = [Create(record.key(project), dump(record.dump()))]
        for name in aliases:
            alias = _alias_record(name, "", record)
            operations.append(Create(alias.key(project), dump(alias.dump())))
        try:
            await self.store.transaction(operations)
        except Conflict:
            if await self.store.get(image_key(project, fingerprint)) is not None:
                raise Conflict(DUPLICATE_IMAGE) from None
            for name in aliases:
                if await self.store.get(alias_key(project, name)) is not None:
                    raise Conflict(f'Alias "{name}" already exists') from None
            raise

    # -- changing and deleting ----------------------------------------------------------

    async def update_image(
        self, project: str, fingerprint: str, put: ImagePut, revision: int = 0
    ) -> dict[str, Any]:
        """Apply an ImagePut. With `revision`, only if the record is still at that revision
        (Conflict otherwise); without, retried over concurrent writes."""
        for name in put.profiles:
            if await self.store.get(record_key("profiles", project, name)) is None:
                raise InvalidArgument(f"Profile '{name}' doesn't exist")
        record, _ = await self.find(project, fingerprint)
        key = record.key(project)
        for _ in range(20):
            entry = await self.store.get(key)
            if entry is None:
                raise NotFound(IMAGE_NOT_FOUND)
            if revision and entry.revision != revision:
                raise Conflict(f"Image {record.fingerprint} changed since it was read")
            current = ImageRecord.model_validate(entry.json())
            new = current.model_copy(
                update={
                    "is_public": put.public,
                    "auto_update": put.auto_update,
                    "properties": dict(put.properties),
                    "profiles": list(put.profiles),
                    "expires_at": put.expires_at or current.expires_at or NO_EXPIRY,
                }
            )
            try:
                await self.store.update(key, dump(new.dump()), revision=entry.revision)
            except Conflict:
                if revision:
                    raise
                continue
            except NotFound:
                raise NotFound(IMAGE_NOT_FOUND) from None
            return await self.render(project, new)
        raise Conflict(f"Image {record.fingerprint} is changing too fast; try again")

    async def delete_image(self, project: str, fingerprint: str) -> str:
        """Delete the image (fingerprint or unique prefix) and its aliases in one
        transaction, then its blob unless another project still has it. Returns the full
        fingerprint."""
        record, revision = await self.find(project, fingerprint)
        fingerprint = record.fingerprint
        async with self._blob_lock(fingerprint):
            aliases = [
                e
                for e in await self.store.list(record_prefix(ALIASES, project))
                if ImageAliasRecord.model_validate(e.json()).target == fingerprint
            ]
            operations = [Delete(image_key(project, fingerprint), revision=revision)]
            operations += [Delete(e.key, revision=e.revision) for e in aliases]
            try:
                await self.store.transaction(operations)
            except (Conflict, NotFound):
                if await self.store.get(image_key(project, fingerprint)) is None:
                    raise NotFound(IMAGE_NOT_FOUND) from None
                raise Conflict(
                    f"Image {fingerprint} changed while being deleted; try again"
                ) from None
            holder = record.croft.member or self.member
            if holder == self.member:
                await self._drop_blob_if_unused(fingerprint)
            else:
                log.warning("image %s deleted; its blob stays on member %s", fingerprint, holder)
        log.info("deleted image %s from project %s", fingerprint, project)
        return fingerprint

    async def _drop_blob_if_unused(self, fingerprint: str) -> None:
        """Remove the blob when no project has a record of it (call with the lock held)."""
        suffix = f"/{fingerprint}"
        for entry in await self.store.list(f"{RECORDS}{IMAGES}/"):
            if entry.key.endswith(suffix):
                return
        with contextlib.suppress(NotFound):
            await in_thread(self.blobs.delete, fingerprint)

    @contextlib.asynccontextmanager
    async def _blob_lock(self, fingerprint: str) -> AsyncIterator[None]:
        """Exclusive, across the processes of this member, for one fingerprint. Polled
        with LOCK_NB so that a cancelled waiter leaves nothing blocked behind."""
        fd = os.open(self._locks / fingerprint, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- aliases ------------------------------------------------------------------------

    async def create_alias(
        self, project: str, name: str, target: str, description: str = ""
    ) -> ImageAliasRecord:
        if not name or not target:
            raise InvalidArgument("name and target are required")
        record, _ = await self.find(project, target)
        alias = _alias_record(name, description, record)
        try:
            await self.store.create(alias.key(project), dump(alias.dump()))
        except Conflict:
            raise Conflict(f'Alias "{name}" already exists') from None
        # The image may have been deleted between the lookup and the create.
        if await self.store.get(record.key(project)) is None:
            with contextlib.suppress(NotFound):
                await self.store.delete(alias_key(project, name))
            raise NotFound(IMAGE_NOT_FOUND)
        return alias

    async def update_alias(
        self, project: str, name: str, target: str, description: str, revision: int = 0
    ) -> ImageAliasRecord:
        """Point an alias at `target` with `description` (LXD's PUT; the api merges a PATCH
        first). With `revision`, only if the alias is still at that revision."""
        if not target:
            raise InvalidArgument("The target field is required")
        key = alias_key(project, name)
        if await self.store.get(key) is None:
            raise NotFound(ALIAS_NOT_FOUND)
        record, _ = await self.find(project, target)
        for _ in range(20):
            entry = await self.store.get(key)
            if entry is None:
                raise NotFound(ALIAS_NOT_FOUND)
            if revision and entry.revision != revision:
                raise Conflict(f'Alias "{name}" changed since it was read')
            alias = _alias_record(name, description, record)
            try:
                await self.store.update(key, dump(alias.dump()), revision=entry.revision)
            except Conflict:
                if revision:
                    raise
                continue
            except NotFound:
                raise NotFound(ALIAS_NOT_FOUND) from None
            return alias
        raise Conflict(f'Alias "{name}" is changing too fast; try again')

    async def rename_alias(self, project: str, name: str, new_name: str) -> ImageAliasRecord:
        if not new_name:
            raise InvalidArgument("The new name of the alias is required")
        entry = await self.store.get(alias_key(project, name))
        if entry is None:
            raise NotFound(ALIAS_NOT_FOUND)
        alias = ImageAliasRecord.model_validate(entry.json())
        if new_name == name:
            return alias
        new_key = alias_key(project, new_name)
        if await self.store.get(new_key) is not None:
            raise Conflict(f'Alias "{new_name}" already exists')
        alias = alias.model_copy(update={"name": new_name})
        try:
            await self.store.transaction(
                [Create(new_key, dump(alias.dump())), Delete(entry.key, revision=entry.revision)]
            )
        except (Conflict, NotFound):
            if await self.store.get(new_key) is not None:
                raise Conflict(f'Alias "{new_name}" already exists') from None
            raise Conflict(f'Alias "{name}" changed while being renamed; try again') from None
        return alias

    async def delete_alias(self, project: str, name: str) -> None:
        entry = await self.store.get(alias_key(project, name))
        if entry is None:
            raise NotFound(ALIAS_NOT_FOUND)
        try:
            await self.store.delete(entry.key, revision=entry.revision)
        except NotFound:
            raise NotFound(ALIAS_NOT_FOUND) from None
        except Conflict:
            raise Conflict(f'Alias "{name}" changed while being deleted; try again') from None


def _alias_record(name: str, description: str, image: ImageRecord) -> ImageAliasRecord:
    return ImageAliasRecord(
        name=name, description=description, target=image.fingerprint, type=image.type
    )


def _write(job: ImageImport, digest: Any, data: bytes, rootfs: bool) -> None:
    # Hashed here as well as in the blob store: the fingerprint is needed to take its lock
    # before the import is committed. (An ImageImport.fingerprint would spare one hash.)
    digest.update(data)
    if rootfs:
        job.write_rootfs(data)
    else:
        job.write_metadata(data)
