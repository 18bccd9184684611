"""Image templates rendered into a real unpacked rootfs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from croft.common.errors import InvalidArgument
from croft.imageformat.format import ImageTemplate, unpack_image
from croft.imageformat.templates import (
    TemplateInstance,
    apply_template,
    apply_templates,
    render_template,
    template_context,
    write_in_root,
)

METADATA = b"""architecture: x86_64
creation_date: 1700000000
templates:
  /etc/hostname:
    when: [create, copy]
    template: hostname.tpl
  /etc/cloud/user-data:
    when: [create]
    create_only: true
    template: user-data.tpl
    properties:
      default: "#cloud-config\\n{}"
  /etc/motd:
    when: [start]
    template: motd.tpl
"""

USER_DATA = (
    b'{%- if config_get("user.user-data", properties.default) == properties.default -%}\n'
    b"{{ properties.default }}\n"
    b"{%- else -%}\n"
    b'{{ config_get("user.user-data", "") }}\n'
    b"{%- endif %}\n"
)
MOTD = b"{{ instance.name|upper }} on {{ container.architecture }} ({{ trigger }})\n"


@pytest.fixture
def volume(workdir: Path, kit, make_unified) -> Path:
    spec = kit.unified_spec(METADATA)
    spec.add("templates/user-data.tpl", data=USER_DATA)
    spec.add("templates/motd.tpl", data=MOTD)
    image = make_unified(spec=spec)
    dest = workdir / "volume"
    unpack_image(image, None, dest)
    return dest


def test_create_writes_the_hostname(volume):
    instance = TemplateInstance(
        name="web1", config={"user.user-data": "#cloud-config\nruncmd: []\n"}
    )

    written = apply_templates(volume, "create", instance)

    assert sorted(written) == ["/etc/cloud/user-data", "/etc/hostname"]
    assert (volume / "rootfs/etc/hostname").read_text() == "web1\n"
    user_data = volume / "rootfs/etc/cloud/user-data"
    assert user_data.read_text() == "#cloud-config\nruncmd: []\n"
    st = os.stat(user_data)
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert not (volume / "rootfs/etc/motd").exists()


def test_create_only_and_triggers(volume):
    apply_templates(volume, "create", TemplateInstance(name="a"))
    assert (volume / "rootfs/etc/cloud/user-data").read_text() == "#cloud-config\n{}\n"

    # create_only: an existing file is left alone on the next create (e.g. a copy).
    written = apply_templates(
        volume, "create", TemplateInstance(name="b", config={"user.user-data": "x"})
    )
    assert written == ["/etc/hostname"]
    assert (volume / "rootfs/etc/cloud/user-data").read_text() == "#cloud-config\n{}\n"

    assert apply_templates(volume, "start", TemplateInstance(name="c", architecture="aarch64")) == [
        "/etc/motd"
    ]
    assert (volume / "rootfs/etc/motd").read_text() == "C on aarch64 (start)\n"


def test_new_files_are_owned_by_the_containers_root(volume):
    apply_templates(volume, "create", TemplateInstance(name="u"), uid=1000000, gid=1000000)
    st = os.stat(volume / "rootfs/etc/cloud")
    assert (st.st_uid, st.st_gid) == (1000000, 1000000)
    # Existing files keep their owner.
    assert os.stat(volume / "rootfs/etc/hostname").st_uid == 0


def test_symlink_escaping_the_rootfs_is_refused(volume, workdir):
    outside = workdir / "host-file"
    outside.write_text("host data\n")
    hostname = volume / "rootfs/etc/hostname"
    hostname.unlink()
    hostname.symlink_to(os.path.relpath(outside, hostname.parent))

    with pytest.raises(InvalidArgument, match="outside the rootfs"):
        apply_templates(volume, "create", TemplateInstance(name="evil"))

    assert outside.read_text() == "host data\n"


def test_absolute_symlink_resolves_inside_the_rootfs(volume, workdir):
    # /etc -> /var/etc-real : absolute, as images ship them. The host's /var must not be touched.
    rootfs = volume / "rootfs"
    (rootfs / "var/etc-real").mkdir(parents=True)
    os.rename(rootfs / "etc", rootfs / "var/etc-real/etc")
    (rootfs / "etc").symlink_to("/var/etc-real/etc")

    apply_templates(volume, "copy", TemplateInstance(name="inside"))

    assert (rootfs / "var/etc-real/etc/hostname").read_text() == "inside\n"
    assert not Path("/var/etc-real").exists()


def test_intermediate_symlink_to_host_path_stays_in_the_rootfs(workdir):
    rootfs = workdir / "rootfs"
    rootfs.mkdir()
    (rootfs / "etc").symlink_to("/tmp")  # on the host this would be the host's /tmp

    write_in_root(rootfs, "/etc/croft-images-test-marker", "x")

    assert (rootfs / "tmp/croft-images-test-marker").read_text() == "x"
    assert not Path("/tmp/croft-images-test-marker").exists()


def test_templates_cannot_write_into_directories_or_devices(workdir):
    rootfs = workdir / "rootfs"
    (rootfs / "etc/dir").mkdir(parents=True)
    os.mkfifo(rootfs / "etc/fifo")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        write_in_root(rootfs, "/etc/dir", "x")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        write_in_root(rootfs, "/etc/fifo", "x")


def test_template_file_that_is_a_symlink_is_refused(volume):
    tpl = volume / "templates/hostname.tpl"
    tpl.unlink()
    tpl.symlink_to("/etc/shadow")
    with pytest.raises(InvalidArgument, match="symlink"):
        apply_templates(volume, "create", TemplateInstance(name="x"))


def test_pongo2_syntax_used_by_real_images():
    context = template_context(
        TemplateInstance(name="c1", config={"user.a": "1\n"}, ephemeral=True),
        "create",
        "/etc/x",
        {"default": "dflt"},
    )
    source = (
        '{{ config_get("user.missing", properties.default) }}|'
        '{{ config_get("user.a", "") }}|'
        '{{ container.missing|default:"none" }}|'
        '{% if instance.ephemeral == "true" && !config.nothing %}eph{% endif %}|'
        "{% autoescape off %}<{{ path }}>{% endautoescape %}|"
        '{{ "a:b|c" }}\n'
    )
    assert render_template(source, context) == "dflt|1|none|eph|</etc/x>|a:b|c\n"


@pytest.mark.parametrize(
    "source",
    [
        '{% include "/etc/shadow" %}',
        '{% extends "/etc/passwd" %}',
        '{% ssi "/etc/shadow" %}',
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% if %}",
    ],
)
def test_unsafe_or_broken_templates_are_refused(source):
    with pytest.raises(InvalidArgument):
        render_template(source, {})


def test_trigger_not_in_when_writes_nothing(workdir):
    rootfs = workdir / "rootfs"
    templates = workdir / "templates"
    rootfs.mkdir()
    templates.mkdir()
    (templates / "t.tpl").write_text("x")
    tpl = ImageTemplate(path="/etc/x", template="t.tpl", when=("create",))
    assert not apply_template(rootfs, templates, tpl, "start", TemplateInstance(name="n"))
    assert not (rootfs / "etc").exists()


def test_volume_without_metadata_has_nothing_to_apply(workdir):
    (workdir / "rootfs").mkdir()
    assert apply_templates(workdir, "create", TemplateInstance(name="n")) == []


def test_a_rootfs_that_is_a_symlink_is_refused(workdir):
    real = workdir / "elsewhere"
    real.mkdir()
    (workdir / "rootfs").symlink_to(real)
    with pytest.raises(OSError):
        write_in_root(workdir / "rootfs", "/etc/hostname", "x")
    assert list(real.iterdir()) == []
