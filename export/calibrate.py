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


def gallery_shift(door: np.ndarray, refs: np.ndarray, ids: list[str], sizes=(50, 100, 150), draws: int = 40,
                  fpir: float = 0.01, seed: int = 0) -> float:
    """How far the gate's self-calibration (edge.threshold: the tail fitted to its gallery's
    leave-one-out maxima) sits below the tail strangers at the door meet: the mean, over simulated
    galleries (one enrolled photo, `refs`, of each of K random identities), of the threshold at
    `fpir` from the door faces of the identities left out minus the one from the gallery alone."""
    from edge.threshold import leave_one_out_maxima, tail_from_maxima

    ids_arr = np.asarray(ids)
    people = np.unique(ids_arr)
    rng = np.random.default_rng(seed)
    # A small face set (a test subset) simulates galleries of half its people.
    sizes = [k for k in sizes if k < len(people)] or [len(people) // 2]
    if sizes[0] < 4:
        raise FacegateError(None, f"too few identities ({len(people)}) to simulate galleries for the gallery shift")
    diffs = []
    for k in sizes:
        for _ in range(draws):
            chosen = rng.choice(people, k, replace=False)
            enrolled = np.array([rng.choice(np.flatnonzero(ids_arr == p)) for p in chosen])
            gallery = refs[enrolled]
            strangers = door[~np.isin(ids_arr, chosen)]
            at_door = tail_from_maxima((strangers @ gallery.T).max(1), k)
            own = tail_from_maxima(*leave_one_out_maxima(gallery))
            diffs.append(at_door.threshold(fpir, k) - own.threshold(fpir, k))
    return float(np.mean(diffs))


def write_thresholds(encoder: Encoder, faces, out: Path, dataset: str) -> dict:
    ids = [i for i, _ in faces]
    vecs = np.concatenate([encoder.embed_images([c for _, c in faces[i:i + 64]]) for i in range(0, len(faces), 64)])
    table = {"dataset": dataset, **impostor_table(vecs, ids)}
    atomic_write_bytes(out, (json.dumps(table, indent=1) + "\n").encode())
    return table
