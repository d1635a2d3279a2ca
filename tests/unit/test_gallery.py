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


def base64_f32(values) -> str:
    import base64

    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()


def encrypted_payload(payload: dict) -> bytes:
    """A gallery file holding `payload` as written by a save, whatever keys it has."""
    import json
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return G.MAGIC + nonce + AESGCM(KEY).encrypt(nonce, json.dumps(payload).encode(), G.MAGIC)


def test_card_is_kept_with_the_person_and_unreadable_at_rest(tmp_path):
    g = small_gallery()
    g.add(G.Person("carol", np.array([0, 1, 0, 0], np.float32), "E3", 100.0, None, card="0004211337"))
    G.save(g, tmp_path / "g.fgg", KEY)
    back = G.load(tmp_path / "g.fgg", KEY)
    assert [p.card for p in back.people] == ["", "", "0004211337"]
    assert back.card_holder("0004211337").name == "carol" and back.card_holder("") is None
    assert b"0004211337" not in (tmp_path / "g.fgg").read_bytes()


def test_gallery_saved_before_cards_reads_as_people_without_one(tmp_path):
    payload = {"format": G.FORMAT, "version": G.VERSION, "encoder_sha256": "ab" * 32, "dim": 4, "revision": 3,
               "people": [{"name": "alice", "id": "E1", "embedding": base64_f32([1, 0, 0, 0])}]}
    (tmp_path / "old.fgg").write_bytes(encrypted_payload(payload))
    g = G.load(tmp_path / "old.fgg", KEY)
    assert g.names == ["alice"] and g.people[0].card == "" and g.card_holder("1") is None


def test_one_card_is_one_persons_and_the_refusal_names_people_not_the_card(tmp_path):
    g = small_gallery()
    g.add(G.Person("carol", np.array([0, 1, 0, 0], np.float32), "E3", card="77001234"))
    with pytest.raises(GalleryError, match="'dave' is given the card 'carol' holds") as e:
        g.add(G.Person("dave", np.array([0, 0, 0, 1], np.float32), "E4", card="77001234"))
    assert "77001234" not in str(e.value) and g.names == ["alice", "bob", "carol"]
    g.add(G.Person("carol", np.array([0, 1, 0, 0], np.float32), "E3", card="77001235"))  # her own, reissued
    assert g.card_holder("77001235").name == "carol" and g.card_holder("77001234") is None
    # a file holding two people under one card (written by no facegate) is refused whole
    rec = {"id": "", "embedding": base64_f32([1, 0, 0, 0]), "card": "5"}
    payload = {"format": G.FORMAT, "version": G.VERSION, "encoder_sha256": "ab" * 32, "dim": 4, "revision": 1,
               "people": [{**rec, "name": "x"}, {**rec, "name": "y"}]}
    (tmp_path / "two.fgg").write_bytes(encrypted_payload(payload))
    with pytest.raises(GalleryError, match="one card, one person"):
        G.load(tmp_path / "two.fgg", KEY)


@pytest.mark.parametrize("card", ["12 34", "abc", "1" * 33, "１２"])
def test_a_card_number_out_of_the_readers_alphabet_is_refused(card):
    with pytest.raises(GalleryError, match="digits and capital letters expected"):
        small_gallery().add(G.Person("carol", np.array([0, 1, 0, 0], np.float32), card=card))


def test_card_tag_tells_cards_apart_only_with_the_key():
    tags = {G.card_tag(KEY, f"{n:08d}") for n in range(2000)}
    assert len(tags) == 2000 and all(len(t) == 8 for t in tags)
    assert G.card_tag(KEY, "00012345") == G.card_tag(KEY, "00012345") != G.card_tag(OTHER, "00012345")
    assert "12345" not in G.card_tag(KEY, "00012345")
