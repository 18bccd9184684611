"""A bad configuration stops croft before anything starts, and says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from croft.common.config import ConfigError, load_config

from .conftest import make_croft


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "croft.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(tmp_path / "absent.yaml")
    assert config.etcd.endpoints == ["https://127.0.0.1:2379"]
    assert config.state_dir == Path("/var/lib/croft")


def test_unknown_key_is_named_with_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "etcd:\n  endpoint: [http://127.0.0.1:2379]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "etcd.endpoint: unknown key" in message
    assert "endpoints" in message


def test_bad_value_names_key_and_expected_form(tmp_path: Path) -> None:
    path = write(tmp_path, "etcd:\n  endpoints: [localhost]\n")
    with pytest.raises(ConfigError, match=r"etcd\.endpoints: 'localhost' is not a URL of the form"):
        load_config(path)


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "rpc:\n  host: [unclosed\n")
    with pytest.raises(ConfigError, match=r"croft\.yaml: line \d+, column \d+: not valid YAML"):
        load_config(path)


def test_environment_overrides_file_and_is_named_when_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "rpc:\n  timeout: 3\n")
    monkeypatch.setenv("CROFT_RPC__TIMEOUT", "7.5")
    assert load_config(path).rpc.timeout == 7.5
    monkeypatch.setenv("CROFT_RPC__TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="rpc.timeout \\(from CROFT_RPC__TIMEOUT\\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("etcd: [\n", "not valid YAML"),
        ("registry:\n  lease_tll: 5\n", "registry.lease_tll: unknown key"),
        ("services:\n  images:\n    replicas: many\n", "services.images.replicas"),
    ],
)
def test_croft_up_refuses_bad_config_and_starts_nothing(
    croft_dir: Path, text: str, expected: str
) -> None:
    croft = make_croft(croft_dir)
    croft.config_file.write_text(croft.config_file.read_text() + text)
    result = croft.run("up", check=False)
    assert result.returncode == 2
    assert str(croft.config_file) in result.stderr
    assert expected in result.stderr
    assert croft.processes() == []
    assert not (croft.root / "run" / "node.pid").exists()
    assert not (croft.root / "state").exists()
