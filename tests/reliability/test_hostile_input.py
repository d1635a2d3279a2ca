"""Hostile input: each file is refused with an error naming it and the problem, and
nothing else changes (gallery bytes, audit rows, the door)."""
from __future__ import annotations

import json
import pickle
import shutil
import zlib

import cv2
import numpy as np
import pytest
import yaml

from edge import gallery as G
from edge.__main__ import main
from edge.config import load_config
from edge.errors import ConfigError, GalleryError, ModelError
from edge.modelcard import load_card
from reliability.common import models_config
from reliability.fakes import audit_rows
from tests.unit.test_imageio import flat_jpeg, png_claiming


def _png_bomb(width=10000, height=5000) -> bytes:
    """A valid 8-bit grey PNG of 50 megapixels in ~50 kB: every row a filter byte and zeros."""
    def chunk(kind, payload):
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    raw = zlib.compress(b"\0" * ((width + 1) * height), 9)
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def hostile_photos(folder, samples):
    jpeg = (samples / "obama.jpg").read_bytes()
    noise16 = (np.random.default_rng(0).integers(0, 65535, (64, 64, 3))).astype(np.uint16)
    files = {
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "empty.jpg": b"",
        "notes.jpg": b"name,photo\nmallory,me.jpg\n",
        "program.png": b"\x7fELF\x02\x01\x01" + bytes(200),
        "cmyk.jpg": flat_jpeg((255, 255, 0, 255)),  # decodes (yellow), shows no face
        "deep.png": cv2.imencode(".png", noise16)[1].tobytes(),  # 16-bit: decodes, shows no face
        "huge.png": png_claiming(100_000, 100_000),
        "bomb.png": _png_bomb(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


@pytest.fixture()
def gate_config(tmp_path, cards, samples):
    """A config with a gallery holding one person (enrolled through the CLI) and an audit log."""
    cfg = models_config(cards)
    cfg.storage.gallery, cfg.storage.key_file = str(tmp_path / "g.fgg"), str(tmp_path / "g.key")
    cfg.storage.audit = str(tmp_path / "audit.sqlite3")
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    G.new_key_file(cfg.storage.key_file)
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(samples / "obama.jpg", first / "obama.jpg")
    assert main(["enroll", str(first), "--config", str(path)]) == 0
    return path, cfg


def test_hostile_photos_refused_at_enrollment_and_nothing_changes(tmp_path, gate_config, samples, capsys):
    path, cfg = gate_config
    folder = tmp_path / "hostile"
    folder.mkdir()
    files = hostile_photos(folder, samples)
    before = (open(cfg.storage.gallery, "rb").read(), len(audit_rows(cfg.storage.audit)))
    capsys.readouterr()
    assert main(["enroll", str(folder), "--config", str(path)]) == 1
    out = capsys.readouterr().out
    lines = {ln.split()[1].rstrip(":"): ln for ln in out.splitlines() if ln.startswith("REFUSED")}
    assert set(lines) == {n.rsplit(".", 1)[0] for n in files}, out
    expect = {"truncated": "corrupt or truncated", "empty": "empty file", "notes": "not a JPEG",
              "program": "not a JPEG", "cmyk": "no face", "deep": "no face", "huge": "megapixel limit",
              "bomb": "megapixel limit"}
    for stem, words in expect.items():
        assert words in lines[stem] and str(folder / stem) in lines[stem], lines[stem]
    assert "0 enrolled, 8 refused; gallery has 1 people" in out
    assert (open(cfg.storage.gallery, "rb").read(), len(audit_rows(cfg.storage.audit))) == before


def enroll_lines(out: str) -> dict:
    """`edge enroll` output: each entry's name -> its OK / REFUSED / WARNING lines."""
    lines = {}
    for ln in out.splitlines():
        if ln.split(" ", 1)[0] in ("OK", "REFUSED", "WARNING"):
            lines.setdefault(ln.split()[1].rstrip(":"), []).append(ln)
    return lines


def no_hang(seconds: int = 60):
    """Fail a call that blocks (a FIFO opened for reading waits for a writer) instead of hanging."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard():
        def hung(signum, frame):
            raise TimeoutError(f"blocked for {seconds} s")

        previous = signal.signal(signal.SIGALRM, hung)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    return guard()


def test_links_fifos_folders_and_hidden_files_in_an_enrollment_folder_are_each_reported(tmp_path, gate_config,
                                                                                          samples, capsys):
    """Nothing in the folder is skipped unseen or followed: a symlink (here to a real face) is not
    followed, a FIFO is refused without waiting for a writer, a sub-folder is not searched; each is
    named with why, the rest is enrolled and the exit status says not everything was."""
    import os

    path, cfg = gate_config
    folder = tmp_path / "people"
    folder.mkdir()
    shutil.copy(samples / "biden.jpg", folder / "joe.jpg")
    (folder / "alice.jpg").symlink_to(samples / "obama2.jpg")
    os.mkfifo(folder / "bob.jpg")
    (folder / "carol").mkdir()
    shutil.copy(samples / "obama3.jpg", folder / "carol" / "carol.jpg")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    capsys.readouterr()
    with no_hang():
        assert main(["enroll", str(folder), "--config", str(path)]) == 1
    out = capsys.readouterr().out
    lines = enroll_lines(out)
    expect = {"joe": "OK      joe: enrolled", "alice": "is a symbolic link, not followed",
              "bob": "is not a regular file (a device, FIFO or socket)", "carol": "is a folder; sub-folders are not searched",
              ".DS_Store": "hidden file"}
    assert set(lines) == set(expect), out
    for name, words in expect.items():
        assert len(lines[name]) == 1 and words in lines[name][0], lines[name]
        assert f"({folder / name}" in lines[name][0] or name == "joe", lines[name]
    assert "1 enrolled, 4 refused; gallery has 2 people" in out
    assert G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file)).names == ["obama", "joe"]


def test_a_face_already_enrolled_under_another_name_is_refused_naming_both(tmp_path, gate_config, samples, capsys):
    """The same photo under a second name is refused at the gate's own threshold, naming the person
    it duplicates, and audited; another person's face is enrolled beside it. --allow-duplicate
    enrolls it with a warning, the audit row saying whom it duplicates."""
    path, cfg = gate_config  # obama is enrolled
    folder = tmp_path / "people"
    folder.mkdir()
    shutil.copy(samples / "obama.jpg", folder / "barack.jpg")
    shutil.copy(samples / "biden.jpg", folder / "joe.jpg")
    capsys.readouterr()
    assert main(["enroll", str(folder), "--config", str(path)]) == 1
    out = capsys.readouterr().out
    lines = enroll_lines(out)
    assert lines["joe"] == [f"OK      joe: enrolled  ({folder / 'joe.jpg'})"], out
    [refused] = lines["barack"]
    assert refused.startswith("REFUSED barack: the same face as 'obama' (score ") and "--allow-duplicate" in refused
    key = G.load_key(cfg.storage.key_file)
    assert G.load(cfg.storage.gallery, key).names == ["obama", "joe"]
    [row] = [r for r in audit_rows(cfg.storage.audit) if r["identity"] == "barack"]
    assert (row["kind"], row["reason"]) == ("enroll", "refused") and "'obama'" in json.loads(row["details"])["why"]

    (folder / "joe.jpg").unlink()
    assert main(["enroll", str(folder), "--allow-duplicate", "--config", str(path)]) == 0
    lines = enroll_lines(capsys.readouterr().out)
    assert lines["barack"][0].startswith("OK      barack: enrolled")
    assert lines["barack"][1].startswith("WARNING barack: the same face as 'obama'")
    assert G.load(cfg.storage.gallery, key).names == ["obama", "joe", "barack"]
    row = audit_rows(cfg.storage.audit)[-1]
    assert (row["reason"], row["identity"], json.loads(row["details"])) == ("enrolled", "barack", {"duplicate_of": "obama"})


def test_one_face_twice_in_one_enrollment_is_refused_under_both_names(tmp_path, gate_config, samples, capsys):
    path, cfg = gate_config
    folder = tmp_path / "people"
    folder.mkdir()
    for name in ("joe", "joseph"):
        shutil.copy(samples / "biden.jpg", folder / f"{name}.jpg")
    capsys.readouterr()
    assert main(["enroll", str(folder), "--config", str(path)]) == 1
    out = capsys.readouterr().out
    lines = enroll_lines(out)
    assert lines["joe"][0].startswith("REFUSED joe: the same face as 'joseph'"), out
    assert lines["joseph"][0].startswith("REFUSED joseph: the same face as 'joe'"), out
    assert G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file)).names == ["obama"]


def test_verify_takes_a_badge_id_as_the_claim_and_refuses_an_ambiguous_one(tmp_path, gate_config, samples, capsys):
    path, cfg = gate_config
    folder = tmp_path / "people"
    folder.mkdir()
    shutil.copy(samples / "biden.jpg", folder / "joe.jpg")
    assert main(["enroll", str(folder), "--config", str(path)]) == 0
    key = G.load_key(cfg.storage.key_file)

    def set_ids(ids):
        g = G.load(cfg.storage.gallery, key)
        for p in g.people:
            p.person_id = ids[p.name]
        G.save(g, cfg.storage.gallery, key)

    def verify(claim):
        capsys.readouterr()
        status = main(["verify", str(samples / "obama2.jpg"), "--as", claim, "--config", str(path)])
        out, err = capsys.readouterr()
        return status, (json.loads(out) if out.strip() else None), err

    set_ids({"obama": "E7", "joe": "B2"})
    for claim in ("E7", "obama"):
        status, res, _ = verify(claim)
        assert (status, res["verified"], res["reason"]) == (0, True, "match") and res["identity"] == "obama", res
    status, res, _ = verify("B2")
    assert (status, res["identity"], res["verified"]) == (1, "joe", False)
    assert verify("Z9")[1]["reason"] == "claim_unknown"

    set_ids({"obama": "E7", "joe": "E7"})
    status, res, err = verify("E7")
    assert (status, res) == (2, None)
    assert "claim 'E7' is ambiguous: it matches obama (id E7), joe (id E7)" in err


def test_cmyk_and_16_bit_photos_of_a_face_decode_to_the_same_person(real_stack, samples, tmp_path):
    """Not refused but decoded right: the embedding of a 16-bit copy matches the 8-bit original."""
    from edge.config import QualityConfig
    from edge.enroll import embed_photo
    from edge.imageio import load_image

    img = load_image(samples / "obama.jpg")
    (tmp_path / "deep.png").write_bytes(cv2.imencode(".png", img.astype(np.uint16) * 257)[1].tobytes())
    a = embed_photo(real_stack, QualityConfig(), img, "a", "8-bit")
    b = embed_photo(real_stack, QualityConfig(), load_image(tmp_path / "deep.png"), "b", "16-bit")
    assert a.ok and b.ok
    assert float(a.embedding @ b.embedding) > 0.99


@pytest.mark.parametrize("payload", [
    pickle.dumps({"people": ["alice"]}),
    b"\x93NUMPY" + bytes(100),  # an .npy header
])
def test_gallery_files_that_are_pickles_or_arrays_are_refused(tmp_path, payload):
    p = tmp_path / "g.fgg"
    p.write_bytes(payload)
    with pytest.raises(GalleryError, match="bad magic") as e:
        G.load(p, bytes(32))
    assert str(p) in str(e.value)


def test_object_array_npy_renamed_as_gallery_refused_without_unpickling(tmp_path):
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"name": "alice"}, None], dtype=object), allow_pickle=True)
    p = tmp_path / "g.fgg"
    p.write_bytes(buf.getvalue())
    with pytest.raises(GalleryError, match="bad magic"):
        G.load(p, bytes(32))


def test_cohort_with_object_array_refused(tmp_path):
    cohort = pytest.importorskip("edge.cohort")
    p = tmp_path / "x.cohort.npz"
    np.savez(p, vectors=np.array([object(), None], dtype=object), encoder_sha256="e" * 64, top_k=1, fmr=[1.0, 0.0],
             threshold=[0.0, 1.0], impostor_mean=0.0, impostor_std=1.0, dataset="x")
    with pytest.raises(ModelError) as e:
        cohort.load_cohort(p)
    assert str(p) in str(e.value)


def _copy_model(cards, tmp_path, which="detector"):
    card, model = load_card(cards[which], verify_file=False)
    shutil.copy(model, tmp_path / model.name)
    dst = tmp_path / cards[which].name
    shutil.copy(cards[which], dst)
    return dst, tmp_path / model.name


def test_model_whose_hash_does_not_match_its_card_is_refused(cards, tmp_path, capsys):
    card_path, model = _copy_model(cards, tmp_path)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its card") as e:
        load_card(card_path)
    assert str(model) in str(e.value)
    cfg = models_config(cards)
    cfg.models.detector = str(card_path)
    cfg.relay.pin_factory = "mock"
    cfg.storage.audit = str(tmp_path / "audit.sqlite3")
    cfg_path = tmp_path / "gate.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump()))
    assert main(["run", "--config", str(cfg_path), "--max-frames", "1"]) == 2
    assert "does not match its card" in capsys.readouterr().err
    assert not any(r["grant"] for r in audit_rows(cfg.storage.audit))


def test_card_pointing_outside_its_folder_is_refused(cards, tmp_path):
    card_path, _ = _copy_model(cards, tmp_path)
    raw = json.loads(card_path.read_text())
    raw["file"] = "../" + raw["file"]
    card_path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="outside its folder"):
        load_card(card_path)


def _onnx_with_external(tmp_path, location):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    w = helper.make_tensor("W", TensorProto.FLOAT, [4], [0.0] * 4)
    w.data_location = TensorProto.EXTERNAL
    del w.float_data[:]
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        e = w.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph([helper.make_node("Add", ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4])], [w])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "secret.bin").write_bytes(bytes(16))
    path = model_dir / "m.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname"])
def test_onnx_external_data_outside_its_folder_is_refused(tmp_path, location):
    from export.onnx_import import load_onnx

    path = _onnx_with_external(tmp_path, location)
    with pytest.raises(ModelError, match="outside the model folder") as e:
        load_onnx(path)
    assert str(path) in str(e.value)


def test_gate_runtime_refuses_external_data_outside_its_folder(tmp_path):
    """The card's sha256 covers the .onnx only, so the runtime must not follow a path out of it."""
    from edge.runtime import OnnxModel

    path = _onnx_with_external(tmp_path, "../secret.bin")
    with pytest.raises(ModelError):
        OnnxModel(path)


CONFIGS = {
    "unknown_key.yaml": ("camera:\n  sorce: replay\n", "camera.sorce"),
    "unknown_section.yaml": ("cameras: {}\n", "cameras"),
    "wrong_type.yaml": ("relay:\n  pulse_s: three\n", "relay.pulse_s"),
    "out_of_range.yaml": ("relay:\n  max_hold_s: 3600\n", "relay.max_hold_s"),
    "negative.yaml": ("decision:\n  k: -1\n", "decision.k"),
    "pulse_over_hold.yaml": ("relay:\n  pulse_s: 10\n  max_hold_s: 5\n", "pulse_s must not exceed"),
    "python_tag.yaml": ("camera: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
    "list.yaml": ("- camera\n- relay\n", "top level must be a mapping"),
    "latin1.yaml": (b"camera:\n  path: caf\xe9\n", "not valid YAML"),
    "alias_bomb.yaml": ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")), "i"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bad_config_refused_naming_the_file_and_field(tmp_path, name, capsys):
    text, words = CONFIGS[name]
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and words in str(e.value), str(e.value)
    assert main(["check-config", str(p)]) == 2
    assert main(["run", "--config", str(p), "--max-frames", "1"]) == 2
    assert "error: " + str(p) in capsys.readouterr().err
    assert sorted(x.name for x in tmp_path.iterdir()) == [name]  # nothing written: no audit, no gallery
