"""Evaluate an encoder (by its model card, run by the edge's embedder) on LFW: View 2 10-fold
verification, TAR@FAR, EER and the one-shot open-set 1:N protocol of ../shared/README.md.
LFW is for evaluation only. All maths is evaluation/metrics.py; this file only feeds it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.atomic import atomic_write_bytes
from edge.config import QualityConfig
from edge.detect import load_detector
from edge.embed import load_encoder
from evaluation import lfw, metrics
from evaluation.embeddings import embed_folder


def embed_lfw(root: Path, keys: list[str], encoder_card: str, detector_card: str, threads: int = 1,
              cache_dir: str | Path | None = None, progress: bool = True) -> dict[str, np.ndarray | None]:
    """key -> unit embedding, None where no face was found: the evaluations' embeddings and cache
    (evaluation/embeddings.py). The quality gate judges nothing here: this compares encoders."""
    t = embed_folder(Path(root) / "images", keys, load_detector(detector_card, threads),
                     load_encoder(encoder_card, threads), QualityConfig(), cache_dir=cache_dir, progress=progress)
    return {k: (v if ok else None) for k, v, ok in zip(keys, t.vec, t.ok)}


def evaluate(lfw_root: str | Path, encoder_card: str, detector_card: str, protocols=("verification", "1n"),
             folds_limit: int | None = None, threads: int = 1, cache_dir=None, plots_dir=None, progress=True) -> dict:
    """Run the protocols; returns the figures (JSON-ready). `folds_limit` keeps the first N pairs
    of each kind per fold (a quick look, not the protocol's number); it applies to verification only."""
    root = Path(lfw_root)
    report: dict = {"encoder": str(encoder_card), "detector": str(detector_card)}
    curves = {}
    if "verification" in protocols:
        pairs = lfw.lfw_pairs(root / "pairs.txt")
        if folds_limit:
            pairs = lfw.first_pairs_per_fold(pairs, folds_limit)
        keys = sorted({lfw.rel(p.name1, p.n1) for p in pairs} | {lfw.rel(p.name2, p.n2) for p in pairs})
        vec = embed_lfw(root, keys, encoder_card, detector_card, threads, cache_dir, progress)
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
                        cache_dir, progress)
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
