"""LXD's image format as a library, for every service that handles images, so that none of
them imports the images service:

- ``format``: parse, fingerprint, check and unpack an image (unified or split) safely;
- ``templates``: render an image's metadata templates into an instance's rootfs (compute);
- ``streams``: simplestreams documents, parsed and rendered (the images service's client, the
  api's image server);
- ``records``: the image and alias records in the store, and the lookups that only read them;
- ``builder``: build an image from a YAML definition (``croft image build``, the tests);
- ``testing``: images and fixtures for tests.
"""
