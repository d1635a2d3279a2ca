"""export/import_user.py: a user's ONNX encoder -> fp32 + INT8 with cards, on a tiny synthetic
encoder and a calibration folder of the fetched sample faces; one-to-n runs on the result."""
import argparse
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.align import ARCFACE_112
from edge.errors import FacegateError
from edge.modelcard import load_card
from export import import_user as U
from tests.unit._stack import model_cards, sample


def test_parse_template_named_scaled_and_explicit():
    assert U.parse_template("arcface", 112) == ARCFACE_112
    a = U.parse_template("arcface", 224)
    assert a[0] == pytest.approx((2 * ARCFACE_112[0][0], 2 * ARCFACE_112[0][1]))
    assert len(U.parse_template("dlib", 150)) == 5
    assert U.parse_template("1,2,3,4,5,6,7,8,9,10", 112)[4] == (9.0, 10.0)
    for bad in ("1,2,3", "x,2,3,4,5,6,7,8,9,10", "1,2,3,4,5,6,7,8,9,500"):
        with pytest.raises(FacegateError):
            U.parse_template(bad, 112)


def test_three_numbers():
    assert U.three("127.5", "mean") == (127.5, 127.5, 127.5)
    assert U.three("1,2,3", "mean") == (1.0, 2.0, 3.0)
    with pytest.raises(FacegateError):
        U.three("1,2", "mean")
    with pytest.raises(FacegateError):
        U.three("0", "std")


def _tiny_encoder(path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.2, (8, 3, 5, 5)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["data", "w"], ["c"], strides=[4, 4]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["emb"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                          [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 16])], [w, fc])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


def test_import_quantize_card_then_evaluate(tmp_path):
    det, _ = model_cards()
    faces = tmp_path / "faces"
    for who, files in {"obama": ["obama.jpg", "obama2.jpg", "obama3.jpg"], "biden": ["biden.jpg"],
                       "astro": ["astronaut.png"]}.items():
        (faces / who).mkdir(parents=True)
        for f in files:
            shutil.copy(sample(f), faces / who / f)
    src = tmp_path / "mine.onnx"
    _tiny_encoder(src)
    out = tmp_path / "models"
    r = U.import_user(src, "mine", 112, "RGB", (127.5,) * 3, (127.5,) * 3, ARCFACE_112, faces, det, out,
                      limit=4, say=lambda *a: None)
    assert r["parity_cos_mean"] > 0.95
    c8, _ = load_card(out / "mine_int8.card.json")
    c32, _ = load_card(out / "mine_fp32.card.json")
    assert c8.precision == "int8" and c8.embedding.dim == 16 and c8.input.color == "RGB"
    assert c8.calibration is not None and c8.calibration.impostor_pairs > 0
    assert c32.sha256 != c8.sha256
    graph_ops = {n.op_type for n in onnx.load(str(out / "mine_int8.onnx")).graph.node}
    assert "QuantizeLinear" in graph_ops

    from evaluation.__main__ import main as evaluation_cli
    from tests.unit.test_eval_one_to_n import _fake_lfw

    root = _fake_lfw(tmp_path)
    assert evaluation_cli(["one-to-n", "--lfw", str(root), "--encoder", str(out / "mine_int8.card.json"), "--detector", det,
                           "--cache-dir", str(tmp_path / "c"), "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["gallery"] == 1


def test_lfw_is_refused_as_a_calibration_folder(tmp_path):
    ns = argparse.Namespace(calibrate=str(tmp_path / "shared" / "data" / "lfw" / "images"))
    with pytest.raises(FacegateError, match="evaluation only"):
        U.main(ns)
