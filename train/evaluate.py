"""Evaluate an encoder (by its model card, run by the edge's embedder) on LFW: View 2 10-fold
verification, TAR@FAR, EER and the one-shot open-set 1:N protocol of ../shared/README.md.
LFW is for evaluation only. All maths is edge/metrics.py; this file only feeds it."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from evaluation import lfw, metrics
from edge.atomic import atomic_write_bytes
from edge.detect import load_detector
from edge.embed import load_encoder

from .data import read_image


def nearest_centre(dets, shape) -> int | None:
    """The subject of an LFW image: the detected face nearest the image centre (README protocol)."""
    if not dets:
        return None
    cy, cx = shape[0] / 2.0, shape[1] / 2.0
    return int(np.argmin([(d.centre[0] - cx) ** 2 + (d.centre[1] - cy) ** 2 for d in dets]))


def embed_lfw(root: Path, keys: list[str], encoder_card: str, detector_card: str, threads: int = 1,
              cache: str | Path | None = None, progress: bool = True) -> dict[str, np.ndarray | None]:
    """key -> unit embedding, None where no face was found. With `cache`, embeddings already
    computed by the same encoder and detector (by sha256) are reused and new ones added."""
    from tqdm import tqdm

    det = load_detector(detector_card, threads)
    enc = load_encoder(encoder_card, threads)
    tag = np.asarray([enc.sha256, det.card.sha256])
    known: dict[str, np.ndarray | None] = {}
    if cache and Path(cache).exists():
        z = np.load(cache, allow_pickle=False)
        if np.array_equal(z["tag"], tag):
            known = {k: (v if ok else None) for k, v, ok in zip(z["keys"].tolist(), z["vectors"], z["ok"])}
    todo = [k for k in keys if k not in known]
    dim = enc.card.embedding.dim
    for n, k in enumerate(tqdm(todo, desc="embed LFW", unit="img", disable=not progress or not todo), 1):
        img = read_image(root / "images" / k)
        dets = det.detect(img) if img is not None else []
        i = nearest_centre(dets, img.shape) if dets else None
        known[k] = None if i is None else enc.embed(enc.align(img, dets[i])).vector
        if cache and (n % 1000 == 0 or n == len(todo)):  # an interrupted run keeps what it computed
            _save_cache(cache, tag, known, dim)
    return {k: known[k] for k in keys}


def _save_cache(path, tag: np.ndarray, known: dict, dim: int) -> None:
    ks = sorted(known)
    buf = io.BytesIO()
    np.savez(buf, tag=tag, keys=np.asarray(ks), ok=np.asarray([known[k] is not None for k in ks]),
             vectors=np.stack([known[k] if known[k] is not None else np.zeros(dim, np.float32) for k in ks]))
    atomic_write_bytes(path, buf.getvalue())


def evaluate(lfw_root: str | Path, encoder_card: str, detector_card: str, protocols=("verification", "1n"),
             folds_limit: int | None = None, threads: int = 1, cache=None, plots_dir=None, progress=True) -> dict:
    """Run the protocols; returns the figures (JSON-ready). `folds_limit` keeps the first N pairs
    of each kind per fold (a quick look, not the protocol's number); it applies to verification only."""
    root = Path(lfw_root)
    report: dict = {"encoder": str(encoder_card), "detector": str(detector_card)}
    curves = {}
    if "verification" in protocols:
        pairs = lfw.lfw_pairs(root / "pairs.txt")
        if folds_limit:
            pairs = _subset(pairs, folds_limit)
        keys = sorted({lfw.rel(p.name1, p.n1) for p in pairs} | {lfw.rel(p.name2, p.n2) for p in pairs})
        vec = embed_lfw(root, keys, encoder_card, detector_card, threads, cache, progress)
        s, y, f = lfw.pair_scores(pairs, vec)
        k = metrics.kfold_verification(s, y, f)
        report["verification"] = {
            "pairs": len(pairs), "subset": bool(folds_limit), "accuracy_mean": k.mean, "accuracy_std": k.std,
            "fold_accuracies": k.accuracies.tolist(), "fold_thresholds": k.thresholds.tolist(),
            "failures_to_acquire": sum(v is None for v in vec.values()), "pairs_failed": k.failures,
            "tar_at_far_1e-3": metrics.tar_at_far(s[y], s[~y], 1e-3), "eer": metrics.eer(s[y], s[~y])}
        far, frr, _ = metrics.det_points(s[y], s[~y])
        curves["verification"] = (far, frr)
    if "1n" in protocols:
        split = lfw.one_to_n_split(root)
        paths = list(split.gallery.values()) + [p for _, p in split.mated] + [p for _, p in split.nonmated]
        vec = embed_lfw(root, [f"{p.parent.name}/{p.name}" for p in paths], encoder_card, detector_card, threads,
                        cache, progress)
        r = metrics.open_set_1n(*lfw.identify(split, vec))
        report["identification"] = {
            "gallery": len(split.gallery), "mated": len(split.mated), "nonmated": len(split.nonmated),
            "fnir": {str(k): v for k, v in r.fnir.items()}, "fpir": {str(k): v for k, v in r.fpir.items()},
            "thresholds": {str(k): v for k, v in r.thresholds.items()}, "rank1": r.rank1,
            "failures_to_acquire": sum(v is None for v in vec.values())}
        curves["1:N"] = (r.curve_fpir, r.curve_fnir)
    if plots_dir:
        from evaluation.plots import det_plot

        Path(plots_dir).mkdir(parents=True, exist_ok=True)
        for name, xy in curves.items():
            if name == "1:N":
                axes = {"xlabel": "FPIR", "ylabel": "FNIR", "marks": {"FPIR 0.003": 0.003, "FPIR 0.01": 0.01}}
            else:
                axes = {"marks": {"FAR 1e-3": 1e-3}}
            det_plot({Path(encoder_card).name: xy}, Path(plots_dir) / f"det_{name.replace(':', '')}.png",
                     title=f"LFW {name}", **axes)
    return report


def _subset(pairs, n):
    """The first n matched and n mismatched pairs of each fold."""
    out, seen = [], {}
    for p in pairs:
        k = (p.fold, p.same)
        if seen.get(k, 0) < n:
            out.append(p)
            seen[k] = seen.get(k, 0) + 1
    return out


def summary(report: dict) -> str:
    lines = []
    v = report.get("verification")
    if v:
        lines.append(f"LFW 10-fold {100 * v['accuracy_mean']:.2f} +- {100 * v['accuracy_std']:.2f}"
                     f"{' (SUBSET)' if v['subset'] else ''}  TAR@FAR1e-3 {100 * v['tar_at_far_1e-3']:.2f}"
                     f"  EER {100 * v['eer']:.2f}  pairs failed {v['pairs_failed']}")
    i = report.get("identification")
    if i:
        lines.append(f"1:N FNIR@FPIR0.003 {100 * i['fnir']['0.003']:.1f}%  FNIR@FPIR0.01 {100 * i['fnir']['0.01']:.1f}%"
                     f"  rank-1 {100 * i['rank1']:.1f}%  failures to acquire {i['failures_to_acquire']}")
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=1) + "\n").encode())
