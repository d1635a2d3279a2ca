"""The impostor-score table the gate's threshold-from-K rule reads (export/calibrate.py)."""
import numpy as np

from edge.match import threshold_for_fmr
from export.calibrate import impostor_table


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
