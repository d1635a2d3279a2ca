"""Matching: 1:N identification and 1:1 verification of embeddings against the gallery.

Pure functions. Scores are cosine similarities of L2-normalised embeddings (the Siamese distance
d = ||a - b||^2 = 2 - 2*cos, so "d < tau" is "cos > 1 - tau/2").

Threshold from gallery size: a stranger is falsely identified if ANY of the K enrolled templates
scores above the threshold. With independent comparisons at per-comparison false match rate FMR,
    FPIR = 1 - (1 - FMR)^K  ~=  K * FMR,   so   FMR = 1 - (1 - FPIR)^(1/K)  ~=  FPIR / K.
The encoder's card holds its impostor-score table (FMR at each threshold, measured on a
calibration set, never LFW); the gate reads the threshold for that FMR off the table, interpolating
log(FMR) linearly. A larger gallery therefore gets a stricter threshold automatically.
"""
from __future__ import annotations

import numpy as np

from .records import Match


def cosine_scores(gallery: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """K x d gallery (rows L2-normalised) and a d-vector -> K cosine scores."""
    return gallery @ probe.astype(np.float32)


def track_embedding(vectors, frames: int) -> np.ndarray:
    """Multi-frame fusion: the L2-normalised mean of a track's last `frames` unit embeddings (its
    frames' noise averages out; a track that switched people gets a blend that matches no one)."""
    last = np.asarray(list(vectors)[-frames:], np.float64)
    if last.size == 0:
        raise ValueError("no embeddings on this track")
    m = last.mean(0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def per_comparison_fmr(target_fpir: float, k: int) -> float:
    if not 0 < target_fpir < 1:
        raise ValueError("target FPIR must be in (0, 1)")
    return 1.0 - (1.0 - target_fpir) ** (1.0 / max(int(k), 1))


def _log_table(fmr_table: list[float], thr_table: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(log FMR, threshold), by ascending threshold."""
    f = np.asarray(fmr_table, np.float64)
    t = np.asarray(thr_table, np.float64)
    order = np.argsort(t)
    f, t = f[order], t[order]
    if np.any(np.diff(f) > 1e-12):
        raise ValueError("FMR table must not increase with the threshold")
    return np.log(np.clip(f, 1e-12, 1.0)), t


def threshold_for_fmr(fmr_table: list[float], thr_table: list[float], fmr: float) -> float:
    """Threshold at which the impostor FMR equals `fmr`, by log-linear interpolation in the table.

    Outside the table the nearest end is used, and a target below the table's smallest FMR gets
    its threshold (the table cannot vouch for rarer events: the calibration set is what it is)."""
    lf, t = _log_table(fmr_table, thr_table)
    x = np.log(max(fmr, 1e-12))
    # np.interp needs increasing x: FMR falls as threshold rises, so interpolate on -log(FMR).
    return float(np.interp(-x, -lf, t))


def threshold_for_gallery(fmr_table, thr_table, target_fpir: float, k: int) -> float:
    return threshold_for_fmr(fmr_table, thr_table, per_comparison_fmr(target_fpir, k))


def fmr_at_threshold(fmr_table: list[float], thr_table: list[float], threshold: float) -> float:
    """Impostor FMR at `threshold`, by the same log-linear interpolation (the inverse of
    threshold_for_fmr). Beyond the table it answers only what the table vouches for: below its
    lowest threshold 1.0 (nothing was measured there, so every stranger may pass), above its
    highest the table's smallest FMR (rarer events are beyond the calibration set)."""
    lf, t = _log_table(fmr_table, thr_table)
    if threshold < t[0]:
        return 1.0
    return float(np.exp(np.interp(threshold, t, lf)))


def expected_fpir(fmr: float, k: int) -> float:
    """FPIR of k independent comparisons at per-comparison FMR: 1 - (1 - FMR)^k (log1p/expm1:
    exact for the tiny FMRs of a strict threshold, where 1 - FMR rounds)."""
    if fmr >= 1.0:
        return 1.0
    return float(-np.expm1(max(int(k), 1) * np.log1p(-fmr)))


def fpir_at_threshold(fmr_table, thr_table, threshold: float, k: int) -> float:
    """Expected FPIR of a fixed threshold against a gallery of k people."""
    return expected_fpir(fmr_at_threshold(fmr_table, thr_table, threshold), k)


def as_norm(score: float, probe_cohort: np.ndarray, enrollee_stats: tuple[float, float], top_k: int) -> float:
    """Adaptive symmetric score normalisation (AS-norm, top-k cohort):
        0.5 * ((s - mu_p) / sd_p + (s - mu_e) / sd_e)
    with mu_p, sd_p over the probe's top_k cohort scores and (mu_e, sd_e) the enrollee's, precomputed."""
    top = np.sort(np.asarray(probe_cohort, np.float64))[-top_k:]
    mu_p, sd_p = float(top.mean()), float(max(top.std(), 1e-6))
    mu_e, sd_e = enrollee_stats
    return 0.5 * ((score - mu_p) / sd_p + (score - mu_e) / max(sd_e, 1e-6))


def cohort_stats(cohort_scores: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (mean, std) of the top_k scores of an R x C score matrix against the cohort."""
    top = np.sort(np.asarray(cohort_scores, np.float64), axis=1)[:, -top_k:]
    return top.mean(1), np.maximum(top.std(1), 1e-6)


def identify(scores: np.ndarray, names: list[str], threshold: float, min_margin: float = 0.0,
             normalized: np.ndarray | None = None) -> Match:
    """Best enrolled identity for one probe; accepted when its (normalised) score passes the
    threshold and beats the runner-up identity by at least min_margin (in the units it is ranked by)."""
    if len(names) == 0:
        return Match(None, float("-inf"), None, float("-inf"), float("-inf"), threshold, False, "empty_gallery")
    norm = scores if normalized is None else normalized
    # The best two only: a partial partition is O(K), a full sort of 100,000 scores is not.
    top = np.argpartition(-norm, 1)[:2] if len(norm) > 2 else np.arange(len(norm))
    top = top[np.lexsort((top, -norm[top]))]  # by score, ties to the earlier enrollee
    best = int(top[0])
    second = int(top[1]) if len(top) > 1 else None
    s2 = float(scores[second]) if second is not None else float("-inf")
    accepted, reason = True, "match"
    if norm[best] < threshold:
        accepted, reason = False, "below_threshold"
    elif second is not None and float(norm[best]) - float(norm[second]) < min_margin:
        accepted, reason = False, "margin"
    return Match(names[best], float(scores[best]), names[second] if second is not None else None, s2,
                 float(norm[best]), float(threshold), accepted, reason)


def verify(scores: np.ndarray, names: list[str], claim: str, threshold: float) -> Match:
    """1:1: the probe against the claimed identity only (one comparison: FMR = the per-transaction rate)."""
    if claim not in names:
        return Match(claim, float("-inf"), None, float("-inf"), float("-inf"), threshold, False, "claim_unknown")
    i = names.index(claim)
    s = float(scores[i])
    return Match(claim, s, None, float("-inf"), s, float(threshold), s >= threshold,
                 "match" if s >= threshold else "below_threshold")
