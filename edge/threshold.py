"""The gate's operating threshold: the cosine score above which a probe is taken for an enrolled
person, chosen so that a stranger is let in with the asked probability (the false positive
identification rate, FPIR) against the gallery's actual size K.

Model: a stranger's score against one enrolled face has a generalised Pareto upper tail,
P(s >= t) = (1 - k (t - a) / beta) ** (1 / k), exponential exp(-(t - a) / beta) at shape k = 0.
Cosine scores are bounded, so the tail ends (k > 0) rather than running on as an exponential's
does; the shape is the encoder's, measured on its card's calibration set (`calibration.tail_shape`).
A stranger's best score against K faces is then a generalised extreme value (Gumbel at k = 0) and
FPIR(t, K) = 1 - exp(-K P(s >= t)). (a, beta) come from:

- the gallery itself: each enrolled face, left out in turn, is a stranger to the others; the
  extreme value fitted (by L-moments, at the card's shape) to those leave-one-out maxima gives
  (a, beta) from this camera set-up and this population. These are gallery-vs-gallery scores,
  not door-frame-vs-gallery ones: the card's `calibration.gallery_shift`, measured on its
  calibration set, moves `a` by the difference.
- the encoder card's impostor table (its tail fitted at the same shape), as a prior worth
  PRIOR_MAXIMA maxima: it decides a small gallery, the gallery's own scores a large one.

Pure functions, no I/O: the gate computes the point at each gallery load and reload.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .config import MAX_TARGET_FPIR, MatchConfig
from .errors import GalleryError
from .match import fpir_at_threshold, threshold_for_gallery

EULER = 0.5772156649015329
# The card's table counts as this many leave-one-out maxima. Small on purpose: the table comes from
# another population (the card's calibration set), so by a few dozen people the gallery's own
# scores lead.
PRIOR_MAXIMA = 25
# Pairs scored at each load: every leave-one-out maximum up to ~2,000 people; beyond, a sample of
# people against a sample of the rest, carried to the full K by the extreme value's max-stability.
# Keeps a reload of 100,000 people to ~1e9 multiply-adds (2,000 x 2,000 pairs of 256-d vectors).
MAX_PAIRS = 4_000_000
# The card's table is fitted as a tail over these FMRs.
TAIL_FMR = (1e-6, 1e-2)


def tail_share(z: np.ndarray | float, shape: float) -> np.ndarray | float:
    """P(s >= a + beta z) of the generalised Pareto tail: (1 - k z) ** (1 / k), exp(-z) at k = 0,
    0 past the end of a bounded tail."""
    z = np.asarray(z, np.float64)
    if shape == 0:
        return np.exp(-z)
    return np.clip(1 - shape * z, 0, None) ** (1 / shape)


def tail_distance(p: np.ndarray | float, shape: float) -> np.ndarray | float:
    """The z at which tail_share(z, shape) == p: (1 - p ** k) / k, -ln p at k = 0."""
    p = np.asarray(p, np.float64)
    return -np.log(p) if shape == 0 else (1 - p ** shape) / shape


@dataclass(frozen=True)
class TailModel:
    """Upper tail of one stranger-vs-enrolled comparison: P(s >= t) = tail_share((t - a) / beta, shape)."""

    a: float
    beta: float
    shape: float = 0.0

    def fpir(self, threshold: float, k: int) -> float:
        """Share of strangers whose best score against k enrolled people reaches `threshold`."""
        rate = max(int(k), 1) * tail_share((threshold - self.a) / self.beta, self.shape)
        return float(-np.expm1(-rate))

    def threshold(self, target_fpir: float, k: int) -> float:
        """The threshold at which fpir(threshold, k) == target_fpir."""
        if not 0 < target_fpir < 1:
            raise ValueError("target FPIR must be in (0, 1)")
        return float(self.a + self.beta * tail_distance(-np.log1p(-target_fpir) / max(int(k), 1), self.shape))


@dataclass(frozen=True)
class OperatingPoint:
    """The threshold the gate uses, the FPIR it expects at K, and where that came from."""

    threshold: float
    expected_fpir: float
    k: int
    source: str  # "gallery + card prior", "card", "fixed threshold", "cohort table"
    detail: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"threshold": round(self.threshold, 4), "expected_fpir": float(f"{self.expected_fpir:.3g}"),
                "k": self.k, "source": self.source, **self.detail}


def extreme_value_lmoments(x: np.ndarray, shape: float = 0.0) -> tuple[float, float]:
    """(location, scale) of the generalised extreme value of the given shape k (Hosking's sign: k > 0
    a bounded tail; Gumbel at 0) by the method of L-moments, less swayed by one extreme value than
    moments or maximum likelihood: scale = l2 k / ((1 - 2^-k) Gamma(1 + k)), location =
    l1 - scale (1 - Gamma(1 + k)) / k; at k = 0 scale = l2 / ln 2, location = l1 - Euler scale."""
    x = np.sort(np.asarray(x, np.float64))
    n = len(x)
    if n < 3:
        raise ValueError("need at least 3 values to fit an extreme value")
    b0 = float(x.mean())
    b1 = float(np.sum(np.arange(n) / (n - 1) * x) / n)
    l2 = 2 * b1 - b0
    if not l2 > 0:
        raise ValueError("the values do not spread: no extreme-value scale")
    if shape == 0:
        scale = l2 / np.log(2)
        return b0 - EULER * scale, float(scale)
    g = math.gamma(1 + shape)
    scale = l2 * shape / ((1 - 2 ** -shape) * g)
    return b0 - scale * (1 - g) / shape, float(scale)


def tail_from_maxima(maxima: np.ndarray, m: int, shape: float = 0.0) -> TailModel:
    """The per-comparison tail whose maximum over m comparisons fits `maxima`: by max-stability the
    maximum of m draws from tail (a, beta, k) is an extreme value with scale beta m^-k and location
    a + beta (1 - m^-k) / k (a + beta ln m at k = 0)."""
    mu, scale = extreme_value_lmoments(maxima, shape)
    beta = scale * m ** shape
    return TailModel(mu - beta * tail_distance(1 / m, shape), beta, shape)


def tail_from_table(fmr_table, thr_table, fmr_range=TAIL_FMR, shape: float = 0.0) -> TailModel:
    """The tail of an impostor table at the given shape: least squares of tail_distance(FMR) on the
    threshold (-ln FMR at shape 0) over the table's points with FMR in fmr_range, or over all its
    points below 1 where fewer than two fall in that range (a short table)."""
    f = np.asarray(fmr_table, np.float64)
    t = np.asarray(thr_table, np.float64)
    keep = (f >= fmr_range[0]) & (f <= fmr_range[1])
    if keep.sum() < 2:
        keep = (f > 0) & (f < 1)
    if keep.sum() < 2:
        raise ValueError("the impostor table has fewer than 2 points with an FMR between 0 and 1")
    slope, icpt = np.polyfit(t[keep], tail_distance(f[keep], shape), 1)
    if not slope > 0:
        raise ValueError("the impostor table's FMR does not fall with the threshold")
    beta = 1.0 / slope
    return TailModel(float(-icpt * beta), float(beta), shape)  # distance = (t - a) / beta


def leave_one_out_maxima(matrix: np.ndarray, max_pairs: int = MAX_PAIRS, seed: int = 0) -> tuple[np.ndarray, int]:
    """Each enrolled face's best cosine score against the others (unit rows): (maxima, m), m the
    number of faces each maximum is over. Past max_pairs, a fixed-seed sample of n faces each
    against m others (the same gallery gives the same point)."""
    x = np.asarray(matrix, np.float32)
    k = len(x)
    if k < 2:
        raise ValueError("need at least 2 enrolled faces")
    if k * (k - 1) <= max_pairs:
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return s.max(1).astype(np.float64), k - 1
    side = max(int(np.sqrt(max_pairs)), 2)
    rng = np.random.default_rng(seed)
    order = rng.permutation(k)
    # Probes and their comparison set are disjoint samples: no face is scored against itself.
    probes, others = order[:side], order[side:2 * side]
    return (x[probes] @ x[others].T).max(1).astype(np.float64), len(others)


def blend(own: TailModel, prior: TailModel, n_own: int, n_prior: int = PRIOR_MAXIMA) -> TailModel:
    """Weighted mean of the two tails' parameters, weights n_own and n_prior (one shape for both)."""
    if own.shape != prior.shape:
        raise ValueError(f"cannot blend tails of shapes {own.shape} and {prior.shape}")
    w = n_own / (n_own + n_prior)
    return TailModel(w * own.a + (1 - w) * prior.a, w * own.beta + (1 - w) * prior.beta, own.shape)


def gallery_tail(matrix: np.ndarray, prior: TailModel, shift: float = 0.0, max_pairs: int = MAX_PAIRS,
                 n_prior: int = PRIOR_MAXIMA) -> tuple[TailModel, dict]:
    """The tail the gate works with for this gallery: its own leave-one-out maxima (moved by the
    card's door-vs-gallery shift) blended with the card's prior, at the prior's shape; the prior
    alone below 4 faces (3 maxima at least for a fit)."""
    if len(matrix) < 4:
        return prior, {"maxima": 0}
    maxima, m = leave_one_out_maxima(matrix, max_pairs)
    own = tail_from_maxima(maxima, m, prior.shape)
    own = TailModel(own.a + shift, own.beta, own.shape)
    tail = blend(own, prior, len(maxima), n_prior)
    return tail, {"maxima": len(maxima), "over": m, "own_a": round(own.a, 4), "own_beta": round(own.beta, 5),
                  "prior_a": round(prior.a, 4), "prior_beta": round(prior.beta, 5),
                  "prior_weight": round(n_prior / (len(maxima) + n_prior), 3), "shift": shift,
                  "tail_shape": prior.shape}


def operating_points(match: MatchConfig, table: tuple[list[float], list[float]], matrix: np.ndarray,
                     shift: float = 0.0, table_only: str | None = None,
                     shape: float = 0.0) -> tuple[OperatingPoint, OperatingPoint]:
    """The gate's thresholds against gallery `matrix` (unit rows), 1:N (K enrolled) and 1:1 (a
    claim is one comparison, K = 1), with the FPIR each expects: fixed in config, or for
    target_fpir. By default (match.calibration 'gallery') from the tail fitted to the enrolled
    faces' own scores, moved by `shift`, with the (FMR, threshold) `table` as a prior, both at the
    card's tail `shape`; with match.calibration 'card' or scores the gallery cannot speak for
    (`table_only` names the table, e.g. a cohort's AS-norm one), from the table alone, its
    comparisons taken as independent."""
    fmr, thr = table
    fixed = match.threshold is not None
    ks = (max(len(matrix), 1), 1)
    if table_only or match.calibration == "card":
        source = ("fixed threshold, " if fixed else "") + (table_only or "card table")
        ts = [match.threshold if fixed else threshold_for_gallery(fmr, thr, match.target_fpir, k) for k in ks]
        return tuple(OperatingPoint(t, fpir_at_threshold(fmr, thr, t, k), k, source) for t, k in zip(ts, ks))
    prior = tail_from_table(fmr, thr, shape=shape)
    tail, detail = gallery_tail(matrix, prior, shift)
    source = ("fixed threshold, " if fixed else "") + (
        "gallery + card prior" if detail["maxima"] else "card prior (gallery too small to fit)")
    points = []
    for k in ks:
        t, why = match.threshold, detail
        if not fixed:
            t = tail.threshold(match.target_fpir, k)
            # However the gallery's scores fall, never looser than the card's own table allows at the
            # bound: read as the table stands, not through the prior refitted at the tail's shape.
            floor = threshold_for_gallery(fmr, thr, MAX_TARGET_FPIR, k)
            if t < floor:
                t, why = floor, {**detail, "raised_to_card_floor": True}
            # One comparison (a claim) is what the card's table measured directly, on millions of
            # door-vs-enrolled pairs; the gallery's tail reaches K = 1 only by extrapolating down
            # from maxima over K: the stricter of the two.
            one = threshold_for_gallery(fmr, thr, match.target_fpir, 1) if k == 1 else -np.inf
            if t < one:
                t, why = one, {**why, "raised_to_card_table": True}
        points.append(OperatingPoint(t, tail.fpir(t, k), k, source, why))
    return tuple(points)


def check_operating_point(point: OperatingPoint, fixed: bool) -> OperatingPoint:
    """The point, or GalleryError when it lets in more strangers than MAX_TARGET_FPIR: a fixed
    threshold lets in more as the gallery grows, and a table's stops tightening where it ends, so
    only the gallery's actual size can tell."""
    if point.expected_fpir > MAX_TARGET_FPIR * (1 + 1e-9):  # a target of exactly the bound must not fail on rounding
        how = ("match.threshold is fixed: raise it, or leave it unset to follow the gallery size" if fixed else
               "the impostor table ends before a threshold that holds a gallery this large")
        raise GalleryError(None, f"threshold {point.threshold:.4f} against {point.k} enrolled gives an expected false "
                                 f"positive identification rate of {point.expected_fpir:.3g} ({point.source}), above "
                                 f"the bound {MAX_TARGET_FPIR}: the gate refuses this gallery ({how})")
    return point
