"""edge.modelcard: card round trip, every refusal is a ModelError naming the file, preprocess by hand."""
import hashlib
import json

import numpy as np
import pytest

from edge.errors import ModelError
from edge.modelcard import Card, card_path_for, load_card, write_card

MODEL_BYTES = b"not really onnx, but bytes to hash\n"


def make_card(**over):
    fields = dict(
        name="tiny-detector", task="face_detection", file="tiny.onnx",
        sha256=hashlib.sha256(MODEL_BYTES).hexdigest(), size_bytes=len(MODEL_BYTES),
        runtime="onnxruntime", precision="fp32",
        input=dict(color="BGR", layout="NCHW", size_multiple=32),
        detector=dict(kind="yunet", strides=[8, 16, 32]),
        source=dict(package="test", version="0", file="tiny.onnx", license="MIT"),
    )
    return Card.model_validate({**fields, **over})


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "tiny.onnx"
    p.write_bytes(MODEL_BYTES)
    write_card(make_card(), p)
    return p


def card_json(model):
    return card_path_for(model)


def edit(model, **changes):
    path = card_json(model)
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return path


def refused(target, named):
    with pytest.raises(ModelError) as e:
        load_card(target)
    assert e.value.path == str(named) and str(named) in str(e.value)
    return e.value.problem


def test_card_sits_beside_its_model():
    assert card_path_for("/m/yunet_int8.onnx").name == "yunet_int8.card.json"
    assert card_path_for("/m/a.b.onnx").name == "a.b.card.json"


def test_round_trip_from_the_card_or_the_model(model):
    card, path = load_card(card_json(model))
    assert card == make_card()
    assert path == model.resolve()
    assert load_card(model) == (card, path)  # the model path finds its card


def test_unknown_field_is_refused(model):
    problem = refused(edit(model, quantised=True), card_json(model))
    assert "quantised" in problem


def test_unknown_nested_field_is_refused(model):
    path = edit(model, input=dict(color="BGR", layout="NCHW", scale=255))
    assert "input.scale" in refused(path, path)


def test_task_without_its_section_is_refused(model):
    path = edit(model, detector=None)
    assert "needs detector" in refused(path, path)


def test_sha256_mismatch_is_refused(model):
    model.write_bytes(MODEL_BYTES.replace(b"bytes", b"BYTES"))  # same size, other content
    assert "sha256" in refused(card_json(model), model)


def test_truncated_model_is_refused(model):
    model.write_bytes(MODEL_BYTES[:-1])
    assert "truncated" in refused(card_json(model), model)


def test_missing_model_is_refused(model):
    model.unlink()
    assert "missing" in refused(card_json(model), model)


@pytest.mark.parametrize("file", ["../tiny.onnx", "sub/tiny.onnx", "/etc/hostname"])
def test_card_pointing_outside_its_folder_is_refused(model, file):
    path = edit(model, file=file)
    assert "outside its folder" in refused(path, path)


def test_invalid_json_and_missing_card_are_refused(tmp_path, model):
    path = card_json(model)
    path.write_text('{"name": "tiny-detector",')
    assert "not valid JSON" in refused(path, path)
    assert "not found" in refused(tmp_path / "other.onnx", tmp_path / "other.card.json")


def test_verify_file_false_skips_only_the_model_checks(model):
    model.unlink()
    card, path = load_card(card_json(model), verify_file=False)
    assert path == model.resolve() and card.name == "tiny-detector"


def test_preprocess_rgb_nchw_mean_std_by_hand():
    # BGR pixels; the card wants RGB, (x - mean) / std per RGB channel, NCHW.
    img = np.array([[[10, 20, 30], [40, 50, 60]],
                    [[70, 80, 90], [100, 110, 120]]], np.uint8)
    card = make_card(input=dict(color="RGB", layout="NCHW", mean=(30.0, 20.0, 10.0), std=(2.0, 5.0, 10.0)))
    x = card.preprocess([img, img[::-1]])
    assert x.shape == (2, 3, 2, 2) and x.dtype == np.float32 and x.flags.c_contiguous
    # R channel = BGR index 2: (30, 60; 90, 120) - 30, / 2
    np.testing.assert_allclose(x[0, 0], [[0, 15], [30, 45]])
    # G = index 1: (20, 50; 80, 110) - 20, / 5
    np.testing.assert_allclose(x[0, 1], [[0, 6], [12, 18]])
    # B = index 0: (10, 40; 70, 100) - 10, / 10
    np.testing.assert_allclose(x[0, 2], [[0, 3], [6, 9]])
    np.testing.assert_allclose(x[1, 0], [[30, 45], [0, 15]])  # second image, rows swapped


def test_preprocess_with_one_std_takes_the_fast_path_with_the_same_arithmetic():
    # A uniform std goes through OpenCV's blob maker: mean per RGB channel, mirrored views accepted.
    img = np.array([[[10, 20, 30], [40, 50, 60]],
                    [[70, 80, 90], [100, 110, 120]]], np.uint8)
    card = make_card(input=dict(color="RGB", layout="NCHW", mean=(30.0, 20.0, 10.0), std=(2.0, 2.0, 2.0)))
    x = card.preprocess([img, img[:, ::-1]])
    assert x.shape == (2, 3, 2, 2) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x[0, 0], [[0, 15], [30, 45]])  # R = BGR index 2, minus 30, / 2
    np.testing.assert_allclose(x[0, 2], [[0, 15], [30, 45]])  # B = index 0, minus 10, / 2
    np.testing.assert_allclose(x[1, 0], [[15, 0], [45, 30]])  # the mirror image


def test_preprocess_bgr_nhwc_keeps_channel_order():
    img = np.array([[[10, 20, 30], [40, 50, 60]],
                    [[70, 80, 90], [100, 110, 120]]], np.uint8)
    card = make_card(input=dict(color="BGR", layout="NHWC", mean=(10.0, 0.0, 0.0), std=(1.0, 1.0, 2.0)))
    x = card.preprocess([img])
    assert x.shape == (1, 2, 2, 3)
    np.testing.assert_allclose(x[0, 0, 0], [0, 20, 15])
    np.testing.assert_allclose(x[0, 1, 1], [90, 110, 60])
