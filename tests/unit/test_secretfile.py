"""Secret files (edge.secretfile): owner-only or refused naming the file; unset = systemd's credential."""
from __future__ import annotations

import os

import pytest

from edge import gallery as G
from edge.errors import ConfigError, GalleryError
from edge.secretfile import credential_path, read_secret


def secret(tmp_path, mode: int, data: bytes = b"s3cret\n"):
    p = tmp_path / "mqtt.password"
    p.write_bytes(data)
    p.chmod(mode)
    return p


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_an_owner_only_secret_is_read(tmp_path, mode):
    assert read_secret(secret(tmp_path, mode), "mqtt password", 64, ConfigError) == b"s3cret\n"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_a_secret_its_group_or_others_can_touch_is_refused_naming_the_file(tmp_path, mode):
    p = secret(tmp_path, mode)
    with pytest.raises(ConfigError) as e:
        read_secret(p, "mqtt password", 64, ConfigError)
    assert e.value.path == str(p)
    assert f"mqtt password may be read or written by its group or others (mode {mode:04o})" in str(e.value)
    assert "chmod 600" in str(e.value)


def test_a_secret_through_a_symlink_is_judged_by_its_target(tmp_path):
    target = secret(tmp_path, 0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="mode 0644"):
        read_secret(link, "mqtt password", 64, ConfigError)
    target.chmod(0o600)
    assert read_secret(link, "mqtt password", 64, ConfigError) == b"s3cret\n"


def test_a_missing_fifo_or_oversized_secret_is_refused_without_waiting(tmp_path):
    with pytest.raises(ConfigError, match="mqtt password not found"):
        read_secret(tmp_path / "absent", "mqtt password", 64, ConfigError)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secret(fifo, "mqtt password", 64, ConfigError)
    with pytest.raises(ConfigError, match="larger than 4 bytes"):
        read_secret(secret(tmp_path, 0o600), "mqtt password", 4, ConfigError)


def test_an_unset_path_is_the_credential_systemd_handed_over(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="no mqtt password: set mqtt.password_file or run under systemd with "
                                          "LoadCredential=mqtt.password"):
        credential_path(None, "mqtt.password", "mqtt password", "mqtt.password_file", ConfigError)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert credential_path(None, "mqtt.password", "mqtt password", "mqtt.password_file", ConfigError) == \
        tmp_path / "mqtt.password"
    assert credential_path("/etc/x", "mqtt.password", "mqtt password", "mqtt.password_file", ConfigError).as_posix() \
        == "/etc/x"


def test_the_gallery_key_comes_from_the_same_credential_lookup(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(GalleryError, match="no gallery key: set storage.key_file or run under systemd with "
                                           "LoadCredential=gallery.key"):
        G.load_key(None)
    G.new_key_file(tmp_path / "gallery.key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert G.load_key(None) == G.load_key(tmp_path / "gallery.key")
