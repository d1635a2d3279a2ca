"""`python -m export cohort`: the score-normalisation cohort and its calibration, from a face folder
(one sub-folder per identity; ../shared/data/celeba in development, never LFW).

The identities are split in two, alternately in sorted order: the cohort half is shipped (its
embeddings, beside the encoder as ``<model>.cohort.npz``, allow_pickle=False), the other half
("dev") calibrates it: the impostor table of AS-normalised scores (so the gate reads a normalised
threshold for a target FPIR and gallery size K), the top-k chosen for the cohort, the raw impostor
mean/std used to put encoders on one scale for score fusion, and, with --fusion-with, the fusion
weight. Both test-time-flip modes are stored (embeddings must be made the way the cohort was).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from edge.atomic import atomic_write_bytes
from edge.cohort import MODES, Cohort, as_norm_matrix, cohort_path_for
from edge.config import QualityConfig
from edge.detect import load_detector
from edge.embed import load_encoder
from edge.errors import FacegateError
from evaluation.embeddings import embed_folder
from evaluation.one_to_n import fuse
from evaluation.metrics import tar_at_far

from .calibrate import FMR_GRID

TOP_K_GRID = (25, 50, 100, 200, 400)


def identity_keys(root: Path, per_identity: int = 0) -> list[str]:
    """The images of a one-folder-per-identity tree, as 'identity/file' (the first
    `per_identity` of each in name order when given)."""
    from .quantize import IMAGE_EXT

    keys = []
    for d in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        files = sorted(f.name for f in d.iterdir() if f.suffix.lower() in IMAGE_EXT)
        keys += [f"{d.name}/{f}" for f in (files[:per_identity] if per_identity else files)]
    if not keys:
        raise FacegateError(root, "no identity folders with images")
    return keys


def split_identities(ids: list[str]) -> tuple[set, set]:
    """(cohort, dev) identities: alternate in sorted order, so both halves span the folder."""
    u = sorted(set(ids))
    if len(u) < 4:
        raise ValueError("need at least 4 identities to split into cohort and calibration halves")
    return set(u[0::2]), set(u[1::2])


def fmr_table(impostor_scores: np.ndarray, grid=FMR_GRID) -> tuple[list[float], list[float]]:
    """(fmr, threshold), ascending threshold: at threshold[i], fmr[i] of the impostor scores are
    >= it. Grid points finer than one impostor score are dropped (the data cannot vouch for them)."""
    imp = np.sort(np.asarray(impostor_scores, np.float64))
    n = imp.size
    fmr, thr = [], []
    for f in sorted(grid, reverse=True):
        k = int(np.floor(f * n))
        if k < 1:
            continue
        t = float(imp[n - k])
        fmr.append(float(np.mean(imp >= t)))
        thr.append(t)
    return fmr, thr


def impostor_mask(ids: np.ndarray) -> np.ndarray:
    """Upper-triangle mask of different-identity pairs."""
    ids = np.asarray(ids)
    return np.triu(ids[:, None] != ids[None, :], 1)


# Two labels whose "impostor" pairs score like genuine ones are one person under two labels (CelebA
# has such duplicates, often at neighbouring ids); counted as impostors they would set the raw FMR
# tail, hence the gate's threshold, far too strict. "Like genuine" is measured on the encoder's own
# scale (SFace: two people ~0.1, dlib: ~0.87): at or above this percentile of the labels' own
# mean genuine score.
DUPLICATE_GENUINE_PERCENTILE = 10.0


def duplicate_identities(vectors: np.ndarray, ids: np.ndarray, percentile: float = DUPLICATE_GENUINE_PERCENTILE) -> list[tuple]:
    """(label, label, mean cross score) for label pairs whose mean cross-pair score reaches the
    `percentile`th percentile of the per-label mean genuine scores (labels with 2+ images)."""
    ids = np.asarray(ids)
    v = np.asarray(vectors, np.float64)
    names = sorted(set(ids.tolist()))
    means = np.stack([v[ids == n].mean(0) for n in names])  # mean_a . mean_b = the mean score of a x b pairs
    genuine = []
    for n in names:
        x = v[ids == n]
        if len(x) >= 2:
            g = x @ x.T
            genuine.append((g.sum() - np.trace(g)) / (len(x) * (len(x) - 1)))
    if not genuine:
        return []
    limit = float(np.percentile(genuine, percentile))
    s = means @ means.T
    i, j = np.nonzero(np.triu(s >= limit, 1))
    return [(names[a], names[b], round(float(s[a, b]), 3)) for a, b in zip(i, j)]


def clean_impostor_mask(vectors: np.ndarray, ids: np.ndarray, say=lambda *a: None) -> np.ndarray:
    """Different-identity pairs, without those between labels that are the same person."""
    ids = np.asarray(ids)
    m = impostor_mask(ids)
    for a, b, c in duplicate_identities(vectors, ids):
        say(f"  identities {a} and {b} look like one person (mean cross score {c}): their pairs are not impostors")
        both = ((ids[:, None] == a) & (ids[None, :] == b)) | ((ids[:, None] == b) & (ids[None, :] == a))
        m &= ~both
    return m


def genuine_mask(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    return np.triu(ids[:, None] == ids[None, :], 1)


def dev_open_set_fnir(norm: np.ndarray, ids: np.ndarray, fpir: float = 0.01) -> float:
    """A one-shot 1:N emulation on the dev identities (never LFW): half of them enrolled by their
    first image, the rest of their images mated probes, the other half's images non-mated; FNIR
    at the threshold giving `fpir`. Used only to choose top-k; small, so only a coarse guide."""
    from evaluation.metrics import open_set_1n

    ids = np.asarray(ids)
    people = sorted(set(ids.tolist()))
    enrolled = people[0::2]
    g = [int(np.nonzero(ids == p)[0][0]) for p in enrolled]
    gset = set(g)
    mated = [i for i in range(len(ids)) if ids[i] in set(enrolled) and i not in gset]
    non = [i for i in range(len(ids)) if ids[i] not in set(enrolled)]
    sub = norm[np.ix_(mated + non, g)]
    best = np.argmax(sub, 1)
    sc = sub[np.arange(len(sub)), best]
    names = np.asarray(enrolled, dtype=object)[best]
    m = len(mated)
    r = open_set_1n(names[:m], sc[:m], ids[mated].astype(object), sc[m:], (fpir,))
    return r.fnir[fpir]


def _mode_arrays(vec_c: np.ndarray, vec_d: np.ndarray, ids_d: np.ndarray, top_k: int | None, say) -> dict:
    raw = vec_d @ vec_d.T
    imp = clean_impostor_mask(vec_d, ids_d, say)
    out = {"impostor_mean": float(raw[imp].mean()), "impostor_std": float(raw[imp].std())}
    ks = [k for k in TOP_K_GRID if k <= len(vec_c)] if top_k is None else [top_k]
    best = None
    for k in ks:
        c = Cohort(vec_c, "", k, [], [], 0.0, 1.0, "", False)
        st = c.stats(vec_d)
        norm = as_norm_matrix(raw, st, st)
        f = dev_open_set_fnir(norm, ids_d)
        say(f"  top-k {k:>4}: dev 1:N FNIR@FPIR0.01 {100 * f:.1f}%")
        if best is None or f < best[0]:
            best = (f, k, norm)
    out["top_k"] = best[1]
    out["fmr"], out["threshold"] = fmr_table(best[2][imp])
    out["raw_fmr"], out["raw_threshold"] = fmr_table(raw[imp])
    out["vectors"] = vec_c.astype(np.float32)
    return out


def build_cohort(encoder_card: Path, detector_card: Path, faces: Path, out: Path | None = None,
                 cache_dir: Path | None = None, top_k: int | None = None, fusion_with: Path | None = None,
                 progress: bool = True, quiet: bool = False, per_identity: int = 0) -> dict:
    say = (lambda *a: None) if quiet else (lambda *a: print("cohort:", *a))
    det = load_detector(detector_card, 2)
    enc = load_encoder(encoder_card, 2)
    keys = identity_keys(faces, per_identity)
    tab = embed_folder(faces, keys, det, enc, QualityConfig(), cache_dir=cache_dir, progress=progress)
    ok = tab.ok
    ids = np.asarray([k.split("/")[0] for k in keys])
    cohort_ids, dev_ids = split_identities(ids[ok].tolist())
    c_rows = ok & np.isin(ids, list(cohort_ids))
    d_rows = ok & np.isin(ids, list(dev_ids))
    say(f"{ok.sum()} of {len(keys)} faces found; cohort {c_rows.sum()} faces of {len(cohort_ids)} identities, "
        f"calibration {d_rows.sum()} faces of {len(dev_ids)} identities")
    arrays = {"encoder_sha256": np.asarray(enc.sha256), "dataset": np.asarray(f"{faces} (cohort: alternate identities)")}
    summary = {}
    for flip, mode in MODES.items():
        v = tab.vectors(flip)
        say(f"mode {mode}:")
        a = _mode_arrays(v[c_rows], v[d_rows], ids[d_rows], top_k, say)
        arrays.update({f"{mode}_{k}": np.asarray(x) for k, x in a.items()})
        summary[mode] = {k: a[k] for k in ("top_k", "impostor_mean", "impostor_std")}
        summary[mode]["impostor_pairs"] = int(clean_impostor_mask(v[d_rows], ids[d_rows]).sum())
    if fusion_with is not None:
        summary["fusion"] = fusion_weight(tab, ids, d_rows, fusion_with, det, faces, keys, cache_dir, progress, say)
    out = out or cohort_path_for(Path(encoder_card).with_name(enc.card.file))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())
    say(f"wrote {out}")
    summary["file"] = str(out)
    return summary


def best_fusion_weight(va: np.ndarray, vb: np.ndarray, ids: np.ndarray, ga: np.ndarray | None = None,
                       gb: np.ndarray | None = None) -> tuple[float, float, list[tuple[float, float]]]:
    """Weight w of encoder a in w * z_a + (1 - w) * z_b (z = raw cosine standardised by each
    encoder's impostor mean/std on these faces) maximising TAR at FAR 1e-4 over their pairs.
    `ga`, `gb`: the same faces as enrolled (e.g. embedded with their mirror image), compared with
    the door's `va`, `vb`; default the door's. Returns (w, that TAR, [(mean, std) of a, of b])."""
    gen, imp = genuine_mask(ids), clean_impostor_mask(va, ids)
    sa, sb = va @ (va if ga is None else ga).T, vb @ (vb if gb is None else gb).T
    stats = [(float(s[imp].mean()), float(s[imp].std())) for s in (sa, sb)]
    # The one-standard-error rule: every weight whose TAR is within one binomial standard error
    # of the best is as good as far as these faces can tell, and of those the one nearest equal
    # weighting is kept (a dev half of ~130 identities cannot justify leaning on either encoder).
    tars = {}
    for w in np.round(np.arange(0.0, 1.0001, 0.1), 2):
        f = fuse([sa, sb], [w, 1 - w], [m for m, _ in stats], [s for _, s in stats])
        tars[float(w)] = tar_at_far(f[gen], f[imp], 1e-4)
    best = max(tars.values())
    se = np.sqrt(best * (1 - best) / max(int(gen.sum()), 1))
    w = min((k for k, t in tars.items() if t >= best - se), key=lambda k: (abs(k - 0.5), -tars[k]))
    return w, tars[w], stats


def fusion_weight(tab, ids, d_rows, other_card: Path, det, faces, keys, cache_dir, progress, say) -> dict:
    """best_fusion_weight on the dev identities, for both test-time-flip modes."""
    other = embed_folder(faces, keys, det, load_encoder(other_card, 2), QualityConfig(), cache_dir=cache_dir,
                         progress=progress)
    rows = d_rows & other.ok
    res = {}
    for flip, mode in MODES.items():
        w, tar, _ = best_fusion_weight(tab.vectors(flip)[rows], other.vectors(flip)[rows], ids[rows])
        say(f"fusion ({mode}) with {Path(other_card).name}: weight {w:.1f} (dev TAR@FAR1e-4 {100 * tar:.2f}%)")
        res[mode] = {"weight": w, "dev_tar_at_far_1e-4": tar}
    return res


def main(args) -> int:
    if not Path(args.faces).is_dir():
        print(f"cohort: {args.faces} not found; nothing built (needs a face folder, e.g. ../shared/data/celeba/images)")
        return 2
    s = build_cohort(Path(args.encoder), Path(args.detector), Path(args.faces), Path(args.out) if args.out else None,
                     Path(args.cache_dir), args.top_k, Path(args.fusion_with) if args.fusion_with else None,
                     per_identity=args.per_identity)
    print(json.dumps(s, indent=1))
    return 0
