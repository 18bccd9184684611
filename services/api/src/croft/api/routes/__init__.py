"""The REST endpoints, one module per LXD collection; each exposes `router`."""
