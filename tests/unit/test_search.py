"""edge.search: the INT8 first pass bounds every score, and the best two come out as the float
product gives them."""
from __future__ import annotations

import numpy as np
import pytest

from edge.match import identify
from edge.search import GalleryIndex, top2_candidates


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gallery():
    rng = np.random.default_rng(0)
    m = _unit(rng.normal(size=(6000, 256)))
    m[100] = m[200]  # a duplicate enrollment: a tie for the top
    return m, GalleryIndex(m, min_rows=1000)


def test_top2_candidates_by_hand():
    approx = np.array([0.9, 0.8, 0.5, 0.78, 0.1])
    # lower bounds 0.85 0.75 0.45 0.73 0.05 -> second-largest 0.75; uppers >= 0.75: rows 0, 1, 3
    assert top2_candidates(approx, np.full(5, 0.05)).tolist() == [True, True, False, True, False]
    assert top2_candidates(np.array([0.3, 0.1]), np.zeros(2)).all()


def test_every_int8_score_is_within_its_bound(gallery):
    m, index = gallery
    rng = np.random.default_rng(1)
    for q in _unit(rng.normal(size=(5, 256))):
        approx, bound = index.approximate(q)
        assert np.all(np.abs(approx - m.astype(np.float64) @ q) <= bound)
        assert 0 < bound.max() < 0.05  # tight enough to leave few candidates


def test_best_and_runner_up_equal_the_float_product(gallery):
    m, index = gallery
    names = [f"p{i}" for i in range(len(m))]
    rng = np.random.default_rng(2)
    probes = np.concatenate([_unit(m[rng.integers(0, len(m), 20)] + 0.04 * rng.normal(size=(20, 256))),
                             _unit(rng.normal(size=(20, 256))), m[[100, 5]]])
    for q in probes:
        full, got = m @ q, index.scores(q)
        a, b = identify(full, names, 0.5, 0.02), identify(got, names, 0.5, 0.02)
        assert (a.identity, a.runner_up, a.accepted, a.reason) == (b.identity, b.runner_up, b.accepted, b.reason)
        assert a.score == pytest.approx(b.score, abs=1e-6) and a.runner_up_score == pytest.approx(b.runner_up_score, abs=1e-6)
        assert np.isfinite(got).sum() < len(m) // 10  # the float pass ran on a few rows only


def test_a_small_gallery_is_searched_in_float_with_every_score():
    m = _unit(np.random.default_rng(3).normal(size=(50, 16)))
    index = GalleryIndex(m)
    assert index.session is None
    np.testing.assert_array_equal(index.scores(m[7]), m @ m[7])
