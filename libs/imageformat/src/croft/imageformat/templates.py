"""Image templates: render ``metadata.yaml``'s ``templates:`` into an instance's rootfs.

LXD renders these with pongo2 (Django-like) at instance create/copy/start/rename, with the
context ``trigger``, ``path``, ``container`` and ``instance`` (name, type, architecture,
ephemeral and privileged as strings), ``config``, ``devices``, ``properties`` (the
template's own) and ``config_get(key, default)``. Here jinja2's sandbox renders them, after a
small translation of the pongo2 syntax real images use: Django-style filter arguments
(``|default:"x"``), ``&&``/``||``/``!``, and ``{% autoescape off %}``. Like LXD, the tags that
could read host files (``extends``, ``import``, ``include``, ``ssi``) are refused.

Templates come from images, so they are untrusted: the sandbox blocks attribute tricks, and
every write happens through directory file descriptors opened with O_NOFOLLOW, resolving
symlinks by hand inside the rootfs. An absolute symlink resolves against the rootfs root (as
it would inside the container); a relative one that climbs above the root is refused; the host
never follows a link.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from croft.common.errors import InvalidArgument
from croft.imageformat.format import ImageMetadata, ImageTemplate, host_architecture, parse_metadata

MAX_SYMLINKS = 40
_BANNED_TAGS = ("extends", "import", "include", "ssi", "from")

_SEGMENT = re.compile(r"({{.*?}}|{%.*?%}|{#.*?#})", re.S)
_TOKEN = re.compile(
    r"""(?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
      |(?P<op>&&|\|\||!=|!|\|)
      |(?P<word>[\w.]+)
      |(?P<ws>\s+)
      |(?P<other>.)""",
    re.S | re.X,
)


@dataclass(frozen=True)
class TemplateInstance:
    """What a template may know about the instance it is rendered for."""

    name: str
    type: str = "container"
    architecture: str = field(default_factory=host_architecture)
    ephemeral: bool = False
    privileged: bool = False
    config: Mapping[str, str] = field(default_factory=dict)
    devices: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


# --------------------------------------------------------------------------- rendering


def _translate_code(code: str) -> str:
    """pongo2 expression syntax -> jinja2, leaving string literals alone."""
    tokens = [(m.lastgroup or "", m.group()) for m in _TOKEN.finditer(code)]
    out: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "op" and text == "|":
            # |filter:arg  ->  |filter(arg)
            j = i + 1
            while j < len(tokens) and tokens[j][0] == "ws":
                j += 1
            if j < len(tokens) and tokens[j][0] == "word":
                k = j + 1
                while k < len(tokens) and tokens[k][0] == "ws":
                    k += 1
                if k < len(tokens) and tokens[k] == ("other", ":"):
                    a = k + 1
                    while a < len(tokens) and tokens[a][0] == "ws":
                        a += 1
                    if a < len(tokens) and tokens[a][0] in ("str", "word"):
                        out.append(f"|{tokens[j][1]}({tokens[a][1]})")
                        i = a + 1
                        continue
            out.append(text)
        elif kind == "op" and text == "&&":
            out.append(" and ")
        elif kind == "op" and text == "||":
            out.append(" or ")
        elif kind == "op" and text == "!":
            out.append(" not ")
        else:
            out.append(text)
        i += 1
    return "".join(out)


def translate_pongo2(source: str) -> str:
    """Translate the pongo2 template syntax LXD images use into jinja2 syntax."""
    parts: list[str] = []
    for segment in _SEGMENT.split(source):
        if segment.startswith("{{") and segment.endswith("}}"):
            parts.append("{{" + _translate_code(segment[2:-2]) + "}}")
        elif segment.startswith("{%") and segment.endswith("%}"):
            inner = segment[2:-2]
            trim_left = inner.startswith("-")
            trim_right = inner.endswith("-")
            body = inner[1 if trim_left else 0 : -1 if trim_right else None].strip()
            tag = body.split(None, 1)[0] if body else ""
            if tag in _BANNED_TAGS:
                raise InvalidArgument(f"template tag {{% {tag} %}} is not allowed")
            if tag == "autoescape":
                arg = body[len(tag) :].strip()
                body = "autoescape " + {"off": "false", "on": "true"}.get(arg, arg)
            else:
                body = _translate_code(body)
            parts.append(
                "{%"
                + ("-" if trim_left else "")
                + " "
                + body
                + " "
                + ("-" if trim_right else "")
                + "%}"
            )
        else:
            parts.append(segment)
    return "".join(parts)


def _django_default(value: Any, default: Any = "") -> Any:
    # pongo2's default applies to any false value, not only to missing ones.
    return value if value else default


def _capfirst(value: Any) -> str:
    text = str(value)
    return text[:1].upper() + text[1:]


def _yesno(value: Any, choices: str = "yes,no,maybe") -> str:
    options = choices.split(",")
    if value is None and len(options) > 2:
        return options[2]
    return options[0] if value else options[1]


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        autoescape=False,
        keep_trailing_newline=True,
        undefined=jinja2.Undefined,
        finalize=lambda value: "" if value is None else value,
        loader=None,
    )
    env.filters.update(
        default=_django_default,
        capfirst=_capfirst,
        cut=lambda value, arg: str(value).replace(str(arg), ""),
        yesno=_yesno,
        default_if_none=lambda value, default="": default if value is None else value,
    )
    return env


_ENV = _environment()


# Every start renders the image's `start` templates, and compiling one costs about a
# millisecond: a compiled template depends only on its text, so keep the recent ones.
@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> jinja2.Template:
    return _ENV.from_string(translate_pongo2(source))


# The same goes for the metadata.yaml every start reads (the result is not mutated).
@functools.lru_cache(maxsize=64)
def _metadata(data: bytes) -> ImageMetadata:
    return parse_metadata(data)


def template_context(
    instance: TemplateInstance,
    trigger: str,
    path: str,
    properties: Mapping[str, str],
) -> dict[str, Any]:
    """LXD's template context for one template file."""
    meta = {
        "name": instance.name,
        "type": instance.type,
        "architecture": instance.architecture,
        "ephemeral": "true" if instance.ephemeral else "false",
        "privileged": "true" if instance.privileged else "false",
    }
    config = dict(instance.config)

    def config_get(key: Any, default: Any = None) -> Any:
        value = config.get(str(key))
        if value is None:
            return default
        return value.rstrip("\r\n")

    return {
        "trigger": trigger,
        "path": path,
        "container": meta,
        "instance": meta,
        "config": config,
        "devices": {k: dict(v) for k, v in instance.devices.items()},
        "properties": dict(properties),
        "config_get": config_get,
    }


def render_template(source: str, context: Mapping[str, Any], *, name: str = "template") -> str:
    """Render pongo2-style template text; InvalidArgument with the reason if it cannot."""
    try:
        return _compiled(source).render(dict(context))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{name}: {exc.message}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidArgument(
            f"{name}: template syntax error on line {exc.lineno}: {exc.message}"
        ) from None
    except Exception as exc:  # a template is image-supplied: any failure is the image's
        raise InvalidArgument(f"{name}: rendering failed: {exc}") from None


# --------------------------------------------------------------------------- safe writes


def _open_dir(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _resolve_parent(
    root_fd: int, path: str, *, uid: int, gid: int, follow_final: bool = True
) -> tuple[int, str]:
    """An fd of the directory that will hold ``path`` inside the root, and the final name.

    Missing directories are created (0755, owned by uid:gid). Symlinks on the way, including
    a symlink as the final component, are resolved inside the root.
    """
    pending: deque[str] = deque(p for p in path.split("/") if p not in ("", "."))
    if not pending:
        raise InvalidArgument(f"template target {path!r} is the root directory")
    stack = [os.dup(root_fd)]
    followed = 0
    try:
        while True:
            comp = pending.popleft()
            if comp == "..":
                if len(stack) == 1:
                    raise InvalidArgument(f"template target {path!r} resolves outside the rootfs")
                os.close(stack.pop())
                if not pending:
                    raise InvalidArgument(f"template target {path!r} is a directory")
                continue
            here = stack[-1]
            try:
                st = os.stat(comp, dir_fd=here, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode) and (pending or follow_final):
                followed += 1
                if followed > MAX_SYMLINKS:
                    raise InvalidArgument(f"template target {path!r}: too many levels of symlinks")
                target = os.readlink(comp, dir_fd=here)
                if target.startswith("/"):
                    for fd in stack[1:]:
                        os.close(fd)
                    del stack[1:]
                pending.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
                if not pending:
                    raise InvalidArgument(f"template target {path!r} is a directory")
                continue
            if not pending:
                result = (stack.pop(), comp)
                return result
            if st is None:
                os.mkdir(comp, 0o755, dir_fd=here)
                os.chown(comp, uid, gid, dir_fd=here, follow_symlinks=False)
            elif not stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"template target {path!r}: {comp!r} is not a directory")
            stack.append(_open_dir(comp, here))
    finally:
        for fd in stack:
            os.close(fd)


def write_in_root(
    rootfs: str | os.PathLike[str],
    path: str,
    content: str | bytes,
    *,
    create_only: bool = False,
    replace: bool = False,
    uid: int = 0,
    gid: int = 0,
    mode: int = 0o644,
) -> bool:
    """Write ``content`` to ``path`` inside ``rootfs`` without ever following a link out of it.

    New files get ``mode`` and uid:gid; existing regular files are truncated and keep their
    owner and mode. With ``replace``, whatever non-directory sits at ``path`` (a symlink
    included, which is then not followed) is removed first and a new file created. Returns
    False if the file existed and ``create_only`` was set (nothing written). InvalidArgument
    if the target is a directory, not a regular file, or escapes the rootfs.
    """
    data = content.encode() if isinstance(content, str) else content
    # The rootfs directory itself must not be a symlink (a hostile image could make it one).
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        parent, name = _resolve_parent(root_fd, path, uid=uid, gid=gid, follow_final=not replace)
    finally:
        os.close(root_fd)
    try:
        if replace:
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=parent)
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        created = False
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=parent)
            created = True
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.ELOOP, errno.ENXIO):
                raise InvalidArgument(f"template target {path!r} is not a regular file") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidArgument(f"template target {path!r} is not a regular file")
            if not created and create_only:
                return False
            if created:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
            else:
                os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    finally:
        os.close(parent)
    return True


# --------------------------------------------------------------------------- applying


def _read_template_file(templates_dir: Path, name: str) -> str:
    if "/" in name or name in ("", ".", ".."):
        raise InvalidArgument(f"template file name {name!r} must be a plain file name")
    dir_fd = os.open(templates_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except FileNotFoundError:
            raise InvalidArgument(f"template file {name!r} is missing from templates/") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidArgument(f"template file {name!r} is a symlink") from None
            raise
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InvalidArgument(f"template file {name!r} is not a regular file")
            return f.read().decode("utf-8", errors="replace")
    finally:
        os.close(dir_fd)


def apply_template(
    rootfs: str | os.PathLike[str],
    templates_dir: str | os.PathLike[str],
    template: ImageTemplate,
    trigger: str,
    instance: TemplateInstance,
    *,
    uid: int = 0,
    gid: int = 0,
) -> bool:
    """Render one template into the rootfs if ``trigger`` is in its ``when``. True if written."""
    if trigger not in template.when:
        return False
    source = _read_template_file(Path(templates_dir), template.template)
    context = template_context(instance, trigger, template.path, template.properties)
    text = render_template(
        source, context, name=f"template {template.template} for {template.path}"
    )
    return write_in_root(
        rootfs, template.path, text, create_only=template.create_only, uid=uid, gid=gid
    )


def apply_templates(
    volume_dir: str | os.PathLike[str],
    trigger: str,
    instance: TemplateInstance,
    *,
    uid: int = 0,
    gid: int = 0,
) -> list[str]:
    """Apply every template of an unpacked instance volume for ``trigger``.

    ``volume_dir`` has LXD's layout (``metadata.yaml``, ``templates/``, ``rootfs/``; see
    format.unpack_image). No metadata.yaml means nothing to do. ``uid``/``gid`` own new files
    and directories (the container's root on the host: 0 with idmapped mounts). Returns the
    paths written. Stops at the first failing template with InvalidArgument; files already
    written stay (LXD behaves the same).
    """
    volume = Path(volume_dir)
    meta_file = volume / "metadata.yaml"
    if not meta_file.exists() and not meta_file.is_symlink():
        return []
    if meta_file.is_symlink() or not meta_file.is_file():
        raise InvalidArgument("the instance's metadata.yaml is not a regular file")
    metadata = _metadata(meta_file.read_bytes())
    written: list[str] = []
    for template in metadata.templates.values():
        if apply_template(
            volume / "rootfs", volume / "templates", template, trigger, instance, uid=uid, gid=gid
        ):
            written.append(template.path)
    return written
