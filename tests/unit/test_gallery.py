"""The encrypted gallery at rest: right key loads, anything else is refused by name."""
import pickle

import numpy as np
import pytest

from edge import gallery as G
from edge.errors import GalleryError

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def small_gallery():
    g = G.Gallery("ab" * 32, 4, bundle_sequence=7)
    g.add(G.Person("alice", np.array([3, 4, 0, 0], np.float32), "E1", 100.0, 200.0))
    g.add(G.Person("bob", np.array([0, 0, 1, 0], np.float32), "E2", 100.0, None))
    return g


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "gallery.fgg"
    G.save(small_gallery(), path, KEY)
    return path


def test_right_key_round_trip(saved):
    g = G.load(saved, KEY, "ab" * 32)
    assert g.names == ["alice", "bob"] and g.bundle_sequence == 7 and g.revision == 1
    np.testing.assert_allclose(g.people[0].embedding, [0.6, 0.8, 0, 0], rtol=1e-6)  # stored normalised
    assert (g.people[0].person_id, g.people[0].expires_at, g.people[1].expires_at) == ("E1", 200.0, None)
    assert saved.stat().st_mode & 0o777 == 0o600


def test_nothing_readable_at_rest(saved):
    data = saved.read_bytes()
    assert b"alice" not in data and b"embedding" not in data


def test_wrong_key_refused(saved):
    with pytest.raises(GalleryError, match="failed authentication: wrong key"):
        G.load(saved, OTHER)


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_flipped_byte_refused(saved, where):
    data = bytearray(saved.read_bytes())
    i = {"nonce": len(G.MAGIC) + 3, "ciphertext": len(G.MAGIC) + 12 + 5, "tag": len(data) - 1}[where]
    data[i] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match="failed authentication"):
        G.load(saved, KEY)


def test_flipped_magic_refused(saved):
    data = bytearray(saved.read_bytes())
    data[0] ^= 0x20
    saved.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match="bad magic"):
        G.load(saved, KEY)


@pytest.mark.parametrize("keep", [0, 10, len(G.MAGIC) + 20, -1])
def test_truncated_file_refused(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(GalleryError, match="bad magic|truncated|failed authentication"):
        G.load(saved, KEY)


def test_pickle_renamed_to_fgg_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.fgg"
    path.write_bytes(pickle.dumps({"people": [Boom()]}))
    with pytest.raises(GalleryError, match="not a facegate gallery"):
        G.load(path, KEY)
    assert not (tmp_path / "pwned").exists()


def test_encoder_mismatch_refused(saved):
    with pytest.raises(GalleryError, match="re-enroll"):
        G.load(saved, KEY, "cd" * 32)


def test_missing_gallery_named(tmp_path):
    with pytest.raises(GalleryError, match="gallery file not found") as e:
        G.load(tmp_path / "none.fgg", KEY)
    assert e.value.path == str(tmp_path / "none.fgg")


def test_key_formats_and_credentials_directory(tmp_path, monkeypatch):
    G.new_key_file(tmp_path / "hex.key")
    assert (tmp_path / "hex.key").stat().st_mode & 0o777 == 0o600
    assert len(G.load_key(tmp_path / "hex.key")) == 32
    (tmp_path / "raw.key").write_bytes(KEY)
    assert G.load_key(tmp_path / "raw.key") == KEY
    (tmp_path / "short.key").write_bytes(b"0123")
    with pytest.raises(GalleryError, match="32 raw bytes or 64 hex digits"):
        G.load_key(tmp_path / "short.key")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(GalleryError, match="LoadCredential"):
        G.load_key(None)
    (tmp_path / "gallery.key").write_bytes(KEY.hex().encode() + b"\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert G.load_key(None) == KEY


def test_each_save_uses_a_fresh_nonce(tmp_path):
    g = small_gallery()
    G.save(g, tmp_path / "a.fgg", KEY)
    first = (tmp_path / "a.fgg").read_bytes()
    G.save(g, tmp_path / "a.fgg", KEY)
    second = (tmp_path / "a.fgg").read_bytes()
    n = len(G.MAGIC)
    assert first[n:n + 12] != second[n:n + 12]  # a reused GCM nonce would leak the key stream
    assert G.load(tmp_path / "a.fgg", KEY).revision == 2


def killed_save_leftover(path, g) -> tuple[str, bytes]:
    """The temp file a save of `g` killed after its fsync leaves: its real name and bytes, kept as
    the save writes them (a kill runs no cleanup; this save's own error path then deletes it)."""
    left = {}

    def hook(step):
        if step == "synced":
            tmp = next(p for p in path.parent.iterdir() if p.name.endswith(".tmp"))
            left.update(name=tmp.name, data=tmp.read_bytes())
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        G.save(g, path, KEY, _hook=hook)
    (path.parent / left["name"]).write_bytes(left["data"])
    return left["name"], left["data"]


def test_save_deletes_the_temp_file_a_killed_save_left(saved):
    g = G.load(saved, KEY)
    name, data = killed_save_leftover(saved, g)  # still holds bob, whom the next save removes
    assert G.from_bytes(data, KEY).names == ["alice", "bob"]
    others = [".other.fgg.abc123.tmp", "gallery.fgg.tmp", ".gallery.fgg.abc123.tmp.bak"]
    for other in others:
        (saved.parent / other).write_bytes(b"not the gallery's")
    (saved.parent / ".gallery.fgg.folder1.tmp").mkdir()
    g.remove("bob")
    G.save(g, saved, KEY)
    assert not (saved.parent / name).exists()
    assert sorted(p.name for p in saved.parent.iterdir()) == sorted(others + [".gallery.fgg.folder1.tmp", "gallery.fgg"])
    assert G.load(saved, KEY).names == ["alice"]


def test_load_deletes_leftover_temp_files_unless_a_writer_holds_the_lock(saved):
    """The gate's start loads the gallery: leftovers go then, unless a writer (holding the writers'
    lock) may be saving right now, whose temp file is not a leftover."""
    from edge.bundle import gallery_lock

    name, _ = killed_save_leftover(saved, G.load(saved, KEY))
    with gallery_lock(saved):  # creates the lock file, as every writer on a gate has
        G.load(saved, KEY)
        assert (saved.parent / name).exists()
    assert G.load(saved, KEY).names == ["alice", "bob"]
    assert not (saved.parent / name).exists()
