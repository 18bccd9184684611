"""The instance config keys' one declaration: LXD's value formats, read one way by the
api (validate) and by compute (InstanceConfig)."""

from __future__ import annotations

import pytest

from croft.common.errors import InvalidArgument
from croft.common.instance_config import (
    KEYS,
    CpuLimit,
    InstanceConfig,
    MemoryLimit,
    lookup,
    parse_bool,
    parse_byte_size,
    parse_cpu_allowance,
    parse_cpuset,
    parse_device_name,
    parse_int,
    parse_interface_name,
    parse_mac,
    validate,
)


@pytest.mark.parametrize("word", ["true", "1", "yes", "on", "TRUE", "On", "Yes"])
def test_every_true_word_lxd_accepts_reads_true_everywhere(word: str) -> None:
    validate({"security.privileged": word, "boot.autostart": word}, profile=False)
    cfg = InstanceConfig({"security.privileged": word, "boot.autostart": word})
    assert cfg.bool("security.privileged") and cfg.bool("boot.autostart")


@pytest.mark.parametrize("word", ["false", "0", "no", "off", "FALSE", "Off"])
def test_every_false_word_reads_false(word: str) -> None:
    assert parse_bool(word) is False
    assert not InstanceConfig({"security.nesting": word}).bool("security.nesting")


def test_unset_reads_as_the_default() -> None:
    cfg = InstanceConfig({})
    assert cfg.bool("security.privileged") is False
    assert cfg.bool("security.devlxd") is True  # LXD's default
    assert cfg.memory() is None and cfg.cpu() is None and cfg.int("limits.processes") is None
    assert not cfg.is_set("boot.autostart")


@pytest.mark.parametrize(
    ("text", "size"),
    [("", 0), ("100", 100), ("100B", 100), ("100 bytes", 100), ("2kB", 2000),
     ("64MiB", 64 * 2**20), ("1GB", 10**9), ("3EiB", 3 * 2**60)],
)  # fmt: skip
def test_sizes_read_as_lxd_parse_byte_size_string(text: str, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["1.5GB", "64 MiB", " 64MiB", "64mib", "-1", "MiB", "16EiB"])
def test_sizes_lxd_refuses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_byte_size(text)


def test_cpu_limits_are_a_count_or_a_set() -> None:
    assert InstanceConfig({"limits.cpu": "2"}).cpu() == CpuLimit(count=2)
    assert InstanceConfig({"limits.cpu": "0-1,3"}).cpu() == CpuLimit(cpus=(0, 1, 3), cpuset="0-1,3")
    assert parse_cpuset("1-1") == (1,)
    for bad, message in [
        ("abc", "Invalid CPU limit syntax"),
        ("0 - 1", "Invalid CPU limit syntax"),
        ("1-3,3", "Cannot define CPU multiple times"),
        ("3-1", "Invalid cpuset value"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_cpuset(bad)


def test_prefixed_keys_read_through_their_prefix() -> None:
    assert (
        InstanceConfig({"limits.hugepages.2MB": "4MiB"}).size("limits.hugepages.2MB") == 4 * 2**20
    )
    with pytest.raises(KeyError):
        InstanceConfig({}).bool("limits.memory")  # declared, but not a boolean


def test_memory_is_bytes_or_a_percentage() -> None:
    assert InstanceConfig({"limits.memory": "1GiB"}).memory() == MemoryLimit(bytes=2**30)
    assert InstanceConfig({"limits.memory": "50%"}).memory() == MemoryLimit(percent=50)


def test_a_stored_value_that_does_not_parse_names_its_key() -> None:
    with pytest.raises(InvalidArgument, match=r'limits\.memory "lots"'):
        InstanceConfig({"limits.memory": "lots"}).memory()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"security.privileged": "maybe"}, 'Invalid value for a boolean "maybe"'),
        ({"limits.memory": "1.5GB"}, "Invalid value: 1.5GB"),
        ({"limits.processes": "1_000"}, 'Invalid value for an integer "1_000"'),
        ({"foo.bar": "x"}, "Unknown configuration key: foo.bar"),
        ({"environment.A": "1\nlxc.hook.pre-start = /bin/x"}, "control characters"),
        ({"limits.kernel.nofile": "1\r"}, "control characters"),
        ({"user.a\nb": "1"}, "control characters"),
        ({"user.\x00": "1"}, "control characters"),
    ],
)
def test_bad_config_is_refused_with_lxd_words(config: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate(config, profile=False)


def test_free_text_keys_keep_their_lines() -> None:
    validate(
        {
            "user.user-data": "#cloud-config\npackages: [vim]\n",
            "cloud-init.user-data": "#cloud-config\n",
            "raw.lxc": "lxc.apparmor.profile = unconfined\n",
        },
        profile=False,
    )


def test_volatile_keys_only_on_instances() -> None:
    validate({"volatile.eth0.hwaddr": "00:16:3e:00:00:01"}, profile=False)
    with pytest.raises(InvalidArgument, match="Volatile keys can only be set on instances"):
        validate({"volatile.eth0.hwaddr": "00:16:3e:00:00:01"}, profile=True)
    assert lookup("volatile.nope") is None


def test_only_limits_and_boot_keys_apply_live() -> None:
    live = {key for key, declared in KEYS.items() if declared.live}
    assert {"limits.cpu", "limits.memory", "limits.processes", "boot.autostart"} <= live
    assert "security.privileged" not in live and "raw.lxc" not in live


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("lxc.environment", "Invalid raw.lxc line: lxc.environment"),
        ("lxc.log.file = /tmp/x", "Setting lxc.logfile is not allowed"),
        ("LXC.Ephemeral = 1", "Setting lxc.ephemeral is not allowed"),
        ("lxc.prlimit.nofile = 10", "Process limits should be set via"),
        ("lxc.net.0.link = br1", "Only interface-specific ipv4/ipv6"),
        ("lxc.environment = A=1\r\nlxc.environment = B=2", "carriage return or NUL"),
        ("lxc.environment = A=1\x00", "carriage return or NUL"),
    ],
)
def test_raw_lxc_is_checked_as_lxd_checks_it(raw: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate({"raw.lxc": raw}, profile=False)
    validate({"raw.lxc": "# mine\n\n  lxc.net.0.ipv4.address = 10.0.0.2/24\n"}, profile=False)


def test_no_parser_lets_a_trailing_newline_through() -> None:
    """Regular expressions' `$` matches before a final newline: each parser must not."""
    cases = [
        (parse_int, "5"), (parse_cpuset, "0-1"), (parse_interface_name, "eth0"),
        (parse_mac, "00:16:3e:00:00:01"), (parse_device_name, "eth0"),
        (parse_byte_size, "5"), (parse_cpu_allowance, "5%"),
    ]  # fmt: skip
    for parse, good in cases:
        parse(good)
        with pytest.raises(ValueError):
            parse(good + "\n")
