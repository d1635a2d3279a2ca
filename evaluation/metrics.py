"""Evaluation maths shared by every evaluation (train, verify, one-to-n, benchmarks).

Conventions, the same in every function:
- Scores are similarities: higher = more alike. A comparison is accepted when ``score >= t``.
- A NaN score is a failure to acquire (no face found, or refused by the quality gate). Such a
  score passes no threshold: in ROC / DET / TAR@FAR / EER and in the 1:N figures it is a miss for
  a genuine (mated) comparison and a non-match for an impostor (non-mated) one, as the NIST FRTE
  1:N rules and ../shared/README.md say. In the LFW 10-fold accuracy a NaN pair is always counted
  as wrong, whatever its label (the LFW rule: "a pair where a face is not found counts as an error").
Numpy only, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# far * n is computed in floating point (0.003 * 4069 = 12.207); without this slack a product that
# should be an integer (0.001 * 3000) could land just below it and allow one accept too few.
_COUNT_SLACK = 1e-9


def _scores(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if np.isinf(a).any():
        raise ValueError("scores must be finite or NaN (NaN = failure to acquire)")
    return a


def share_at_least(scores, thresholds) -> np.ndarray:
    """For each threshold t, the share of `scores` with score >= t (NaN never passes).

    The denominator is every score, NaN included, so failures to acquire count against the rate."""
    s = _scores(scores)
    if s.size == 0:
        raise ValueError("no scores")
    finite = np.sort(s[np.isfinite(s)])
    t = np.asarray(thresholds, dtype=np.float64)
    passing = finite.size - np.searchsorted(finite, t, side="left")
    return passing / s.size


def _curve_thresholds(*score_sets) -> np.ndarray:
    """+inf (accept nothing), then every distinct finite score in descending order."""
    allf = np.concatenate([s[np.isfinite(s)] for s in score_sets])
    return np.concatenate([[np.inf], np.unique(allf)[::-1]])


def roc(scores_genuine, scores_impostor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (far, tar, thresholds), far and tar non-decreasing, thresholds descending.

    The first point is t = +inf (far = tar = 0); then one point per distinct finite score.
    The last point accepts every acquired comparison; with failures to acquire, far and tar stay
    below 1 there."""
    g, i = _scores(scores_genuine), _scores(scores_impostor)
    t = _curve_thresholds(g, i)
    return share_at_least(i, t), share_at_least(g, t), t


def det_points(scores_genuine, scores_impostor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DET points (far, frr, thresholds): the ROC with frr = 1 - tar (false non-match rate)."""
    far, tar, t = roc(scores_genuine, scores_impostor)
    return far, 1.0 - tar, t


def threshold_at_far(scores_impostor, far: float) -> float:
    """The lowest threshold whose false accept rate on `scores_impostor` is at most `far`.

    With n impostor scores, at most floor(far * n) of them may pass: the threshold sits just above
    the (floor(far * n) + 1)-th highest score. Ties there make the achieved rate lower than `far`
    (never higher). Used for TAR@FAR and for the 1:N threshold from the non-mated scores."""
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    s = _scores(scores_impostor)
    if s.size == 0:
        raise ValueError("no impostor scores")
    ranked = np.sort(np.where(np.isfinite(s), s, -np.inf))[::-1]
    allowed = int(np.floor(far * s.size + _COUNT_SLACK))
    if allowed >= s.size or ranked[allowed] == -np.inf:
        # Every acquired score may pass: accept them all (NaN still never passes).
        return -np.inf
    return float(np.nextafter(ranked[allowed], np.inf))


def tar_at_far(scores_genuine, scores_impostor, far: float) -> float:
    """True accept rate at the lowest threshold whose FAR is at most `far`."""
    t = threshold_at_far(scores_impostor, far)
    return float(share_at_least(scores_genuine, [t])[0])


def eer(scores_genuine, scores_impostor) -> float:
    """Equal error rate: where FAR = FRR, linearly interpolated between adjacent ROC points."""
    far, frr, _ = det_points(scores_genuine, scores_impostor)
    d = far - frr  # -1 at t = +inf, rises as the threshold falls
    k = int(np.argmax(d >= 0)) if (d >= 0).any() else None
    if k is None:
        # Failures to acquire keep FAR + FRR < 1 at the last point: FAR never reaches FRR on the
        # ROC; the error rates are equal nowhere, and the best honest answer is the last FRR.
        return float(frr[-1])
    if d[k] == 0:
        return float(far[k])
    a = -d[k - 1] / (d[k] - d[k - 1])
    return float(far[k - 1] + a * (far[k] - far[k - 1]))


@dataclass(frozen=True)
class KFoldResult:
    mean: float  # mean accuracy over folds
    std: float  # population std over folds (ddof=0, as the LFW literature reports it)
    accuracies: np.ndarray  # per fold, in fold order
    thresholds: np.ndarray  # the threshold chosen on the other folds, applied to this fold
    failures: int  # pairs with a NaN score (each counted wrong)


def best_threshold(scores, labels) -> float:
    """The threshold that maximises accuracy (same if score >= t) on these pairs.

    Candidates: the midpoints between adjacent distinct finite scores, plus one below the lowest
    and one above the highest (so "all same" and "all different" are possible). NaN pairs are
    wrong at any threshold and do not move the choice. Ties: the lowest best candidate."""
    s = _scores(scores)
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError("scores and labels differ in length")
    ok = np.isfinite(s)
    u = np.unique(s[ok])
    if u.size == 0:
        raise ValueError("no finite scores to choose a threshold from")
    cand = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1.0]])
    gen = np.sort(s[ok & y])
    imp = np.sort(s[ok & ~y])
    correct = (gen.size - np.searchsorted(gen, cand, side="left")) + np.searchsorted(imp, cand, side="left")
    return float(cand[int(np.argmax(correct))])


def verification_accuracy(scores, labels, threshold: float) -> float:
    """Share of pairs judged right at `threshold`; a NaN score is always wrong."""
    s = _scores(scores)
    y = np.asarray(labels, dtype=bool).ravel()
    right = np.isfinite(s) & ((s >= threshold) == y)
    return float(right.mean())


def kfold_verification(scores, labels, folds) -> KFoldResult:
    """LFW View 2 protocol: for each fold, the threshold that maximises accuracy on the other
    folds (see `best_threshold`) is tested on that fold.

    `folds` gives each pair's fold id (LFW: 0..9, from pairs.txt order). A NaN score (failure to
    acquire) is always wrong: it counts as an error in the test fold whatever its label."""
    s = _scores(scores)
    y = np.asarray(labels, dtype=bool).ravel()
    f = np.asarray(folds).ravel()
    if not (s.shape == y.shape == f.shape):
        raise ValueError("scores, labels and folds differ in length")
    ids = np.unique(f)
    if ids.size < 2:
        raise ValueError("k-fold needs at least 2 folds")
    acc, thr = [], []
    for k in ids:
        test = f == k
        t = best_threshold(s[~test], y[~test])
        thr.append(t)
        acc.append(verification_accuracy(s[test], y[test], t))
    acc = np.asarray(acc)
    return KFoldResult(float(acc.mean()), float(acc.std()), acc, np.asarray(thr), int(np.isnan(s).sum()))


@dataclass(frozen=True)
class OpenSetResult:
    fnir: dict  # target FPIR -> FNIR at the threshold set from the non-mated scores
    fpir: dict  # target FPIR -> FPIR actually reached there (ties can make it lower)
    thresholds: dict  # target FPIR -> threshold
    rank1: float  # share of mated probes whose best identity is their own (no threshold)
    curve_fpir: np.ndarray  # over every distinct score, threshold descending
    curve_fnir: np.ndarray
    curve_thresholds: np.ndarray
    mated_failures: int
    nonmated_failures: int


def open_set_1n(mated_best_ids, mated_best_scores, mated_true_ids, nonmated_best_scores,
                fpirs=(0.003, 0.01)) -> OpenSetResult:
    """One-shot open-set 1:N identification, NIST FRTE style (protocol in ../shared/README.md).

    For each probe the system returned its best-scoring enrolled identity and that score.
    FPIR(t) = share of non-mated probes whose best score >= t; FNIR(t) = share of mated probes
    that are not (returned as their own identity with score >= t). The threshold for each target
    FPIR comes from the non-mated scores (`threshold_at_far`). A failure to acquire is a NaN score
    (its id may be anything, e.g. None): a miss for a mated probe, a non-match for a non-mated one."""
    ms = _scores(mated_best_scores)
    ns = _scores(nonmated_best_scores)
    got = np.asarray(mated_best_ids, dtype=object).ravel()
    want = np.asarray(mated_true_ids, dtype=object).ravel()
    if not (ms.shape == got.shape == want.shape):
        raise ValueError("mated ids, scores and true ids differ in length")
    if ms.size == 0 or ns.size == 0:
        raise ValueError("need both mated and non-mated probes")
    hit = np.isfinite(ms) & (got == want)
    # A wrong identity can never become a hit at any threshold: give it no score, like a failure.
    hit_scores = np.where(hit, ms, np.nan)
    fnir, fpir, thr = {}, {}, {}
    for target in fpirs:
        t = threshold_at_far(ns, target)
        thr[target] = t
        fpir[target] = float(share_at_least(ns, [t])[0])
        fnir[target] = 1.0 - float(share_at_least(hit_scores, [t])[0])
    curve_t = _curve_thresholds(ms, ns)
    return OpenSetResult(
        fnir=fnir, fpir=fpir, thresholds=thr, rank1=float(hit.mean()),
        curve_fpir=share_at_least(ns, curve_t), curve_fnir=1.0 - share_at_least(hit_scores, curve_t),
        curve_thresholds=curve_t,
        mated_failures=int(np.isnan(ms).sum()), nonmated_failures=int(np.isnan(ns).sum()))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial share k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
