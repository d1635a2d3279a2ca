"""evaluation/one_to_n.py: the pure scoring helpers by hand, and the runner on a tiny fake LFW tree
built from the fetched sample faces (cache hits, quality re-verdicts, end-to-end one-to-n)."""
import json
import shutil

import numpy as np
import pytest

from edge.cohort import as_norm_matrix
from edge.config import QualityConfig
from edge.match import as_norm, cohort_stats
from edge.records import Detection
from evaluation import embeddings as Emb
from evaluation import one_to_n as E
from evaluation.__main__ import main as evaluation_cli
from tests.conftest import MODELS
from tests.unit._stack import model_cards, sample


def _det(cx, cy, w=20.0):
    return Detection(box=(cx - w / 2, cy - w / 2, w, w), keypoints=np.zeros((5, 2), np.float32), score=0.9)


def test_nearest_centre_picks_the_face_nearest_the_middle_not_the_biggest():
    dets = [_det(10, 10, 80), _det(48, 52), _det(90, 90)]
    assert Emb.nearest_centre(dets, (100, 100, 3)) == 1
    assert Emb.nearest_centre([], (100, 100, 3)) is None


def test_subject_face_is_the_detection_nearest_the_centre_or_none():
    class Found:
        def __init__(self, dets):
            self.dets = dets

        def detect(self, image):
            return self.dets

    image = np.zeros((100, 100, 3), np.uint8)
    big_off_centre, small_centred = _det(10, 10, 80), _det(48, 52)
    assert Emb.subject_face(Found([big_off_centre, small_centred]), image) is small_centred
    assert Emb.subject_face(Found([]), image) is None


def test_scaled_template_shrinks_about_the_crop_centre():
    t = Emb.scaled_template([(0, 0), (100, 100), (50, 50), (20, 80), (80, 20)], (100, 100), 0.9)
    assert np.allclose(t, [(5, 5), (95, 95), (50, 50), (23, 77), (77, 23)])
    same = [(38.3, 51.7), (73.5, 51.5), (56.0, 71.7), (41.5, 92.4), (70.7, 92.2)]
    assert np.allclose(Emb.scaled_template(same, (112, 112), 1.0), same)


def test_combine_averages_the_mirror_and_renormalises():
    v = np.array([[1.0, 0.0]], np.float32)
    vf = np.array([[0.0, 1.0]], np.float32)
    assert np.allclose(Emb.combine(v, vf, False), [[1, 0]])
    assert np.allclose(Emb.combine(v, vf, True), [[2 ** -0.5, 2 ** -0.5]])
    extra = np.array([[[0.0, -1.0]]], np.float32)  # one jittered frame
    assert np.allclose(Emb.combine(v, vf, True, extra), [[1.0, 0.0]])


def test_search_1n_best_by_normalised_score_margin_on_raw():
    raw = np.array([[0.50, 0.48, 0.10],    # margin 0.02: refused at 0.05
                    [0.20, 0.70, 0.30]])   # margin 0.40
    norm = raw.copy()
    best, score, margin = E.search_1n(norm, raw, 0.05)
    assert best.tolist() == [0, 1]
    assert score[0] == E.REFUSED and score[1] == pytest.approx(0.70)
    assert margin == pytest.approx([0.02, 0.40])
    # Normalisation can change which column is best; the margin uses raw scores of best and runner-up.
    norm2 = np.array([[1.0, 3.0, 0.0], [0.0, 1.0, 2.0]])
    best, score, margin = E.search_1n(norm2, raw, 0.0)
    assert best.tolist() == [1, 2] and score.tolist() == [3.0, 2.0]
    assert margin == pytest.approx([0.48 - 0.50, 0.30 - 0.70])
    assert E.search_1n(norm2, raw, 0.01)[1].tolist() == [E.REFUSED, E.REFUSED]


def test_fuse_standardises_then_weights():
    f = E.fuse([np.array([0.5]), np.array([0.9])], [0.25, 0.75], [0.1, 0.5], [0.2, 0.1])
    assert f[0] == pytest.approx(0.25 * 2.0 + 0.75 * 4.0)


def test_as_norm_matrix_equals_the_scalar_rule_of_edge_match():
    rng = np.random.default_rng(0)
    p_coh, e_coh = rng.normal(size=(3, 40)), rng.normal(size=(4, 40))
    raw = rng.normal(size=(3, 4))
    m = as_norm_matrix(raw, cohort_stats(p_coh, 10), cohort_stats(e_coh, 10))
    mu_e, sd_e = cohort_stats(e_coh, 10)
    for i in range(3):
        for j in range(4):
            assert m[i, j] == pytest.approx(as_norm(raw[i, j], p_coh[i], (mu_e[j], sd_e[j]), 10))


def _fake_lfw(tmp_path):
    """Obama (3 photos: gallery + 2 mated), Biden and the astronaut (one photo each: non-mated),
    a non-image file posing as a JPEG (failure to acquire), View 2 pairs in 2 folds."""
    root = tmp_path / "lfw"
    files = {"Obama_S": ["obama.jpg", "obama2.jpg", "obama3.jpg"], "Biden_S": ["biden.jpg"],
             "Astro_S": ["astronaut.png"]}
    for name, srcs in files.items():
        (root / "images" / name).mkdir(parents=True)
        for n, f in enumerate(srcs, 1):
            shutil.copy(sample(f), root / "images" / name / f"{name}_{n:04d}.jpg")
    (root / "images" / "Junk_S").mkdir()
    (root / "images" / "Junk_S" / "Junk_S_0001.jpg").write_bytes(b"not an image")
    (root / "pairs.txt").write_text("2\t1\nObama_S\t1\t2\nObama_S\t1\tBiden_S\t1\n"
                                    "Obama_S\t2\t3\nAstro_S\t1\tJunk_S\t1\n")
    return root


@pytest.fixture(scope="module")
def stack_parts():
    from edge.detect import load_detector
    from edge.embed import load_encoder

    det, enc = model_cards()
    return load_detector(det), load_encoder(enc), det, enc


def test_embed_folder_caches_and_rechecks_quality_without_reembedding(tmp_path, stack_parts, monkeypatch):
    det, enc, *_ = stack_parts
    root = _fake_lfw(tmp_path) / "images"
    keys = ["Obama_S/Obama_S_0001.jpg", "Biden_S/Biden_S_0001.jpg", "Junk_S/Junk_S_0001.jpg"]
    t = Emb.embed_folder(root, keys, det, enc, QualityConfig(), cache_dir=tmp_path / "c", progress=False)
    assert t.ok.tolist() == [True, True, False] and t.quality[2] == "no_face"
    assert np.allclose(np.linalg.norm(t.vec[:2], axis=1), 1, atol=1e-5)
    assert not np.allclose(t.vec[0], t.vec_flip[0])  # the mirror is a different view
    calls = []
    monkeypatch.setattr(enc, "embed_images", lambda crops, flip=None: calls.append(len(crops)))
    again = Emb.embed_folder(root, keys, det, enc, QualityConfig(), cache_dir=tmp_path / "c", progress=False)
    assert calls == [] and np.array_equal(again.vec, t.vec)
    strict = QualityConfig(min_face_px=1999)
    q = Emb.embed_folder(root, keys, det, enc, strict, cache_dir=tmp_path / "c", progress=False)
    assert calls == [] and q.quality.tolist() == ["too_small", "too_small", "no_face"]
    assert q.acquired(True).sum() == 0 and q.acquired(False).sum() == 2
    # Another run on part of the keys, with other quality settings, shares the cache file: the
    # records it does not judge must stay readable (and be judged again when asked for).
    Emb.embed_folder(root, keys[:1], det, enc, QualityConfig(), cache_dir=tmp_path / "c", progress=False)
    back = Emb.embed_folder(root, keys, det, enc, strict, cache_dir=tmp_path / "c", progress=False)
    assert calls == [] and back.quality.tolist() == ["too_small", "too_small", "no_face"]


def test_embed_folder_stores_both_views_whatever_the_encoders_flip(tmp_path, stack_parts):
    from edge.embed import load_encoder

    det, enc, _, enc_card = stack_parts
    root = _fake_lfw(tmp_path) / "images"
    keys = ["Obama_S/Obama_S_0001.jpg"]
    plain = Emb.embed_folder(root, keys, det, enc, QualityConfig(), progress=False)
    flipping = Emb.embed_folder(root, keys, det, load_encoder(enc_card, flip=True), QualityConfig(), progress=False)
    np.testing.assert_allclose(flipping.vec, plain.vec, atol=1e-6)
    np.testing.assert_allclose(flipping.vec_flip, plain.vec_flip, atol=1e-6)


def test_one_to_n_end_to_end_on_a_tiny_tree(tmp_path, stack_parts, capsys):
    _, _, det_card, enc_card = stack_parts
    root = _fake_lfw(tmp_path)
    out = tmp_path / "r.json"
    assert evaluation_cli(["one-to-n", "--lfw", str(root), "--encoder", enc_card, "--detector", det_card, "--flip",
                           "--cache-dir", str(tmp_path / "c"), "--json", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    row = r["rows"][0]
    assert r["acquisition"] == {"no_face": 1, "ok": 5}
    assert row["gallery"] == 1 and row["mated"] == 2 and row["nonmated"] == 3  # Astro, Biden, Junk
    assert row["rank1"] == 1.0  # one enrolled person: every acquired mated probe finds him
    assert row["failures_to_acquire"] == 1 and row["pairs_failed"] == 1
    assert "LFW" not in capsys.readouterr().err


def test_subset_keeps_every_nth_person_and_n_pairs_per_fold(tmp_path):
    from evaluation.lfw import lfw_pairs, one_to_n_split

    root = _fake_lfw(tmp_path)
    pairs, split = E.subset(lfw_pairs(root / "pairs.txt"), one_to_n_split(root), 2, 1)
    assert [(p.fold, p.same) for p in pairs] == [(0, True), (0, False), (1, True), (1, False)]
    assert list(split.gallery) == ["Obama_S"] and [n for n, _ in split.nonmated] == ["Astro_S", "Junk_S"]


def test_jittered_views_are_added_to_the_cache_and_reproducible(tmp_path, stack_parts):
    det, enc, *_ = stack_parts
    root = _fake_lfw(tmp_path) / "images"
    keys = ["Obama_S/Obama_S_0001.jpg", "Junk_S/Junk_S_0001.jpg"]
    base = Emb.embed_folder(root, keys, det, enc, QualityConfig(), cache_dir=tmp_path / "c", progress=False)
    one = Emb.embed_folder(root, keys, det, enc, QualityConfig(), jitter=1, cache_dir=tmp_path / "c", progress=False)
    two = Emb.embed_folder(root, keys, det, enc, QualityConfig(), jitter=2, cache_dir=tmp_path / "c", progress=False)
    fresh = Emb.embed_folder(root, keys, det, enc, QualityConfig(), jitter=2, progress=False)
    assert np.array_equal(base.vec, two.vec)
    assert np.allclose(one.jit[0], two.jit[0]) and np.allclose(two.jit, fresh.jit, atol=1e-5)
    assert 0.9 < float(two.jit[0, 0] @ two.vec[0]) < 0.99999  # a nearby, different view
    assert np.allclose(two.vectors(frames=3)[0], Emb.combine(two.vec, two.vec_flip, False, two.jit)[0])
    with pytest.raises(ValueError, match="jittered"):
        base.vectors(frames=2)


def test_our_alignment_is_the_opencv_zoo_aligncrop(stack_parts):
    """The 'template x1.0' row is the Zoo stack's alignment: cv2.FaceRecognizerSF.alignCrop warps
    to the same ArcFace template; the crops differ by at most one grey level from rounding."""
    import cv2

    from edge.imageio import load_image

    det, enc, *_ = stack_parts
    if enc.card.alignment.size != (112, 112):
        pytest.skip("the encoder is not a 112 px ArcFace-template encoder")
    zoo_model = MODELS / "raw" / "sface_2021dec_int8bq.onnx"  # the Zoo's own file; alignCrop does not use it
    if not zoo_model.is_file():
        pytest.skip(f"{zoo_model} is missing: run `python -m export fetch`")
    zoo = cv2.FaceRecognizerSF.create(str(zoo_model), "")
    for name in ("obama.jpg", "biden.jpg"):
        img = load_image(sample(name))
        d = det.detect(img)[0]
        theirs = zoo.alignCrop(img, np.array([[*d.box, *d.keypoints.ravel(), d.score]], np.float32))
        ours = enc.align(img, d).image
        assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_enrollment_flip_applies_to_references_and_member_flip_to_both_sides():
    rng = np.random.default_rng(3)
    vec, mir = _unit(rng.normal(size=(3, 4))), _unit(rng.normal(size=(3, 4)))
    keys = ["a/1", "b/1", "c/1"]
    t = Emb.Table(keys=keys, ok=np.ones(3, bool), vec=vec, vec_flip=mir, quality=np.array(["ok"] * 3))
    both = _unit(vec + mir)
    s, _ = E.score_matrices([E.Member(t)], E.Scoring(gallery_flip=True), ["a/1"], ["b/1", "c/1"])
    np.testing.assert_allclose(s, vec[:1] @ both[1:].T, atol=1e-6)  # door face as is, enrolled mirrored
    s, _ = E.score_matrices([E.Member(t, flip=True)], E.Scoring(), ["a/1"], ["b/1", "c/1"])
    np.testing.assert_allclose(s, both[:1] @ both[1:].T, atol=1e-6)
    # A fusion member the recipe mirrors enters the fused table as the mean of its two views.
    f = Emb._fused_table([t, t], [1.0, 1.0], [False, True])
    np.testing.assert_allclose(f.vec, _unit(np.concatenate([vec, both], axis=1)), atol=1e-6)
    np.testing.assert_allclose(f.vec_flip, _unit(np.concatenate([mir, both], axis=1)), atol=1e-6)


def test_impostor_table_with_enrolled_views_scores_door_against_enrolled():
    from export.calibrate import impostor_table

    rng = np.random.default_rng(4)
    door, enrolled = _unit(rng.normal(size=(40, 8))), _unit(rng.normal(size=(40, 8)))
    ids = [f"p{i // 2}" for i in range(40)]
    same = impostor_table(door, ids)
    cross = impostor_table(door, ids, refs=enrolled)
    assert same["impostor_pairs"] == cross["impostor_pairs"] == 40 * 39 // 2 - 20
    assert cross["threshold"] != same["threshold"]
    assert impostor_table(door, ids, refs=door) == same


def test_oracle_fnir_by_hand():
    non = np.array([0.9, 0.5, np.nan])  # the NaN stranger was not acquired: never let in
    mated, hit = np.array([0.95, 0.6, 0.85]), np.array([True, True, False])  # the third found someone else
    assert E.oracle_fnir(non, mated, hit, 0) == pytest.approx(2 / 3)  # above 0.9: only 0.95 is accepted
    assert E.oracle_fnir(non, mated, hit, 1) == pytest.approx(1 / 3)  # above 0.5: 0.95 and 0.6
    assert E.oracle_fnir(non, mated, hit, 2) == pytest.approx(1 / 3)  # every threshold: the wrong identity stays a miss


def _tiny_protocol(n_people=6, n_strangers=3, dim=8):
    """Enrolled p0..p5 (photo 1 enrolled, photo 2 a mated probe near it) and strangers x0..x2."""
    from pathlib import Path

    from evaluation.lfw import OneToNSplit

    rng = np.random.default_rng(5)
    base = _unit(rng.normal(size=(n_people, dim)))
    keys = [f"p{i}/p{i}_1.jpg" for i in range(n_people)] + [f"p{i}/p{i}_2.jpg" for i in range(n_people)] \
        + [f"x{j}/x{j}_1.jpg" for j in range(n_strangers)]
    vec = np.concatenate([base, _unit(base + 0.3 * rng.normal(size=base.shape)), _unit(rng.normal(size=(n_strangers, dim)))])
    t = Emb.Table(keys=keys, ok=np.ones(len(keys), bool), vec=vec.astype(np.float32), vec_flip=vec.astype(np.float32),
                  quality=np.array(["ok"] * len(keys)))
    split = OneToNSplit({f"p{i}": Path(f"p{i}/p{i}_1.jpg") for i in range(n_people)},
                        [(f"p{i}", Path(f"p{i}/p{i}_2.jpg")) for i in range(n_people)],
                        [(f"x{j}", Path(f"x{j}/x{j}_1.jpg")) for j in range(n_strangers)])
    return [E.Member(t)], E.Scoring(), split, base


def test_the_gate_s_own_threshold_on_random_galleries_counts_people_left_out_as_strangers():
    from edge.config import MatchConfig
    from edge.threshold import operating_points

    members, s, split, base = _tiny_protocol()
    table = ([1e-1, 1e-2, 1e-3], [0.5, 0.7, 0.9])
    runs = E.gate_threshold_runs(members, s, split, table, 0.0, None, ks=(4, 6), targets=(0.05,), draws=3)
    small, full = [r for r in runs if r["K"] == 4], [r for r in runs if r["K"] == 6]
    assert len(small) == 3 and len(full) == 1
    assert all(r["nonmated"] == 3 + 2 and r["mated"] == 4 for r in small)  # two people's probes left out
    assert full[0]["nonmated"] == 3 and full[0]["mated"] == 6
    # the full gallery's threshold is the gate's own, from the enrolled vectors alone
    want = operating_points(MatchConfig(target_fpir=0.05), table, base.astype(np.float32))[0].threshold
    assert full[0]["threshold"] == pytest.approx(want, rel=1e-6) and full[0]["source"] == "gallery + card prior"
    probes = np.concatenate([_unit(base)[:0], members[0].table.vec[12:]])
    fp = int(((probes @ base.T).max(1) >= full[0]["threshold"]).sum())
    assert full[0]["false_positives"] == fp and full[0]["measured_fpir"] == fp / 3
    card = E.gate_threshold_runs(members, s, split, table, 0.0, None, "card", ks=(6,), targets=(0.05,))
    assert card[0]["source"] == "card table" and card[0]["threshold"] != full[0]["threshold"]


def test_the_summary_interval_is_the_wider_of_the_draws_and_the_pooled_count():
    from evaluation.metrics import wilson

    rows = [{"K": 10, "target_fpir": 0.01, "threshold": 0.8, "measured_fpir": f, "false_positives": fp, "nonmated": 1000,
             "fnir": 0.1, "oracle_fnir_at_measured": 0.1, "oracle_fnir_at_target": 0.09} for f, fp in ((0.006, 6), (0.008, 8))]
    (c,) = E.summarize_gate_runs(rows)
    lo, hi = wilson(14, 2000)
    half = 12.706 * np.std([0.006, 0.008], ddof=1) / np.sqrt(2)  # t(0.975, 1 dof)
    assert c["measured_fpir"] == pytest.approx(0.007) and c["ci95"][1] == pytest.approx(max(hi, 0.007 + half), rel=1e-3)
    assert c["ratio"] == pytest.approx(0.7) and not c["within"]  # the upper bound (the draws disagree) passes 1.5x
    # 10 expected per draw: a gate at exactly the target would show an upper bound of 1.83x
    assert c["too_few_to_tell"] and wilson(10, 1000)[1] > 0.015
    one = E.summarize_gate_runs(rows[:1])[0]
    assert one["ci95"] == pytest.approx(list(wilson(6, 1000))) and one["within"]  # 0.6x, upper 0.0130 <= 0.015
    # 40 expected per draw: exactly the target would show 1.36x, so the count can tell
    big = [{**r, "nonmated": 4000, "false_positives": 4 * r["false_positives"]} for r in rows]
    assert not E.summarize_gate_runs(big)[0]["too_few_to_tell"] and wilson(40, 4000)[1] < 0.015
