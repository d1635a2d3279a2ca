"""edge.match: FPIR -> per-comparison FMR -> threshold, 1:N identify, 1:1 verify, AS-norm. Hand cases."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from edge.config import Config
from edge.errors import GalleryError
from edge.modelcard import CalibrationSpec
from edge.match import (as_norm, cohort_stats, cosine_scores, expected_fpir, fmr_at_threshold, fpir_at_threshold,
                        identify, per_comparison_fmr, threshold_for_fmr, threshold_for_gallery, verify)
from edge.pipeline import impostor_table
from edge.threshold import check_operating_point, operating_points

FMR = [1e-1, 1e-2, 1e-3]
THR = [0.2, 0.3, 0.4]


# ---------------------------------------------------------------- FMR and thresholds

def test_one_comparison_fmr_is_the_fpir():
    assert per_comparison_fmr(0.01, 1) == pytest.approx(0.01, rel=1e-12)


def test_k_comparisons_share_the_fpir():
    got = per_comparison_fmr(0.01, 100)
    assert got == pytest.approx(1 - 0.99 ** (1 / 100), rel=1e-12)
    assert got == pytest.approx(0.01 / 100, rel=0.01)  # the union-bound approximation, within 1 %
    # and the exact inverse: K independent comparisons at that FMR give back the FPIR
    assert 1 - (1 - got) ** 100 == pytest.approx(0.01, rel=1e-9)


def test_an_empty_gallery_counts_as_one_comparison():
    assert per_comparison_fmr(0.01, 0) == per_comparison_fmr(0.01, 1)


@pytest.mark.parametrize("fpir", [0.0, 1.0, -0.1, 1.5])
def test_fpir_outside_the_open_unit_interval_is_refused(fpir):
    with pytest.raises(ValueError):
        per_comparison_fmr(fpir, 10)


@pytest.mark.parametrize("fmr,expected", [
    (1e-1, 0.2), (1e-2, 0.3), (1e-3, 0.4),  # on the table
    (10 ** -2.5, 0.35), (10 ** -1.25, 0.225),  # log-linear between rows
    (0.5, 0.2), (1e-6, 0.4), (0.0, 0.4),  # beyond either end: the end's threshold
])
def test_threshold_for_fmr_by_hand(fmr, expected):
    assert threshold_for_fmr(FMR, THR, fmr) == pytest.approx(expected, abs=1e-12)


def test_threshold_table_order_does_not_matter():
    assert threshold_for_fmr(FMR[::-1], THR[::-1], 10 ** -2.5) == pytest.approx(0.35)


def test_a_table_whose_fmr_rises_with_the_threshold_is_refused():
    with pytest.raises(ValueError, match="must not increase"):
        threshold_for_fmr([1e-3, 1e-2, 1e-1], THR, 1e-2)


def test_threshold_for_gallery_tightens_as_the_gallery_grows():
    fmr = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
    thr = [0.2, 0.3, 0.4, 0.5, 0.6]
    got = {k: threshold_for_gallery(fmr, thr, 0.01, k) for k in (1, 10, 100, 1000)}
    for k, t in got.items():
        # 0.1 per decade of FMR, starting at 0.2 for FMR 1e-1
        assert t == pytest.approx(0.2 + 0.1 * (-math.log10(1 - 0.99 ** (1 / k)) - 1), abs=1e-12)
    assert got[1] == pytest.approx(0.3)
    assert got[1] < got[10] < got[100] < got[1000]


@pytest.mark.parametrize("threshold,expected", [
    (0.2, 1e-1), (0.3, 1e-2), (0.4, 1e-3),  # on the table
    (0.35, 10 ** -2.5), (0.225, 10 ** -1.25),  # log-linear between rows
    (0.9, 1e-3),  # above the table: its smallest FMR, nothing rarer is vouched for
    (0.19, 1.0), (0.0, 1.0), (-1.0, 1.0),  # below the table: unmeasured, every stranger may pass
])
def test_fmr_at_threshold_by_hand(threshold, expected):
    assert fmr_at_threshold(FMR, THR, threshold) == pytest.approx(expected, rel=1e-12)


def test_fmr_at_threshold_inverts_threshold_for_fmr():
    for fmr in (0.05, 3e-3, 1.5e-3):
        assert fmr_at_threshold(FMR[::-1], THR[::-1], threshold_for_fmr(FMR, THR, fmr)) == pytest.approx(fmr, rel=1e-9)


@pytest.mark.parametrize("fmr,k,expected", [
    (0.01, 1, 0.01),
    (0.01, 5, 0.0490099501),  # 1 - 0.99^5
    (0.01, 6, 0.058519850599),  # 1 - 0.99^6
    (0.5, 2, 0.75),
    (1e-6, 100_000, 0.0951626272),  # 1 - exp(100000 * ln(1 - 1e-6)) = 1 - e^-0.10000005
    (0.0, 1000, 0.0), (1.0, 3, 1.0),
    (0.01, 0, 0.01),  # an empty gallery counts as one comparison
])
def test_expected_fpir_by_hand(fmr, k, expected):
    assert expected_fpir(fmr, k) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_fpir_at_threshold_by_hand():
    assert fpir_at_threshold(FMR, THR, 0.3, 2) == pytest.approx(1 - 0.99 ** 2, rel=1e-12)  # 0.0199
    assert fpir_at_threshold(FMR, THR, 0.1, 1) == 1.0  # below the table: no stranger is kept out
    # the gallery-size rule gives back its target at its K
    assert fpir_at_threshold(FMR, THR, threshold_for_gallery(FMR, THR, 0.02, 10), 10) == pytest.approx(0.02, rel=1e-9)


# ---------------------------------------------------------------- identify / verify

NAMES = ["ann", "bob", "cat"]
SCORES = np.array([0.2, 0.8, 0.5])


def test_cosine_scores_are_dot_products():
    g = np.array([[1, 0], [0.6, 0.8]], np.float32)
    np.testing.assert_allclose(cosine_scores(g, np.array([0.6, 0.8])), [0.6, 1.0], rtol=1e-6)


def test_identify_best_and_runner_up():
    m = identify(SCORES, NAMES, threshold=0.6)
    assert (m.identity, m.score, m.runner_up, m.runner_up_score) == ("bob", 0.8, "cat", 0.5)
    assert (m.normalized_score, m.threshold, m.accepted, m.reason) == (0.8, 0.6, True, "match")


def test_identify_margin_rule_uses_the_runner_up():
    m = identify(SCORES, NAMES, threshold=0.6, min_margin=0.31)  # 0.8 - 0.5 = 0.3 < 0.31
    assert (m.identity, m.accepted, m.reason) == ("bob", False, "margin")
    assert identify(SCORES, NAMES, threshold=0.6, min_margin=0.29).accepted


def test_identify_below_threshold_names_the_nearest_but_does_not_accept():
    m = identify(SCORES, NAMES, threshold=0.81)
    assert (m.identity, m.score, m.accepted, m.reason) == ("bob", 0.8, False, "below_threshold")


def test_identify_threshold_is_inclusive():
    assert identify(SCORES, NAMES, threshold=0.8).accepted


def test_identify_single_enrolee_has_no_runner_up_and_no_margin_rule():
    m = identify(np.array([0.7]), ["ann"], threshold=0.5, min_margin=1.0)
    assert (m.identity, m.runner_up, m.runner_up_score, m.accepted) == ("ann", None, float("-inf"), True)


def test_identify_empty_gallery():
    m = identify(np.zeros(0), [], threshold=0.5)
    assert (m.identity, m.accepted, m.reason) == (None, False, "empty_gallery")
    assert m.score == float("-inf")


def test_identify_applies_threshold_and_margin_to_the_normalised_scores():
    norm = np.array([0.1, 3.0, 1.0])
    m = identify(SCORES, NAMES, threshold=2.5, normalized=norm)
    assert (m.identity, m.score, m.normalized_score, m.accepted) == ("bob", 0.8, 3.0, True)
    # raw 0.8 would pass 0.6, but the normalised score is what the threshold sees
    assert identify(SCORES, NAMES, threshold=3.5, normalized=norm).reason == "below_threshold"
    # margin in the ranking's units: 3.0 - 1.0 = 2.0
    assert identify(SCORES, NAMES, threshold=2.5, min_margin=2.1, normalized=norm).reason == "margin"
    assert identify(SCORES, NAMES, threshold=2.5, min_margin=1.9, normalized=norm).accepted
    # normalisation that reorders the candidates never makes the margin negative
    assert identify(np.array([0.2, 0.8, 0.5]), NAMES, threshold=0.0, normalized=np.array([0.1, 1.0, 3.0])).accepted


def test_verify_scores_only_the_claimed_identity():
    m = verify(SCORES, NAMES, "cat", threshold=0.4)
    assert (m.identity, m.score, m.accepted, m.reason) == ("cat", 0.5, True, "match")
    # bob scores higher, but 1:1 never looks past the claim
    m = verify(SCORES, NAMES, "ann", threshold=0.4)
    assert (m.identity, m.score, m.accepted, m.reason) == ("ann", 0.2, False, "below_threshold")


def test_verify_claim_not_enrolled():
    m = verify(SCORES, NAMES, "dan", threshold=0.0)
    assert (m.identity, m.accepted, m.reason) == ("dan", False, "claim_unknown")


# ---------------------------------------------------------------- score normalisation

def test_as_norm_by_hand():
    # probe's top 3 cohort scores 0.3, 0.4, 0.5: mean 0.4, population sd sqrt(0.02 / 3);
    # (0.6 - 0.4) / sqrt(0.02 / 3) = sqrt(6); enrollee (0.6 - 0.2) / 0.1 = 4
    got = as_norm(0.6, np.array([0.5, 0.1, 0.4, 0.2, 0.3]), (0.2, 0.1), top_k=3)
    assert got == pytest.approx(0.5 * (math.sqrt(6) + 4), rel=1e-12)


def test_as_norm_flat_cohort_does_not_divide_by_zero():
    got = as_norm(0.5, np.full(10, 0.3), (0.3, 0.0), top_k=4)
    assert got == pytest.approx(0.2 / 1e-6)


def test_cohort_stats_by_hand():
    mean, sd = cohort_stats(np.array([[4.0, 1.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]]), top_k=2)
    np.testing.assert_allclose(mean, [3.5, 5.0])  # top 2 of row 0 are 3 and 4
    np.testing.assert_allclose(sd, [0.5, 1e-6])


def test_cohort_stats_feed_as_norm_consistently():
    # A score equal to both cohort means normalises to 0.
    cohort = np.array([[0.1, 0.3, 0.5]])
    mu, sd = cohort_stats(cohort, top_k=2)
    assert as_norm(0.4, cohort[0], (mu[0], sd[0]), top_k=2) == pytest.approx(0.0, abs=1e-12)


def test_track_embedding_is_the_normalised_mean_of_the_last_frames():
    from edge.match import track_embedding

    v = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.6, 0.8])]
    assert np.allclose(track_embedding(v, 1), [0.6, 0.8])
    # last two: mean (0.3, 0.9), norm sqrt(0.9) -> (0.3162, 0.9487)
    assert np.allclose(track_embedding(v, 2), [0.3 / np.sqrt(0.9), 0.9 / np.sqrt(0.9)], atol=1e-6)
    # more frames asked than seen: all of them, (1.6, 1.8) / 2.408
    assert np.allclose(track_embedding(v, 10), np.array([1.6, 1.8]) / np.hypot(1.6, 1.8), atol=1e-6)
    with pytest.raises(ValueError):
        track_embedding([], 3)


def test_the_gates_matcher_applies_as_norm_with_a_configured_cohort(tmp_path, stack, model_cards):
    """match.cohort: the gate scores AS-norm (edge.match.as_norm, score by score) against the
    cohort and reads its threshold off the cohort's table, not the card's."""
    import io as _io

    from edge import gallery as G
    from edge.config import Config
    from edge.match import as_norm
    from edge.pipeline import Matcher, Stack

    rng = np.random.default_rng(1)
    dim = stack.encoder.card.embedding.dim
    cohort_v = rng.normal(size=(40, dim)).astype(np.float32)
    cohort_v /= np.linalg.norm(cohort_v, axis=1, keepdims=True)
    arrays = {"encoder_sha256": np.asarray(stack.encoder.sha256), "dataset": np.asarray("test")}
    for mode in ("plain", "flip"):
        arrays.update({f"{mode}_vectors": cohort_v, f"{mode}_top_k": np.asarray(5),
                       f"{mode}_fmr": np.asarray([0.1, 1e-6]), f"{mode}_threshold": np.asarray([1.0, 9.0]),
                       f"{mode}_raw_fmr": np.asarray([0.1, 0.01]), f"{mode}_raw_threshold": np.asarray([0.3, 0.5]),
                       f"{mode}_impostor_mean": np.asarray(0.0), f"{mode}_impostor_std": np.asarray(0.1)})
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    (tmp_path / "c.cohort.npz").write_bytes(buf.getvalue())
    cfg = Config()
    cfg.models.detector, cfg.models.encoder = str(model_cards["detector"]), str(model_cards["encoder"])
    cfg.match.cohort = str(tmp_path / "c.cohort.npz")
    st = Stack.from_config(cfg)
    g = G.Gallery(st.encoder.sha256, dim)
    people = rng.normal(size=(3, dim)).astype(np.float32)
    people /= np.linalg.norm(people, axis=1, keepdims=True)
    for i, v in enumerate(people):
        g.add(G.Person(f"p{i}", v, f"E{i}", 0.0, None))
    m = Matcher(cfg.match, st, g)
    probe = (people[1] + 0.3 * people[0]) / np.linalg.norm(people[1] + 0.3 * people[0])
    r = m.match(probe.astype(np.float32))
    top = lambda v: np.sort(cohort_v @ v)[-5:]  # noqa: E731
    want = as_norm(float(people[1] @ probe), cohort_v @ probe, (float(top(people[1]).mean()), float(top(people[1]).std())), 5)
    assert r.identity == "p1" and r.normalized_score == pytest.approx(want, rel=1e-4)
    # K = 3, target FPIR 0.003 -> FMR 0.001: between the cohort table's 1.0 (0.1) and 9.0 (1e-6)
    assert 1.0 < m.threshold_1n < 9.0 and m.threshold_1n != Matcher(Config().match, stack, g).threshold_1n


# ---------------------------------------------------------------- the gate's operating point at its gallery size

TABLE = (FMR, THR)


def card_point(match, table, k: int, verification: bool = False) -> float:
    """Expected FPIR of the table-only point against k enrolled, or GalleryError."""
    match.calibration = "card"
    p = operating_points(match, table, np.zeros((k, 4), np.float32))[1 if verification else 0]
    return check_operating_point(p, match.threshold is not None).expected_fpir


def test_a_fixed_threshold_is_refused_once_the_gallery_makes_it_too_loose():
    cfg = Config()
    cfg.match.threshold = 0.3  # FMR 0.01 on the table
    assert card_point(cfg.match, TABLE, 5) == pytest.approx(0.0490099501)  # 1 - 0.99^5
    with pytest.raises(GalleryError, match=r"threshold 0.3000 against 6 enrolled .* 0.0585 \(fixed threshold, card table\), above the bound 0.05.*fixed"):
        card_point(cfg.match, TABLE, 6)  # 1 - 0.99^6
    assert card_point(cfg.match, TABLE, 6, verification=True) == pytest.approx(0.01)  # 1:1: one comparison
    cfg.match.threshold = 0.19  # below the table: FMR 1
    with pytest.raises(GalleryError, match="rate of 1 "):
        card_point(cfg.match, TABLE, 1)


def test_a_target_fpir_threshold_is_refused_where_the_table_ends():
    """target 0.003: the threshold tightens with K until the table's last row (FMR 1e-3, 0.4);
    past that K the FPIR grows: 1 - 0.999^51 = 0.049746 runs, 1 - 0.999^52 = 0.050695 does not."""
    assert card_point(Config().match, TABLE, 1) == pytest.approx(0.003, rel=1e-9)
    assert card_point(Config().match, TABLE, 51) == pytest.approx(0.04974558, rel=1e-6)
    with pytest.raises(GalleryError, match=r"0.0507 \(card table\), above the bound 0.05: .*the impostor table ends"):
        card_point(Config().match, TABLE, 52)


def test_an_encoder_without_an_impostor_table_is_refused_even_with_a_fixed_threshold():
    cfg = Config()
    cfg.match.threshold = 0.5
    stack = SimpleNamespace(cohort=None, encoder=SimpleNamespace(card=SimpleNamespace(calibration=None, name="enc")))
    with pytest.raises(GalleryError, match="no calibration"):
        impostor_table(stack)


def test_retention_lowered_since_enrollment_ends_enrolments_at_the_next_decision():
    """storage.retention_days as the config sets it now: an enrolment ends at its own end or
    retention after it was made, whichever is first, and one with no end of its own ends too."""
    from edge import gallery as G
    from edge.pipeline import Matcher

    cal = CalibrationSpec(dataset="hand-made", impostor_pairs=1, fmr=FMR, threshold=THR)
    stack = SimpleNamespace(cohort=None, threads=1, encoder=SimpleNamespace(sha256="e", card=SimpleNamespace(calibration=cal)))
    g = G.Gallery("e", 4)
    day = 86400.0
    g.add(G.Person("open_ended", np.eye(4, dtype=np.float32)[0], "1", enrolled_at=100 * day, expires_at=None))
    g.add(G.Person("three_years", np.eye(4, dtype=np.float32)[1], "2", enrolled_at=100 * day, expires_at=1195 * day))
    g.add(G.Person("unknown_date", np.eye(4, dtype=np.float32)[2], "3", enrolled_at=0.0, expires_at=None))
    now = 131 * day  # 31 days after enrollment
    m = Matcher(Config().match, stack, g, retention_days=30)
    assert [m.refusal(n, now, now) for n in ("open_ended", "three_years", "unknown_date")] == ["expired", "expired", None]
    assert m.refusal("open_ended", 129 * day, 129 * day) is None  # 29 days: still within
    kept = Matcher(Config().match, stack, g, retention_days=1095)
    assert [kept.refusal(n, now, now) for n in ("open_ended", "three_years")] == [None, None]
    assert Matcher(Config().match, stack, g).refusal("open_ended", 10_000 * day, 10_000 * day) is None
