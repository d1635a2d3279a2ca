"""INT8 TFLite encoders (`python -m export tflite`) against their fp32 ONNX on the sample faces,
through the cards and edge.embed as the gate runs them."""
import numpy as np
import pytest

from tests.conftest import MODELS

SAMPLES = ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.png"]
MIN_COSINE = 0.98


@pytest.fixture(scope="module")
def faces(samples):
    from edge.detect import load_detector
    from edge.imageio import load_image

    card = MODELS / "yunet_fp32.card.json"
    if not card.is_file():
        pytest.skip(f"{card} is missing: run `python -m export setup`")
    det = load_detector(card)
    out = []
    for name in SAMPLES:
        img = load_image(samples / name)
        out.append((img, det.detect(img)[0]))
    return out


@pytest.mark.parametrize("encoder", ["sface", "dlib"])
def test_tflite_int8_matches_fp32_on_sample_faces(faces, encoder):
    tfl, ref = MODELS / f"{encoder}_tflite_int8.card.json", MODELS / f"{encoder}_fp32.card.json"
    for p in (tfl, ref):
        if not p.is_file():
            pytest.skip(f"{p} is missing: run `python -m export tflite` (in .venv-tflite, see requirements-tflite.txt)")
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        pytest.skip("ai_edge_litert is not installed (requirements.txt)")
    from edge.embed import load_encoder

    q8, f32 = load_encoder(tfl), load_encoder(ref)
    assert q8.card.runtime == "litert" and q8.card.precision == "int8"
    assert q8.card.alignment == f32.card.alignment and q8.card.input.color == f32.card.input.color
    a = np.stack([q8.embed(q8.align(img, d)).vector for img, d in faces])
    b = np.stack([f32.embed(f32.align(img, d)).vector for img, d in faces])
    cos = np.sum(a * b, axis=1)
    assert cos.min() >= MIN_COSINE, cos
    # and it still tells people apart: Obama's photos agree more with each other than with Biden
    sim = a @ a.T
    assert sim[0, 1] > sim[0, 3] and sim[0, 2] > sim[0, 3]


def test_tflite_card_feeds_like_its_fp32_card_but_channels_last_batch_one(tmp_path):
    from edge.modelcard import CalibrationSpec, sha256_file
    from export.cards import sface_card
    from export.tflite import tflite_card

    onnx_file, tfl_file = tmp_path / "sface_fp32.onnx", tmp_path / "sface_tflite_int8.tflite"
    onnx_file.write_bytes(b"onnx")
    tfl_file.write_bytes(b"tflite bytes")
    cal = CalibrationSpec(dataset="celeba", impostor_pairs=10, fmr=[0.1, 0.01], threshold=[0.2, 0.3])
    fp32 = sface_card("sface_fp32", onnx_file, "fp32", calibration=cal)
    card = tflite_card(fp32, "sface_tflite_int8", tfl_file, accuracy={"parity_cosine_min_vs_fp32": 0.99})
    assert (card.runtime, card.precision, card.file) == ("litert", "int8", "sface_tflite_int8.tflite")
    assert (card.input.layout, card.input.dynamic_batch) == ("NHWC", False)
    assert card.sha256 == sha256_file(tfl_file) and card.size_bytes == len(b"tflite bytes")
    assert card.calibration is None  # thresholds of the fp32 model do not hold for the INT8 one
    assert card.alignment == fp32.alignment and card.input.color == fp32.input.color
    img = np.arange(112 * 112 * 3, dtype=np.uint8).reshape(112, 112, 3)
    np.testing.assert_array_equal(card.preprocess([img]), fp32.preprocess([img]).transpose(0, 2, 3, 1))
