# The two sacred commands: `make setup` (a fresh Debian 12 machine, as root) and `make test`.
SHELL := /bin/bash
export UV_PYTHON := /usr/bin/python3
export UV_PYTHON_PREFERENCE := only-system
export UV_LINK_MODE := copy
VENV := .venv
PY := $(VENV)/bin/python
PROTO_SRC := libs/common/protos
PROTO_OUT := libs/common/src
PROTOS := $(shell find $(PROTO_SRC) -name '*.proto')
PROTO_STAMP := $(PROTO_OUT)/croft/.proto-stamp

# What `make test` type-checks with mypy --strict (configured in pyproject.toml): every
# package of the tree, the shared libraries, the services and the client.
MYPY_PACKAGES := croft.common croft.imageformat croft.client \
  croft.api croft.auth croft.compute croft.images croft.network croft.node croft.storage

.PHONY: setup test lint format proto sync bench clean-proto images interop

IMAGES_DIR ?= /var/lib/croft/build-images

setup:
	bash scripts/setup.sh

test: proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy $(MYPY_PACKAGES:%=-p %)
	$(VENV)/bin/pytest -m "not lxd_interop" $(PYTEST_ARGS)

# croft against the real LXD 5.0.2 (the anchor): LXD as the client of croft's image server,
# pulling croft's streams. Needs ../shared/tools/lxd-anchor/setup-lxd.sh first.
interop: proto
	$(VENV)/bin/pytest -m lxd_interop $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

proto: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTOS)
	$(PY) -m grpc_tools.protoc -I$(PROTO_SRC) --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
	  --grpc_python_out=$(PROTO_OUT) $(PROTOS)
	touch $@

# Local images (no image server is reachable): busybox and Debian 12, LXD unified tarballs.
images: proto
	bash scripts/build-images.sh $(IMAGES_DIR)

# After changing any pyproject.toml: relock and sync (serialized; several people may run it).
sync:
	flock /tmp/croft-uv.lock sh -c 'uv lock -q && uv sync -q --locked --all-packages'

clean-proto:
	rm -f $(PROTO_STAMP)
	find $(PROTO_OUT)/croft/v1 $(PROTO_OUT)/croft/etcdpb -name '*_pb2*' -delete 2>/dev/null || true
