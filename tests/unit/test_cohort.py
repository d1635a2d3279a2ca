"""export/cohort.py and edge/cohort.py: the identity split, the FMR table, the dev 1:N used to
choose top-k, and the cohort file (no pickle, bound to its encoder)."""
import io

import numpy as np
import pytest

from edge.cohort import load_cohort
from edge.errors import ModelError
from export import cohort as C


def test_split_alternates_sorted_identities_and_needs_four():
    a, b = C.split_identities(["d", "a", "c", "b", "a", "e"])
    assert a == {"a", "c", "e"} and b == {"b", "d"}
    with pytest.raises(ValueError):
        C.split_identities(["a", "b", "c"])


def test_fmr_table_counts_scores_at_or_above_each_threshold():
    imp = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    fmr, thr = C.fmr_table(imp, grid=[0.5, 0.1, 0.01])
    # 0.01 * 10 < 1 pair: dropped; ascending thresholds
    assert thr == [0.6, 1.0] and fmr == [0.5, 0.1]


def test_pair_masks_are_upper_triangle_by_identity():
    ids = np.array(["x", "x", "y"])
    assert C.impostor_mask(ids).sum() == 2 and C.genuine_mask(ids).sum() == 1
    assert not C.impostor_mask(ids)[1, 0]


def test_dev_open_set_fnir_by_hand():
    # people a, b, c, d: enrolled = a, c (first images 0 and 3); mated probes 1, 2 (a), 4 (c);
    # non-mated: 5 (b), 6 (d).
    ids = np.array(["a", "a", "a", "c", "c", "b", "d"])
    s = np.full((7, 7), 0.0)
    s[1, 0], s[2, 0], s[4, 3] = 0.9, 0.4, 0.8   # mated probes' own scores
    s[2, 3] = 0.5                               # probe 2 prefers c: a wrong identity
    s[5, 0], s[6, 3] = 0.3, 0.1                 # strangers' best scores
    # FPIR 0.5 of 2 strangers: one may pass, threshold just above 0.1: hits 1 (0.9), 4 (0.8); 2 is wrong
    assert C.dev_open_set_fnir(s, ids, 0.5) == pytest.approx(1 / 3)


def _write(path, sha="a" * 64, k=2):
    arrays = {"encoder_sha256": np.asarray(sha), "dataset": np.asarray("test")}
    for mode in ("plain", "flip"):
        arrays.update({f"{mode}_vectors": np.eye(3, 4, dtype=np.float32), f"{mode}_top_k": np.asarray(k),
                       f"{mode}_fmr": np.asarray([0.1, 0.01]), f"{mode}_threshold": np.asarray([1.0, 2.0]),
                       f"{mode}_raw_fmr": np.asarray([0.1, 0.01]), f"{mode}_raw_threshold": np.asarray([0.3, 0.5]),
                       f"{mode}_impostor_mean": np.asarray(0.0), f"{mode}_impostor_std": np.asarray(0.1)})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def test_cohort_file_round_trip_and_refusals(tmp_path):
    p = tmp_path / "m.cohort.npz"
    _write(p)
    c = load_cohort(p, "a" * 64, flip=True)
    assert c.top_k == 2 and c.flip and c.raw_threshold == (0.3, 0.5)
    mu, sd = c.stats(np.array([[1.0, 0, 0, 0]], np.float32))  # scores 1, 0, 0 -> top-2 = 1, 0
    assert mu[0] == pytest.approx(0.5) and sd[0] == pytest.approx(0.5)
    with pytest.raises(ModelError, match="another encoder"):
        load_cohort(p, "b" * 64)
    _write(p, k=9)
    with pytest.raises(ModelError, match="top_k"):
        load_cohort(p)
    p.write_bytes(b"junk")
    with pytest.raises(ModelError, match="not a valid cohort"):
        load_cohort(p)
    with pytest.raises(ModelError, match="not found"):
        load_cohort(tmp_path / "none.npz")


def test_object_arrays_are_refused_not_unpickled(tmp_path):
    p = tmp_path / "evil.cohort.npz"
    np.savez(p, encoder_sha256=np.asarray([{"x": 1}], dtype=object))
    with pytest.raises(ModelError):
        load_cohort(p)


def test_duplicate_labels_are_not_counted_as_impostors():
    # a and b are one person (same direction), c is someone else; two images each.
    v = np.array([[1, 0], [0.995, 0.0998], [0.995, -0.0998], [0.98, 0.199], [0, 1], [0.0998, 0.995]], np.float64)
    ids = np.array(["a", "a", "b", "b", "c", "c"])
    # genuine means: a 0.995, b 0.955, c 0.995 -> 10th percentile 0.963;
    # a x b pairs: 0.995, 0.98, 0.980, 0.995 -> mean 0.9875 (a x c and b x c are near 0.1)
    assert C.duplicate_identities(v, ids) == [("a", "b", pytest.approx(0.9875, abs=0.001))]
    m = C.clean_impostor_mask(v, ids)
    assert m.sum() == 8 and not m[0, 2] and not m[1, 3] and m[0, 4]


def test_a_common_offset_does_not_make_everyone_one_person():
    # dlib-like embeddings: a large shared component makes any two people score ~0.9 raw.
    rng = np.random.default_rng(0)
    people = rng.normal(0, 1, (20, 128))
    v = np.repeat(people, 3, axis=0) + rng.normal(0, 0.3, (60, 128)) + 5.0
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.repeat([f"p{i}" for i in range(20)], 3)
    assert (v[0] @ v[3]) > 0.9  # raw cosine of two different people
    assert C.duplicate_identities(v, ids) == []


def _clusters(seed: int, people: int = 12, each: int = 4, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, 16))
    v = np.repeat(centres, each, axis=0) + noise * rng.normal(size=(people * each, 16))
    return v / np.linalg.norm(v, axis=1, keepdims=True), np.repeat([f"p{i}" for i in range(people)], each)


def test_fusion_weight_within_one_standard_error_goes_to_equal_weighting():
    v, ids = _clusters(0)
    w, tar, _ = C.best_fusion_weight(v, v.copy(), ids)  # two copies of one encoder: every weight ties
    assert w == 0.5 and tar > 0
    noise = np.random.default_rng(1).normal(size=v.shape)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    w, tar, _ = C.best_fusion_weight(v, noise, ids)  # b knows nobody
    assert w > 0.5 and tar == C.best_fusion_weight(v, v.copy(), ids)[1]
    # Enrolled views default to the door's: passing them explicitly changes nothing.
    assert C.best_fusion_weight(v, noise, ids, v, noise)[0] == w
