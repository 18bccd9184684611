"""`croft image ...`: build images locally, and list, import, export, copy and delete them
through croft's REST API (LXD's ``/1.0/images``, over the local unix socket).

The REST calls follow LXD's API shape exactly (the same as the ``lxc`` client sends), so
these commands work against a real LXD's socket too (``--socket /var/lib/lxd/unix.socket``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import quote, urlsplit

import click
import httpx
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from croft.common.errors import (
    Conflict,
    CroftError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from croft.common.multipart import part_head

CHUNK = 1 << 20
API_TIMEOUT = 30.0
PROGRESS_POLL = 0.25  # seconds between looks at a download's progress

_STATUS_ERRORS: dict[int, type[CroftError]] = {
    400: InvalidArgument,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    503: Unavailable,
}


# --------------------------------------------------------------------------- formatting


def human_size(size: int | float) -> str:
    """Bytes as LXD's client shows them: ``1.00MiB``, ``512B``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.2f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_date(value: str | None) -> str:
    """An API timestamp as the ``lxc`` client shows it: ``Nov 22, 2026 at 2:35pm (UTC)``."""
    if not value:
        return ""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if when.year <= 1970:
        return ""
    when = when.astimezone()
    hour = when.strftime("%I").lstrip("0")
    return (
        f"{when:%b} {when.day}, {when.year} at {hour}:{when:%M}{when:%p}".replace(
            "AM", "am"
        ).replace("PM", "pm")
        + f" ({when.tzname()})"
    )


# --------------------------------------------------------------------------- image servers


@dataclass(frozen=True)
class RemoteImage:
    """An image on an image server, as `POST /1.0/images` names it (LXD's ImageSource)."""

    server: str  # https://host:port
    name: str  # an alias, a fingerprint or a unique fingerprint prefix
    protocol: str = "lxd"  # or "simplestreams"
    certificate: str = ""  # PEM: the server must present exactly this certificate


def lxc_config_dir() -> Path:
    """Where the `lxc` client keeps its remotes: $LXD_CONF, else ~/.config/lxc."""
    configured = os.environ.get("LXD_CONF")
    return Path(configured) if configured else Path.home() / ".config" / "lxc"


def remote_image(
    server: str,
    name: str,
    *,
    protocol: str | None = None,
    certificate: str = "",
    accept_certificate: bool = False,
    config_dir: Path | None = None,
) -> RemoteImage:
    """The image `name` on `server`: an http(s) URL, or the name of a remote of the `lxc`
    client (its address, protocol and pinned certificate, `servercerts/NAME.crt`).
    `accept_certificate` pins whatever certificate the server presents now."""
    if not name:
        raise InvalidArgument("The image to copy needs a name (an alias or a fingerprint)")
    if "://" in server:
        address, remote_protocol = server.rstrip("/"), "lxd"
    else:
        directory = config_dir or lxc_config_dir()
        remotes = _lxc_remotes(directory)
        if server not in remotes:
            known = ", ".join(sorted(remotes)) or "none"
            raise NotFound(
                f"{server!r} is neither an https:// URL nor a remote of the lxc client in "
                f"{directory} (remotes: {known})"
            )
        entry = remotes[server]
        address = str(entry.get("addr") or "").rstrip("/")
        remote_protocol = str(entry.get("protocol") or "lxd")
        pinned = directory / "servercerts" / f"{server}.crt"
        if not certificate and pinned.is_file():
            certificate = pinned.read_text()
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(f"{address!r} is not an http(s) address of an image server")
    if accept_certificate and not certificate:
        certificate = _server_certificate(parts.hostname, parts.port or 8443)
    chosen = protocol or remote_protocol
    if chosen not in ("lxd", "simplestreams"):
        raise InvalidArgument(f"Unsupported protocol {chosen!r} (lxd or simplestreams)")
    return RemoteImage(address, name, chosen, certificate)


def _lxc_remotes(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / "config.yml"
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"cannot read the lxc client's remotes from {path}: {exc}") from None
    remotes = loaded.get("remotes") if isinstance(loaded, dict) else None
    return {str(k): v for k, v in (remotes or {}).items() if isinstance(v, dict)}


def _server_certificate(host: str, port: int) -> str:
    try:
        return ssl.get_server_certificate((host, port), timeout=API_TIMEOUT)
    except (OSError, ssl.SSLError) as exc:
        raise Unavailable(f"cannot fetch the certificate of {host}:{port}: {exc}") from None


# --------------------------------------------------------------------------- the REST client


class ImagesApi:
    """The few ``/1.0/images`` calls the CLI needs, over a unix socket, in LXD's API shape."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = API_TIMEOUT):
        self.socket_path = Path(socket_path)
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)),
            base_url="http://unix.socket",
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ImagesApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        try:
            return self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise Unavailable(
                f"cannot reach the API at {self.socket_path}: {exc or type(exc).__name__} "
                "(is croft running? `croft up`)"
            ) from None

    @staticmethod
    def _envelope(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise Internal(
                f"{response.request.method} {response.request.url.path} answered "
                f"{response.status_code} with no LXD envelope"
            )
        if body.get("type") == "error" or response.status_code >= 400:
            code = int(body.get("error_code") or response.status_code)
            raise _STATUS_ERRORS.get(code, Internal)(str(body.get("error") or f"HTTP {code}"))
        return body

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A request whose answer is an envelope; returns the whole envelope."""
        return self._envelope(self._send(self._http.build_request(method, path, **kwargs)))

    def wait(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """Wait for an async answer's operation; its metadata, or the error it failed with."""
        if envelope.get("type") != "async":
            return envelope.get("metadata") or {}
        operation = envelope["operation"]
        request = self._http.build_request(
            "GET", f"{operation}/wait", params={"timeout": -1}, timeout=None
        )
        op = self._envelope(self._send(request))["metadata"]
        if op.get("status") != "Success":
            raise Internal(op.get("err") or f"operation {operation} ended {op.get('status')}")
        return op.get("metadata") or {}

    # ----------------------------------------------------------------- images

    def list_images(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/1.0/images", params={"recursion": 1})["metadata"])

    def resolve(self, name: str) -> str:
        """The fingerprint an alias or a (unique) fingerprint prefix names."""
        with contextlib.suppress(NotFound):
            return str(
                self.call("GET", f"/1.0/images/aliases/{quote(name, safe='')}")["metadata"][
                    "target"
                ]
            )
        matches = [
            str(fp).rsplit("/", 1)[-1]
            for fp in self.call("GET", "/1.0/images")["metadata"]
            if str(fp).rsplit("/", 1)[-1].startswith(name.lower())
        ]
        if not matches:
            raise NotFound(f"no image or alias named {name!r}")
        if len(matches) > 1:
            raise InvalidArgument(f"{name!r} matches more than one image fingerprint")
        return matches[0]

    def upload(
        self,
        metadata: Path,
        rootfs: Path | None,
        *,
        public: bool = False,
        properties: dict[str, str] | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> str:
        """Upload an image file (unified) or pair (split); returns its fingerprint."""
        headers = {"X-LXD-filename": metadata.name}
        if public:
            headers["X-LXD-public"] = "true"
        if properties:
            headers["X-LXD-properties"] = str(httpx.QueryParams(properties))
        if rootfs is None:
            length = metadata.stat().st_size
            body = _file_chunks([metadata], progress)
            headers["Content-Type"] = "application/octet-stream"
        else:
            body, length, content_type = _multipart_upload(metadata, rootfs, progress)
            headers["Content-Type"] = content_type
        headers["Content-Length"] = str(length)
        request = self._http.build_request(
            "POST", "/1.0/images", content=body, headers=headers, timeout=None
        )
        result = self.wait(self._envelope(self._send(request)))
        return str(result["fingerprint"])

    def copy_from(
        self,
        source: RemoteImage,
        *,
        aliases: tuple[str, ...] = (),
        public: bool = False,
        auto_update: bool = False,
        progress: Callable[[str], object] | None = None,
    ) -> dict[str, Any]:
        """LXD's `POST /1.0/images` from an image server (what `lxc image copy` asks of the
        target); `progress` is given each new `download_progress` of the operation. Returns
        the operation's metadata (`fingerprint`, `size`)."""
        body = {
            "source": {
                "type": "image",
                "mode": "pull",
                "server": source.server,
                "protocol": source.protocol,
                "certificate": source.certificate,
                "alias": source.name,
            },
            "aliases": [{"name": name, "description": ""} for name in aliases],
            "public": public,
            "auto_update": auto_update,
        }
        envelope = self.call("POST", "/1.0/images", json=body)
        if progress is not None and envelope.get("type") == "async":
            self._follow(envelope["operation"], progress)
        return self.wait(envelope)

    def _follow(self, operation: str, progress: Callable[[str], object]) -> None:
        """Report an operation's `download_progress` as it changes, until it ends."""
        shown = ""
        while True:
            response = self._send(self._http.build_request("GET", operation))
            if response.status_code != 200:
                return  # the final wait reports what went wrong
            op = response.json().get("metadata") or {}
            text = str((op.get("metadata") or {}).get("download_progress") or "")
            if text and text != shown:
                shown = text
                progress(text)
            if op.get("status") not in ("Pending", "Running"):
                return
            time.sleep(PROGRESS_POLL)

    def add_alias(self, name: str, fingerprint: str, description: str = "") -> None:
        self.call(
            "POST",
            "/1.0/images/aliases",
            json={"name": name, "target": fingerprint, "description": description},
        )

    def delete(self, fingerprint: str) -> None:
        self.wait(self.call("DELETE", f"/1.0/images/{fingerprint}"))

    @contextlib.contextmanager
    def export(self, fingerprint: str) -> Iterator[httpx.Response]:
        request = self._http.build_request(
            "GET", f"/1.0/images/{fingerprint}/export", timeout=httpx.Timeout(API_TIMEOUT)
        )
        response = self._send(request, stream=True)
        try:
            if response.status_code != 200:
                response.read()
                self._envelope(response)
            yield response
        finally:
            response.close()


def _file_chunks(paths: list[Path], progress: Callable[[int], object] | None) -> Iterator[bytes]:
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                if progress is not None:
                    progress(len(chunk))
                yield chunk


def _multipart_upload(
    metadata: Path, rootfs: Path, progress: Callable[[int], object] | None
) -> tuple[Iterator[bytes], int, str]:
    """LXD's split upload: multipart/form-data, ``metadata`` then ``rootfs`` (``rootfs.img``
    for a VM disk), streamed from the files with an exact Content-Length."""
    from croft.imageformat.format import FileFormat, detect_file_format

    boundary = uuid.uuid4().hex
    rootfs_field = "rootfs.img" if detect_file_format(rootfs) is FileFormat.QCOW2 else "rootfs"

    parts = [
        part_head(boundary, "metadata", metadata.name, first=True),
        part_head(boundary, rootfs_field, rootfs.name, first=False),
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    length = sum(map(len, parts)) + metadata.stat().st_size + rootfs.stat().st_size

    def body() -> Iterator[bytes]:
        yield parts[0]
        yield from _file_chunks([metadata], progress)
        yield parts[1]
        yield from _file_chunks([rootfs], progress)
        yield parts[2]

    return body(), length, f"multipart/form-data; boundary={boundary}"


def _disposition_filename(header: str) -> str:
    for item in header.split(";"):
        key, _, value = item.strip().partition("=")
        if key.lower() == "filename":
            return Path(value.strip().strip('"')).name
    return ""


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


def split_multipart(
    chunks: Iterator[bytes], boundary: str, open_part: Callable[[str, str], Writable]
) -> list[str]:
    """Stream a multipart body into files: ``open_part(field name, filename)`` gives the
    file for each part. Returns the field names in order. InvalidArgument on a broken body."""
    delimiter = b"--" + boundary.encode()
    body_end = b"\r\n" + delimiter
    buffer = b""
    names: list[str] = []
    state = "preamble"
    out: Writable | None = None
    for chunk in chunks:
        buffer += chunk
        while True:
            if state == "preamble":
                at = buffer.find(delimiter)
                if at < 0 or len(buffer) < at + len(delimiter) + 2:
                    break
                buffer = buffer[at + len(delimiter) :]
                state = "after-delimiter"
            if state == "after-delimiter":
                if len(buffer) < 2:
                    break
                if buffer[:2] == b"--":
                    return names
                if buffer[:2] != b"\r\n":
                    raise InvalidArgument("the server sent a broken multipart body")
                buffer = buffer[2:]
                state = "headers"
            if state == "headers":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > 64 << 10:
                        raise InvalidArgument("the server sent a broken multipart body")
                    break
                headers = {}
                for line in buffer[:end].decode("utf-8", "replace").split("\r\n"):
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                buffer = buffer[end + 4 :]
                disposition = headers.get("content-disposition", "")
                name = ""
                for item in disposition.split(";"):
                    key, _, value = item.strip().partition("=")
                    if key.lower() == "name":
                        name = value.strip('"')
                names.append(name)
                out = open_part(name, _disposition_filename(disposition))
                state = "body"
            if state == "body":
                assert out is not None
                at = buffer.find(body_end)
                if at < 0:
                    keep = len(body_end) - 1
                    if len(buffer) > keep:
                        out.write(buffer[:-keep])
                        buffer = buffer[-keep:]
                    break
                out.write(buffer[:at])
                buffer = buffer[at + len(body_end) :]
                state = "after-delimiter"
    raise InvalidArgument("the server's multipart body ended early")


# --------------------------------------------------------------------------- commands


def _socket_path(socket: str | None) -> Path:
    if socket:
        return Path(socket)
    from croft.common.config import ConfigError, load_config

    try:
        return load_config().state_dir / "unix.socket"
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _api(socket: str | None) -> ImagesApi:
    return ImagesApi(_socket_path(socket))


def socket_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--socket",
        envvar="CROFT_SOCKET",
        metavar="PATH",
        help="the API's unix socket (default: <state_dir>/unix.socket from croft's config)",
    )(fn)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except CroftError as exc:
        click.echo(f"Error: {exc.message}", err=True)
        raise SystemExit(1) from None


def _interactive() -> bool:
    return Console(stderr=True).is_terminal


def _transfer_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not _interactive(),
    )


@click.group()
def image() -> None:
    """Build images, and list, import, export, copy and delete them."""


@image.command()
@click.argument("definition", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=True, path_type=Path),
    help="the image file to write (default: <name>.tar.gz here; a directory: in it)",
)
def build(definition: Path, output: Path | None) -> None:
    """Build an image from a definition (YAML) into an LXD unified tarball."""
    from croft.imageformat.builder import build_image, load_definition

    with _errors():
        name = load_definition(definition).name
        if output is None:
            output = Path(f"{name}.tar.gz")
        elif output.is_dir():
            output = output / f"{name}.tar.gz"
        started = time.monotonic()
        with Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[image]}[/bold] {task.description}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
            disable=not _interactive(),
        ) as progress:
            task = progress.add_task("starting", image=name, total=None)
            info = build_image(
                definition,
                output,
                on_stage=lambda text: progress.update(task, description=text),
            )
        elapsed = time.monotonic() - started
    click.echo(
        f"{output}: fingerprint {info.fingerprint}, {human_size(info.size)}, "
        f"built in {elapsed:.1f}s"
    )


@image.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@socket_option
def list_(fmt: str, socket: str | None) -> None:
    """List the images the server stores."""
    with _errors(), _api(socket) as api:
        images = api.list_images()
    if fmt == "json":
        click.echo(json.dumps(images, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("ALIAS", "FINGERPRINT", "PUBLIC", "DESCRIPTION"):
        table.add_column(column, no_wrap=column != "DESCRIPTION", overflow="fold")
    for column in ("ARCHITECTURE", "TYPE", "SIZE", "UPLOAD DATE"):
        table.add_column(column, no_wrap=column != "UPLOAD DATE")
    for img in sorted(images, key=lambda i: (_aliases(i) or "~", i.get("fingerprint", ""))):
        table.add_row(
            _aliases(img),
            str(img.get("fingerprint", ""))[:12],
            "yes" if img.get("public") else "no",
            str((img.get("properties") or {}).get("description", "")),
            str(img.get("architecture", "")),
            "VIRTUAL-MACHINE" if img.get("type") == "virtual-machine" else "CONTAINER",
            human_size(int(img.get("size") or 0)),
            human_date(img.get("uploaded_at")),
        )
    Console().print(table)


def _aliases(img: dict[str, Any]) -> str:
    return "\n".join(str(a.get("name", "")) for a in img.get("aliases") or [])


@image.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument(
    "rootfs", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--alias", "aliases", multiple=True, help="an alias for the image (repeatable)")
@click.option("--public", is_flag=True, help="make the image public")
@click.option("--property", "props", multiple=True, metavar="KEY=VALUE", help="(repeatable)")
@socket_option
def import_(
    file: Path,
    rootfs: Path | None,
    aliases: tuple[str, ...],
    public: bool,
    props: tuple[str, ...],
    socket: str | None,
) -> None:
    """Import an image file (unified), or a metadata file and a rootfs (split)."""
    properties = {}
    for item in props:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--property")
        properties[key] = value
    total = file.stat().st_size + (rootfs.stat().st_size if rootfs else 0)
    with _errors(), _api(socket) as api:
        with _transfer_progress() as progress:
            task = progress.add_task(f"Uploading {file.name}", total=total)
            fingerprint = api.upload(
                file,
                rootfs,
                public=public,
                properties=properties,
                progress=lambda n: progress.advance(task, n),
            )
        for alias in aliases:
            api.add_alias(alias, fingerprint)
    click.echo(f"Image imported with fingerprint: {fingerprint}")


@image.command("export")
@click.argument("name")
@click.argument("target", required=False, type=click.Path(path_type=Path))
@socket_option
def export(name: str, target: Path | None, socket: str | None) -> None:
    """Export an image (alias or fingerprint) to files: TARGET is a directory (default: here)
    or a file name (a split image's rootfs then goes to TARGET.root)."""
    with _errors(), _api(socket) as api:
        fingerprint = api.resolve(name)
        written = _export(api, fingerprint, target or Path("."))
    for path in written:
        click.echo(f"Image exported to {path}")


def _export(api: ImagesApi, fingerprint: str, target: Path) -> list[Path]:
    """Download, verify against the fingerprint, and only then put the files in place."""
    directory = target if target.is_dir() else target.parent
    partials: dict[str, tuple[Path, Path]] = {}
    digest = hashlib.sha256()
    files: list[IO[bytes]] = []

    def place(field: str, filename: str) -> Writable:
        if target.is_dir():
            final = target / (filename or f"{fingerprint}.{field}")
        else:
            final = target if not partials else target.with_name(target.name + ".root")
        partial = directory / f".{final.name}.{os.getpid()}.part"
        partials[field] = (partial, final)
        f = open(partial, "wb")  # noqa: SIM115
        files.append(f)
        return _Hashing(f, digest)

    try:
        with api.export(fingerprint) as response, _transfer_progress() as progress:
            total = int(response.headers.get("Content-Length") or 0) or None
            task = progress.add_task(f"Exporting {fingerprint[:12]}", total=total)

            def chunks() -> Iterator[bytes]:
                for chunk in response.iter_raw(CHUNK):
                    progress.advance(task, len(chunk))
                    yield chunk

            content_type = response.headers.get("Content-Type", "")
            if content_type.startswith("multipart/"):
                boundary = content_type.split("boundary=", 1)[-1].strip().strip('"')
                split_multipart(chunks(), boundary, place)
            else:
                filename = _disposition_filename(response.headers.get("Content-Disposition", ""))
                out = place("image", filename)
                for chunk in chunks():
                    out.write(chunk)
        for f in files:
            f.close()
        if digest.hexdigest() != fingerprint:
            raise InvalidArgument(
                f"the exported files hash to {digest.hexdigest()}, not {fingerprint}; "
                "nothing was kept"
            )
        for partial, final in partials.values():
            os.rename(partial, final)
        return [final for _, final in partials.values()]
    finally:
        for f in files:
            f.close()
        for partial, _ in partials.values():
            partial.unlink(missing_ok=True)


class _Hashing:
    """A file that also feeds what is written to it into a running hash."""

    def __init__(self, f: IO[bytes], digest: Any) -> None:
        self._f, self._digest = f, digest

    def write(self, data: bytes, /) -> int:
        self._digest.update(data)
        return self._f.write(data)


@image.command()
@click.argument("server")
@click.argument("name")
@click.option(
    "--protocol",
    type=click.Choice(["lxd", "simplestreams"]),
    help="how to talk to SERVER (default: the lxc remote's protocol, else lxd)",
)
@click.option(
    "--certificate",
    "certificate_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="the server's certificate (PEM) to pin (default: the lxc remote's pinned one)",
)
@click.option(
    "--accept-certificate", is_flag=True, help="pin the certificate the server presents now"
)
@click.option("--alias", "aliases", multiple=True, help="an alias for the copy (repeatable)")
@click.option("--public", is_flag=True, help="make the copy public")
@click.option("--auto-update", is_flag=True, help="keep the copy current (NAME must be an alias)")
@socket_option
def copy(
    server: str,
    name: str,
    protocol: str | None,
    certificate_file: Path | None,
    accept_certificate: bool,
    aliases: tuple[str, ...],
    public: bool,
    auto_update: bool,
    socket: str | None,
) -> None:
    """Copy image NAME (an alias or a fingerprint) from an image server into this croft.

    SERVER is an address, e.g. https://10.0.0.5:8443, or the name of a remote of the lxc
    client ($LXD_CONF or ~/.config/lxc/config.yml). Another croft serves its public images
    both ways: LXD's REST API (--protocol lxd, the default; what an LXD serves too) and
    simplestreams (--protocol simplestreams). The local croft downloads the image itself (LXD's
    `POST /1.0/images` with `source.type: image`) and checks its fingerprint; a failed copy
    keeps nothing.

    \b
    Examples:
      croft image copy https://10.0.0.5:8443 busybox --accept-certificate
      croft image copy https://10.0.0.5:8443 debian/12 --protocol simplestreams \\
          --certificate depot.crt --alias debian
      croft image copy depot busybox      # `lxc remote add depot ...` made it known
    """
    with _errors():
        source = remote_image(
            server,
            name,
            protocol=protocol,
            certificate=certificate_file.read_text() if certificate_file else "",
            accept_certificate=accept_certificate,
        )
        with _api(socket) as api, _download_progress() as progress:
            task = progress.add_task(f"Copying {name}", total=100, speed="")

            def show(text: str) -> None:
                label, percent, speed = parse_download_progress(text)
                progress.update(
                    task,
                    completed=percent,
                    description=f"Copying {name}" + (f" ({label})" if label else ""),
                    speed=speed,
                )

            result = api.copy_from(
                source, aliases=aliases, public=public, auto_update=auto_update, progress=show
            )
    click.echo(f"Image copied with fingerprint: {result['fingerprint']}")


_PROGRESS = re.compile(r"(?:(?P<label>[\w.-]+): )?(?P<percent>\d+)% \((?P<speed>[^)]*)\)")


def parse_download_progress(text: str) -> tuple[str, int, str]:
    """LXD's `download_progress` (`rootfs: 42% (10.50MB/s)`, `42% (1.00kB/s)`) as
    (label, percent, speed); an unknown text gives ("", 0, "")."""
    found = _PROGRESS.fullmatch(text.strip())
    if found is None:
        return "", 0, ""
    return found["label"] or "", min(100, int(found["percent"])), found["speed"]


def _download_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not _interactive(),
    )


@image.command()
@click.argument("names", nargs=-1, required=True)
@socket_option
def delete(names: tuple[str, ...], socket: str | None) -> None:
    """Delete images (by alias or fingerprint)."""
    with _errors(), _api(socket) as api:
        for name in names:
            fingerprint = api.resolve(name)
            api.delete(fingerprint)
            click.echo(f"Deleted image {fingerprint[:12]} ({name})")
