"""Configuration precedence (YAML < env < flags) and validation errors."""

import pytest

from edgecloud.config import ConfigError, load_settings


def test_precedence_yaml_env_flags(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("edge:\n  server: {port: 7000, max_workers: 4}\n  batching: {max_batch_size: 8}\n")
    s = load_settings(path)
    assert (s.edge.server.port, s.edge.server.max_workers, s.edge.batching.max_batch_size) == (7000, 4, 8)
    monkeypatch.setenv("EDGECLOUD_EDGE__SERVER__PORT", "7100")
    s = load_settings(path)
    assert s.edge.server.port == 7100 and s.edge.server.max_workers == 4
    s = load_settings(path, {"edge": {"server": {"port": 7200}}})
    assert s.edge.server.port == 7200 and s.edge.batching.max_batch_size == 8


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"edge\.server\.port"):
        load_settings(None, {"edge": {"server": {"port": 70000}}})
    with pytest.raises(ConfigError, match=r"edge\.backend\.name"):
        load_settings(None, {"edge": {"backend": {"name": "quantum"}}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("edge: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("edge:\n  servr: {}\n")
    with pytest.raises(ConfigError, match="servr"):
        load_settings(unknown)


def test_tls_needs_existing_files(tmp_path):
    with pytest.raises(ConfigError, match="tls.cert"):
        load_settings(None, {"cloud": {"server": {"tls": {"enabled": True}}}})
