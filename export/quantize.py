"""INT8 static quantization with onnxruntime.quantization (QDQ, per-channel weights).

Activation ranges come from aligned face crops of a folder the user passes (for development
../shared/data/celeba, never LFW). The ranges are saved as a small JSON calibration cache, so the
setup step can rebuild the same INT8 model on a machine that has no calibration images."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import cv2
import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from edge.align import align
from edge.detect import load_detector, scale_to
from edge.embed import Encoder
from edge.errors import FacegateError
from edge.imageio import load_image
from edge.modelcard import Card

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def list_images(folder: Path, limit: int, seed: int = 0) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXT)
    if not files:
        raise FacegateError(folder, "no images found for calibration")
    random.Random(seed).shuffle(files)
    return files[:limit]


def aligned_crops(folder: Path, detector_card: Path, card: Card, limit: int = 300) -> list[np.ndarray]:
    """Detect and align faces exactly as the gate does, so the ranges match what the gate feeds."""
    # Imported here: the installer builds the models with edge/ and export/ alone, and its build
    # reads cached ranges, never faces.
    from evaluation.embeddings import subject_face

    det = load_detector(detector_card)
    crops = []
    for p in list_images(folder, limit * 2):
        try:
            img = load_image(p)
        except FacegateError:
            continue
        face = subject_face(det, img)
        if face is not None:
            crops.append(align(img, face, card.alignment.template, card.alignment.size).image)
        if len(crops) >= limit:
            break
    return crops


class ArrayReader(CalibrationDataReader):
    def __init__(self, name: str, tensors: list[np.ndarray]):
        self.name, self.tensors, self.i = name, tensors, 0

    def get_next(self):
        if self.i >= len(self.tensors):
            return None
        self.i += 1
        return {self.name: self.tensors[self.i - 1]}

    def rewind(self):
        self.i = 0


def encoder_reader(card: Card, input_name: str, crops: list[np.ndarray], batch: int = 10) -> ArrayReader:
    # Equal batch sizes: the histogram calibrators stack per-batch outputs into one array.
    n = len(crops) - len(crops) % batch
    return ArrayReader(input_name, [card.preprocess(crops[i:i + batch]) for i in range(0, n, batch)])


def detector_reader(card: Card, input_name: str, folder: Path, limit: int = 100) -> ArrayReader:
    xs = []
    for p in list_images(folder, limit):
        try:
            img, _ = scale_to(load_image(p), card.detector.max_side)
        except FacegateError:
            continue
        side = card.detector.max_side
        img = cv2.copyMakeBorder(img, 0, side - img.shape[0], 0, side - img.shape[1], cv2.BORDER_CONSTANT, value=0)
        xs.append(card.preprocess([img]))
    return ArrayReader(input_name, xs)


def quantize(fp32: Path, out: Path, method: str = "minmax", reader: CalibrationDataReader | None = None,
             cache: Path | None = None, exclude_ops: tuple[str, ...] = ()) -> Path:
    """fp32 ONNX -> INT8 QDQ ONNX (uint8 activations: about 2x faster than int8 on x86 here).

    With `cache` present, its ranges are used and `reader` may be None; with `cache` absent and a
    reader given, the ranges are computed and written to `cache`."""
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Symbolic shape inference trips over the L2 normalisation some encoders end with.
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        import onnx

        ops = sorted({n.op_type for n in onnx.load(str(pre)).graph.node} - set(exclude_ops))
        tmp_out = Path(tmp) / "q.onnx"
        quantize_static(str(pre), str(tmp_out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=METHODS[method], op_types_to_quantize=ops,
                        calibration_cache_path=str(cache) if cache else None,
                        extra_options={"CalibMaxIntermediateOutputs": _flush_every(reader)})
        from edge.atomic import atomic_write_bytes

        from .prelu import finish_int8

        finish_int8(tmp_out)  # the float PReLUs left between Dequantize and Quantize, made fast
        atomic_write_bytes(out, tmp_out.read_bytes())
    return out


def _flush_every(reader) -> int:
    """Flush collected activations every few batches: histogram methods otherwise hold every
    intermediate tensor of every batch (24 GB and out of memory for SFace here). onnxruntime then
    fails with "No data is collected" when the batch count is a multiple of the flush size, so
    pick one that is not."""
    n = len(getattr(reader, "tensors", ())) or 1
    return next((k for k in (4, 5, 6, 7, 9, 11) if n % k), n + 1)

