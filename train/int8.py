"""A trained encoder's fp32 ONNX (train/onnx.py) -> INT8 through export/: static QDQ with
activation ranges from prepared training crops (never LFW), an INT8 card that keeps the fp32
card's source (training data and licence), and an impostor-score table from identities the
encoder was not trained on (the gate's thresholds come from it: impostor scores of training
identities are lower than a stranger's and would set the threshold too low)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.embed import load_encoder
from edge.errors import FacegateError
from edge.modelcard import CalibrationSpec, load_card, sha256_file, write_card

from .data import FaceSet


def export_int8(fp32_card: str | Path, out: str | Path, calib: FaceSet, method: str = "percentile",
                limit: int = 300, holdout: FaceSet | None = None, cache: str | Path | None = None) -> dict:
    """Write `out` (INT8 ONNX) and its card; returns the card path and INT8-vs-fp32 cosines."""
    import onnx

    from export.calibrate import impostor_table
    from export.quantize import encoder_reader, quantize

    out = Path(out)
    card, fp32 = load_card(fp32_card)
    if tuple(card.alignment.size) != (calib.images.shape[2], calib.images.shape[1]):
        raise FacegateError(fp32_card, f"calibration crops are {calib.images.shape[2]}x{calib.images.shape[1]}, "
                                       f"the card asks for {tuple(card.alignment.size)}")
    pick = np.random.default_rng(0).permutation(len(calib))[:limit]
    crops = [calib.images[i] for i in pick]
    reader = encoder_reader(card, onnx.load(str(fp32)).graph.input[0].name, crops, batch=min(10, len(crops)))
    quantize(fp32, out, method, reader, cache)
    int8 = card.model_copy(update={"name": out.name.rsplit(".", 1)[0], "file": out.name, "sha256": sha256_file(out),
                                   "size_bytes": out.stat().st_size, "precision": "int8", "calibration": None,
                                   "source": card.source.model_copy(update={"notes": (
                                       f"{card.source.notes} INT8 from {fp32.name}: static QDQ, {method} ranges "
                                       f"from {len(crops)} training crops.").strip()})})
    card_path = write_card(int8, out)
    check = holdout.images if holdout is not None else calib.images[pick[:100]]
    got = _embed(load_encoder(card_path), check)
    cos = np.sum(_embed(load_encoder(fp32_card), check) * got, axis=1)
    if holdout is not None and len(holdout.classes) >= 2:
        # The table of the model the gate runs (INT8), not of its fp32 parent.
        spec = CalibrationSpec(dataset=f"{len(holdout)} faces of {len(holdout.classes)} identities held out of training",
                               **impostor_table(got, [holdout.classes[k] for k in holdout.labels]))
        card_path = write_card(int8.model_copy(update={"calibration": spec}), out)
    return {"card": str(card_path), "parity_cos_mean": float(cos.mean()), "parity_cos_min": float(cos.min()),
            "calibration_crops": len(crops), "method": method}


def _embed(enc, images: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([enc.embed_images(list(images[i:i + batch])) for i in range(0, len(images), batch)])
