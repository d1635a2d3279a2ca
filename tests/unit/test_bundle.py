"""Signed enrollment bundles: signing, every rejection case, and applying one to a real gallery."""
import base64
import hashlib
import json
import os
import shutil
import time

import cv2
import numpy as np
import pytest
import yaml

from edge import bundle as B
from edge import gallery as G
from edge.audit import AuditLog
from edge.errors import BundleError
from edge.modelcard import CalibrationSpec

from _stack import gate_config as stack_gate_config
from _stack import sample

AUDIENCE = "test-gate"


def gate_config(tmp_path):
    """The deploy tests' gate config, answering to the audience the bundles here are made for."""
    cfg = stack_gate_config(tmp_path)
    cfg.enrollment.audience = [AUDIENCE]
    return cfg


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    priv, pub = B.generate_signing_key(d / "signing.key")
    return B.load_private_key(priv), B.load_public_key(pub), d


def write_photos(folder, names):
    folder.mkdir(exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"photo bytes of " + n.encode())


def make_bundle(tmp_path, priv, people=None, removals=(), sequence=5, name="bundle"):
    people = people if people is not None else [
        {"name": "alice", "id": "E1", "photo": "alice.jpg", "valid_from": "2024-01-01", "valid_until": "2099-01-01"},
        {"name": "bob", "id": "E2", "photo": "bob.jpg"}]
    photos = tmp_path / "photos"
    write_photos(photos, [p["photo"] for p in people if (photos / p["photo"]).name == p["photo"]])
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump({"sequence": sequence, "people": people, "removals": list(removals)}))
    out = tmp_path / name
    B.create_bundle(photos, manifest, priv, out, AUDIENCE, now=1.7e9)
    return out


def resign(bundle_dir, priv, manifest: dict | bytes):
    """What a stolen signing key or a buggy tool could produce: any manifest, validly signed."""
    body = manifest if isinstance(manifest, bytes) else B.canonical_json(manifest)
    (bundle_dir / B.MANIFEST).write_bytes(body)
    (bundle_dir / B.SIGNATURE).write_bytes(base64.b64encode(priv.sign(B.signed_message(body))))


def test_create_and_verify_round_trip(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    assert sorted(p.name for p in out.iterdir()) == ["alice.jpg", "bob.jpg", "manifest.json", "manifest.sig"]
    vb = B.verify_bundle(out, pub)
    m = vb.manifest
    assert m.sequence == 5 and m.created == "2023-11-14T22:13:20Z"
    assert (m.version, m.audience, m.not_after) == (2, AUDIENCE, "2023-11-21T22:13:20Z")  # 7 days by default
    assert [(p.name, p.id) for p in m.people] == [("alice", "E1"), ("bob", "E2")]
    alice = m.people[0]
    assert alice.valid_from == "2024-01-01T00:00:00Z" and alice.valid_until == "2099-01-01T00:00:00Z"
    assert alice.sha256 == hashlib.sha256(b"photo bytes of alice.jpg").hexdigest()
    assert vb.photos["bob.jpg"] == b"photo bytes of bob.jpg"
    # the manifest on disk is exactly the canonical form that was signed
    assert (out / B.MANIFEST).read_bytes() == B.canonical_json(json.loads((out / B.MANIFEST).read_bytes()))


def test_signature_covers_domain_and_manifest_digest(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    sig = base64.b64decode((out / B.SIGNATURE).read_bytes())
    body = (out / B.MANIFEST).read_bytes()
    pub.verify(sig, b"facegate-bundle-v1\0" + hashlib.sha256(body).digest())  # raises if not


def test_unsigned_bundle_refused(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    (out / B.SIGNATURE).unlink()
    with pytest.raises(BundleError, match="unsigned"):
        B.verify_bundle(out, pub)


def test_other_key_refused(tmp_path, keys):
    priv, _, _ = keys
    out = make_bundle(tmp_path, priv)
    _, other_pub = B.generate_signing_key(tmp_path / "other.key")
    with pytest.raises(BundleError, match="signature does not verify"):
        B.verify_bundle(out, B.load_public_key(other_pub))


def test_garbage_signature_refused(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    (out / B.SIGNATURE).write_bytes(b"not base64 !!")
    with pytest.raises(BundleError, match="signature does not verify"):
        B.verify_bundle(out, pub)


def test_tampered_manifest_refused(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    body = (out / B.MANIFEST).read_bytes()
    (out / B.MANIFEST).write_bytes(body.replace(b'"bob"', b'"eve"'))
    with pytest.raises(BundleError, match="signature does not verify"):
        B.verify_bundle(out, pub)


def test_tampered_photo_refused(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    data = bytearray((out / "bob.jpg").read_bytes())
    data[3] ^= 1
    (out / "bob.jpg").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its signed sha256"):
        B.verify_bundle(out, pub)


def test_swapped_photos_refused(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    a, b = (out / "alice.jpg").read_bytes(), (out / "bob.jpg").read_bytes()
    (out / "alice.jpg").write_bytes(b)
    (out / "bob.jpg").write_bytes(a)
    with pytest.raises(BundleError, match="tampered"):
        B.verify_bundle(out, pub)


def test_missing_photo_refused(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    (out / "bob.jpg").unlink()
    with pytest.raises(BundleError, match="photo not found"):
        B.verify_bundle(out, pub)


@pytest.mark.parametrize("applied,ok", [(0, True), (4, True), (5, False), (9, False)])
def test_replay_refused_at_or_below_applied_sequence(tmp_path, keys, applied, ok):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv, sequence=5)
    if ok:
        assert B.verify_bundle(out, pub, min_sequence=applied).manifest.sequence == 5
    else:
        with pytest.raises(BundleError, match="replayed or old bundle: sequence 5"):
            B.verify_bundle(out, pub, min_sequence=applied)


@pytest.mark.parametrize("bad", ["../alice.jpg", "/etc/passwd", "sub/alice.jpg", "a\0.jpg", "..", ".hidden.jpg",
                                 "a\\b.jpg", "x..jpg"])
def test_path_traversing_names_refused_even_when_signed(tmp_path, keys, bad):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    m = json.loads((out / B.MANIFEST).read_bytes())
    m["people"][0]["photo"] = bad
    resign(out, priv, m)
    with pytest.raises(BundleError, match="malformed manifest"):
        B.verify_bundle(out, pub)


@pytest.mark.parametrize("bad", ["../alice.jpg", "/etc/passwd", "sub/alice.jpg"])
def test_create_refuses_path_names(tmp_path, keys, bad):
    priv, _, _ = keys
    with pytest.raises(BundleError, match="people\\[0\\]"):
        make_bundle(tmp_path, priv, people=[{"name": "alice", "photo": bad}])


def test_symlinked_photo_refused(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((out / "bob.jpg").read_bytes())  # same bytes: only the link is wrong
    (out / "bob.jpg").unlink()
    (out / "bob.jpg").symlink_to(outside)
    with pytest.raises(BundleError, match="symlinks are refused"):
        B.verify_bundle(out, pub)


def test_symlinked_manifest_and_bundle_folder_refused(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(BundleError, match="not a folder"):
        B.verify_bundle(link, pub)
    shutil.move(out / B.MANIFEST, tmp_path / "m.json")
    (out / B.MANIFEST).symlink_to(tmp_path / "m.json")
    with pytest.raises(BundleError, match="symlinks are refused"):
        B.verify_bundle(out, pub)


def test_oversized_photo_refused(tmp_path, keys, monkeypatch):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    monkeypatch.setattr(B, "MAX_PHOTO_BYTES", 10)
    with pytest.raises(BundleError, match="photo is larger than 10 bytes"):
        B.verify_bundle(out, pub)


def test_oversized_bundle_refused(tmp_path, keys, monkeypatch):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    monkeypatch.setattr(B, "MAX_BUNDLE_BYTES", 30)
    with pytest.raises(BundleError, match="photos total 46 bytes"):
        B.verify_bundle(out, pub)


def test_oversized_manifest_refused_before_parsing(tmp_path, keys, monkeypatch):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    monkeypatch.setattr(B, "MAX_MANIFEST_BYTES", 64)
    with pytest.raises(BundleError, match="manifest is larger than 64 bytes"):
        B.verify_bundle(out, pub)


def test_signed_manifest_with_duplicate_or_unknown_keys_refused(tmp_path, keys):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    body = (out / B.MANIFEST).read_bytes()
    resign(out, priv, body[:-1] + b',"sequence":99}')
    with pytest.raises(BundleError, match="duplicate key 'sequence'"):
        B.verify_bundle(out, pub)
    m = json.loads(body)
    m["command"] = "rm -rf /"
    resign(out, priv, m)
    with pytest.raises(BundleError, match="command"):
        B.verify_bundle(out, pub)


def test_admin_manifest_rules(tmp_path, keys):
    priv, _, _ = keys
    with pytest.raises(BundleError, match="duplicate name"):
        make_bundle(tmp_path, priv, people=[{"name": "a", "photo": "a.jpg"}, {"name": "a", "photo": "b.jpg"}], name="b1")
    with pytest.raises(BundleError, match="both enrolled and removed: a"):
        make_bundle(tmp_path, priv, people=[{"name": "a", "photo": "a.jpg"}], removals=["a"], name="b2")
    with pytest.raises(BundleError, match="valid_until is not after valid_from"):
        make_bundle(tmp_path, priv, people=[{"name": "a", "photo": "a.jpg", "valid_from": "2025-01-02",
                                             "valid_until": "2025-01-01"}], name="b3")
    with pytest.raises(BundleError, match="sequence"):
        make_bundle(tmp_path, priv, sequence=0, name="b4")


def test_create_refuses_more_people_than_a_bundle_holds_before_reading_a_photo(tmp_path, keys, monkeypatch):
    priv, _, _ = keys
    people = [{"name": f"p{i}", "photo": f"p{i}.jpg"} for i in range(4)]
    write_photos(tmp_path / "photos", [p["photo"] for p in people])
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"sequence": 1, "people": people}))
    read = B._read_small

    def no_photos(path, limit, what):
        assert what != "photo", f"{path} read before the people count was checked"
        return read(path, limit, what)

    monkeypatch.setattr(B, "_read_small", no_photos)
    monkeypatch.setattr(B, "MAX_PEOPLE", 3)
    with pytest.raises(BundleError, match="people: 4 listed, at most 3 in one bundle") as e:
        B.create_bundle(tmp_path / "photos", tmp_path / "m.yaml", priv, tmp_path / "out", AUDIENCE)
    assert str(tmp_path / "m.yaml") in str(e.value) and not (tmp_path / "out").exists()


def test_admin_manifest_yaml_tags_refused(tmp_path, keys):
    priv, _, _ = keys
    m = tmp_path / "evil.yaml"
    m.write_text("sequence: 1\npeople: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(BundleError, match="not valid YAML"):
        B.create_bundle(tmp_path, m, priv, tmp_path / "out", AUDIENCE)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_keygen_refuses_to_overwrite(tmp_path):
    B.generate_signing_key(tmp_path / "k.key")
    assert oct((tmp_path / "k.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(BundleError, match="refusing to overwrite"):
        B.generate_signing_key(tmp_path / "k.key")


# ------------------------------------------------------------------ applying to a real gallery
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from edge.pipeline import Stack

    return Stack.from_config(gate_config(tmp_path_factory.mktemp("cfg")))


def photo_bundle(tmp_path, priv, people, removals=(), sequence=1, name="bundle", extra=None, audience=AUDIENCE,
                 valid_days=B.DEFAULT_VALID_DAYS, now=None, cards=None):
    """A bundle of real photos: people = [(name, id, sample file)]; extra = {file: image array};
    cards = {name: card number}."""
    photos = tmp_path / f"{name}-photos"
    photos.mkdir()
    for _, _, f in people:
        if not (extra and f in extra):
            shutil.copy(sample(f), photos / f)
    for f, img in (extra or {}).items():
        cv2.imwrite(str(photos / f), img)
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump({"sequence": sequence, "removals": list(removals),
                                        "people": [{"name": n, "id": i, "photo": f,
                                                    **({"card": cards[n]} if n in (cards or {}) else {})}
                                                   for n, i, f in people]}))
    B.create_bundle(photos, manifest, priv, tmp_path / name, audience, valid_days, now=now)
    return tmp_path / name


def apply(bundle_dir, pub, gallery, stack, cfg, audit=None, now=None):
    """Admit, then apply, as `bundle apply` does; `now` (default: the wall clock) the gate's trusted time."""
    admitted = B.admit_bundle(bundle_dir, pub, cfg.enrollment, lambda: time.time() if now is None else now)
    return B.apply_bundle(admitted, gallery, stack, cfg, audit=audit)


def test_apply_enrolls_refuses_removes_and_audits(tmp_path, keys, stack):
    priv, pub, _ = keys
    cfg = gate_config(tmp_path)
    G.new_key_file(cfg.storage.key_file)
    key = G.load_key(cfg.storage.key_file)
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    suit = cv2.imread(str(sample("astronaut.png")))[300:512, 0:180]  # the astronaut's suit: no face
    b1 = photo_bundle(tmp_path, priv, [("obama", "E1", "obama.jpg"), ("astronaut", "E2", "astronaut.png"),
                                       ("nobody", "E3", "suit.png")], sequence=3, name="b1", extra={"suit.png": suit})
    with AuditLog(cfg.storage.audit) as audit:
        r = apply(b1, pub, g, stack, cfg, audit=audit)
        assert r.enrolled == ["obama", "astronaut"] and list(r.refused) == ["nobody"]
        assert r.refused["nobody"] == "no face found"
        on_disk = G.load(cfg.storage.gallery, key, stack.encoder.sha256)
        assert on_disk.names == ["obama", "astronaut"] and on_disk.bundle_sequence == 3
        assert [p.person_id for p in on_disk.people] == ["E1", "E2"]
        assert all(p.expires_at > p.enrolled_at + 1094 * 86400 for p in on_disk.people)

        # replaying the same bundle changes nothing and is audited
        before = (tmp_path / "gallery.fgg").read_bytes()
        with pytest.raises(BundleError, match="replayed"):
            apply(b1, pub, on_disk, stack, cfg, audit=audit)
        assert (tmp_path / "gallery.fgg").read_bytes() == before

        b2 = photo_bundle(tmp_path, priv, [], removals=["E2"], sequence=4, name="b2")
        r2 = apply(b2, pub, on_disk, stack, cfg, audit=audit)
        assert r2.removed == ["astronaut"]
        after = G.load(cfg.storage.gallery, key, stack.encoder.sha256)
        assert after.names == ["obama"] and after.bundle_sequence == 4
        rows = [(r["kind"], r["reason"], r["identity"]) for r in audit.tail(20)]
    assert rows == [("enroll", "enrolled", "obama"), ("enroll", "enrolled", "astronaut"),
                    ("enroll", "refused", "nobody"), ("enroll", "bundle_applied", None),
                    ("enroll", "bundle_refused", None),
                    ("enroll", "revoked", "astronaut"), ("enroll", "bundle_applied", None)]
    # photos are not kept anywhere next to the gallery
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".jpg", ".png")) == []
    # the same id under a new name replaces the old entry
    b3 = photo_bundle(tmp_path, priv, [("Barack Obama", "E1", "obama2.jpg")], sequence=5, name="b3")
    apply(b3, pub, after, stack, cfg)
    assert G.load(cfg.storage.gallery, key).names == ["Barack Obama"]


def test_apply_validity_window(tmp_path, keys, stack):
    priv, pub, _ = keys
    cfg = gate_config(tmp_path)
    G.new_key_file(cfg.storage.key_file)
    photos = tmp_path / "p"
    photos.mkdir()
    for f in ("obama.jpg", "astronaut.png", "biden.jpg"):
        shutil.copy(sample(f), photos / f)
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"sequence": 1, "people": [
        {"name": "early", "photo": "obama.jpg", "valid_from": "2030-01-01"},
        {"name": "late", "photo": "astronaut.png", "valid_until": "2020-01-01"},
        {"name": "short", "photo": "biden.jpg", "valid_until": "2026-01-01"}]}))
    B.create_bundle(photos, m, priv, tmp_path / "b", AUDIENCE)
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    now = B.to_epoch("2025-06-01", "")
    r = apply(tmp_path / "b", pub, g, stack, cfg, now=now)
    assert r.enrolled == ["short"]
    assert r.refused["early"].startswith("not valid before 2030-01-01")
    assert r.refused["late"].startswith("validity ended 2020-01-01")
    assert g.people[0].expires_at == B.to_epoch("2026-01-01", "")  # the earlier of valid_until and retention


def test_cli_keygen_create_verify_apply(tmp_path, stack, capsys):
    from edge.__main__ import main

    cfg = gate_config(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    assert main(["keygen", "--signing", str(tmp_path / "admin.key"), "--gallery", str(tmp_path / "gallery.key")]) == 0
    assert oct((tmp_path / "gallery.key").stat().st_mode & 0o777) == "0o600"
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sample("obama.jpg"), photos / "obama.jpg")
    (tmp_path / "m.yaml").write_text("sequence: 1\ncreated: 2025-01-01\npeople:\n  - {name: obama, id: E1, photo: obama.jpg}\n")
    assert main(["bundle", "create", "--photos", str(photos), "--manifest", str(tmp_path / "m.yaml"),
                 "--key", str(tmp_path / "admin.key"), "--out", str(tmp_path / "b"), "--audience", AUDIENCE]) == 0
    pub = str(tmp_path / "admin.pub")
    assert main(["bundle", "verify", str(tmp_path / "b"), "--public-key", pub]) == 0
    assert main(["bundle", "apply", str(tmp_path / "b"), "--public-key", pub, "--config", str(tmp_path / "config.yaml")]) == 0
    assert main(["bundle", "apply", str(tmp_path / "b"), "--public-key", pub, "--config", str(tmp_path / "config.yaml")]) == 2
    out = capsys.readouterr()
    assert "bundle 1 applied: 1 enrolled" in out.out and "replayed" in out.err
    g = G.load(tmp_path / "gallery.fgg", G.load_key(tmp_path / "gallery.key"))
    assert g.names == ["obama"] and g.bundle_sequence == 1


def test_cli_rekey(tmp_path, capsys):
    from edge.__main__ import main

    G.new_key_file(tmp_path / "k1")
    G.new_key_file(tmp_path / "k2")
    g = G.Gallery("e" * 64, 4)
    g.add(G.Person("a", np.ones(4, np.float32)))
    G.save(g, tmp_path / "g.fgg", G.load_key(tmp_path / "k1"))
    (tmp_path / "c.yaml").write_text(f"storage: {{gallery: g.fgg, audit: a.sqlite3, key_file: k1}}\n")
    assert main(["rekey", "--config", str(tmp_path / "c.yaml"), "--old", str(tmp_path / "k1"), "--new", str(tmp_path / "k2")]) == 0
    assert G.load(tmp_path / "g.fgg", G.load_key(tmp_path / "k2")).names == ["a"]
    with pytest.raises(Exception, match="failed authentication"):
        G.load(tmp_path / "g.fgg", G.load_key(tmp_path / "k1"))
    # a wrong old key changes nothing
    before = (tmp_path / "g.fgg").read_bytes()
    assert main(["rekey", "--config", str(tmp_path / "c.yaml"), "--old", str(tmp_path / "k1"), "--new", str(tmp_path / "k2")]) == 2
    assert (tmp_path / "g.fgg").read_bytes() == before
    assert os.stat(tmp_path / "g.fgg").st_mode & 0o777 == 0o600


def test_cli_forget_removes_and_audits(tmp_path, capsys):
    from edge.__main__ import main

    G.new_key_file(tmp_path / "k")
    g = G.Gallery("e" * 64, 4)
    g.add(G.Person("a", np.ones(4, np.float32)))
    g.add(G.Person("b", np.ones(4, np.float32)))
    G.save(g, tmp_path / "g.fgg", G.load_key(tmp_path / "k"))
    (tmp_path / "c.yaml").write_text("storage: {gallery: g.fgg, audit: a.sqlite3, key_file: k}\n")
    assert main(["forget", "a", "--config", str(tmp_path / "c.yaml")]) == 0
    assert main(["forget", "a", "--config", str(tmp_path / "c.yaml")]) == 1
    assert G.load(tmp_path / "g.fgg", G.load_key(tmp_path / "k")).names == ["b"]
    with AuditLog(tmp_path / "a.sqlite3", readonly=True) as a:
        assert [(r["kind"], r["reason"], r["identity"]) for r in a.tail(5)] == [("forget", "removed", "a")]


# ------------------------------------------------------------------ ids are the stable key
def test_two_people_under_one_id_are_refused_when_made_and_when_applied(tmp_path, keys):
    priv, pub, _ = keys
    people = [{"name": "alice", "id": "E1", "photo": "alice.jpg"}, {"name": "bob", "id": "E1", "photo": "bob.jpg"}]
    with pytest.raises(BundleError, match="duplicate id"):
        make_bundle(tmp_path, priv, people=people)
    out = make_bundle(tmp_path, priv, people=[people[0], {**people[1], "id": "E2"}], name="ok")
    m = json.loads((out / B.MANIFEST).read_bytes())
    m["people"][1]["id"] = "E1"  # signed by a tool without the check
    resign(out, priv, m)
    with pytest.raises(BundleError, match="duplicate id"):
        B.verify_bundle(out, pub)


def enrolled_gallery(stack, cfg, people):
    """A saved gallery of (name, id) entries with arbitrary embeddings."""
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    rng = np.random.default_rng(0)
    for name, pid in people:
        g.add(G.Person(name, rng.standard_normal(g.dim).astype(np.float32), pid, 1.7e9, None))
    G.new_key_file(cfg.storage.key_file)
    G.save(g, cfg.storage.gallery, G.load_key(cfg.storage.key_file))
    return g


def test_a_name_enrolled_under_another_id_is_not_replaced(tmp_path, keys, stack):
    priv, pub, _ = keys
    cfg = gate_config(tmp_path)
    g = enrolled_gallery(stack, cfg, [("obama", "E1"), ("biden", "")])
    before = {p.name: p.embedding.copy() for p in g.people}
    b = photo_bundle(tmp_path, priv, [("obama", "E9", "obama2.jpg"), ("biden", "E7", "biden.jpg")], sequence=2)
    with AuditLog(cfg.storage.audit) as audit:
        r = apply(b, pub, g, stack, cfg, audit=audit)
        rows = [(x["reason"], x["identity"]) for x in audit.tail(5)]
    assert r.enrolled == [] and sorted(r.refused) == ["biden", "obama"]
    assert "enrolled under id E1" in r.refused["obama"] and "id (none)" in r.refused["biden"]
    on_disk = G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file))
    assert [(p.name, p.person_id) for p in on_disk.people] == [("obama", "E1"), ("biden", "")]
    assert all(np.array_equal(p.embedding, before[p.name]) for p in on_disk.people)
    assert ("refused", "obama") in rows and ("refused", "biden") in rows
    # removing the old id in the same bundle is how a name moves to a new id
    b2 = photo_bundle(tmp_path, priv, [("obama", "E9", "obama2.jpg")], removals=["E1"], sequence=3, name="b2")
    r2 = apply(b2, pub, on_disk, stack, cfg)
    assert r2.removed == ["obama"] and r2.enrolled == ["obama"]
    assert [(p.name, p.person_id) for p in G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file)).people] == \
        [("biden", ""), ("obama", "E9")]


def test_a_removal_matching_two_people_refuses_the_bundle(tmp_path, keys, stack):
    priv, pub, _ = keys
    cfg = gate_config(tmp_path)
    g = enrolled_gallery(stack, cfg, [("alice", "E1"), ("E1x", "E2"), ("carol", "alice")])
    before = (tmp_path / "gallery.fgg").read_bytes()
    b = photo_bundle(tmp_path, priv, [], removals=["alice"], sequence=2)
    with AuditLog(cfg.storage.audit) as audit:
        with pytest.raises(BundleError, match="removal 'alice' is ambiguous: it matches alice .id E1., carol .id alice."):
            apply(b, pub, g, stack, cfg, audit=audit)
        assert [(x["reason"], x["identity"]) for x in audit.tail(5)] == [("bundle_refused", None)]
    assert (tmp_path / "gallery.fgg").read_bytes() == before
    b2 = photo_bundle(tmp_path, priv, [], removals=["E1"], sequence=3, name="b2")
    assert apply(b2, pub, g, stack, cfg).removed == ["alice"]


def test_a_signed_face_the_gate_would_take_for_another_person_is_refused_and_the_rest_applied(
        tmp_path, keys, stack, monkeypatch, capsys):
    """A bundle is screened as `edge enroll` is: a face already enrolled under another name, or
    two people of one bundle with one face, refused naming whom it duplicates, audited, exit 4;
    the others enrolled. Not duplicates: the same id renamed, or the old entry removed in the
    same bundle."""
    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    b1 = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")], sequence=1, name="b1")
    assert main(["bundle", "apply", str(b1), *opts]) == 0
    astronaut = cv2.imread(str(sample("astronaut.png")))
    b2 = photo_bundle(tmp_path, keys[0], [("barack", "E5", "obama2.jpg"), ("joe", "E2", "biden.jpg"),
                                          ("eileen", "E3", "astronaut.png"), ("collins", "E4", "astro2.png")],
                      sequence=2, name="b2", extra={"astro2.png": astronaut})
    capsys.readouterr()
    assert main(["bundle", "apply", str(b2), *opts]) == 4
    out = capsys.readouterr().out
    refused = {line.split(":")[0][len("REFUSED "):]: line for line in out.splitlines() if line.startswith("REFUSED")}
    assert sorted(refused) == ["barack", "collins", "eileen"] and "OK      joe" in out, out
    assert "the same face as 'obama' (score " in refused["barack"] and "under removals" in refused["barack"]
    assert "the same face as 'collins'" in refused["eileen"] and "the same face as 'eileen'" in refused["collins"]
    key = G.load_key(cfg.storage.key_file)
    assert G.load(cfg.storage.gallery, key).names == ["obama", "joe"]
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        rows = {r["identity"]: r for r in a.tail(10) if r["reason"] == "refused"}
    assert sorted(rows) == ["barack", "collins", "eileen"] and "'obama'" in rows["barack"]["details"]["why"]

    # obama's id under a new name, and a new id for his face with the old one removed: one person each time
    b3 = photo_bundle(tmp_path, keys[0], [("Barack Obama", "E1", "obama2.jpg")], sequence=3, name="b3")
    assert main(["bundle", "apply", str(b3), *opts]) == 0
    b4 = photo_bundle(tmp_path, keys[0], [("barack", "E9", "obama3.jpg")], removals=["E1"], sequence=4, name="b4")
    assert main(["bundle", "apply", str(b4), *opts]) == 0
    assert [(p.name, p.person_id) for p in G.load(cfg.storage.gallery, key).people] == [("joe", "E2"), ("barack", "E9")]


# ------------------------------------------------------------------ a stick or a gate that cannot be read or written
def cli_gate(tmp_path, keys, stack, monkeypatch):
    """A gate config file, its gallery key, and the module's models standing in for a fresh load."""
    from edge.pipeline import Stack

    cfg = gate_config(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    G.new_key_file(cfg.storage.key_file)
    monkeypatch.setattr(Stack, "from_config", classmethod(lambda cls, c: stack))
    return cfg, ["--public-key", str(keys[2] / "signing.pub"), "--config", str(tmp_path / "config.yaml")]


@pytest.mark.parametrize("what", [B.MANIFEST, B.SIGNATURE, "obama.jpg"])
def test_a_stick_whose_manifest_signature_or_photo_is_a_folder_is_refused_audited(tmp_path, keys, stack, monkeypatch,
                                                                                   capsys, what):
    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    b = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")])
    (b / what).unlink()
    (b / what).mkdir()
    assert main(["bundle", "apply", str(b), *opts]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {b / what}: ") and " is a folder" in err and "Traceback" not in err
    assert not (tmp_path / "gallery.fgg").exists()
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        (row,) = a.tail(5)
    assert (row["reason"], row["details"]["bundle"]) == ("bundle_refused", str(b)) and "is a folder" in row["details"]["error"]


@pytest.mark.parametrize("what", [B.MANIFEST, B.SIGNATURE, "obama.jpg"])
def test_a_fifo_on_the_stick_is_refused_without_waiting_for_a_writer(tmp_path, keys, stack, monkeypatch, capsys, what):
    """A FIFO opened for reading waits for a writer: `bundle apply` would hang holding the gallery
    lock. SIGALRM ends the test instead of hanging it."""
    import signal

    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    b = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")])
    (b / what).unlink()
    os.mkfifo(b / what)

    def hung(signum, frame):
        raise TimeoutError(f"bundle apply waited on the FIFO {what}")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        status = main(["bundle", "apply", str(b), *opts])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    assert status == 2 and f"{b / what}: " in err and "is not a regular file (a device, FIFO or socket)" in err, err
    assert not (tmp_path / "gallery.fgg").exists()
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        assert [r["reason"] for r in a.tail(5)] == ["bundle_refused"]


def read_only_folder(folder, monkeypatch):
    """Every open for writing in `folder` fails as on a read-only filesystem (root ignores modes)."""
    import errno

    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if os.path.dirname(os.path.abspath(path)) == str(folder) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def full_disk(monkeypatch):
    """The gallery's temp file cannot be created: the disk is full."""
    import errno
    import tempfile

    def mkstemp(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("fault", ["read-only folder", "full disk"])
def test_a_gallery_that_cannot_be_written_refuses_the_bundle_with_its_own_status_audited(tmp_path, keys, stack,
                                                                                         monkeypatch, capsys, fault):
    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    gallery_dir = tmp_path / "gallery"
    gallery_dir.mkdir()
    cfg.storage.gallery = str(gallery_dir / "gallery.fgg")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    enrolled_gallery(stack, cfg, [("biden", "E2")])
    before = (gallery_dir / "gallery.fgg").read_bytes()
    b = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")], sequence=2)
    with monkeypatch.context() as m:
        read_only_folder(gallery_dir, m) if fault == "read-only folder" else full_disk(m)
        status = main(["bundle", "apply", str(b), *opts])
    err = capsys.readouterr().err
    assert status == 5, err
    assert str(gallery_dir) in err and ("Read-only file system" in err if fault == "read-only folder" else
                                        "No space left on device" in err) and "Traceback" not in err
    assert (gallery_dir / "gallery.fgg").read_bytes() == before
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        rows = a.tail(5)
    assert rows[-1]["reason"] == "bundle_refused" and str(gallery_dir) in rows[-1]["details"]["error"]
    if fault == "full disk":  # what was about to change is on record, and that it did not take effect
        assert [(r["reason"], r["identity"]) for r in rows[:-1]] == [("enrolled", "obama"), ("bundle_applied", None)]
        assert "did not take effect" in rows[-1]["details"]["error"]
    # the sequence was not used up: with the fault gone the same stick applies
    assert main(["bundle", "apply", str(b), *opts]) == 0
    assert G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file)).names == ["biden", "obama"]


def test_a_bundle_applied_in_part_has_a_status_of_its_own(tmp_path, keys, stack, monkeypatch, capsys):
    from edge.__main__ import main

    _, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    suit = cv2.imread(str(sample("astronaut.png")))[300:512, 0:180]
    b = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg"), ("nobody", "E3", "suit.png")],
                     extra={"suit.png": suit})
    assert main(["bundle", "apply", str(b), *opts]) == 4  # not 1, Python's status for a crash
    assert "REFUSED nobody: no face found" in capsys.readouterr().out


def fake_enroll_stack(monkeypatch, results):
    """Enrollment without models: the folder's photos come out as `results`."""
    from types import SimpleNamespace

    import edge.enroll
    from edge.pipeline import Stack

    # enroll screens for duplicate faces at the gate's threshold: this table puts it near 1, so only
    # (near) identical fake embeddings are one face
    calibration = CalibrationSpec(dataset="hand-made", impostor_pairs=1, fmr=[1e-2, 1e-12], threshold=[0.9999, 1.0])
    encoder = SimpleNamespace(sha256="e" * 64, card=SimpleNamespace(embedding=SimpleNamespace(dim=4), calibration=calibration))
    monkeypatch.setattr(Stack, "from_config", classmethod(lambda cls, c: Stack(None, encoder)))
    monkeypatch.setattr(edge.enroll, "enroll_folder", lambda stack, cfg, folder: results)


def read_only_audit(monkeypatch):
    """The audit database opens but takes no row, as a read-only file does."""
    import sqlite3

    real = AuditLog._open

    def open_(self):
        real(self).close()
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)

    monkeypatch.setattr(AuditLog, "_open", open_)


def test_enrolling_more_people_than_an_audit_list_holds_audits_each_of_them(tmp_path, monkeypatch, capsys):
    from edge.__main__ import main
    from edge.audit import MAX_LIST_ITEMS
    from edge.enroll import EnrollResult

    G.new_key_file(tmp_path / "k")
    (tmp_path / "c.yaml").write_text("storage: {gallery: g.fgg, audit: a.sqlite3, key_file: k}\n")
    rng = np.random.default_rng(1)
    people = [f"p{i:03d}" for i in range(MAX_LIST_ITEMS + 6)]
    fake_enroll_stack(monkeypatch, [EnrollResult(n, f"{n}.jpg", True, "enrolled", rng.standard_normal(4)) for n in people])
    assert main(["enroll", str(tmp_path), "--config", str(tmp_path / "c.yaml")]) == 0
    assert G.load(tmp_path / "g.fgg", G.load_key(tmp_path / "k")).names == people
    with AuditLog(tmp_path / "a.sqlite3", readonly=True) as a:
        assert [(r["kind"], r["reason"], r["identity"]) for r in a.tail(200)] == [("enroll", "enrolled", n) for n in people]


def test_enroll_and_forget_with_an_audit_log_that_takes_no_rows_change_nothing(tmp_path, monkeypatch, capsys):
    from edge.__main__ import main
    from edge.enroll import EnrollResult

    G.new_key_file(tmp_path / "k")
    g = G.Gallery("e" * 64, 4)
    g.add(G.Person("a", np.ones(4, np.float32)))
    G.save(g, tmp_path / "g.fgg", G.load_key(tmp_path / "k"))
    before = (tmp_path / "g.fgg").read_bytes()
    (tmp_path / "c.yaml").write_text("storage: {gallery: g.fgg, audit: a.sqlite3, key_file: k}\n")
    fake_enroll_stack(monkeypatch, [EnrollResult("b", "b.jpg", True, "enrolled", np.array([1, -1, 1, -1], np.float32))])
    read_only_audit(monkeypatch)
    assert main(["forget", "a", "--config", str(tmp_path / "c.yaml")]) == 5
    assert main(["enroll", str(tmp_path), "--config", str(tmp_path / "c.yaml")]) == 5
    err = capsys.readouterr().err
    assert err.count(f"error: {tmp_path / 'a.sqlite3'}: cannot write the audit log: attempt to write a readonly database") == 2
    assert (tmp_path / "g.fgg").read_bytes() == before


HIDDEN_LABELS = {"bidi override": "alice\u202egpj.exe", "zero-width space": "ali\u200bce",
                 "line separator": "alice\u2028bob", "newline": "alice\nbob", "zero-width joiner": "al\u200dice"}


@pytest.mark.parametrize("field", ["name", "id"])
@pytest.mark.parametrize("label", list(HIDDEN_LABELS.values()), ids=list(HIDDEN_LABELS))
def test_names_and_ids_with_invisible_or_control_characters_are_refused_when_made_and_when_applied(tmp_path, keys, field, label):
    priv, pub, _ = keys
    person = {"name": "alice", "id": "E1", "photo": "alice.jpg", field: label}
    (tmp_path / "made").mkdir()
    with pytest.raises(BundleError, match=f"people.0.{field}: .*U\\+"):
        make_bundle(tmp_path / "made", priv, people=[person])
    out = make_bundle(tmp_path, priv)
    m = json.loads((out / B.MANIFEST).read_bytes())
    m["people"][0][field] = label
    resign(out, priv, m)
    with pytest.raises(BundleError, match="malformed manifest"):
        B.verify_bundle(out, pub)


def test_a_removal_with_a_control_character_is_refused(tmp_path, keys):
    priv, _, _ = keys
    with pytest.raises(BundleError, match="removal.*U\\+2028"):
        make_bundle(tmp_path, priv, removals=["E1\u2028"])


def test_enrolling_a_photo_whose_name_hides_characters_is_refused(tmp_path):
    from edge.enroll import enroll_folder

    folder = tmp_path / "people"
    folder.mkdir()
    (folder / "ali\u200bce.jpg").write_bytes(b"not read")
    (folder / "bob\u202e.jpg").write_bytes(b"not read")
    results = enroll_folder(None, None, folder)
    assert [r.ok for r in results] == [False, False]
    assert all("U+" in r.reason and "file name" in r.reason for r in results)


def test_a_signing_key_named_like_its_public_key_is_refused(tmp_path):
    with pytest.raises(BundleError, match="must not end in .pub") as e:
        B.generate_signing_key(tmp_path / "site.pub")
    assert str(tmp_path / "site.pub") in str(e.value)
    assert not (tmp_path / "site.pub").exists()


# ------------------------------------------------------------------ the sequence store beside the gallery key
def test_a_lost_or_copied_back_gallery_does_not_let_an_old_bundle_apply_again(tmp_path, keys, stack, monkeypatch,
                                                                              capsys):
    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    b1 = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")], sequence=1, name="b1")
    b2 = photo_bundle(tmp_path, keys[0], [], removals=["E1"], sequence=2, name="b2")
    gallery, store = tmp_path / "gallery.fgg", tmp_path / "bundle.seq"  # the store defaults to beside the key
    assert main(["bundle", "apply", str(b1), *opts]) == 0
    backup = gallery.read_bytes()
    assert main(["bundle", "apply", str(b2), *opts]) == 0
    assert store.read_text() == "2\n" and oct(store.stat().st_mode & 0o777) == "0o644"
    gallery.write_bytes(backup)  # an old backup copied back: the removal's stick must not apply twice...
    assert main(["bundle", "apply", str(b2), *opts]) == 2
    gallery.unlink()  # ...and with the gallery lost, neither may the first stick
    assert main(["bundle", "apply", str(b1), *opts]) == 2
    err = capsys.readouterr().err
    assert err.count("replayed or old bundle") == 2 and "this gate has applied 2" in err
    assert not gallery.exists()
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        assert [r["reason"] for r in a.tail(2)] == ["bundle_refused", "bundle_refused"]


def test_a_store_the_gate_user_cannot_write_is_advanced_by_root_afterwards(tmp_path, keys, stack, monkeypatch, capsys):
    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg.storage.sequence_file = str(etc / "bundle.seq")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    b1 = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")], sequence=3, name="b1")
    with monkeypatch.context() as m:  # apply runs as the gate user: root's folder is not writable
        read_only_folder(etc, m)
        assert main(["bundle", "apply", str(b1), *opts]) == 0
    assert not (etc / "bundle.seq").exists()
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        row = a.tail(1)[0]
    assert row["reason"] == "sequence_not_saved" and row["details"]["file"] == str(etc / "bundle.seq")
    # root (deploy/enroll-usb) then records the sequence the saved gallery has applied
    assert main(["bundle", "advance-sequence", "--config", str(tmp_path / "config.yaml")]) == 0
    assert (etc / "bundle.seq").read_text() == "3\n"
    (tmp_path / "gallery.fgg").unlink()
    assert main(["bundle", "apply", str(b1), *opts]) == 2
    # a gallery below the store never lowers it
    enrolled_gallery(stack, cfg, [("biden", "E2")])  # bundle_sequence 0
    assert main(["bundle", "advance-sequence", "--config", str(tmp_path / "config.yaml")]) == 0
    assert (etc / "bundle.seq").read_text() == "3\n" and "bundle sequence 3 -> 3" in capsys.readouterr().out


def test_a_store_that_holds_no_sequence_refuses_every_bundle(tmp_path, keys, stack, monkeypatch, capsys):
    from edge.__main__ import main

    _, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    (tmp_path / "bundle.seq").write_text("garbage\n")
    b = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")], sequence=9)
    assert main(["bundle", "apply", str(b), *opts]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "bundle.seq") in err and "does not hold a bundle sequence number" in err
    assert not (tmp_path / "gallery.fgg").exists()


# ------------------------------------------------------------------ audience, expiry and version
DAY = 86400.0


def as_version_1(bundle_dir, priv):
    """The bundle as `bundle create` wrote it before version 2: no audience, no expiry, validly signed."""
    m = json.loads((bundle_dir / B.MANIFEST).read_bytes())
    del m["audience"], m["not_after"]
    resign(bundle_dir, priv, {**m, "version": 1})
    return bundle_dir


def refused_bundle(tmp_path, keys, fault):
    """A bundle the gate must refuse for `fault`, and the words its refusal must carry."""
    priv, _, _ = keys
    people = [("obama", "E1", "obama.jpg")]
    if fault == "signature":
        b = photo_bundle(tmp_path, priv, people)
        (b / B.SIGNATURE).write_bytes(base64.b64encode(b"\0" * 64))
        return b, "signature does not verify"
    if fault == "audience":
        return (photo_bundle(tmp_path, priv, people, audience="other-site"),
                f"bundle is for audience 'other-site'; this gate answers to {AUDIENCE} (enrollment.audience): refused")
    if fault == "expired":
        return photo_bundle(tmp_path, priv, people, now=time.time() - 10 * DAY), "bundle expired at"
    return as_version_1(photo_bundle(tmp_path, priv, people), priv), "version 1 bundle, which names no audience"


@pytest.mark.parametrize("fault", ["signature", "audience", "expired", "version 1"])
def test_a_bundle_is_refused_for_its_signature_audience_expiry_or_version_before_any_model_loads(
        tmp_path, keys, stack, monkeypatch, capsys, fault):
    from edge.__main__ import main
    from edge.pipeline import Stack

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    b, reason = refused_bundle(tmp_path, keys, fault)

    def no_models(cls, c):
        raise AssertionError("models loaded for a bundle the gate refuses without them")

    monkeypatch.setattr(Stack, "from_config", classmethod(no_models))
    assert main(["bundle", "apply", str(b), *opts]) == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err, err
    assert not (tmp_path / "gallery.fgg").exists()
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        (row,) = a.tail(5)
    assert row["reason"] == "bundle_refused" and reason in row["details"]["error"]


def test_a_gate_with_no_audience_refuses_every_version_2_bundle_naming_the_setting(tmp_path, keys, stack, monkeypatch,
                                                                                   capsys):
    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    cfg.enrollment.audience = []
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    b = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")])
    assert main(["bundle", "apply", str(b), *opts]) == 2
    assert "this gate answers to no name (set enrollment.audience)" in capsys.readouterr().err


def test_an_expired_bundle_stays_expired_with_the_clock_set_back(tmp_path, keys, stack, monkeypatch, capsys):
    """Valid from ten days ago for seven: expired. Setting the wall clock back five days, inside its
    validity, does not revive it: the gate judges at its time floor, the newest time it has audited."""
    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    real = time.time()
    b = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")], now=real - 10 * DAY, valid_days=7)
    assert main(["bundle", "apply", str(b), *opts]) == 2  # its refusal is audited at the true time
    true_time = time.time
    monkeypatch.setattr(time, "time", lambda: true_time() - 5 * DAY)  # inside its validity
    assert main(["bundle", "apply", str(b), *opts]) == 2
    err = capsys.readouterr().err
    assert err.count(f"bundle expired at {B.iso(real - 3 * DAY)}") == 2, err
    assert not (tmp_path / "gallery.fgg").exists()
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        assert [r["reason"] for r in a.tail(5)] == ["bundle_refused", "bundle_refused"]


def test_a_version_1_bundle_applies_only_with_the_transition_switch(tmp_path, keys, stack, monkeypatch, capsys):
    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    b = as_version_1(photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")]), keys[0])
    assert main(["bundle", "apply", str(b), *opts]) == 2
    assert "enrollment.accept_v1_bundles: true" in capsys.readouterr().err
    cfg.enrollment.accept_v1_bundles = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    assert main(["bundle", "apply", str(b), *opts]) == 0
    assert G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file)).names == ["obama"]
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        row = a.tail(1)[0]
    assert (row["reason"], row["details"]["version"]) == ("bundle_applied", 1)


def test_a_version_2_bundle_for_this_gate_applies(tmp_path, keys, stack, monkeypatch, capsys):
    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    cfg.enrollment.audience = ["hq-door-3", "hq"]  # the gate's own name and its site's
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    b = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")], audience="hq", valid_days=0.5)
    assert main(["bundle", "apply", str(b), *opts]) == 0
    assert G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file)).names == ["obama"]
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        row = a.tail(1)[0]
    assert (row["reason"], row["details"]["version"]) == ("bundle_applied", 2)


@pytest.mark.parametrize("days", [0, -1, 90.5])
def test_create_refuses_a_validity_outside_its_bounds(tmp_path, keys, days):
    with pytest.raises(BundleError, match=f"validity of {days:g} days: give more than 0 and at most 90"):
        B.create_bundle(tmp_path, tmp_path / "m.yaml", keys[0], tmp_path / "out", AUDIENCE, days)


@pytest.mark.parametrize("manifest", [{"audience": None}, {"not_after": None}, {"version": 1}])
def test_a_signed_manifest_missing_what_its_version_needs_is_malformed(tmp_path, keys, manifest):
    priv, pub, _ = keys
    out = make_bundle(tmp_path, priv)
    m = {k: v for k, v in {**json.loads((out / B.MANIFEST).read_bytes()), **manifest}.items() if v is not None}
    resign(out, priv, m)
    with pytest.raises(BundleError, match="malformed manifest: .*version [12] (needs audience and not_after|has no audience or not_after)"):
        B.verify_bundle(out, pub)


# ------------------------------------------------------------------ a gallery older than the store
def gallery_put_back(tmp_path, keys, stack, monkeypatch):
    """Bundle 1 enrolls obama, bundle 2 revokes him and enrolls biden. Returns the config (for
    run_service: an empty scene replayed in a loop, no liveness model), the CLI options, the
    gallery as bundle 1 left it (a backup) and as bundle 2 left it."""
    from edge.__main__ import main

    cfg, opts = cli_gate(tmp_path, keys, stack, monkeypatch)
    b1 = photo_bundle(tmp_path, keys[0], [("obama", "E1", "obama.jpg")], sequence=1, name="b1")
    b2 = photo_bundle(tmp_path, keys[0], [("biden", "E2", "biden.jpg")], removals=["E1"], sequence=2, name="b2")
    assert main(["bundle", "apply", str(b1), *opts]) == 0
    backup = (tmp_path / "gallery.fgg").read_bytes()
    assert main(["bundle", "apply", str(b2), *opts]) == 0
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "000_empty.png"), cv2.imread(str(sample("astronaut.png")))[300:512, 0:180])
    cfg.camera.path, cfg.camera.fps, cfg.camera.loop = str(frames), 30.0, True
    cfg.liveness.mode = "off"
    return cfg, opts, backup, (tmp_path / "gallery.fgg").read_bytes()


def gate_rows(cfg) -> list[dict]:
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        return [r for r in a.tail(100) if r["kind"] in ("gallery", "service")]


def test_a_gallery_older_than_the_last_applied_bundle_does_not_start_the_gate(tmp_path, keys, stack, monkeypatch):
    from edge.__main__ import main
    from edge.errors import GalleryError
    from edge.service import Notifier, run_service

    cfg, opts, backup, _ = gallery_put_back(tmp_path, keys, stack, monkeypatch)
    gallery = tmp_path / "gallery.fgg"
    gallery.write_bytes(backup)  # obama, revoked by bundle 2, would be let in again
    with pytest.raises(GalleryError, match="gallery older than applied bundle 2: it records bundle 1 as its last"):
        run_service(cfg, max_frames=3, verbose=False, notifier=Notifier(""))
    # a gallery `edge enroll` made afresh records no bundle: below the store, it is refused too
    fresh = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    fresh.add(G.Person("carol", np.ones(fresh.dim, np.float32)))
    G.save(fresh, gallery, G.load_key(cfg.storage.key_file))
    with pytest.raises(GalleryError, match="gallery older than applied bundle 2: it records bundle none as its last"):
        run_service(cfg, max_frames=3, verbose=False, notifier=Notifier(""))
    rows = gate_rows(cfg)
    assert [(r["kind"], r["reason"]) for r in rows] == [("gallery", "refused"), ("service", "stopped")] * 2
    assert str(tmp_path / "bundle.seq") in rows[0]["details"]["error"]
    # recovery: a newer signed bundle brings the old gallery forward, on record, and the gate starts
    gallery.write_bytes(backup)
    b3 = photo_bundle(tmp_path, keys[0], [("biden", "E2", "biden.jpg")], removals=["E1"], sequence=3, name="b3")
    assert main(["bundle", "apply", str(b3), *opts]) == 0
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        applied = a.tail(1)[0]
    assert (applied["reason"], applied["details"]["stale_gallery_sequence"]) == ("bundle_applied", 1)
    assert run_service(cfg, max_frames=3, verbose=False, notifier=Notifier("")) == 0
    started = [r for r in gate_rows(cfg) if r["reason"] == "started"]
    assert len(started) == 1 and started[0]["details"]["people"] == 1


def test_a_reload_of_a_gallery_older_than_the_last_applied_bundle_is_refused_and_the_gallery_kept(
        tmp_path, keys, stack, monkeypatch):
    import signal
    import threading

    from edge.service import Notifier, run_service

    cfg, _, backup, current = gallery_put_back(tmp_path, keys, stack, monkeypatch)
    gallery = tmp_path / "gallery.fgg"

    def wait_for(reason):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and reason not in [r["reason"] for r in gate_rows(cfg)]:
            time.sleep(0.05)

    def admin():  # on the running gate: the backup copied back, then the current gallery again
        try:
            wait_for("started")
            gallery.write_bytes(backup)
            os.kill(os.getpid(), signal.SIGHUP)
            wait_for("reload_refused")
            gallery.write_bytes(current)
            os.kill(os.getpid(), signal.SIGHUP)
            wait_for("reloaded")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=admin)
    t.start()
    try:
        assert run_service(cfg, max_frames=100_000, verbose=False, notifier=Notifier("")) == 0
    finally:
        t.join()
    rows = gate_rows(cfg)
    assert [(r["kind"], r["reason"]) for r in rows] == [("service", "started"), ("gallery", "reload_refused"),
                                                        ("gallery", "reloaded"), ("service", "stopped")]
    assert "gallery older than applied bundle 2: it records bundle 1 as its last" in rows[1]["details"]["error"]
    assert rows[2]["details"]["people"] == 1


# ------------------------------------------------------------------ badge card numbers
def test_card_numbers_are_taken_as_the_reader_types_them_and_one_card_is_one_persons(tmp_path, keys):
    priv, pub, _ = keys
    people = [{"name": "alice", "id": "E1", "photo": "alice.jpg", "card": "00a1f3"},
              {"name": "bob", "id": "E2", "photo": "bob.jpg", "card": "0012345"}]
    m = B.verify_bundle(make_bundle(tmp_path, priv, people=people), pub).manifest
    assert [p.card for p in m.people] == ["00A1F3", "0012345"]  # the reader's keymap types capitals
    assert B.verify_bundle(make_bundle(tmp_path, priv, name="none"), pub).manifest.people[0].card is None
    with pytest.raises(BundleError, match=r"people\[1\]\.card: write the card number in quotes"):
        make_bundle(tmp_path, priv, people=[people[0], {**people[1], "card": 12345}], name="b1")
    with pytest.raises(BundleError, match=r"people\[0\]\.card: digits and letters only"):
        make_bundle(tmp_path, priv, people=[{**people[0], "card": "12-34"}], name="b2")
    with pytest.raises(BundleError, match="one card given to more than one person: alice, bob") as e:
        make_bundle(tmp_path, priv, people=[people[0], {**people[1], "card": "00A1F3"}], name="b3")
    assert "00A1F3" not in str(e.value)
    out = make_bundle(tmp_path, priv, people=people, name="b4")
    signed = json.loads((out / B.MANIFEST).read_bytes())
    signed["people"][1]["card"] = "00A1F3"  # signed by a tool without the check
    resign(out, priv, signed)
    with pytest.raises(BundleError, match="one card given to more than one person"):
        B.verify_bundle(out, pub)
    signed["people"][1]["card"] = "00a1f3"  # not the reader's alphabet: refused, not matched loosely
    resign(out, priv, signed)
    with pytest.raises(BundleError, match=r"people\.1\.card: String should match pattern"):
        B.verify_bundle(out, pub)


def all_audit_text(path) -> str:
    with AuditLog(path, readonly=True) as a:
        return json.dumps(a.tail(1000))


def test_a_reissued_card_stays_with_the_same_person_and_a_card_someone_holds_is_refused(tmp_path, keys, stack):
    """The id is the person: a new card under the same id replaces the card, not the person. A card
    another person keeps is refused for the one given it, naming the holder; two people may swap
    cards in one bundle. The audit tells cards apart by card_tag, never by number."""
    priv, pub, _ = keys
    cfg = gate_config(tmp_path)
    G.new_key_file(cfg.storage.key_file)
    key = G.load_key(cfg.storage.key_file)
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    b1 = photo_bundle(tmp_path, priv, [("obama", "E1", "obama.jpg"), ("joe", "E2", "biden.jpg")], sequence=1,
                      name="b1", cards={"obama": "10001", "joe": "20002"})
    with AuditLog(cfg.storage.audit) as audit:
        assert apply(b1, pub, g, stack, cfg, audit=audit).enrolled == ["obama", "joe"]
        g = G.load(cfg.storage.gallery, key)
        assert [(p.name, p.person_id, p.card) for p in g.people] == [("obama", "E1", "10001"), ("joe", "E2", "20002")]
        # a reissued badge: same id, new card; and a stranger given joe's card, whom joe keeps
        b2 = photo_bundle(tmp_path, priv, [("Barack Obama", "E1", "obama2.jpg"), ("eileen", "E3", "astronaut.png")],
                          sequence=2, name="b2", cards={"Barack Obama": "10009", "eileen": "20002"})
        r = apply(b2, pub, g, stack, cfg, audit=audit)
        assert r.enrolled == ["Barack Obama"] and list(r.refused) == ["eileen"]
        assert "the one joe (id E2) holds" in r.refused["eileen"] and "20002" not in r.refused["eileen"]
        g = G.load(cfg.storage.gallery, key)
        assert [(p.name, p.person_id, p.card) for p in g.people] == [("joe", "E2", "20002"),
                                                                      ("Barack Obama", "E1", "10009")]
        rows = [r for r in audit.tail(4) if r["reason"] in ("enrolled", "refused")]
        # swapped in one bundle: each old entry leaves before either new one comes in
        b3 = photo_bundle(tmp_path, priv, [("Barack Obama", "E1", "obama3.jpg"), ("joe", "E2", "biden.jpg")],
                          sequence=3, name="b3", cards={"Barack Obama": "20002", "joe": "10009"})
        assert apply(b3, pub, g, stack, cfg, audit=audit).enrolled == ["Barack Obama", "joe"]
        assert {p.name: p.card for p in G.load(cfg.storage.gallery, key).people} == {"Barack Obama": "20002",
                                                                                     "joe": "10009"}
    enrolled = {r["identity"]: r["details"] for r in rows if r["reason"] == "enrolled"}
    assert enrolled["Barack Obama"]["card"] == G.card_tag(key, "10009")
    assert enrolled["Barack Obama"]["previous_card"] == G.card_tag(key, "10001")
    text = all_audit_text(cfg.storage.audit)
    assert not any(card in text for card in ("10001", "20002", "10009"))


def test_a_refused_person_keeps_their_card_and_so_refuses_whoever_was_given_it(tmp_path, keys, stack):
    """Rounds: joe's new photo is refused (no face), so joe keeps his card, and eileen, given it
    on the understanding that joe gets another, is refused too."""
    priv, pub, _ = keys
    cfg = gate_config(tmp_path)
    G.new_key_file(cfg.storage.key_file)
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    apply(photo_bundle(tmp_path, priv, [("joe", "E2", "biden.jpg")], sequence=1, name="b1", cards={"joe": "20002"}),
          pub, g, stack, cfg)
    g = G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file))
    suit = cv2.imread(str(sample("astronaut.png")))[300:512, 0:180]
    b2 = photo_bundle(tmp_path, priv, [("joe", "E2", "suit.png"), ("eileen", "E3", "astronaut.png")], sequence=2,
                      name="b2", extra={"suit.png": suit}, cards={"joe": "30003", "eileen": "20002"})
    r = apply(b2, pub, g, stack, cfg)
    assert r.enrolled == [] and r.refused["joe"] == "no face found" and "the one joe (id E2) holds" in r.refused["eileen"]
    assert [(p.name, p.card) for p in G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file)).people] == \
        [("joe", "20002")]
