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


def _tensor(name: bytes, external: bool = False, location: bytes = b"w.bin") -> bytes:
    from edge.search import field

    t = field(8, name) + field(9, b"\x00" * 4)
    if external:
        t += field(13, field(1, b"location") + field(2, location)) + field(14, 1)
    return t


def _model(graph: bytes, functions: bytes = b"") -> bytes:
    from edge.search import field

    return field(1, 8) + field(7, graph) + functions


def test_onnx_external_tensors_finds_initializers_stored_in_another_file():
    from edge.modelcard import onnx_external_tensors
    from edge.search import field

    inside = _model(field(5, _tensor(b"a")))
    assert onnx_external_tensors(inside) == []
    outside = _model(field(5, _tensor(b"a")) + field(5, _tensor(b"W", True, b"weights.bin")))
    assert onnx_external_tensors(outside) == ["W (weights.bin)"]
    # data_location alone, with no entries naming the file, is still external
    only_flag = _model(field(5, field(8, b"V") + field(14, 1)))
    assert onnx_external_tensors(only_flag) == ["V ()"]


def test_onnx_external_tensors_looks_in_sparse_initializers_constants_subgraphs_and_functions():
    from edge.modelcard import onnx_external_tensors
    from edge.search import field

    ext = _tensor(b"S", True)
    sparse = field(15, field(1, ext) + field(2, _tensor(b"i")))
    assert onnx_external_tensors(_model(sparse)) == ["S (w.bin)"]
    constant = field(1, field(4, b"Constant") + field(5, field(1, b"value") + field(5, ext)))
    assert onnx_external_tensors(_model(constant)) == ["S (w.bin)"]
    branch = field(1, field(4, b"If") + field(5, field(1, b"then_branch") + field(6, field(5, ext))))
    assert onnx_external_tensors(_model(branch)) == ["S (w.bin)"]
    function = field(25, field(7, field(5, field(5, ext))))
    assert onnx_external_tensors(_model(b"", function)) == ["S (w.bin)"]


@pytest.mark.parametrize("data", [MODEL_BYTES, b"\x3a\x05ab", b"\x08\xff\xff"])
def test_bytes_that_are_not_a_protobuf_message_are_refused_by_the_reader(data):
    from edge.modelcard import onnx_external_tensors

    with pytest.raises(ValueError):
        onnx_external_tensors(data)


def test_a_model_with_weights_in_a_sibling_file_is_refused_before_it_runs(tmp_path):
    """The card's sha256 covers the .onnx only: weights swapped in its external data file must
    never reach the runtime."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edge.runtime import open_model

    w = numpy_helper.from_array(np.arange(64, dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("Add", ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [64])], [w])
    path = tmp_path / "tiny.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="tiny.weights",
                    size_threshold=0)
    data = path.read_bytes()
    write_card(make_card(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)), path)
    (tmp_path / "tiny.weights").write_bytes(np.full(64, 1e6, np.float32).tobytes())  # swapped weights
    card, model_file = load_card(path)
    with pytest.raises(ModelError, match="external data") as e:
        open_model(card, model_file)
    assert e.value.path == str(model_file) and "W (tiny.weights)" in str(e.value)


def test_the_shipped_onnx_models_keep_their_weights_inside_and_load():
    from edge.config import MODELS
    from edge.runtime import open_model

    cards = [c for c in sorted(MODELS.glob("*.card.json")) + sorted((MODELS.parent / "edge/assets/pad").glob("*.card.json"))
             if json.loads(c.read_text()).get("runtime") == "onnxruntime"]
    if not cards:
        pytest.skip("no ONNX model cards in models/: run `python -m export setup`")
    for c in cards:
        card, path = load_card(c)
        assert open_model(card, path).output_names, c
