"""Score fusion of two encoders as one encoder (edge.embed.FusedEncoder, export.fusion)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge.embed import FusedEncoder, fuse_vectors, load_encoder
from edge.errors import ModelError
from evaluation.one_to_n import fuse
from edge.imageio import load_image
from edge.modelcard import CalibrationSpec, EmbeddingSpec, load_card, write_card
from export.build import derived_card

from tests.conftest import MODELS


def test_fused_cosine_is_an_affine_function_of_the_z_score_fusion():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 4))
    b = rng.normal(size=(5, 3))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    w, sd, mu = (0.3, 0.7), (0.09, 0.04), (0.1, 0.87)
    scales = [np.sqrt(w[0] / sd[0]), np.sqrt(w[1] / sd[1])]
    f = fuse_vectors([a, b], scales)
    assert np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-6)
    cos = f @ f.T
    z = fuse([a @ a.T, b @ b.T], list(w), list(mu), list(sd))
    # cos = (z + sum w_i mu_i / sd_i) / sum s_i^2, by hand
    c = sum(wi / si for wi, si in zip(w, sd))
    assert np.allclose(cos, (z + sum(wi * mi / si for wi, mi, si in zip(w, mu, sd))) / c, atol=1e-5)


@pytest.fixture
def fused_dir(tmp_path):
    """sface_int8 + sface_fp32 fused in a folder of their own (both build in CI, no torch)."""
    for n in ("sface_int8", "sface_fp32"):
        if not (MODELS / f"{n}.onnx").exists():
            pytest.skip("run `python -m export setup`")
        for suffix in (".onnx", ".card.json"):
            shutil.copy(MODELS / f"{n}{suffix}", tmp_path / f"{n}{suffix}")
    members = [load_encoder(tmp_path / f"{n}.card.json") for n in ("sface_int8", "sface_fp32")]
    recipe = tmp_path / "pair.fusion.json"
    recipe.write_text(json.dumps({"members": [{"card": f"{n}.card.json", "sha256": m.sha256, "scale": s}
                                              for n, m, s in zip(("sface_int8", "sface_fp32"), members, (2.0, 1.0))]}))
    base = members[0].card
    write_card(derived_card(base, "pair", recipe, "int8", runtime="fusion", embedding=EmbeddingSpec(dim=256),
                            calibration=CalibrationSpec(dataset="hand", impostor_pairs=1000, fmr=[0.1, 0.001], threshold=[0.2, 0.5])), recipe)
    return tmp_path


def test_a_fusion_card_loads_as_one_encoder_and_embeds_from_each_members_crop(fused_dir, samples):
    from edge.detect import load_detector

    enc = load_encoder(fused_dir / "pair.fusion.card.json")
    assert isinstance(enc, FusedEncoder) and enc.card.embedding.dim == 256
    img = load_image(samples / "obama.jpg")
    det = max(load_detector(MODELS / "yunet_fp32.card.json").detect(img), key=lambda d: d.size)
    face = enc.align(img, det)
    assert len(face.views) == 2 and face.image is face.views[0]
    v = enc.embed(face).vector
    a, b = (m.embed(m.align(img, det)).vector for m in enc.members)
    want = np.concatenate([2.0 * a, 1.0 * b]) / np.sqrt(5.0)
    assert np.allclose(v, want, atol=1e-5)
    with pytest.raises(ValueError, match="own align"):
        enc.embed(enc.members[0].align(img, det))


def test_a_member_the_recipe_mirrors_is_embedded_with_its_mirror_and_enrollment_mirrors_all(fused_dir, samples):
    from edge.config import Config
    from edge.detect import load_detector
    from edge.enroll import embed_photo
    from edge.pipeline import Stack

    recipe = fused_dir / "pair.fusion.json"
    r = json.loads(recipe.read_text())
    r["members"][1]["flip"] = True  # the door mirrors the second member only
    recipe.write_text(json.dumps(r))
    card, _ = load_card(fused_dir / "pair.fusion.card.json", verify_file=False)
    write_card(derived_card(card, "pair", recipe, "int8", runtime="fusion", embedding=card.embedding,
                            calibration=card.calibration), recipe)
    enc = load_encoder(fused_dir / "pair.fusion.card.json")
    assert [m.flip for m in enc.members] == [False, True]
    img = load_image(samples / "obama.jpg")
    det = max(load_detector(MODELS / "yunet_fp32.card.json").detect(img), key=lambda d: d.size)
    face = enc.align(img, det)

    def unit(x):
        return x / np.linalg.norm(x)

    (pa, pb), (ma, mb) = [[m.embed_images([v], flip=False)[0] for m, v in zip(enc.members, vs)]
                          for vs in (face.views, [v[:, ::-1] for v in face.views])]
    door = unit(np.concatenate([2.0 * pa, 1.0 * unit(pb + mb)]))
    enrolled = unit(np.concatenate([2.0 * unit(pa + ma), 1.0 * unit(pb + mb)]))
    assert np.allclose(enc.embed(face).vector, door, atol=1e-5)
    assert np.allclose(enc.embed(face, flip=True).vector, enrolled, atol=1e-5)
    assert not np.allclose(door, enrolled, atol=1e-3)
    # Enrollment photos are embedded as enrolled, probes (identify / verify) as the door does.
    cfg = Config()
    cfg.models.encoder = str(fused_dir / "pair.fusion.card.json")
    stack = Stack.from_config(cfg)
    assert stack.enroll_flip
    assert np.allclose(embed_photo(stack, cfg.enroll_quality, img, "o", "o.jpg").embedding, enrolled, atol=1e-5)
    assert np.allclose(embed_photo(stack, cfg.quality, img, "p", "p.jpg", probe=True).embedding, door, atol=1e-5)
    cfg.match.enroll_flip = False
    assert np.allclose(embed_photo(Stack.from_config(cfg), cfg.enroll_quality, img, "o", "o.jpg").embedding, door, atol=1e-5)


def test_a_recipe_that_names_other_models_is_refused(fused_dir):
    recipe = fused_dir / "pair.fusion.json"
    r = json.loads(recipe.read_text())
    r["members"][1]["sha256"] = "0" * 64
    recipe.write_text(json.dumps(r))
    card, _ = load_card(fused_dir / "pair.fusion.card.json", verify_file=False)
    with pytest.raises(ModelError, match="not the model the recipe was made with"):
        FusedEncoder(card, recipe)
    # and the card itself refuses the edited recipe (its sha256 no longer matches)
    with pytest.raises(ModelError, match="sha256"):
        load_encoder(fused_dir / "pair.fusion.card.json")


def test_a_recipe_whose_member_is_a_fusion_is_refused(fused_dir):
    recipe = fused_dir / "pair.fusion.json"
    r = json.loads(recipe.read_text())
    r["members"][1]["card"] = "pair.fusion.card.json"  # itself
    recipe.write_text(json.dumps(r))
    card, _ = load_card(fused_dir / "pair.fusion.card.json", verify_file=False)
    with pytest.raises(ModelError, match="itself a fusion"):
        FusedEncoder(card, recipe)


def test_a_malformed_recipe_is_refused_by_name(fused_dir):
    recipe = fused_dir / "pair.fusion.json"
    card, _ = load_card(fused_dir / "pair.fusion.card.json", verify_file=False)
    for text in ("{not json", json.dumps({"members": [{"card": "../x.card.json", "sha256": "0" * 64, "scale": 1}] * 2}),
                 json.dumps({"members": [], "extra": 1})):
        recipe.write_text(text)
        with pytest.raises(ModelError, match="invalid fusion recipe") as e:
            FusedEncoder(card, recipe)
        assert e.value.path == str(recipe)


def test_the_gate_grants_an_enrolled_person_through_a_fused_encoder(fused_dir, samples):
    from edge.config import Config
    from edge.enroll import embed_photo
    from edge.pipeline import Stack

    cfg = Config()
    cfg.models.encoder = str(fused_dir / "pair.fusion.card.json")
    stack = Stack.from_config(cfg)
    a = embed_photo(stack, cfg.enroll_quality, load_image(samples / "obama.jpg"), "obama", "obama.jpg")
    b = embed_photo(stack, cfg.quality, load_image(samples / "obama2.jpg"), "probe", "obama2.jpg")
    c = embed_photo(stack, cfg.quality, load_image(samples / "biden.jpg"), "probe", "biden.jpg")
    assert a.ok and b.ok and c.ok and a.embedding.shape == (256,)
    assert float(a.embedding @ b.embedding) > 0.5 > float(a.embedding @ c.embedding)


def test_committed_fusions_are_installed_only_beside_all_their_members(tmp_path, monkeypatch):
    import export.build as B

    calib, out = tmp_path / "calib", tmp_path / "models"
    calib.mkdir()
    out.mkdir()
    recipe = {"members": [{"card": f"{n}.card.json", "sha256": "0" * 64, "scale": 1.0} for n in ("a", "b")]}
    (calib / "ab.fusion.json").write_text(json.dumps(recipe))
    (calib / "ab.fusion.card.json").write_text("{}")
    monkeypatch.setattr(B, "CALIB_DIR", calib)
    (out / "a.card.json").write_text("{}")
    assert B.install_fusions(out, say=lambda *a: None) == []  # b is missing
    (out / "b.card.json").write_text("{}")
    assert sorted(p.name for p in B.install_fusions(out, say=lambda *a: None)) == ["ab.fusion.card.json", "ab.fusion.json"]
    assert B.install_fusions(out, say=lambda *a: None) == []  # already there, same bytes


def test_an_int8_fusion_gets_an_fp32_twin_with_its_scales_and_flips(fused_dir):
    import export.build as B

    m = load_encoder(fused_dir / "sface_int8.card.json")
    recipe = fused_dir / "x_int8.fusion.json"
    recipe.write_text(json.dumps({"members": [{"card": "sface_int8.card.json", "sha256": m.sha256, "scale": s, "flip": f}
                                              for s, f in ((2.0, False), (1.0, True))]}))
    base, _ = load_card(fused_dir / "pair.fusion.card.json", verify_file=False)
    write_card(derived_card(base, "x_int8", recipe, "int8", runtime="fusion", embedding=base.embedding,
                            calibration=base.calibration), recipe)
    made = B._fp32_twin(recipe, fused_dir)
    assert [p.name for p in made] == ["x_fp32.fusion.json", "x_fp32.fusion.card.json"]
    twin = load_encoder(fused_dir / "x_fp32.fusion.card.json")
    assert twin.card.precision == "fp32" and twin.card.calibration == base.calibration
    assert [e.card.name for e in twin.members] == ["sface_fp32", "sface_fp32"] and twin.scales == [2.0, 1.0]
    assert [e.flip for e in twin.members] == [False, True]
    assert B._fp32_twin(recipe, fused_dir) == []  # unchanged: nothing rewritten
    assert B._fp32_twin(fused_dir / "pair.fusion.json", fused_dir) == []  # not an INT8 recipe by name


def test_export_fuse_on_a_small_celeba_subset_writes_a_loadable_calibrated_fusion(fused_dir, shared, tmp_path):
    """python -m export fuse on 8 CelebA identities x 3 photos (the full run uses all 3,497)."""
    from export.fusion import build_fusion

    faces = tmp_path / "faces"
    people = sorted(p for p in (shared / "data" / "celeba" / "images").iterdir() if p.is_dir())[:8]
    for p in people:
        (faces / p.name).mkdir(parents=True)
        for f in sorted(p.iterdir())[:3]:
            (faces / p.name / f.name).write_bytes(f.read_bytes())
    card_path = build_fusion([fused_dir / "sface_int8.card.json", fused_dir / "sface_fp32.card.json"],
                             MODELS / "yunet_fp32.card.json", faces, "pair2", cache_dir=None, progress=False,
                             say=lambda *a: None)
    enc = load_encoder(card_path)
    assert isinstance(enc, FusedEncoder) and enc.card.runtime == "fusion" and enc.card.embedding.dim == 256
    cal = enc.card.calibration
    assert cal.impostor_pairs > 0 and cal.threshold == sorted(cal.threshold)
    assert all(a >= b for a, b in zip(cal.fmr, cal.fmr[1:]))  # rarer false matches at higher thresholds
    with pytest.raises(Exception, match="LFW"):
        build_fusion([fused_dir / "sface_int8.card.json", fused_dir / "sface_fp32.card.json"],
                     MODELS / "yunet_fp32.card.json", tmp_path / "lfw" / "images", "x", say=lambda *a: None)


def test_enrollment_twin_is_found_beside_the_door_encoder_and_must_be_its_network(tmp_path):
    from edge.embed import check_twin, enrollment_card

    door_card, twin_card, other_card = (MODELS / f"{n}.card.json" for n in ("sface_int8", "sface_fp32", "dlib_int8"))
    if not all(c.is_file() for c in (door_card, twin_card, other_card)):
        pytest.skip("run `python -m export setup`")
    assert enrollment_card(door_card) == twin_card
    assert enrollment_card(twin_card) == twin_card  # an fp32 encoder enrolls itself
    assert enrollment_card(door_card, other_card) == other_card  # configured wins
    door = load_encoder(door_card)
    check_twin(door, load_encoder(twin_card), twin_card)
    check_twin(door, door, door_card)
    with pytest.raises(ModelError, match="not the door encoder"):
        check_twin(door, load_encoder(other_card), other_card)
    lone = tmp_path / "x_int8.card.json"  # no twin beside it: the door encoder enrolls
    assert enrollment_card(lone) == lone
