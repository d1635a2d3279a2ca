"""`python -m export import-onnx MODEL ...`: a user's own ONNX face encoder -> clean fp32 ONNX
(export.onnx_import) -> INT8 QDQ ONNX (export.quantize, ranges from aligned crops of the user's
calibration folder, never LFW) -> model cards with the impostor-score table, so the gate and
`python -m evaluation one-to-n --encoder models/<name>_int8.card.json` run it unchanged.

The input spec comes from the command line: the card is the only place the gate learns it."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edge.align import ARCFACE_112, DLIB_TEMPLATE_150
from edge.embed import load_encoder
from edge.errors import FacegateError, ModelError
from edge.modelcard import (AlignmentSpec, CalibrationSpec, Card, EmbeddingSpec, InputSpec, ScoreSpec, SourceSpec,
                            sha256_file, write_card)

from .calibrate import identity_folder_faces, impostor_table
from .onnx_import import import_onnx
from .prelu import int8_friendly
from .quantize import encoder_reader, quantize

MODELS = Path(__file__).resolve().parent.parent / "models"


def parse_template(text: str, size: int) -> list[tuple[float, float]]:
    """'arcface' (112 px template scaled to `size`), 'dlib' (the dlib 150 px chip template, scaled), or ten comma-separated numbers x1,y1,...,x5,y5 in crop pixels
    (the gate's keypoint order)."""
    if text in ("arcface", "dlib"):
        pts, base = (ARCFACE_112, 112.0) if text == "arcface" else (DLIB_TEMPLATE_150, 150.0)
        return [(x * size / base, y * size / base) for x, y in pts]
    try:
        v = [float(x) for x in text.split(",")]
    except ValueError:
        v = []
    if len(v) != 10:
        raise FacegateError(None, f"--template must be arcface, dlib or 10 numbers x1,y1,...,x5,y5; got {text!r}")
    pts = list(zip(v[0::2], v[1::2]))
    if not all(0 <= c <= size for p in pts for c in p):
        raise FacegateError(None, f"--template points must lie inside the {size}x{size} crop")
    return pts


def three(text: str, what: str) -> tuple[float, float, float]:
    try:
        v = tuple(float(x) for x in text.split(","))
    except ValueError:
        v = ()
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise FacegateError(None, f"--{what} takes one number or three comma-separated numbers; got {text!r}")
    if what == "std" and any(x == 0 for x in v):
        raise FacegateError(None, "--std must not be 0")
    return v


def user_card(name: str, model: Path, precision: str, size: int, color: str, mean, std, template, dim: int,
              source: Path, calibration: CalibrationSpec | None = None) -> Card:
    return Card(name=name, task="face_embedding", file=model.name, sha256=sha256_file(model),
                size_bytes=model.stat().st_size, runtime="onnxruntime", precision=precision,
                input=InputSpec(width=size, height=size, color=color, layout="NCHW", mean=mean, std=std, dynamic_batch=True),
                alignment=AlignmentSpec(size=(size, size), template=template), embedding=EmbeddingSpec(dim=dim),
                score=ScoreSpec(), calibration=calibration,
                source=SourceSpec(package="user", version="-", file=source.name, license="as supplied by the user",
                                  notes="imported by `python -m export import-onnx`"))


def _dim(model: Path) -> int:
    out = onnx.load(str(model)).graph.output[0].type.tensor_type.shape.dim
    d = out[-1].dim_value if out else 0
    if d < 2:
        raise ModelError(model, "cannot read the embedding size from the first output's last dimension")
    return int(d)


def import_user(src: Path, name: str, size: int, color: str, mean, std, template, faces: Path, detector_card: Path,
                out_dir: Path = MODELS, limit: int = 300, method: str = "minmax", say=print) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out_dir / f"{name}_fp32.onnx", out_dir / f"{name}_int8.onnx"
    import_onnx(src, fp32)
    dim = _dim(fp32)
    write_card(user_card(f"{name}_fp32", fp32, "fp32", size, color, mean, std, template, dim, src), fp32)
    card32 = load_encoder(fp32).card
    faces_all = identity_folder_faces(faces, detector_card, template, (size, size))
    say(f"import-onnx: {len(faces_all)} aligned faces from {faces}")
    crops = [c for _, c in faces_all]
    rng = random.Random(0)
    idx = list(range(len(crops)))
    rng.shuffle(idx)
    cal, held = [crops[i] for i in idx[:limit]], [crops[i] for i in idx[limit:limit + 200]] or [crops[i] for i in idx[:50]]
    input_name = onnx.load(str(fp32)).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.onnx"
        int8_friendly(str(fp32), str(ready))  # PReLU has no INT8 kernel; a no-op for other graphs
        quantize(ready, int8, method, encoder_reader(card32, input_name, cal, batch=min(10, len(cal))))
    write_card(user_card(f"{name}_int8", int8, "int8", size, color, mean, std, template, dim, src), int8)
    ref = load_encoder(fp32).embed_images(held)
    got = load_encoder(int8).embed_images(held)
    cos = np.sum(ref * got, axis=1)
    say(f"import-onnx: INT8 vs fp32 cosine on {len(held)} faces: mean {cos.mean():.4f}, min {cos.min():.4f}")
    ids = [i for i, _ in faces_all]
    result = {"fp32": str(fp32), "int8": str(int8), "parity_cos_mean": float(cos.mean()), "parity_cos_min": float(cos.min())}
    if len(set(ids)) >= 2:
        for model, prec in ((fp32, "fp32"), (int8, "int8")):
            enc = load_encoder(model)
            vec = np.concatenate([enc.embed_images(crops[i:i + 64]) for i in range(0, len(crops), 64)])
            cal_spec = CalibrationSpec(dataset=f"{faces.name} ({len(crops)} faces)", **impostor_table(vec, ids))
            write_card(user_card(f"{name}_{prec}", model, prec, size, color, mean, std, template, dim, src, cal_spec), model)
    else:
        say("import-onnx: one identity only: no impostor table, and the gate runs no encoder without one "
            "(no threshold's false match rate is known); --calibrate with two or more identities")
    return result


def add_arguments(s) -> None:
    s.add_argument("model", help="the encoder's ONNX file")
    s.add_argument("--name", help="artifact name (default: the file's stem)")
    s.add_argument("--input-size", type=int, default=112)
    s.add_argument("--color", choices=["RGB", "BGR"], default="RGB")
    s.add_argument("--mean", default="127.5", help="one or three numbers, in --color order: value = (pixel - mean) / std")
    s.add_argument("--std", default="127.5")
    s.add_argument("--template", default="arcface", help="arcface | dlib | x1,y1,...,x5,y5 in crop pixels")
    s.add_argument("--calibrate", required=True, help="face folder, one sub-folder per identity (never LFW)")
    s.add_argument("--detector", default=str(MODELS / "yunet_fp32.card.json"))
    s.add_argument("--out-dir", default=str(MODELS))
    s.add_argument("--limit", type=int, default=300, help="crops used for the activation ranges")


def main(args) -> int:
    if "lfw" in Path(args.calibrate).resolve().parts:
        raise FacegateError(args.calibrate, "LFW is for evaluation only: calibrate on another face folder")
    src = Path(args.model)
    r = import_user(src, args.name or src.stem, args.input_size, args.color, three(args.mean, "mean"),
                    three(args.std, "std"), parse_template(args.template, args.input_size), Path(args.calibrate),
                    Path(args.detector), Path(args.out_dir), args.limit)
    print(f"import-onnx: wrote {r['fp32']} and {r['int8']} with cards; evaluate with "
          f"python -m evaluation one-to-n --encoder {Path(r['int8']).with_suffix('').with_suffix('.card.json')}")
    return 0
