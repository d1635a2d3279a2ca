"""evaluation/metrics.py, evaluation/lfw.py, evaluation/plots.py against hand-computed cases."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from evaluation import metrics as m
from edge.errors import FacegateError
from evaluation.lfw import image_path, lfw_pairs, one_to_n_split

NAN = float("nan")
GEN = [0.9, 0.8, 0.6, 0.4]
IMP = [0.7, 0.5, 0.3, 0.1]
LFW = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lfw"


def test_roc_points_by_hand():
    far, tar, t = m.roc(GEN, IMP)
    assert t[0] == np.inf
    np.testing.assert_allclose(t[1:], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1])
    np.testing.assert_allclose(tar, [0, .25, .5, .5, .75, .75, 1, 1, 1])
    np.testing.assert_allclose(far, [0, 0, 0, .25, .25, .5, .5, .75, 1])
    far_d, frr, _ = m.det_points(GEN, IMP)
    np.testing.assert_allclose(frr, 1 - tar)


def test_eer_exact_crossing_and_interpolated():
    # GEN/IMP: at t = 0.6 FAR = FRR = 0.25 exactly.
    assert m.eer(GEN, IMP) == pytest.approx(0.25)
    # (far, frr) goes (0, 1/3) -> (0.5, 1/3): the line crosses far = frr at 1/3.
    assert m.eer([0.9, 0.8, 0.5], [0.6, 0.2]) == pytest.approx(1 / 3)


def test_perfectly_separable():
    assert m.eer([0.9, 0.8], [0.1, 0.2]) == 0.0
    assert m.tar_at_far([0.9, 0.8], [0.1, 0.2], 0.0) == 1.0


def test_tar_at_far_by_hand():
    # one impostor of four may pass at FAR 0.25: threshold just above 0.5
    assert m.tar_at_far(GEN, IMP, 0.25) == 0.75
    assert m.tar_at_far(GEN, IMP, 0.2) == 0.5  # floor(0.8) = 0 impostors may pass: above 0.7
    assert m.tar_at_far(GEN, IMP, 0.0) == 0.5
    assert m.tar_at_far(GEN, IMP, 1.0) == 1.0


def test_threshold_at_far_never_exceeds_target_on_ties():
    imp = [0.5, 0.5, 0.5, 0.1]
    t = m.threshold_at_far(imp, 0.25)
    assert t > 0.5 and m.share_at_least(imp, [t])[0] == 0.0
    # 0.001 * 3000 is 3 allowed passes, not 2 (floating point slack)
    imp = np.linspace(0, 1, 3000)
    t = m.threshold_at_far(imp, 0.001)
    assert m.share_at_least(imp, [t])[0] == pytest.approx(0.001)


def test_nan_is_a_miss_and_a_non_match():
    gen, imp = [0.9, NAN], [0.1, NAN]
    far, tar, _ = m.roc(gen, imp)
    assert tar[-1] == 0.5 and far[-1] == 0.5  # denominators keep the failures
    assert m.tar_at_far(gen, imp, 0.0) == 0.5
    with pytest.raises(ValueError):
        m.roc([np.inf], [0.0])


def test_kfold_by_hand():
    # fold 0: .9 same, .2 diff, NaN diff; fold 1: .8 same, .35 diff; fold 2: .4 same, .6 diff
    s = [0.9, 0.2, NAN, 0.8, 0.35, 0.4, 0.6]
    y = [1, 0, 0, 1, 0, 1, 0]
    f = [0, 0, 0, 1, 1, 2, 2]
    r = m.kfold_verification(s, y, f)
    # test fold 0, train {.8S .35D .4S .6D}: midpoints .375 and .7 both get 3 of 4: lowest, .375
    # test fold 1, train {.9S .2D .4S .6D}: .3 and .75 tie: .3; then .35D >= .3 is judged same
    # test fold 2, train {.9S .2D .8S .35D}: .575 gets 4 of 4; both test pairs wrong
    np.testing.assert_allclose(r.thresholds, [0.375, 0.3, 0.575])
    # the NaN pair is wrong although "different" is its label
    np.testing.assert_allclose(r.accuracies, [2 / 3, 0.5, 0.0])
    assert r.mean == pytest.approx((2 / 3 + 0.5) / 3)
    assert r.std == pytest.approx(np.std([2 / 3, 0.5, 0.0]))
    assert r.failures == 1


def test_best_threshold_edges():
    # all training pairs genuine: the candidate below the lowest score accepts them all
    assert m.best_threshold([0.3, 0.5], [1, 1]) < 0.3
    assert m.best_threshold([0.3, 0.5], [0, 0]) > 0.5
    with pytest.raises(ValueError):
        m.best_threshold([NAN], [1])


def test_open_set_1n_by_hand():
    ids = ["A", "B", "C", None]
    scores = [0.9, 0.8, 0.5, NAN]  # hit, wrong identity, hit, failure to acquire
    true = ["A", "A", "C", "B"]
    non = [0.85, 0.6, 0.4, 0.3, NAN]
    r = m.open_set_1n(ids, scores, true, non, fpirs=(0.0, 0.2, 0.4, 1.0))
    assert r.rank1 == 0.5
    assert r.mated_failures == 1 and r.nonmated_failures == 1
    # FPIR 0.2: one of five non-mated may pass: threshold just above 0.6; only A@0.9 is a hit
    assert r.thresholds[0.2] > 0.6 and r.fpir[0.2] == pytest.approx(0.2)
    assert r.fnir[0.2] == pytest.approx(0.75)
    # FPIR 0.4: threshold just above 0.4: hits A@0.9 and C@0.5; the wrong identity at 0.8 never counts
    assert r.fnir[0.4] == pytest.approx(0.5) and r.fpir[0.4] == pytest.approx(0.4)
    assert r.fnir[0.0] == pytest.approx(0.75) and r.fpir[0.0] == 0.0
    # everything acquired passes; the NaN non-mated probe still does not
    assert r.fnir[1.0] == pytest.approx(0.5) and r.fpir[1.0] == pytest.approx(0.8)
    assert r.curve_fnir[0] == 1.0 and r.curve_fpir[0] == 0.0
    assert np.all(np.diff(r.curve_fpir) >= 0) and np.all(np.diff(r.curve_fnir) <= 0)


def test_lfw_pairs_parse(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("2\t1\nAl_B\t1\t3\nAl_B\t1\tCy_D\t2\nCy_D\t1\t2\nAl_B\t2\tEd_F\t1\n")
    pairs = lfw_pairs(p)
    assert [(x.fold, x.same) for x in pairs] == [(0, True), (0, False), (1, True), (1, False)]
    assert pairs[1].name2 == "Cy_D" and pairs[1].n2 == 2 and pairs[0].name2 == "Al_B"
    assert image_path("/r", "Al_B", 3) == Path("/r/images/Al_B/Al_B_0003.jpg")
    p.write_text("2\t1\nAl_B\t1\t3\nAl_B\t1\t3\nCy_D\t1\t2\nAl_B\t2\tEd_F\t1\n")
    with pytest.raises(FacegateError, match="line 3"):
        lfw_pairs(p)
    p.write_text("2\t1\nAl_B\t1\t3\n")
    with pytest.raises(FacegateError, match="header promises 5"):
        lfw_pairs(p)


def test_one_to_n_split_tiny(tmp_path):
    for name, n in [("Al_B", 3), ("Cy_D", 1), ("Ed_F", 2)]:
        d = tmp_path / "images" / name
        d.mkdir(parents=True)
        for i in range(1, n + 1):
            (d / f"{name}_{i:04d}.jpg").write_bytes(b"x")
    s = one_to_n_split(tmp_path)
    assert sorted(s.gallery) == ["Al_B", "Ed_F"]
    assert [(n, p.name) for n, p in s.mated] == [("Al_B", "Al_B_0002.jpg"), ("Al_B", "Al_B_0003.jpg"), ("Ed_F", "Ed_F_0002.jpg")]
    assert [n for n, _ in s.nonmated] == ["Cy_D"]
    (tmp_path / "images" / "Ed_F" / "Ed_F_0001.jpg").unlink()
    with pytest.raises(FacegateError, match="Ed_F_0001"):
        one_to_n_split(tmp_path)


@pytest.mark.skipif(not LFW.is_dir(), reason="../shared/data/lfw not present")
def test_real_lfw_protocol_counts():
    pairs = lfw_pairs(LFW / "pairs.txt")
    assert len(pairs) == 6000 and sum(p.same for p in pairs) == 3000
    assert np.bincount([p.fold for p in pairs]).tolist() == [600] * 10
    s = one_to_n_split(LFW)
    assert (len(s.gallery), len(s.mated), len(s.nonmated)) == (1680, 7484, 4069)


def test_plots(tmp_path):
    from evaluation import plots

    far, frr, _ = m.det_points(GEN, IMP)
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(RuntimeError, match="matplotlib"):
            plots.det_plot({"x": (far, frr)}, tmp_path / "det.png")
        return
    out = plots.det_plot({"x": (far, frr)}, tmp_path / "det.png", marks={"FPIR 0.003": 0.003})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    far, tar, _ = m.roc(GEN, IMP)
    assert plots.roc_plot({"x": (far, tar)}, tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_pair_scores_and_identify_by_hand():
    from evaluation.lfw import OneToNSplit, Pair, identify, pair_scores, rel

    v = {rel("A", 1): np.array([1.0, 0.0]), rel("A", 2): np.array([0.6, 0.8]), rel("A", 3): None,
         rel("B", 1): np.array([0.0, 1.0]), rel("C", 1): None, rel("C", 2): np.array([1.0, 0.0]),
         rel("D", 1): np.array([0.8, 0.6])}
    pairs = [Pair(0, True, "A", 1, "A", 2), Pair(0, False, "A", 1, "B", 1), Pair(1, True, "A", 1, "A", 3)]
    s, y, f = pair_scores(pairs, v)
    np.testing.assert_allclose(s, [0.6, 0.0, NAN])
    assert y.tolist() == [True, False, True] and f.tolist() == [0, 0, 1]
    img = lambda n, k: Path(f"/x/images/{n}/{n}_{k:04d}.jpg")  # noqa: E731
    # C's enrollment photo was not acquired: C is not enrolled, so C_0002 can only miss
    split = OneToNSplit(
        gallery={"A": img("A", 1), "C": img("C", 1)},
        mated=[("A", img("A", 2)), ("A", img("A", 3)), ("C", img("C", 2))],
        nonmated=[("B", img("B", 1)), ("D", img("D", 1))])
    ids, ms, true, ns = identify(split, v)
    assert ids == ["A", None, "A"] and true == ["A", "A", "C"]
    np.testing.assert_allclose(ms, [0.6, NAN, 1.0])
    np.testing.assert_allclose(ns, [0.0, 0.8])
    r = m.open_set_1n(ids, ms, true, ns, fpirs=(0.5,))
    assert r.rank1 == pytest.approx(1 / 3)
