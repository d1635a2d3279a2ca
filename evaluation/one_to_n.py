"""The LFW protocols (../shared/README.md) through the device pipeline: embeddings from the one
cache (evaluation/embeddings.py), then scored in seconds for any matcher setting.

Used by `python -m evaluation one-to-n`, `python -m evaluation verify` and `python -m export cohort`.
LFW is for evaluation only: nothing here feeds training or calibration.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.atomic import atomic_write_bytes
from edge.cohort import as_norm_matrix
from edge.errors import FacegateError

from .embeddings import Table, embed_folder, subject_face
from .timing import median_ms

# A probe refused by the margin rule passes no threshold; a finite sentinel (not NaN) keeps it
# out of the failure-to-acquire count, which NaN means in evaluation.metrics.
REFUSED = -1.0e6


# ---------------------------------------------------------------- pure helpers

def search_1n(norm: np.ndarray, raw: np.ndarray, min_margin: float = 0.0):
    """Best enrolled column of each probe row by (normalised) score, as edge.match.identify picks
    it, and the score a threshold is applied to: REFUSED where the best raw score beats the
    runner-up's by less than min_margin > 0 (the runner-up is the second by normalised score).
    Returns (best column, decision score, margin)."""
    norm = np.asarray(norm, np.float64)
    raw = np.asarray(raw, np.float64)
    rows = np.arange(norm.shape[0])
    if norm.shape[1] < 2:
        best = np.zeros(norm.shape[0], int)
        return best, norm[rows, best], np.full(norm.shape[0], np.inf)
    top2 = np.argpartition(-norm, 1, axis=1)[:, :2]
    first_is_best = norm[rows, top2[:, 0]] >= norm[rows, top2[:, 1]]
    best = np.where(first_is_best, top2[:, 0], top2[:, 1])
    second = np.where(first_is_best, top2[:, 1], top2[:, 0])
    margin = raw[rows, best] - raw[rows, second]
    # No rule at all when min_margin is 0: with normalised scores the raw margin can be negative.
    score = np.where((margin >= min_margin) | (min_margin <= 0), norm[rows, best], REFUSED)
    return best, score, margin


def fuse(scores: list[np.ndarray], weights: list[float], means: list[float], stds: list[float]) -> np.ndarray:
    """Weighted sum of several encoders' scores, each first standardised by its impostor mean and
    std (measured on the calibration set), so the weights compare like with like."""
    return sum(w * (np.asarray(s, np.float64) - m) / sd for s, w, m, sd in zip(scores, weights, means, stds))


# ---------------------------------------------------------------- scoring one configuration

@dataclass(frozen=True)
class Scoring:
    """One matcher configuration (a lever setting); every field is a pure scoring choice."""

    flip: bool = False
    gallery_flip: bool = False  # enrollment side only: references embedded with their mirror image
    enroll_twin: bool = False  # references from each member's enrollment table (its fp32 twin) where it has one
    norm: str | None = None  # None (raw cosine) or "asnorm"
    margin: float = 0.0
    frames: int = 1  # > 1: multi-frame emulation (needs the jittered embeddings)
    weights: tuple[float, ...] = (1.0,)  # one per encoder: score fusion when several
    gate_quality: bool = True  # quality-gate rejections are failures to acquire


@dataclass
class Member:
    """One encoder's part in a scoring: its embedding table and (optional) cohort."""

    table: Table
    cohort: object | None = None  # edge.cohort.Cohort
    flip: bool = False  # this member mirrored at the door whatever Scoring.flip says (a fusion recipe's member flip)
    ref_table: Table | None = None  # the same faces as enrollment embeds them (the encoder's fp32 twin)


def _references(m: Member, s: Scoring, keys: list[str]) -> np.ndarray:
    """One encoder's enrolled-side vectors of `keys`, as enrollment makes them."""
    rt = m.ref_table if s.enroll_twin and m.ref_table is not None else m.table
    return rt.vectors(s.flip or m.flip or s.gallery_flip, s.frames)[rt.rows(keys)]


def score_matrices(members: list[Member], s: Scoring, probe_keys: list[str], ref_keys: list[str]):
    """(decision scores, raw scores) of probes x references: the (fused, normalised) score the
    threshold applies to, and the first encoder's raw cosine (what the margin rule looks at).
    References are the enrolled side (gallery_flip applies to them), probes the door's."""
    if len(members) != len(s.weights):
        raise ValueError("one weight per encoder")
    fused, raw0 = [], None
    for m in members:
        door = s.flip or m.flip
        p = m.table.vectors(door, s.frames)[m.table.rows(probe_keys)]
        r = _references(m, s, ref_keys)
        raw = p @ r.T
        if raw0 is None:
            raw0 = raw
        if s.norm == "asnorm":
            if m.cohort is None:
                raise ValueError("AS-norm needs a cohort for every encoder")
            fused.append(as_norm_matrix(raw, m.cohort.stats(p), m.cohort.stats(r)))
        elif s.norm is None:
            fused.append(raw)
        else:
            raise ValueError(f"unknown normalisation {s.norm!r}")
    if len(members) == 1:
        return np.asarray(fused[0], np.float64), raw0
    if s.norm == "asnorm":  # already on a common (standardised) scale
        means, stds = [0.0] * len(members), [1.0] * len(members)
    else:
        means = [m.cohort.impostor_mean for m in members]
        stds = [m.cohort.impostor_std for m in members]
    return fuse(fused, list(s.weights), means, stds), raw0


def acquired_mask(members: list[Member], s: Scoring) -> np.ndarray:
    """A face is acquired when every encoder of the fusion got it (same detector, so the same
    detection; the quality gate is the first encoder's, on its own aligned crop)."""
    ok = members[0].table.acquired(s.gate_quality)
    for m in members[1:]:
        ok = ok & m.table.ok
    return ok


def pair_scores(members: list[Member], s: Scoring, pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """View 2 pair scores (NaN where a face was not acquired), labels, folds."""
    from .lfw import rel

    a = [rel(p.name1, p.n1) for p in pairs]
    b = [rel(p.name2, p.n2) for p in pairs]
    uniq = sorted(set(a) | set(b))
    pos = {k: i for i, k in enumerate(uniq)}
    full, _ = score_matrices(members, s, uniq, uniq)
    sc = full[[pos[k] for k in a], [pos[k] for k in b]]
    tab = members[0].table
    acq = acquired_mask(members, s)
    ok = acq[tab.rows(a)] & acq[tab.rows(b)]
    return np.where(ok, sc, np.nan), np.array([p.same for p in pairs]), np.array([p.fold for p in pairs])


@dataclass
class OneToN:
    gallery: list[str]  # identity per gallery column (acquired gallery images only)
    probe_keys: list[str]
    true_ids: list[str | None]  # None for non-mated probes
    best: list[str | None]
    score: np.ndarray  # decision score (NaN = not acquired, REFUSED = margin rule)
    margin: np.ndarray


def key_of(path: Path) -> str:
    """An LFW image's key: person/file, relative to images/."""
    return f"{path.parent.name}/{path.name}"


def one_to_n(members: list[Member], s: Scoring, split, gallery_names: list[str] | None = None) -> OneToN:
    """Search every probe of the split against the gallery (or the `gallery_names` subset)."""
    key = key_of
    tab = members[0].table
    acq = acquired_mask(members, s)
    names = [n for n in (gallery_names if gallery_names is not None else split.gallery)
             if acq[tab.index[key(split.gallery[n])]]]
    gkeys = [key(split.gallery[n]) for n in names]
    probes = [(n, key(p)) for n, p in split.mated] + [(None, key(p)) for _, p in split.nonmated]
    pkeys = [k for _, k in probes]
    norm, raw = score_matrices(members, s, pkeys, gkeys)
    best, score, margin = search_1n(norm, raw, s.margin)
    p_ok = acq[tab.rows(pkeys)]
    score = np.where(p_ok, score, np.nan)
    return OneToN(names, pkeys, [n for n, _ in probes], [names[b] if ok else None for b, ok in zip(best, p_ok)],
                  score, margin)


def figures_1n(r: OneToN, fpirs=(0.003, 0.01)):
    """evaluation.metrics.open_set_1n on a search result; also returns the mated/non-mated masks."""
    from .metrics import open_set_1n

    mated = np.array([t is not None for t in r.true_ids])
    ids = np.asarray(r.best, dtype=object)
    res = open_set_1n(ids[mated], r.score[mated], np.asarray(r.true_ids, dtype=object)[mated], r.score[~mated], fpirs)
    return res, mated


def false_matches(r: OneToN, threshold: float) -> list[dict]:
    """Every probe accepted as someone it is not at `threshold`: non-mated probes (strangers let
    in) and mated probes returned as another enrolled person."""
    out = []
    for k, t, b, sc in zip(r.probe_keys, r.true_ids, r.best, r.score):
        if np.isfinite(sc) and sc >= threshold and b != t:
            out.append({"probe": k, "kind": "non-mated" if t is None else "mated, wrong identity",
                        "matched": b, "score": round(float(sc), 4)})
    return sorted(out, key=lambda d: -d["score"])


# ---------------------------------------------------------------- one-to-n

def subset(pairs, split, every: int = 1, pairs_per_fold: int = 0):
    """A quick-look subset, never the protocol's figures: every Nth gallery person (with their
    mated probes) and every Nth non-mated person; the first n pairs of each kind per fold."""
    from .lfw import OneToNSplit, first_pairs_per_fold

    names = sorted(split.gallery)[::max(every, 1)]
    keep = set(names)
    sub = OneToNSplit({n: split.gallery[n] for n in names}, [(n, p) for n, p in split.mated if n in keep],
                      split.nonmated[::max(every, 1)])
    return (first_pairs_per_fold(pairs, pairs_per_fold) if pairs_per_fold else pairs), sub


def verification_figures(members: list[Member], s: Scoring, pairs) -> dict:
    from .metrics import eer, kfold_verification, tar_at_far

    sc, y, f = pair_scores(members, s, pairs)
    k = kfold_verification(sc, y, f)
    return {"lfw_mean": k.mean, "lfw_std": k.std, "tar_at_far_1e-3": tar_at_far(sc[y], sc[~y], 1e-3),
            "eer": eer(sc[y], sc[~y]), "pairs_failed": k.failures}


GATE_KS = (100, 420, 840, 1680)
GATE_TARGETS = (0.001, 0.003, 0.01)


def oracle_fnir(nonmated: np.ndarray, mated: np.ndarray, hit: np.ndarray, passes: int) -> float:
    """FNIR at the lowest threshold that lets exactly `passes` of the non-mated scores through
    (NaN scores: not acquired, never through): the best a threshold could do at that FPIR."""
    ranked = np.sort(nonmated[np.isfinite(nonmated)])[::-1]
    t = np.nextafter(ranked[passes], np.inf) if passes < len(ranked) else -np.inf
    return float(1 - np.mean(hit & np.isfinite(mated) & (mated >= t)))


def gate_threshold_runs(members: list[Member], s: Scoring, split, table: tuple[list, list], shift: float,
                        table_only: str | None, calibration: str = "gallery", ks=GATE_KS, targets=GATE_TARGETS,
                        draws: int = 20, seed: int = 0, full: OneToN | None = None, shape: float = 0.0) -> list[dict]:
    """The gate's own threshold (edge.threshold.operating_points, as Matcher computes it from the
    enrolled vectors alone) on random galleries of K of the protocol's enrolled people (`draws`
    each; the full gallery once). The non-mated probes of a draw are the protocol's plus the mated
    probes of the people left out. Per draw, target: threshold, expected and measured FPIR, FNIR,
    and the oracle FNIR at the measured and at the target FPIR. `full`: the whole gallery's search,
    where the caller has it already."""
    from edge.config import MatchConfig
    from edge.threshold import operating_points

    if len(members) != 1 or s.norm is not None and not table_only:
        raise ValueError("the gate's own threshold is evaluated for one encoder's scores")
    full = full if full is not None else one_to_n(members, s, split)
    rng = np.random.default_rng(seed)
    out = []
    for k in ks:
        k = min(k, len(full.gallery))
        for d in range(1 if k == len(full.gallery) else draws):
            names = full.gallery if k == len(full.gallery) else sorted(rng.choice(full.gallery, k, replace=False).tolist())
            res = full if names is full.gallery else one_to_n(members, s, split, names)
            refs = _references(members[0], s, [key_of(split.gallery[n]) for n in res.gallery])
            enrolled = set(res.gallery)
            mated = np.array([t is not None and t in enrolled for t in res.true_ids])
            non, ms = res.score[~mated], res.score[mated]
            hit = np.array([b == t for b, t in zip(res.best, res.true_ids)])[mated]
            for target in targets:
                match = MatchConfig(target_fpir=target, calibration=calibration)
                point = operating_points(match, table, refs, shift, table_only, shape)[0]
                t = point.threshold
                fp = int((np.isfinite(non) & (non >= t)).sum())
                out.append({"K": k, "draw": d, "target_fpir": target, "threshold": t, "expected_fpir": point.expected_fpir,
                            "source": point.source, "false_positives": fp, "nonmated": int(len(non)),
                            "measured_fpir": fp / len(non), "mated": int(mated.sum()),
                            "fnir": float(1 - np.mean(hit & np.isfinite(ms) & (ms >= t))),
                            "oracle_fnir_at_measured": oracle_fnir(non, ms, hit, fp),
                            "oracle_fnir_at_target": oracle_fnir(non, ms, hit, int(np.floor(target * len(non))))})
    return out


def summarize_gate_runs(runs: list[dict]) -> list[dict]:
    """Per (K, target): means over draws, the measured FPIR's 95% interval and the verdict. The
    interval is the wider of the t-interval over draws (the galleries differ) and the pooled
    Wilson interval (the probes are few; the draws share the protocol's non-mated probes, so the
    t-interval alone would be too narrow). A single draw has the Wilson interval."""
    from scipy import stats

    from .metrics import wilson

    out = []
    for key in sorted({(r["K"], r["target_fpir"]) for r in runs}):
        rs = [r for r in runs if (r["K"], r["target_fpir"]) == key]
        f = np.array([r["measured_fpir"] for r in rs])
        fp, n = sum(r["false_positives"] for r in rs), sum(r["nonmated"] for r in rs)
        lo, hi = wilson(fp, n)
        if len(rs) > 1:
            half = stats.t.ppf(0.975, len(rs) - 1) * f.std(ddof=1) / np.sqrt(len(rs))
            lo, hi = min(lo, f.mean() - half), max(hi, f.mean() + half)
        target = key[1]
        # Too few non-mated probes in a draw (the draws share the protocol's) to tell: a gate that
        # let in exactly the target would show an upper bound above 1.5x on one draw's count.
        per_draw = n // len(rs)
        small = wilson(round(target * per_draw), per_draw)[1] > 1.5 * target
        out.append({"K": key[0], "target_fpir": target, "draws": len(rs), "nonmated_per_draw": per_draw,
                    "threshold": float(np.mean([r["threshold"] for r in rs])),
                    "threshold_sd": float(np.std([r["threshold"] for r in rs])),
                    "measured_fpir": float(f.mean()), "ci95": [max(0.0, float(lo)), float(hi)],
                    "false_positives": fp, "ratio": float(f.mean() / target),
                    "fnir": float(np.mean([r["fnir"] for r in rs])),
                    "oracle_fnir_at_measured": float(np.mean([r["oracle_fnir_at_measured"] for r in rs])),
                    "oracle_fnir_at_target": float(np.mean([r["oracle_fnir_at_target"] for r in rs])),
                    "within": bool(0.5 * target <= f.mean() <= target and hi <= 1.5 * target),
                    "too_few_to_tell": bool(small)})
    return out


GATE_HEADER = (f"  {'K':>5} {'target':>6} {'draws':>5} {'threshold':>9} {'measured FPIR [95% CI]':>27} {'x target':>8} "
               f"{'FNIR':>6} {'oracle@meas':>11} {'oracle@target':>13}  verdict")


def _gate_row_text(c: dict) -> str:
    ci = f"{c['measured_fpir']:.4f} [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]"
    verdict = ("in [0.5x, 1x], upper <= 1.5x" if c["within"] else "OUTSIDE") + (
        " (too few non-mated probes to tell)" if c["too_few_to_tell"] else "")
    return (f"  {c['K']:5d} {c['target_fpir']:6.3f} {c['draws']:5d} {c['threshold']:9.4f} {ci:>27} {c['ratio']:7.2f}x "
            f"{100 * c['fnir']:5.1f}% {100 * c['oracle_fnir_at_measured']:10.1f}% {100 * c['oracle_fnir_at_target']:12.1f}%  {verdict}")


def lever_costs(encoder_card, detector, image: np.ndarray, cohort=None, other_card=None, n: int = 30) -> dict:
    """Per-frame latency each lever adds, here, 1 thread: the encoder's own time for the face
    (flip = the mirror in the same batch), AS-norm (probe x cohort scores and top-k), a second
    encoder (its alignment and embedding). Crop scale and the margin rule cost nothing."""
    from edge.embed import load_encoder

    enc, flipped = load_encoder(encoder_card, 1), load_encoder(encoder_card, 1, flip=True)
    det = subject_face(detector, image)
    face = enc.align(image, det)
    base = median_ms(lambda: enc.embed(face), n, warmup=1)
    costs = {"encoder_ms": base, "flip_ms": median_ms(lambda: flipped.embed(face), n, warmup=1) - base,
             "margin_ms": 0.0, "crop_scale_ms": 0.0}
    if cohort is not None:
        v = enc.embed(face).vector[None]
        costs["asnorm_ms"] = median_ms(lambda: cohort.stats(v), n, warmup=1)
    if other_card is not None:
        other = load_encoder(other_card, 1)
        costs["fusion_ms"] = median_ms(lambda: other.embed_images([other.align(image, det).image]), n, warmup=1)
    return costs


def _row_text(name: str, v: dict, o: dict, fta: int, cost: str) -> str:
    return (f"{name:<38} {100 * v['lfw_mean']:6.2f} +- {100 * v['lfw_std']:4.2f}  {100 * v['tar_at_far_1e-3']:6.2f}"
            f"  {100 * v['eer']:5.2f}  {100 * o['fnir_0.003']:5.1f}%  {100 * o['fnir_0.01']:5.1f}%"
            f"  {100 * o['rank1']:5.1f}%  {fta:4d}  {cost}")


HEADER = (f"{'configuration':<38} {'LFW 10-fold':>14}  {'TAR@1e-3':>6}  {'EER':>5}  {'FNIR.003':>6}  "
          f"{'FNIR.01':>6}  {'rank-1':>6}  {'FTA':>4}  per-frame cost")


def score_row(members, s: Scoring, pairs, split) -> tuple[dict, OneToN, object]:
    v = verification_figures(members, s, pairs)
    r = one_to_n(members, s, split)
    res, _ = figures_1n(r)
    o = {"fnir_0.003": res.fnir[0.003], "fnir_0.01": res.fnir[0.01], "fpir_0.003": res.fpir[0.003],
         "fpir_0.01": res.fpir[0.01], "threshold_0.003": res.thresholds[0.003], "threshold_0.01": res.thresholds[0.01],
         "rank1": res.rank1, "gallery": len(r.gallery), "mated": int(sum(t is not None for t in r.true_ids)),
         "nonmated": int(sum(t is None for t in r.true_ids))}
    return {**v, **o}, r, res


def main(args) -> int:
    """`python -m evaluation one-to-n`: the LFW protocols of ../shared/README.md through the device
    pipeline, for one configuration or (--levers) each lever alone and combined."""
    from edge.cohort import cohort_path_for, load_cohort
    from edge.config import load_config
    from edge.detect import load_detector
    from edge.embed import enrollment_twin, load_encoder
    from .lfw import lfw_pairs, one_to_n_split
    from edge.modelcard import load_card

    cfg = load_config(args.config)
    lfw = Path(args.lfw)
    if not (lfw / "pairs.txt").is_file():
        raise FacegateError(lfw, "LFW not found (pairs.txt and images/); see ../shared/README.md")
    pairs, split = lfw_pairs(lfw / "pairs.txt"), one_to_n_split(lfw)
    if args.every > 1 or args.pairs_per_fold:
        pairs, split = subset(pairs, split, args.every, args.pairs_per_fold)
        print(f"SUBSET (not the protocol's figures): every {args.every}th person for 1:N, "
              f"{args.pairs_per_fold or 300} pairs of each kind per fold")
    from .lfw import rel

    keys = sorted({f"{p.parent.name}/{p.name}" for p in split.gallery.values()}
                  | {f"{p.parent.name}/{p.name}" for _, p in split.mated + split.nonmated}
                  | {rel(p.name1, p.n1) for p in pairs} | {rel(p.name2, p.n2) for p in pairs})
    det = load_detector(args.detector or cfg.models.detector, 2)
    enc_card = args.encoder or cfg.models.encoder
    frames = max(1, args.frames)

    def table(card, scale=1.0, jitter=0):
        return embed_folder(lfw / "images", keys, det, load_encoder(card, 2), cfg.quality, template_scale=scale,
                            jitter=jitter, cache_dir=args.cache_dir, progress=not args.quiet)

    def cohort_for(card, flip, required):
        _, model = load_card(card)
        p = cohort_path_for(model)
        if not p.is_file() and not required:
            return None
        return load_cohort(p, load_card(card)[0].sha256, flip)

    flip = args.flip or cfg.match.flip
    gflip = cfg.match.enroll_flip if args.enroll_flip is None else args.enroll_flip
    margin = cfg.match.min_margin if args.margin is None else args.margin
    main_t = table(enc_card, args.scale, frames - 1)
    other = None
    if args.fusion:
        card2, _, w = args.fusion.rpartition(":")
        other = (card2, float(w), table(card2))
    want_norm = args.norm == "asnorm"
    # A photo is a whole transaction. With quality.patience_frames > 0 the gate matches a face it
    # keeps refusing once the track's patience runs out, so a photo counts as acquired whatever its
    # quality; with 0 a refused photo is a failure to acquire.
    strict = not args.no_quality and cfg.quality.patience_frames == 0
    # The gallery side as the gate's enrollment makes it: each encoder's fp32 twin where one is
    # installed (models.enroll_encoder), else the encoder itself.
    # Not embedded at all when nothing scores with them (--no-enroll-twin without --levers).
    twins = {}
    for card in [enc_card] + ([other[0]] if other else []) if args.levers or not args.no_enroll_twin else []:
        tw = enrollment_twin(card, (args.enroll_encoder or cfg.models.enroll_encoder) if card == enc_card else None)
        if tw is not None:
            twins[card] = (tw, table(tw, args.scale, frames - 1) if card == enc_card else table(tw))
    twin = not args.no_enroll_twin and bool(twins)

    def members_for(flip, norm, fusion, t=main_t):
        need = norm or fusion
        ref = twins.get(enc_card, (None, None))[1] if t is main_t else None
        ms = [Member(t, cohort_for(enc_card, flip, need) if need else None, ref_table=ref)]
        if fusion:
            ms.append(Member(other[2], cohort_for(other[0], flip or args.fusion_flip, True), flip=args.fusion_flip,
                             ref_table=twins.get(other[0], (None, None))[1]))
        return ms

    def scoring(flip=False, gflip=False, norm=False, margin=0.0, fusion=False, fr=1, tw=False):
        w = (1 - other[1], other[1]) if fusion else (1.0,)
        return Scoring(flip=flip, gallery_flip=gflip, enroll_twin=tw, norm="asnorm" if norm else None, margin=margin,
                       frames=fr, weights=w, gate_quality=strict)

    main_s = scoring(flip, gflip, want_norm, margin, bool(other), frames, twin)
    configs = [("selected: " + _describe(args, flip, gflip, margin, twin), members_for(flip, want_norm, bool(other)),
                main_s, args.scale)]
    if args.levers:
        m = margin or 0.05
        fu = f"fusion {Path(other[0]).name.split('.')[0]}{' (mirrored)' if args.fusion_flip else ''}" if other else ""
        ef, tw = "enrollment flip", "fp32 enrollment"
        # name, flip, enrollment flip, AS-norm, margin, fusion, frames, fp32 enrollment
        lv = [("baseline (ArcFace template x1.0)", False, False, False, 0.0, False, 1, False),
              ("+ flip", True, False, False, 0.0, False, 1, False), (f"+ {ef}", False, True, False, 0.0, False, 1, False),
              ("+ AS-norm", False, False, True, 0.0, False, 1, False), (f"+ margin {m:g}", False, False, False, m, False, 1, False)]
        if twins:
            lv.append((f"+ {tw}", False, False, False, 0.0, False, 1, True))
        if other:
            lv.append((f"+ {fu} w={other[1]:g}", False, False, False, 0.0, True, 1, False))
        if frames > 1:
            lv.append((f"+ multi-frame EMULATION k={frames}", False, False, False, 0.0, False, frames, False))
        lv += [(f"flip + margin {m:g}", True, False, False, m, False, 1, False),
               (f"{ef} + margin {m:g}", False, True, False, m, False, 1, False)]
        if twins:
            lv.append((f"{ef} + {tw}", False, True, False, 0.0, False, 1, True))
        if other:
            lv += [(f"{fu} + margin {m:g}", False, False, False, m, True, 1, False),
                   (f"{ef} + {fu}", False, True, False, 0.0, True, 1, False),
                   (f"{ef} + {fu} + margin {m:g}", False, True, False, m, True, 1, False),
                   (f"flip + {fu}", True, False, False, 0.0, True, 1, False),
                   (f"flip + {fu} + margin {m:g}", True, False, False, m, True, 1, False)]
            if twins:
                lv += [(f"{ef} + {tw} + {fu}", False, True, False, 0.0, True, 1, True),
                       (f"{ef} + {tw} + {fu} + margin {m:g}", False, True, False, m, True, 1, True)]
        lv += [(f"all: flip + AS-norm{' + ' + fu if other else ''} + margin {m:g}", True, False, True, m, bool(other), 1, False)]
        configs = [(n, members_for(f, nm, fs), scoring(f, g, nm, mg, fs, fr, t), 1.0) for n, f, g, nm, mg, fs, fr, t in lv]
        if not args.no_quality:
            # The other quality policy for a few rows: without patience the gate refuses some LFW
            # photos for good; with it (or report-only) it keeps them.
            tag = " [no patience: quality refusals final]" if not strict else " [quality report-only]"
            for n, f, g, nm, mg, fs, fr, t in (lv[0], lv[-1]) + tuple(r for r in lv if r[7] and r[5] and not r[4]):
                sc = Scoring(**{**scoring(f, g, nm, mg, fs, fr, t).__dict__, "gate_quality": not strict})
                configs.append((n + tag, members_for(f, nm, fs), sc, 1.0))
        for sc in args.scales:
            configs.insert(1, (f"crop: template x{sc:g}", [Member(table(enc_card, sc))], scoring(), sc))
        shipped = cfg.models.encoder
        if Path(shipped).resolve() != Path(enc_card).resolve():
            # The configured encoder as the gate runs it, in the same run as the levers it is made of.
            shipped_twin = enrollment_twin(shipped, cfg.models.enroll_encoder)
            ref = table(shipped_twin) if shipped_twin is not None else None
            sc = Scoring(flip=cfg.match.flip, gallery_flip=cfg.match.enroll_flip, enroll_twin=ref is not None,
                         margin=cfg.match.min_margin, gate_quality=strict)
            configs.insert(0, (f"shipped default: {Path(shipped).name.split('.card')[0]}",
                               [Member(table(shipped), ref_table=ref)], sc, 1.0))
    from edge.imageio import load_image

    sample = load_image(lfw / "images" / keys[0])
    c0 = cohort_for(enc_card, False, False)
    costs = lever_costs(enc_card, det, sample, c0, other[0] if other else None)
    if args.levers and Path(cfg.models.encoder).resolve() != Path(enc_card).resolve():
        costs["shipped_default_ms"] = lever_costs(cfg.models.encoder, det, sample)["encoder_ms"]
    report = {"subset": {"every": args.every, "pairs_per_fold": args.pairs_per_fold}, "encoder": str(enc_card), "detector": str(args.detector or cfg.models.detector), "lfw": str(lfw),
              "quality_gate": not args.no_quality, "quality_patience_frames": cfg.quality.patience_frames,
              "costs_ms_1thread": costs, "rows": []}
    qual, counts = np.unique(main_t.quality, return_counts=True)
    report["acquisition"] = {str(q): int(c) for q, c in zip(qual, counts)}
    print(f"encoder {enc_card}; detector {report['detector']}; images {len(keys)}; "
          f"acquisition {report['acquisition']}")
    if not args.no_quality and not strict:
        print(f"quality.patience_frames {cfg.quality.patience_frames}: a photo is a track whose patience ran out, so "
              "faces the quality gate refuses are matched (rows marked [no patience] count them as failures)")
    print(f"per-frame costs here (1 thread, ms): " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    print(HEADER)
    curves = {}
    for i, (name, ms, s, scale) in enumerate(configs):
        fig, r, res = score_row(ms, s, pairs, split)
        acq = acquired_mask(ms, s)
        fta = int((~acq).sum())
        cost = f"{costs['shipped_default_ms']:.1f} ms" if name.startswith("shipped default") else _cost_of(s, costs, ms)
        print(_row_text(name, fig, fig, fta, cost), flush=True)
        row = {"name": name, "scoring": s.__dict__ | {"template_scale": scale}, "failures_to_acquire": fta,
               "cost": cost, **{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in fig.items()}}
        curves[name] = (res.curve_fpir, res.curve_fnir)
        if i == 0 or name.startswith("all: "):
            row["false_matches_at_fpir_0.003"] = false_matches(r, res.thresholds[0.003])
            card = cfg.models.encoder if name.startswith("shipped default") else enc_card
            tbl = _k_table(ms, s, cohort_for, card)
            if tbl is not None and not args.no_gate_threshold:
                # The card's door-vs-gallery shift and tail shape apply to its own table only.
                cal = load_card(card)[0].calibration
                shift, shape = (cal.gallery_shift, cal.tail_shape) if tbl[2].startswith("model card") else (0.0, 0.0)
                only = tbl[2] if s.norm == "asnorm" else None
                runs = {c: gate_threshold_runs(ms, s, split, tbl[:2], shift, only, c, draws=args.draws, full=r,
                                               shape=shape) for c in ("gallery", "card")}
                row["gate_threshold"] = {c: summarize_gate_runs(v) for c, v in runs.items()}
                row["gate_threshold_runs"] = runs
                row["gate_threshold_table"] = tbl[2]
        if i == 0 and args.probes_json:
            # Per probe, for evaluations that slice the protocol (evaluation/fairness.py), with the
            # thresholds the gate picks for the whole gallery.
            gate = {str(x["target_fpir"]): x["threshold"] for x in row.get("gate_threshold_runs", {}).get("gallery", [])
                    if x["K"] == len(r.gallery)}
            atomic_write_bytes(args.probes_json, json.dumps({
                "row": name, "gallery": r.gallery, "gallery_keys": [key_of(split.gallery[n]) for n in r.gallery],
                "gate_thresholds": gate,
                "probes": [{"key": k, "true": t, "best": b, "score": None if not np.isfinite(sc) else float(sc)}
                           for k, t, b, sc in zip(r.probe_keys, r.true_ids, r.best, r.score)]}).encode())
        report["rows"].append(row)
    for row in report["rows"]:
        for calibration, summary in row.get("gate_threshold", {}).items():
            print(f"\nthe gate's own threshold, match.calibration {calibration} ({row['name']}; prior: "
                  f"{row['gate_threshold_table']}; never LFW's probes):")
            print(GATE_HEADER)
            for c in summary:
                print(_gate_row_text(c))
        if "false_matches_at_fpir_0.003" in row:
            print(f"\nfalse matches at FPIR 0.003 ({row['name']}):")
            for f in row["false_matches_at_fpir_0.003"]:
                print(f"  {f['probe']:<45} -> {f['matched']:<30} {f['score']:.4f}  ({f['kind']})")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=1, default=_jsonable) + "\n").encode())
        print(f"\nwrote {args.json}")
    if args.calibration_png and any("gate_threshold" in r for r in report["rows"]):
        try:
            from .plots import calibration_plot

            row = next(r for r in report["rows"] if "gate_threshold" in r)
            calibration_plot(row["gate_threshold"], args.calibration_png,
                             title=f"LFW 1:N, the gate's own threshold ({row['name']})")
            print(f"wrote {args.calibration_png}")
        except RuntimeError as e:
            print(f"no calibration plot: {e}", file=sys.stderr)
    if args.det_png:
        try:
            from .plots import det_plot

            det_plot(curves, args.det_png, title="LFW one-shot open-set 1:N", xlabel="FPIR", ylabel="FNIR",
                     marks={"FPIR 0.003": 0.003, "FPIR 0.01": 0.01})
            print(f"wrote {args.det_png}")
        except RuntimeError as e:
            print(f"no DET plot: {e}", file=sys.stderr)
    return 0


def _k_table(ms, s: Scoring, cohort_for, enc_card):
    """The calibration table the gate would use for this scoring, with where it comes from; None
    for fusion (no table). Raw cosine: the card's (celeba), else the cohort file's raw table of
    its calibration half (also celeba); AS-norm: the cohort file's normalised table."""
    if len(ms) > 1:
        return None
    if s.norm == "asnorm":
        return ms[0].cohort.fmr, ms[0].cohort.threshold, "cohort file, AS-norm table"
    from edge.modelcard import load_card

    cal = load_card(enc_card)[0].calibration
    if cal is not None and not s.flip:
        return cal.fmr, cal.threshold, f"model card ({cal.dataset})"
    c = cohort_for(enc_card, s.flip, False)
    return (list(c.raw_fmr), list(c.raw_threshold), "cohort file, raw-cosine table") if c is not None else None


def _cost_of(s: Scoring, costs: dict, ms) -> str:
    extra = 0.0
    parts = []
    if s.flip:
        extra += costs["flip_ms"]
        parts.append("flip")
    if s.norm == "asnorm" and "asnorm_ms" in costs:
        extra += costs["asnorm_ms"]
    if len(ms) > 1 and "fusion_ms" in costs:
        extra += costs["fusion_ms"] * (2 if s.flip or ms[1].flip else 1)
    txt = f"{costs['encoder_ms']:.1f} + {extra:.2f} ms"
    if s.frames > 1:
        txt += f" (+{s.frames - 1} frames wait)"
    return txt


def _describe(args, flip: bool, gflip: bool, margin: float, twin: bool) -> str:
    bits = [f"x{args.scale:g}"] + (["flip"] if flip else []) + (["enrollment flip"] if gflip else [])
    bits += ["fp32 enrollment"] if twin else []
    bits += ([args.norm] if args.norm else []) + ([f"margin {margin:g}"] if margin else [])
    bits += [f"fusion {args.fusion}{' (mirrored)' if args.fusion_flip else ''}"] if args.fusion else []
    bits += [f"frames {args.frames}"] if args.frames > 1 else []
    return " ".join(bits)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))

