"""Fixtures for the blob store, simplestreams, remote and service tests: the image format
library's (``croft.imageformat.testing``), which its own tests use too.

Images here are real tarballs (and squashfs files made with mksquashfs) written to
directories named /tmp/croft-images-test-*.
"""

from __future__ import annotations

from croft.imageformat.testing import busybox_image, kit, make_unified, workdir  # noqa: F401
