"""Calibration on a face folder (../shared/data/celeba in development; never LFW):

1. INT8 activation ranges for each model, saved as a small JSON cache in export/calibration/ so
   `build` reproduces the same INT8 model without the images;
2. the encoder's impostor-score table (FMR at each threshold), which the gate turns into its
   operating threshold for a gallery of K people (edge/match.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.atomic import atomic_write_bytes
from edge.embed import Encoder, load_encoder
from edge.detect import load_detector
from edge.errors import FacegateError
from edge.imageio import load_image

FMR_GRID = [10.0 ** e for e in np.arange(-6.0, -0.24, 0.25)]


def identity_folder_faces(root: Path, detector_card: Path, template, size, limit_per_id: int = 1000):
    """(identity, aligned crop) for each image of a one-folder-per-identity tree where a face is found."""
    from edge.align import align
    from evaluation.embeddings import subject_face

    det = load_detector(detector_card)
    out = []
    for ident in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for f in sorted(ident.iterdir())[:limit_per_id]:
            try:
                img = load_image(f)
            except FacegateError:
                continue
            face = subject_face(det, img)
            if face is not None:
                out.append((ident.name, align(img, face, template, size).image))
    if not out:
        raise FacegateError(root, "no faces found in the calibration folder")
    return out


TAIL_FIT = (1e-4, 1e-2)  # FMR range the exponential tail is fitted on


def impostor_table(vectors: np.ndarray, ids: list[str], grid=FMR_GRID, refs: np.ndarray | None = None) -> dict:
    """Thresholds at which the share of different-identity pairs scoring >= threshold is each FMR.
    `refs`: the same faces as enrolled, when enrollment embeds them otherwise than the door does.

    Empirical quantiles down to FMR 1e-4 (hundreds of pairs each). Below that the empirical tail
    of a labelled face set is dominated by labelling errors (one person under two identities: on
    this CelebA subset the top pairs score 0.8+, which no stranger does), so the rarer FMRs come
    from an exponential tail, log10 FMR linear in the threshold, fitted on FMR 1e-4 .. 1e-2."""
    ids_arr = np.asarray(ids)
    scores = []
    for i in range(0, len(vectors), 512):
        s = vectors[i:i + 512] @ (vectors if refs is None else refs).T
        rows = np.arange(i, min(i + 512, len(vectors)))[:, None]
        mask = (np.arange(len(vectors))[None, :] > rows) & (ids_arr[i:i + 512, None] != ids_arr[None, :])
        scores.append(s[mask])
    imp = np.sort(np.concatenate(scores))
    n = len(imp)
    emp_f, emp_t = [], []
    for f in grid:
        k = int(np.floor(f * n))
        if k < 1:
            continue
        t = float(imp[n - k])  # k impostor pairs score at or above t
        emp_f.append(float(np.mean(imp >= t)))
        emp_t.append(t)
    emp_f, emp_t = np.asarray(emp_f), np.asarray(emp_t)
    fit = (emp_f >= TAIL_FIT[0] * 0.999) & (emp_f <= TAIL_FIT[1] * 1.001)
    if fit.sum() < 2:  # too few pairs to fit a tail: the table is what the data shows, no more
        return {"impostor_pairs": int(n), "tail": "none (too few pairs)", "fmr": emp_f.tolist()[::-1],
                "threshold": emp_t.tolist()[::-1]}
    slope, intercept = np.polyfit(emp_t[fit], np.log10(emp_f[fit]), 1)
    fmr, thr = [], []
    for f in grid:
        if f >= TAIL_FIT[0] * 0.999:
            i = int(np.argmin(np.abs(np.log10(emp_f) - np.log10(f))))
            fmr.append(float(emp_f[i]))
            thr.append(float(emp_t[i]))
        else:
            fmr.append(float(f))
            thr.append(float((np.log10(f) - intercept) / slope))
    order = np.argsort(thr)
    return {"impostor_pairs": int(n), "tail": f"exponential fit on FMR {TAIL_FIT[0]:g}..{TAIL_FIT[1]:g}",
            "fmr": [fmr[i] for i in order], "threshold": [thr[i] for i in order]}


# An identity pair of a calibration set is one person under two names when a photo of one matches a
# photo of the other as the same image does, or when their photos match each other on average as
# well as a typical person's own do (the 5th percentile of the identities' own mean scores).
SAME_IMAGE = 0.95
# Simulated galleries: K of the calibration set's identities, the rest (at least MIN_STRANGERS
# identities) strangers at the door.
GALLERY_SIZES = (50, 100, 150)
MIN_STRANGERS = 100
# Tail shapes tried, and the FPIRs a shape is judged on: galleries of 50-150 of a few hundred
# identities meet 1,500-3,000 strangers each, too few for FPIR 0.001, where one look-alike decides.
SHAPES = tuple(float(k) for k in np.round(np.arange(0.0, 0.301, 0.025), 3))
SHAPE_TARGETS = (0.003, 0.01, 0.03)


def label_errors(door: np.ndarray, refs: np.ndarray, ids: list[str]) -> list[str]:
    """Identities that are another identity's person (the later name of each such pair), which a
    simulation would count as strangers scoring like the person themself."""
    ids_arr = np.asarray(ids)
    people, inv = np.unique(ids_arr, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    s = (door @ refs.T)[np.ix_(order, order)].astype(np.float64)
    np.fill_diagonal(s, np.nan)  # a photo against its own enrolled copy says nothing of the pair
    sums = np.add.reduceat(np.add.reduceat(np.nan_to_num(s), starts, 0), starts, 1)
    pairs = np.outer(counts, counts) - np.diag(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / pairs
    top = np.maximum.reduceat(np.maximum.reduceat(np.nan_to_num(s, nan=-1.0), starts, 0), starts, 1)
    own = np.diag(mean)[counts > 1]
    if not len(own):
        return []
    same = (np.maximum(top, top.T) >= SAME_IMAGE) | (np.fmax(mean, mean.T) >= np.percentile(own, 5))
    np.fill_diagonal(same, False)
    dropped: set[int] = set()
    for a, b in zip(*np.nonzero(np.triu(same))):
        if a not in dropped:
            dropped.add(int(b))
    return sorted(people[i] for i in dropped)


def simulated_galleries(door: np.ndarray, refs: np.ndarray, ids: list[str], sizes=GALLERY_SIZES, draws: int = 40,
                        seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(gallery, strangers' best scores) of `draws` galleries of each size: one enrolled photo
    (`refs`) of each of K random identities; the strangers are the door faces of the rest."""
    ids_arr = np.asarray(ids)
    people = np.unique(ids_arr)
    rng = np.random.default_rng(seed)
    out = []
    for k in sizes:
        for _ in range(draws):
            chosen = rng.choice(people, k, replace=False)
            gallery = refs[[rng.choice(np.flatnonzero(ids_arr == p)) for p in chosen]]
            out.append((gallery, np.sort((door[~np.isin(ids_arr, chosen)] @ gallery.T).max(1))))
    return out


def gallery_shift(sims, shape: float = 0.0, fpir: float = 0.01) -> float:
    """How far the gate's self-calibration (edge.threshold: the tail fitted to its gallery's
    leave-one-out maxima) sits below the tail strangers at the door meet: the mean over simulated
    galleries of the threshold at `fpir` from the strangers' best scores minus the one from the
    gallery alone, both at tail `shape`."""
    from edge.threshold import leave_one_out_maxima, tail_from_maxima

    diffs = [tail_from_maxima(strangers, len(g), shape).threshold(fpir, len(g))
             - tail_from_maxima(*leave_one_out_maxima(g), shape).threshold(fpir, len(g)) for g, strangers in sims]
    return float(np.mean(diffs))


def delivered_fpir(sims, shape: float, shift: float, table: tuple[list, list], targets=SHAPE_TARGETS) -> np.ndarray:
    """Measured / asked FPIR of the gate's own 1:N threshold (edge.threshold.operating_points at
    `shape`, the card's `table` its prior and floor) per gallery size (rows, ascending) and target,
    pooled over the draws of a size."""
    from edge.config import MatchConfig
    from edge.threshold import operating_points

    counts: dict[tuple[int, float], list[int]] = {}
    for g, strangers in sims:
        for t in targets:
            point = operating_points(MatchConfig(target_fpir=t), table, g, shift, shape=shape)[0]
            c = counts.setdefault((len(g), t), [0, 0])
            c[0] += len(strangers) - int(np.searchsorted(strangers, point.threshold))
            c[1] += len(strangers)
    sizes = sorted({k for k, _ in counts})
    return np.array([[max(counts[(k, t)][0], 1) / counts[(k, t)][1] / t for t in targets] for k in sizes])


def stranger_tail(door: np.ndarray, refs: np.ndarray, ids: list[str], table: tuple[list, list], draws: int = 40,
                  seed: int = 0, say=print) -> dict:
    """The card's `tail_shape` and `gallery_shift`: on galleries simulated from the calibration set
    (its label errors left out), the shape at which the gate's own threshold delivers the same share
    of the asked FPIR at every target and size (the least spread of log(measured / asked)), with the
    door-vs-gallery shift measured at that shape. Where the set has too few identities for galleries
    of 50 beside MIN_STRANGERS strangers the shape is 0, the exponential tail, which errs strict."""
    left_out = label_errors(door, refs, ids)
    keep = ~np.isin(np.asarray(ids), left_out)
    ids_kept = np.asarray(ids)[keep]
    people = len(np.unique(ids_kept))
    sizes = [k for k in GALLERY_SIZES if k + MIN_STRANGERS <= people]
    if not sizes:
        if people < 8:
            raise FacegateError(None, f"too few identities ({people}) to simulate galleries for the gallery shift")
        sims = simulated_galleries(door[keep], refs[keep], ids_kept, [people // 2], draws, seed)
        return {"tail_shape": 0.0, "gallery_shift": gallery_shift(sims), "left_out": left_out}
    sims = simulated_galleries(door[keep], refs[keep], ids_kept, sizes, draws, seed)
    best = None
    for shape in SHAPES:
        shift = gallery_shift(sims, shape)
        spread = float(np.std(np.log(delivered_fpir(sims, shape, shift, table))))
        if best is None or spread < best[0]:
            best = (spread, shape, shift)
    _, shape, shift = best
    ratios = delivered_fpir(sims, shape, shift, table)
    exponential = delivered_fpir(sims, 0.0, gallery_shift(sims, 0.0), table)
    say(f"stranger tail: shape {shape}, shift {shift:+.4f}, measured / asked FPIR {ratios.min():.2f}-{ratios.max():.2f} "
        f"(the exponential tail: {exponential.min():.2f}-{exponential.max():.2f}) on galleries of "
        f"{', '.join(map(str, sizes))} (left out as label errors: {', '.join(left_out) or 'none'})")
    return {"tail_shape": shape, "gallery_shift": shift, "left_out": left_out}


def write_thresholds(encoder: Encoder, faces, out: Path, dataset: str) -> dict:
    ids = [i for i, _ in faces]
    vecs = np.concatenate([encoder.embed_images([c for _, c in faces[i:i + 64]]) for i in range(0, len(faces), 64)])
    table = {"dataset": dataset, **impostor_table(vecs, ids)}
    atomic_write_bytes(out, (json.dumps(table, indent=1) + "\n").encode())
    return table
