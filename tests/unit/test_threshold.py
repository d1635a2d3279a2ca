"""The gate's own threshold (edge/threshold.py) on hand-made score sets."""
import math

import numpy as np
import pytest

from edge.config import MAX_TARGET_FPIR, Config
from edge.threshold import (OperatingPoint, TailModel, blend, extreme_value_lmoments, gallery_tail, leave_one_out_maxima,
                            operating_points, tail_distance, tail_from_maxima, tail_from_table, tail_share)


def test_tail_fpir_and_threshold_by_hand():
    tail = TailModel(a=0.5, beta=0.1)
    # 10 comparisons at 0.8: rate 10 e^-3 = 0.497871, FPIR 1 - e^-rate
    assert tail.fpir(0.8, 10) == pytest.approx(1 - math.exp(-10 * math.exp(-3)), rel=1e-12)
    # and back: t = a + beta ln(K / -ln(1 - p))
    assert tail.threshold(tail.fpir(0.8, 10), 10) == pytest.approx(0.8, abs=1e-12)
    assert tail.threshold(0.01, 100) == pytest.approx(0.5 + 0.1 * math.log(100 / -math.log(0.99)), abs=1e-12)
    # ten times the people: the same FPIR needs the threshold beta ln 10 higher
    assert tail.threshold(0.003, 1000) - tail.threshold(0.003, 100) == pytest.approx(0.1 * math.log(10), abs=1e-12)
    with pytest.raises(ValueError):
        tail.threshold(0.0, 10)


def test_gumbel_l_moments_by_hand():
    # 1, 2, 3, 4: b0 = 2.5, b1 = (0 + 2/3 + 2 + 4) / 4 = 5/3, l2 = 2 b1 - b0 = 5/6
    mu, beta = extreme_value_lmoments(np.array([4.0, 1.0, 3.0, 2.0]))
    assert beta == pytest.approx((5 / 6) / math.log(2), rel=1e-12)
    assert mu == pytest.approx(2.5 - 0.5772156649015329 * beta, rel=1e-12)
    with pytest.raises(ValueError, match="at least 3"):
        extreme_value_lmoments(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="spread"):
        extreme_value_lmoments(np.ones(10))


def test_a_bounded_tail_by_hand():
    # k = 0.5, z = 1: (1 - 0.5) ** 2 = 0.25, and back; past the end (z > 1 / k) no stranger scores
    assert tail_share(1.0, 0.5) == pytest.approx(0.25, rel=1e-12)
    assert tail_distance(0.25, 0.5) == pytest.approx(1.0, rel=1e-12)
    assert tail_share(2.5, 0.5) == 0.0
    # the exponential is the limit k -> 0
    assert tail_share(1.3, 1e-9) == pytest.approx(math.exp(-1.3), rel=1e-6)
    assert tail_distance(0.01, 1e-9) == pytest.approx(-math.log(0.01), rel=1e-6)
    tail = TailModel(a=0.5, beta=0.1, shape=0.5)
    # 10 comparisons at 0.6: each 0.25, rate 2.5
    assert tail.fpir(0.6, 10) == pytest.approx(1 - math.exp(-2.5), rel=1e-12)
    assert tail.threshold(tail.fpir(0.6, 10), 10) == pytest.approx(0.6, abs=1e-12)
    # a bounded tail climbs less with K than the exponential's beta ln 10 per tenfold
    steep = TailModel(0.5, 0.1).threshold(0.003, 1000) - TailModel(0.5, 0.1).threshold(0.003, 100)
    assert tail.threshold(0.003, 1000) - tail.threshold(0.003, 100) < steep


def test_gumbel_fit_recovers_a_gumbel_sample():
    x = np.random.default_rng(0).gumbel(0.7, 0.02, size=20000)
    mu, beta = extreme_value_lmoments(x)
    assert mu == pytest.approx(0.7, abs=0.001) and beta == pytest.approx(0.02, rel=0.03)


def test_maxima_of_an_exponential_tail_give_back_its_parameters():
    """Scores a + beta * Exp(1) have exactly P(s >= t) = exp(-(t - a) / beta); the maximum of m of
    them is Gumbel with location a + beta ln m, so the per-comparison tail comes back."""
    rng = np.random.default_rng(1)
    m = 200
    maxima = (0.3 + 0.05 * rng.exponential(size=(5000, m))).max(1)
    tail = tail_from_maxima(maxima, m)
    assert tail.a == pytest.approx(0.3, abs=0.003) and tail.beta == pytest.approx(0.05, rel=0.03)


def test_extreme_value_fit_at_a_given_shape_recovers_its_sample():
    u = np.random.default_rng(3).uniform(size=40000)
    k, mu, scale = 0.2, 0.7, 0.02
    x = mu + scale * (1 - (-np.log(u)) ** k) / k  # inverse of the GEV's distribution function
    m, s = extreme_value_lmoments(x, k)
    assert m == pytest.approx(mu, abs=0.0005) and s == pytest.approx(scale, rel=0.03)


def test_maxima_of_a_bounded_tail_give_back_its_parameters():
    """Scores a + beta (1 - U^k) / k have exactly P(s >= t) = (1 - k (t - a) / beta) ** (1 / k); the
    maximum of m of them is an extreme value of shape k, and the per-comparison tail comes back."""
    rng = np.random.default_rng(4)
    m, k = 200, 0.15
    maxima = (0.3 + 0.05 * (1 - rng.uniform(size=(5000, m)) ** k) / k).max(1)
    tail = tail_from_maxima(maxima, m, k)
    assert tail.shape == k and tail.a == pytest.approx(0.3, abs=0.004) and tail.beta == pytest.approx(0.05, rel=0.04)
    # read as exponential, the same maxima extrapolate a heavier tail: stricter at rarer targets
    assert tail_from_maxima(maxima, m).threshold(0.001, 1000) > tail.threshold(0.001, 1000)


def test_tail_from_a_log_linear_table_is_exact():
    thr = [0.2, 0.3, 0.4, 0.5, 0.6]
    fmr = [math.exp(-(t - 0.1) / 0.05) for t in thr]  # a = 0.1, beta = 0.05; 0.2 is FMR 0.135, outside the fit
    tail = tail_from_table(fmr, thr)
    assert tail.a == pytest.approx(0.1, abs=1e-9) and tail.beta == pytest.approx(0.05, rel=1e-9)
    short = tail_from_table([0.5, 0.05], [0.1, 0.2])  # none in 1e-6..1e-2: the whole table
    assert short.beta == pytest.approx(0.1 / math.log(10)) and math.exp(-(0.2 - short.a) / short.beta) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="fewer than 2"):
        tail_from_table([1.0, 0.1], [0.1, 0.2])


def test_tail_from_a_bounded_table_is_exact_at_its_shape():
    thr = [0.15, 0.2, 0.25, 0.3]
    fmr = [(1 - 0.2 * (t - 0.1) / 0.05) ** 5 for t in thr]  # a = 0.1, beta = 0.05, k = 0.2: the tail ends at 0.35
    tail = tail_from_table(fmr, thr, fmr_range=(1e-9, 0.5), shape=0.2)
    assert tail.a == pytest.approx(0.1, abs=1e-9) and tail.beta == pytest.approx(0.05, rel=1e-9) and tail.shape == 0.2


def test_leave_one_out_maxima_by_hand():
    v = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    maxima, m = leave_one_out_maxima(v)
    # pairs: (0,1) 0.6, (0,2) 0, (1,2) 0.8
    assert m == 2 and maxima == pytest.approx([0.6, 0.8, 0.8], abs=1e-6)


def test_a_large_gallery_is_sampled_and_carried_to_its_size():
    """Past max_pairs the maxima are of a sample against a disjoint sample, carried to the full K
    by the Gumbel's max-stability. Random vectors score with a Gaussian tail, lighter than the
    exponential the model assumes, so carrying 400 to 2,000 errs high (stricter), never low."""
    rng = np.random.default_rng(2)
    g = rng.normal(size=(2000, 64)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    full = tail_from_maxima(*leave_one_out_maxima(g))
    maxima, m = leave_one_out_maxima(g, max_pairs=160_000)
    assert len(maxima) == 400 and m == 400
    sampled = tail_from_maxima(maxima, m)
    gap = sampled.threshold(0.01, 2000) - full.threshold(0.01, 2000)
    assert -0.005 < gap < 0.04
    again, _ = leave_one_out_maxima(g, max_pairs=160_000)
    assert np.array_equal(maxima, again)  # the same gallery, the same point


def test_blend_weights_by_count():
    own, prior = TailModel(0.6, 0.02), TailModel(0.5, 0.04)
    b = blend(own, prior, n_own=75, n_prior=25)
    assert b.a == pytest.approx(0.575) and b.beta == pytest.approx(0.025)
    with pytest.raises(ValueError, match="shapes"):
        blend(TailModel(0.6, 0.02, 0.1), prior, 75, 25)


def test_a_tiny_gallery_takes_the_prior_and_a_shift_moves_its_own_tail():
    prior = TailModel(0.5, 0.03)
    assert gallery_tail(np.eye(3, dtype=np.float32), prior)[0] == prior
    g = np.eye(8, dtype=np.float32)[:, :8] * 0.8 + 0.6 / np.sqrt(8)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g[:, 0] += np.linspace(0, 0.3, 8)  # spread the maxima
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    moved, d1 = gallery_tail(g, prior, shift=0.01, n_prior=0)
    plain, _ = gallery_tail(g, prior, shift=0.0, n_prior=0)
    assert moved.a == pytest.approx(plain.a + 0.01) and moved.beta == pytest.approx(plain.beta)
    assert d1["maxima"] == 8 and d1["prior_weight"] == 0


def test_the_gate_s_point_follows_its_gallery():
    """Two galleries of 300 people under one card: the one whose faces resemble each other more
    gets the higher threshold, and each point expects exactly the target at its K."""
    thr = [0.3, 0.4, 0.5, 0.6]
    table = ([math.exp(-(t - 0.1) / 0.05) for t in thr], thr)
    rng = np.random.default_rng(3)
    loose = rng.normal(size=(300, 32)).astype(np.float32)
    tight = loose + 1.5  # a shared component: every pair scores higher
    pts = {}
    for name, g in (("loose", loose), ("tight", tight)):
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        one_n, one_one = operating_points(Config().match, table, g)
        assert one_n.k == 300 and one_one.k == 1 and one_n.source == "gallery + card prior"
        assert one_n.expected_fpir == pytest.approx(0.003, rel=1e-9)
        assert one_one.threshold < one_n.threshold
        pts[name] = one_n
    assert pts["tight"].threshold > pts["loose"].threshold + 0.1
    assert isinstance(pts["loose"], OperatingPoint) and pts["loose"].describe()["maxima"] == 300


def test_a_claim_is_never_looser_than_the_card_s_table_at_one_comparison():
    """The 1:1 point: the gallery's tail extrapolated down to K = 1, or the card's own reading of the
    target at one comparison where that is stricter (0.1 - 0.05 ln 0.003 = 0.3905 for this table)."""
    thr = [0.3, 0.4, 0.5, 0.6]
    table = ([math.exp(-(t - 0.1) / 0.05) for t in thr], thr)
    card = 0.1 - 0.05 * math.log(0.003)
    rng = np.random.default_rng(3)
    for dim, raised in ((256, True), (32, False)):  # 256-d random faces score lower against each other
        g = rng.normal(size=(300, dim)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        one_n, one_one = operating_points(Config().match, table, g)
        assert one_one.detail.get("raised_to_card_table", False) is raised
        assert one_one.threshold == pytest.approx(card, abs=1e-4) if raised else one_one.threshold > card + 0.05
        assert not one_n.detail.get("raised_to_card_table")


def test_a_gallery_never_pulls_the_threshold_below_the_card_s_bound():
    """Enrolled faces that score far apart (orthogonal: every pair 0) would put the threshold near
    0; the card's threshold for MAX_TARGET_FPIR at K is the floor."""
    thr = [0.3, 0.4, 0.5, 0.6]
    table = ([math.exp(-(t - 0.1) / 0.05) for t in thr], thr)
    g = np.eye(40, dtype=np.float32)
    g[:, 0] += np.linspace(0, 0.05, 40)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    # the table is exp(-(t - 0.1) / 0.05): FMR 1 - 0.95^(1/40) at 0.1 - 0.05 ln FMR
    floor = 0.1 - 0.05 * math.log(1 - (1 - MAX_TARGET_FPIR) ** (1 / 40))
    for shape in (0.0, 0.2):
        # the floor is the table's own reading, whatever shape its tail is refitted at for the prior
        one_n, _ = operating_points(Config().match, table, g, shape=shape)
        assert one_n.threshold == pytest.approx(floor, abs=1e-9)
        assert one_n.detail["raised_to_card_floor"] and one_n.expected_fpir < 0.003
    assert tail_from_table(*table, shape=0.2).threshold(MAX_TARGET_FPIR, 40) != pytest.approx(one_n.threshold, abs=1e-3)


def test_a_fixed_threshold_reports_the_fpir_the_gallery_expects():
    thr = [0.3, 0.4, 0.5, 0.6]
    table = ([math.exp(-(t - 0.1) / 0.05) for t in thr], thr)
    g = np.random.default_rng(4).normal(size=(100, 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    cfg = Config()
    target = operating_points(cfg.match, table, g)[0]
    cfg.match.threshold = target.threshold - 0.05
    fixed = operating_points(cfg.match, table, g)[0]
    assert fixed.source.startswith("fixed threshold") and fixed.threshold == cfg.match.threshold
    assert fixed.expected_fpir > target.expected_fpir
