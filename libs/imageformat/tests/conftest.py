"""Fixtures for the image format, template, stream and builder tests: real tarballs (and
squashfs files made with mksquashfs) in /tmp/croft-images-test-*, hostile archives crafted
member by member (``croft.imageformat.testing``)."""

from __future__ import annotations

from croft.imageformat.testing import busybox_image, kit, make_unified, workdir  # noqa: F401
