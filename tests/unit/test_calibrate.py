"""The impostor-score table the gate's threshold-from-K rule reads (export/calibrate.py)."""
import numpy as np
import pytest

from edge.errors import FacegateError
from edge.match import threshold_for_fmr
from export.calibrate import (delivered_fpir, gallery_shift, impostor_table, label_errors, simulated_galleries,
                              stranger_tail)


def test_empirical_part_matches_hand_counts():
    # 4 unit vectors at known angles, all different identities: 6 impostor pairs.
    ang = np.radians([0, 60, 90, 180])
    v = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
    t = impostor_table(v, ["a", "b", "c", "d"], grid=[0.5, 1 / 6 + 1e-9, 0.34, 0.49, 0.9, 1.0])
    # cosines: 0.5, 0, -1, 0.5, -0.5, 0 -> sorted -1, -0.5, 0, 0, 0.5, 0.5
    assert t["impostor_pairs"] == 6
    thr = dict(zip(np.round(t["fmr"], 4), np.round(t["threshold"], 4)))
    assert thr[round(2 / 6, 4)] == 0.5  # two pairs at >= 0.5
    assert thr[round(4 / 6, 4)] == 0.0  # four pairs at >= 0.0


def test_same_identity_pairs_are_not_impostors():
    v = np.eye(3, dtype=np.float32)
    v[1] = v[0]  # the same face twice under one identity: cosine 1 but a genuine pair
    t = impostor_table(v, ["a", "a", "b"], grid=[0.5, 1.0])
    assert t["impostor_pairs"] == 2 and max(t["threshold"]) == 0.0


def test_rare_fmr_comes_from_the_tail_fit_not_from_label_noise():
    rng = np.random.default_rng(0)
    n = 3000
    v = rng.normal(size=(n, 64)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [str(i) for i in range(n)]
    # label noise: five people enrolled twice under different ids (near-identical vectors)
    for i in range(5):
        v[n - 1 - i] = v[i] + 0.01 * rng.normal(size=64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    t = impostor_table(v, ids)
    rare = threshold_for_fmr(t["fmr"], t["threshold"], 1e-6)
    assert rare < 0.9  # the duplicates (cosine ~1) do not set the rare-FMR threshold
    assert np.all(np.diff(t["threshold"]) >= 0) and np.all(np.diff(t["fmr"]) <= 1e-12)
    # continuing the fitted line beyond its range keeps ordering with the empirical part
    assert rare > threshold_for_fmr(t["fmr"], t["threshold"], 1e-4)


def _identities(n_people: int, photos: int, dim: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_people, dim))
    v = np.repeat(centres, photos, 0) + noise * np.sqrt(dim) * rng.normal(size=(n_people * photos, dim)) / np.sqrt(dim)
    ids = [f"p{i:03d}" for i in range(n_people) for _ in range(photos)]
    return v, ids


def _unit(v):
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_a_shared_photo_or_a_person_under_two_names_is_a_label_error():
    v, ids = _identities(6, 3, 64, 0.3)
    v[3] = v[0]  # p001's first photo is p000's first photo
    v[9:12] = v[0:3] + 0.3 * np.random.default_rng(1).normal(size=(3, 64))  # p003 is p000 again
    v = _unit(v)
    assert label_errors(v, v, ids) == ["p001", "p003"]  # the earlier name of each pair is kept
    assert label_errors(_unit(_identities(6, 3, 64, 0.3)[0]), _unit(_identities(6, 3, 64, 0.3)[0]), ids) == []


def test_the_stranger_tail_shape_is_chosen_where_the_gate_delivers_the_asked_fpir():
    """Random identities score against strangers with a Gaussian tail, lighter than the exponential:
    read as exponential the gate's own threshold is far too strict at the rarer targets; the chosen
    shape brings every target nearer the asked FPIR, and label errors are left out first."""
    door, ids = _identities(260, 3, 24, 0.5)
    door[-3:] = door[:3] + 0.05  # the last person is the first under another name
    door = _unit(door)
    table = impostor_table(door, ids)
    fit = stranger_tail(door, door, ids, (table["fmr"], table["threshold"]), draws=10, say=lambda *_: None)
    assert fit["left_out"] == ["p259"] and fit["tail_shape"] > 0
    keep = np.array([i != "p259" for i in ids])
    sims = simulated_galleries(door[keep], door[keep], list(np.array(ids)[keep]), draws=10, seed=1)
    chosen = delivered_fpir(sims, fit["tail_shape"], gallery_shift(sims, fit["tail_shape"]), (table["fmr"], table["threshold"]))
    exponential = delivered_fpir(sims, 0.0, gallery_shift(sims, 0.0), (table["fmr"], table["threshold"]))
    assert np.all(np.abs(np.log(chosen[:, 0])) < np.abs(np.log(exponential[:, 0])))


def test_a_small_set_falls_back_to_the_exponential_tail_and_a_tiny_one_is_refused():
    door, ids = _identities(20, 2, 16, 0.5)
    door = _unit(door)
    table = impostor_table(door, ids)
    fit = stranger_tail(door, door, ids, (table["fmr"], table["threshold"]), draws=5, say=lambda *_: None)
    assert fit["tail_shape"] == 0.0 and np.isfinite(fit["gallery_shift"])
    with pytest.raises(FacegateError, match="too few identities"):
        stranger_tail(door[:10], door[:10], ids[:10], (table["fmr"], table["threshold"]))
