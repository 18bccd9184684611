"""Helpers that start real parts (etcd, ...) for tests and benchmarks. Never fakes."""
