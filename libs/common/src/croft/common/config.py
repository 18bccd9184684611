"""croft's configuration: one YAML file plus `CROFT_*` environment variables.

The file is `/etc/croft/croft.yaml` unless `CROFT_CONFIG` names another. Environment
variables override the file, nested keys joined with `__` (`CROFT_ETCD__ENDPOINTS`,
`CROFT_RPC__HOST`). Every key is declared here once, typed and validated; a bad value or an
unknown key fails at start with a message naming the file, the key and the expected form.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from croft.common.errors import InvalidArgument

DEFAULT_PATH = Path("/etc/croft/croft.yaml")


class ConfigError(InvalidArgument):
    """The configuration cannot be used; the message says where and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EtcdConfig(_Section):
    endpoints: list[str] = Field(
        default=["https://127.0.0.1:2379"],
        description=(
            "client URLs of the etcd members: https://HOST:PORT (mutual TLS with the member's "
            "internal certificate, croft.common.internal_tls) or http://HOST:PORT (plain)"
        ),
    )
    embedded: bool = Field(
        default=True, description="`croft up` runs a one-member etcd on this host"
    )
    peer_port: int = Field(default=2380, ge=1, le=65535)
    initial_cluster: str = Field(
        default="",
        description=(
            "etcd's --initial-cluster (NAME=PEER_URL,...) when this member's etcd is one of "
            "a cluster's voters; '' runs it alone. `croft init` writes it to the member's "
            "cluster.yaml when the member joins a cluster"
        ),
    )
    initial_cluster_state: Literal["new", "existing"] = Field(
        default="new", description="'existing' when this member's etcd joins a running cluster"
    )
    max_procs: int = Field(
        default=1,
        ge=0,
        description="GOMAXPROCS of the embedded etcd (0: Go's default, one per CPU)",
    )

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one endpoint is needed")
        for url in value:
            scheme, _, rest = url.partition("://")
            host, _, port = rest.rpartition(":")
            if scheme not in ("http", "https") or not host or not port.isdigit():
                raise ValueError(f"{url!r} is not a URL of the form https://HOST:PORT")
        return value


class RpcConfig(_Section):
    host: str = Field(default="127.0.0.1", description="address services listen on for gRPC")
    timeout: float = Field(default=10.0, gt=0, description="default deadline of a call, seconds")


class RegistryConfig(_Section):
    lease_ttl: int = Field(
        default=10, ge=1, le=300, description="seconds before a dead instance's entry vanishes"
    )


class TelemetryConfig(_Section):
    exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"


class NetworkConfig(_Section):
    default_bridge: str = Field(
        default="croftbr0", description="the managed bridge created at first start ('' for none)"
    )
    nft_table: str = Field(default="croft", description="nftables table (family inet) croft owns")


class ComputeConfig(_Section):
    favor_cgroup_migrations: bool = Field(
        default=True,
        description=(
            "mount the cgroup2 hierarchy with `favordynmods` at start: every exec and start "
            "moves a process into a container's cgroups, and without it each move waits "
            "for an RCU grace period (~10 ms on a busy host)"
        ),
    )
    drivers: list[str] = Field(
        default_factory=list,
        description=(
            "the instance drivers to load (lxc, qemu); empty: every one that can run on "
            "this host. A type no loaded driver runs is refused by the api"
        ),
    )


class StorageConfig(_Section):
    default_pool: str = Field(
        default="default", description="the dir pool created at first start ('' for none)"
    )


class ImagesConfig(_Section):
    """The images service's background work. LXD's server keys `images.auto_update_interval`
    (hours) and `images.remote_cache_expiry` (days) decide; the `*_seconds` keys here replace
    them when set, so that tests need not wait hours."""

    task_interval: float = Field(
        default=3600.0, gt=0, description="seconds between passes of image auto-update and expiry"
    )
    auto_update_interval_seconds: float | None = Field(
        default=None, ge=0, description="overrides images.auto_update_interval (0: off)"
    )
    remote_cache_expiry_seconds: float | None = Field(
        default=None, ge=0, description="overrides images.remote_cache_expiry (0: never)"
    )


class ApiConfig(_Section):
    https_address: str = Field(
        default="",
        description=(
            "address the REST API serves HTTPS on, HOST:PORT ('127.0.0.1:8443', '[::]:8443'); "
            "'' serves the local unix socket only"
        ),
    )

    @field_validator("https_address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not value:
            return value
        host, sep, port = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or (":" in host and not value.startswith("[")):
            raise ValueError("expected HOST:PORT, with an IPv6 host in brackets ([::]:8443)")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("the port must be a number from 1 to 65535")
        return value


class ServiceConfig(_Section):
    replicas: int = Field(default=1, ge=0, le=64)


class ServicesConfig(_Section):
    api: ServiceConfig = ServiceConfig()
    auth: ServiceConfig = ServiceConfig()
    images: ServiceConfig = ServiceConfig()
    compute: ServiceConfig = ServiceConfig()
    storage: ServiceConfig = ServiceConfig()
    network: ServiceConfig = ServiceConfig()


class Config(BaseSettings):
    """The whole configuration. Field descriptions are the documentation of each key."""

    model_config = SettingsConfigDict(
        env_prefix="CROFT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    member: str = Field(default_factory=socket.gethostname, description="this host's name")
    state_dir: Path = Path("/var/lib/croft")
    log_dir: Path = Path("/var/log/croft")
    run_dir: Path = Path("/run/croft")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    etcd: EtcdConfig = EtcdConfig()
    rpc: RpcConfig = RpcConfig()
    registry: RegistryConfig = RegistryConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    services: ServicesConfig = ServicesConfig()
    network: NetworkConfig = NetworkConfig()
    compute: ComputeConfig = ComputeConfig()
    storage: StorageConfig = StorageConfig()
    images: ImagesConfig = ImagesConfig()
    api: ApiConfig = ApiConfig()

    @property
    def networks_dir(self) -> Path:
        return self.state_dir / "networks"

    @property
    def pools_dir(self) -> Path:
        return self.state_dir / "storage-pools"

    @property
    def lxc_dir(self) -> Path:
        return self.state_dir / "lxc"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @field_validator("member")
    @classmethod
    def _member_name(cls, value: str) -> str:
        if not value or "/" in value or len(value) > 63:
            raise ValueError("must be a host name without '/' (1-63 characters)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values come in through init; the environment overrides them.
        return (env_settings, init_settings)


def config_path() -> Path:
    return Path(os.environ.get("CROFT_CONFIG", DEFAULT_PATH))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def _describe(error: ErrorDetails, model: type[BaseModel]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    env_name = "CROFT_" + "__".join(str(part).upper() for part in error["loc"])
    if env_name in os.environ:
        key = f"{key} (from {env_name})"
    if error["type"] == "extra_forbidden":
        allowed = _keys_at(model, error["loc"][:-1])
        return f"{key}: unknown key (known keys here: {', '.join(allowed)})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {error.get('input')!r})"


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


CLUSTER_FILE = "cluster.yaml"


def cluster_file(config: Config) -> Path:
    """Where `croft init` keeps what joining a cluster changed in this member's
    configuration (its store): `<state_dir>/cluster.yaml`, read over croft.yaml."""
    return config.state_dir / CLUSTER_FILE


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: Path | None = None) -> Config:
    """Read, validate and return the configuration. Raises ConfigError naming the problem.
    A member that joined a cluster has its store's settings in `<state_dir>/cluster.yaml`,
    which overrides the file's."""
    path = path or config_path()
    values = _read_yaml(path)
    try:
        config = Config(**values)
    except ValidationError as exc:
        problems = "; ".join(_describe(e, Config) for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None
    overlay_path = cluster_file(config)
    overlay = _read_yaml(overlay_path)
    if not overlay:
        return config
    try:
        return Config(**_merged(values, overlay))
    except ValidationError as exc:
        problems = "; ".join(_describe(e, Config) for e in exc.errors())
        raise ConfigError(f"{overlay_path}: {problems}") from None
