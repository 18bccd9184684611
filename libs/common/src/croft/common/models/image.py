"""Images and their aliases (LXD's `api.Image`, `api.ImageAliasesEntry`).

record_key("images", <project>, <fingerprint>)   ImageRecord
record_key("image-aliases", <project>, <name>)   ImageAliasRecord
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from croft.common.models._base import CroftMeta, Record
from croft.common.records import IMAGE_ALIASES, IMAGES, record_key


class ImageMeta(CroftMeta):
    """An image's `_croft`: the member that holds its blob, and whether metadata and
    rootfs are two files."""

    member: str = ""
    split: bool = False


class ImageRecord(Record):
    """An image as the store holds it (the project is in its key, not its body)."""

    fingerprint: str
    filename: str = ""
    size: int = 0
    type: str = "container"
    architecture: str = ""
    # `public` is the LXD field's name; the attribute is not, so that `public()` stays
    # the method every record has.
    is_public: bool = Field(default=False, alias="public")
    auto_update: bool = False
    cached: bool = False
    properties: dict[str, str] = Field(default_factory=dict)
    profiles: list[str] = Field(default_factory=list)
    created_at: str = ""
    expires_at: str = ""
    last_used_at: str = ""
    uploaded_at: str = ""
    #: Where an image pulled by alias comes from (LXD's `ImageSource`: server, protocol,
    #: alias, certificate, image_type); None for an uploaded one.
    update_source: dict[str, str] | None = None
    croft: ImageMeta = Field(default_factory=ImageMeta, alias="_croft")

    @staticmethod
    def store_key(project: str, fingerprint: str) -> str:
        return record_key(IMAGES, project, fingerprint)

    def key(self, project: str) -> str:
        return self.store_key(project, self.fingerprint)

    @staticmethod
    def meta_of(raw: dict[str, Any]) -> ImageMeta:
        return ImageMeta.model_validate(raw.get("_croft") or {})


class ImageAliasRecord(Record):
    """An image alias: a name for a fingerprint."""

    name: str
    target: str
    description: str = ""
    type: str = "container"

    @staticmethod
    def store_key(project: str, name: str) -> str:
        return record_key(IMAGE_ALIASES, project, name)

    def key(self, project: str) -> str:
        return self.store_key(project, self.name)
