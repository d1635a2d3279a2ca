"""ONNX import vs the model as shipped, on real face crops (issue 2: cosine >= 0.999)."""
import numpy as np
import onnxruntime as ort
import pytest

from edge.imageio import load_image

from tests.conftest import MODELS


def _original_session(path):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # The shipped graph declares every weight as an input; the ones without a default are unused,
    # so any value of the right shape will do for them.
    extra = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
             for i in s.get_inputs()[1:]}
    return s, extra


def test_sface_import_matches_the_shipped_model(stack, samples):
    raw, fp32 = MODELS / "raw" / "sface_2021dec_int8bq.onnx", MODELS / "sface_fp32.onnx"
    if not fp32.exists():
        pytest.skip("run `python -m export setup`")
    crops = []
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "astronaut.png"):
        img = load_image(samples / name)
        crops.append(stack.encoder.align(img, stack.detector.detect(img)[0]).image)
    x = stack.encoder.card.preprocess(crops)
    orig, extra = _original_session(raw)
    ours = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    a = np.concatenate([orig.run(None, {"data": x[i:i + 1], **extra})[0] for i in range(len(x))])
    b = ours.run(None, {"data": x})[0]
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999, cos
    assert ours.get_inputs()[0].shape[0] == "N" and len(ours.get_inputs()) == 1  # dynamic batch, no dangling inputs
