"""`python -m export tflite`: the face encoders as INT8 TFLite models for LiteRT, each with its card.

torch module (dlib: read from its .dat; SFace: rebuilt from its fp32 ONNX by export.onnx_torch)
-> float .tflite (litert-torch, channels-last input) -> INT8 (ai-edge-quantizer recipe
static_wi8_ai8: int8 weights and activations) with activation ranges from aligned face crops of a
folder the user passes (for development ../shared/data/celeba, never LFW) -> parity with the fp32
ONNX encoder on held-out crops of the same folder. The model and its card are written only when
parity holds.

Needs the export-only venv of requirements-tflite.txt (the converter brings jax, about 2 GB); the
device only runs the result with ai-edge-litert. `export setup` does not build these models."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edge.atomic import atomic_write_bytes
from edge.embed import Encoder
from edge.errors import FacegateError, ModelError
from edge.modelcard import Card, load_card, sha256_file, write_card

MIN_COSINE = 0.98  # INT8 TFLite vs fp32 ONNX, mean over held-out faces (the minimum is reported)
ENCODERS = ("dlib", "sface")


def torch_module(name: str, models_dir: Path):
    """The encoder as a torch module on the fp32 card's NCHW input, without L2 normalisation
    (the gate normalises; leaving it out keeps the int8 output range wide)."""
    if name == "dlib":
        from .dlib_net import DAT_NAME, load_dat

        return load_dat(models_dir / "raw" / DAT_NAME).eval()
    if name == "sface":
        from .onnx_torch import load_onnx_module
        from .prelu import int8_friendly

        # PReLU reaches TFLite as MUL/SUB/RELU chains that are slow in INT8; the ONNX build's exact
        # Conv+PReLU rewrite (export.prelu) turns most of them into Conv + ReLU + Add.
        with tempfile.TemporaryDirectory() as tmp:
            ready = Path(tmp) / "sface_int8ready.onnx"
            int8_friendly(str(models_dir / "sface_fp32.onnx"), str(ready))
            return load_onnx_module(ready)
    raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}")


def channels_last(net):
    """NHWC in, as LiteRT models take images; the transpose is folded by the converter."""
    import torch

    class ChannelsLast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    return ChannelsLast().eval()


def tflite_card(fp32: Card, name: str, model_file: Path, **extra) -> Card:
    """The fp32 ONNX card, re-pointed at the TFLite file: same alignment, colour and normalisation,
    channels-last batch-1 input. The fp32 model's score calibration does not carry over."""
    d = fp32.model_dump()
    d.update({"name": name, "file": model_file.name, "runtime": "litert", "precision": "int8", "calibration": None,
              "accuracy": {}, "speed": {}, **extra})
    d["input"].update(layout="NHWC", dynamic_batch=False)
    if model_file.is_file():
        d.update(sha256=sha256_file(model_file), size_bytes=model_file.stat().st_size)
    return Card.model_validate(d)


def convert_float(net, sample: np.ndarray, out: Path) -> Path:
    import litert_torch
    import torch

    model = litert_torch.convert(net, (torch.from_numpy(sample),))
    model.export(str(out))
    return out


def quantize_int8(float_tflite: Path, calib: np.ndarray, out: Path) -> Path:
    from ai_edge_quantizer import quantizer, recipe

    key, name = _signature_input(float_tflite)
    q = quantizer.Quantizer(str(float_tflite), recipe.static_wi8_ai8())
    # One thread: the export machine is shared; calibration of a few hundred crops takes seconds.
    ranges = q.calibrate({key: [{name: x[None]} for x in calib]}, num_threads=1)
    q.quantize(ranges).export_model(str(out), overwrite=True)
    return out


def _signature_input(path: Path) -> tuple[str, str]:
    """(signature key, input name) of a one-input LiteRT model, as the quantizer's calibration wants them."""
    from ai_edge_litert.interpreter import Interpreter

    sigs = Interpreter(model_path=str(path)).get_signature_list()
    key = next(iter(sigs))
    return key, sigs[key]["inputs"][0]


def cosines(a: Encoder, b: Encoder, crops: list[np.ndarray]) -> np.ndarray:
    return np.sum(a.embed_images(crops) * b.embed_images(crops), axis=1)


def export_encoder(name: str, models_dir: Path, faces: Path, detector_card: Path, n_calib: int = 120,
                   n_heldout: int = 100, say=print) -> dict:
    from .quantize import aligned_crops

    fp32_card, fp32_path = load_card(models_dir / f"{name}_fp32.card.json")
    fp32 = Encoder(fp32_card, fp32_path)
    say(f"{name}: aligned crops from {faces}")
    crops = aligned_crops(faces, detector_card, fp32_card, n_calib + n_heldout)
    if len(crops) < n_calib + n_heldout:
        raise FacegateError(faces, f"only {len(crops)} faces found; need {n_calib + n_heldout} for calibration and parity")
    calib, held = crops[:n_calib], crops[n_calib:]
    out = models_dir / f"{name}_tflite_int8.tflite"
    nhwc = tflite_card(fp32_card, out.stem, out)
    x = nhwc.preprocess(calib)
    with tempfile.TemporaryDirectory() as tmp:
        say(f"{name}: torch -> float TFLite")
        f32 = convert_float(channels_last(torch_module(name, models_dir)), x[:1], Path(tmp) / "float.tflite")
        float_cos = cosines(fp32, Encoder(tflite_card(fp32_card, "float", f32, precision="fp32"), f32), held)
        say(f"{name}: float TFLite vs fp32 ONNX: cosine min {float_cos.min():.6f}")
        say(f"{name}: INT8 (static_wi8_ai8, {len(calib)} calibration crops)")
        q8 = quantize_int8(f32, x, Path(tmp) / "int8.tflite")
        int8 = Encoder(tflite_card(fp32_card, out.stem, q8), q8)
        cos = cosines(fp32, int8, held)
        say(f"{name}: INT8 TFLite vs fp32 ONNX on {len(held)} held-out faces: cosine mean {cos.mean():.4f}, "
            f"min {cos.min():.4f}")
        if cos.mean() < MIN_COSINE:
            raise ModelError(out, f"INT8 parity too low (mean cosine {cos.mean():.4f} < {MIN_COSINE}); not written")
        atomic_write_bytes(out, q8.read_bytes())
    acc = {"parity_cosine_mean_vs_fp32": round(float(cos.mean()), 5), "parity_cosine_min_vs_fp32": round(float(cos.min()), 5),
           "parity_faces": f"{len(held)} held-out aligned crops of {faces.name}"}
    card = write_card(tflite_card(fp32_card, out.stem, out, accuracy=acc), out)
    return {"encoder": name, "file": out, "card": card, "size_bytes": out.stat().st_size,
            "float_cosine_min": float(float_cos.min()), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def main(args) -> int:
    try:
        import ai_edge_quantizer  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError as e:
        raise FacegateError("requirements-tflite.txt", f"the TFLite export needs its own venv ({e.name} missing): "
                            "python3 -m venv .venv-tflite && .venv-tflite/bin/pip install -r requirements-tflite.txt") from None
    faces = Path(args.faces)
    if "lfw" in faces.as_posix().lower():
        raise FacegateError(faces, "LFW is for evaluation only; calibrate on another face folder")
    rows = [export_encoder(n, Path(args.models), faces, Path(args.detector), args.calib, args.heldout)
            for n in args.encoders.split(",")]
    for r in rows:
        print(f"{r['file'].name}: {r['size_bytes'] / 1e6:.2f} MB, INT8 vs fp32 cosine mean {r['cosine_mean']:.4f} "
              f"min {r['cosine_min']:.4f} (float TFLite min {r['float_cosine_min']:.6f})")
    return 0


def add_arguments(s, models: Path, shared: Path) -> None:
    s.add_argument("--encoders", default=",".join(ENCODERS))
    s.add_argument("--models", default=str(models))
    s.add_argument("--faces", default=str(shared / "data" / "celeba" / "images"), help="face images for calibration (never LFW)")
    s.add_argument("--detector", default=str(models / "yunet_fp32.card.json"))
    s.add_argument("--calib", type=int, default=120, help="crops for the activation ranges")
    s.add_argument("--heldout", type=int, default=100, help="further crops for the parity check")
