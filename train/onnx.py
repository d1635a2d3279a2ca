"""Hand a trained encoder to the rest of the project: fp32 ONNX plus its model card. INT8,
TFLite and shipping are `export/`'s; this file is the fp32 starting point it takes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge.align import ARCFACE_112
from edge.embed import load_encoder
from edge.modelcard import AlignmentSpec, Card, EmbeddingSpec, InputSpec, ScoreSpec, SourceSpec, sha256_file, write_card

from .backbones import INPUT
from .data import SIZE


def export_onnx(model: torch.nn.Module, out: str | Path, name: str, training_data: str, license: str,
                notes: str = "") -> Path:
    """Write `out` (.onnx, dynamic batch, opset 17) and its card; returns the card's path."""
    out = Path(out)
    model = model.eval().cpu()
    x = torch.zeros(2, 3, SIZE[1], SIZE[0])
    torch.onnx.export(model, (x,), str(out), input_names=["input"], output_names=["embedding"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=17,
                      external_data=False, dynamo=True)
    card = Card(name=name, task="face_embedding", file=out.name, sha256=sha256_file(out), size_bytes=out.stat().st_size,
                runtime="onnxruntime", precision="fp32",
                input=InputSpec(width=INPUT["width"], height=INPUT["height"], color=INPUT["color"], layout=INPUT["layout"],
                                mean=INPUT["mean"], std=INPUT["std"], dynamic_batch=True),
                alignment=AlignmentSpec(size=SIZE, template=ARCFACE_112),
                embedding=EmbeddingSpec(dim=int(model(x[:1]).shape[1]), output="embedding"), score=ScoreSpec(),
                source=SourceSpec(package="facegate-train", version="", file=out.name, license=license,
                                  notes=f"trained on {training_data}. {notes}".strip()))
    return write_card(card, out)


def off_diagonal_cosines(emb: np.ndarray) -> np.ndarray:
    """Cosines between every two different rows (unit embeddings)."""
    c = emb @ emb.T
    return c[~np.eye(len(c), dtype=bool)]


def parity(model: torch.nn.Module, card_path: str | Path, crops_bgr: np.ndarray) -> dict:
    """Torch (eval mode) against the edge embedder (ONNX through its card) on the same crops.

    `parity_min` near 1 proves the card feeds the model as it was trained, but only if the network
    tells the faces apart: a collapsed network gives parity 1 for everything. `spread_max` is the
    highest cosine between two different crops; near 1 means every face gets one embedding."""
    from .data import to_input

    if len(crops_bgr) < 2:
        raise ValueError("parity needs at least 2 crops")
    with torch.no_grad():
        ref = model.eval()(to_input(torch.from_numpy(crops_bgr))).numpy()
    got = load_encoder(card_path).embed_images(list(crops_bgr))
    off = off_diagonal_cosines(got)
    return {"parity_min": float((ref * got).sum(1).min()), "spread_max": float(off.max()),
            "spread_mean": float(off.mean()), "collapsed": bool(off.min() > 0.99)}
