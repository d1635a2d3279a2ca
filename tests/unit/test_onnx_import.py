"""ONNX import vs the model as shipped, on real face crops (cosine >= 0.999)."""
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


def test_sface_is_fed_as_opencv_feeds_it(samples):
    """OpenCV's own SFace pipeline (cv2.FaceDetectorYN + FaceRecognizerSF.alignCrop/feature) is
    the reference: the gate's detector, alignment and card-driven input must give the same
    embedding. FaceRecognizerSF swaps R and B before the network, so a card saying BGR fails here
    (cosine about 0.9 instead of 1)."""
    import cv2

    from edge.detect import load_detector
    from edge.embed import load_encoder

    card, det_card = MODELS / "sface_fp32.card.json", MODELS / "yunet_fp32.card.json"
    if not card.exists() or not det_card.exists():
        pytest.skip("run `python -m export setup`")
    ours_det, ours_enc = load_detector(det_card), load_encoder(card)
    zoo_det = cv2.FaceDetectorYN.create(str(MODELS / "yunet_fp32.onnx"), "", (320, 320), 0.6, 0.3, 5000)
    zoo_rec = cv2.FaceRecognizerSF.create(str(MODELS / "sface_fp32.onnx"), "")
    for name in ("obama.jpg", "biden.jpg", "astronaut.png"):
        img = load_image(samples / name)
        h, w = img.shape[:2]
        f = min(1.0, 320 / max(h, w))  # our detector's own input scaling, so both see the same pixels
        small = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA) if f < 1 else img
        zoo_det.setInputSize((small.shape[1], small.shape[0]))
        _, faces = zoo_det.detect(small)
        face = faces[np.argmax(faces[:, 2] * faces[:, 3])].copy()
        face[:14] /= f
        ref = zoo_rec.feature(zoo_rec.alignCrop(img, face)).ravel()
        d = max(ours_det.detect(img), key=lambda d: d.size)
        got = ours_enc.embed(ours_enc.align(img, d)).vector
        cos = float(ref @ got / np.linalg.norm(ref))
        assert cos >= 0.995, (name, cos)
