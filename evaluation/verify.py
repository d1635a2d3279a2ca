"""`python -m evaluation verify`: LFW View 2 10-fold verification of every encoder artifact (fp32 and
INT8 ONNX, TFLite where present) through the gate's own detector, alignment and quality gate
(the shared runner, evaluation/one_to_n.py, with its embedding cache). Skips with a clear message
where ../shared is absent. LFW is for evaluation only."""
from __future__ import annotations

import json
from pathlib import Path

from edge.atomic import atomic_write_bytes
from edge.config import QualityConfig
from edge.detect import load_detector
from edge.embed import load_encoder
from edge.errors import ModelError
from .embeddings import embed_folder
from .lfw import lfw_pairs, one_to_n_split, rel
from .one_to_n import Member, Scoring, subset, verification_figures
from edge.modelcard import load_card


def encoder_cards(models_dir: Path) -> list[Path]:
    """Every face-encoder card in the folder whose model file is present and matches it."""
    out = []
    for p in sorted(Path(models_dir).glob("*.card.json")):
        try:
            card, _ = load_card(p)
        except ModelError as e:
            print(f"verify: skipping {p.name}: {e.problem}")
            continue
        if card.task == "face_embedding":
            out.append(p)
    return out


def verify(lfw: Path, models_dir: Path, detector_card: Path, cache_dir: Path, flip: bool = False,
           pairs_per_fold: int = 0, progress: bool = True) -> list[dict]:
    pairs = lfw_pairs(lfw / "pairs.txt")
    if pairs_per_fold:
        pairs, _ = subset(pairs, one_to_n_split(lfw), 1, pairs_per_fold)
    keys = sorted({rel(p.name1, p.n1) for p in pairs} | {rel(p.name2, p.n2) for p in pairs})
    det = load_detector(detector_card, 2)
    rows = []
    for card in encoder_cards(models_dir):
        enc = load_encoder(card, 2)
        t = embed_folder(lfw / "images", keys, det, enc, QualityConfig(), cache_dir=cache_dir, progress=progress)
        s = Scoring(flip=flip)
        fig = verification_figures([Member(t)], s, pairs)
        rows.append({"artifact": card.name.replace(".card.json", ""), "precision": enc.card.precision,
                     "runtime": enc.card.runtime, "size_bytes": enc.card.size_bytes,
                     "failures_to_acquire": int((~t.acquired(True)).sum()), **fig})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'artifact':<16} {'LFW 10-fold':>14}  {'TAR@FAR1e-3':>11}  {'EER':>5}  {'FTA':>4}  {'pairs failed':>12}"]
    for r in rows:
        lines.append(f"{r['artifact']:<16} {100 * r['lfw_mean']:6.2f} +- {100 * r['lfw_std']:4.2f}  "
                     f"{100 * r['tar_at_far_1e-3']:11.2f}  {100 * r['eer']:5.2f}  {r['failures_to_acquire']:4d}  "
                     f"{r['pairs_failed']:12d}")
    return "\n".join(lines)


def main(args) -> int:
    lfw = Path(args.lfw)
    if not (lfw / "pairs.txt").is_file():
        print(f"verify: skipped: LFW not found at {lfw} (needs pairs.txt and images/, see ../shared/README.md)")
        return 0
    rows = verify(lfw, Path(args.models), Path(args.detector), Path(args.cache_dir), args.flip, args.pairs_per_fold,
                  not args.quiet)
    if not rows:
        print(f"verify: no encoder cards in {args.models}")
        return 2
    if args.pairs_per_fold:
        print(f"SUBSET: the first {args.pairs_per_fold} pairs of each kind per fold (not the protocol's figures)")
    print(table(rows))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(rows, indent=1) + "\n").encode())
    return 0
