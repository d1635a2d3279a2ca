"""export.prelu: the Conv+PReLU rewrite before quantization and the PReLU split after it are
exact, and the built INT8 SFace has no slow float PReLU left."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.prelu import decompose_prelu, split_prelu
from tests.conftest import MODELS

SLOPES = np.array([-0.4, 0.0, 0.3, 1.0, 1.2], np.float32)  # negative, zero, usual, identity, above 1


def _conv_prelu(height: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = len(SLOPES)
    inits = [numpy_helper.from_array(rng.normal(size=(c, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "b"),
             numpy_helper.from_array(SLOPES.reshape(c, 1, 1), "a")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["y", "a"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, height, height])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c, height, height])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_split_prelu_is_exact_for_every_kind_of_slope():
    m = _conv_prelu(8)
    x = np.random.default_rng(1).normal(size=(1, 2, 8, 8)).astype(np.float32)
    y = _run(m, x)
    assert (y < 0).any() and (y > 0).any()  # both branches of the PReLU are exercised
    split, n = split_prelu(m)
    assert n == 1 and "PRelu" not in _ops(split)
    np.testing.assert_allclose(_run(split, x), y, rtol=0, atol=1e-6)


def test_decompose_prelu_leaves_slopes_above_one_alone_and_is_exact_otherwise():
    m = _conv_prelu(8)
    out, n = decompose_prelu(m)
    assert n == 0 and "PRelu" in _ops(out)  # one slope is 1.2: the conv split would need a negative scale
    a = numpy_helper.from_array(np.clip(SLOPES, None, 1.0).reshape(-1, 1, 1), "a")
    m.graph.initializer[2].CopyFrom(a)
    x = np.random.default_rng(2).normal(size=(1, 2, 8, 8)).astype(np.float32)
    out, n = decompose_prelu(m)
    assert n == 1 and "PRelu" not in _ops(out) and _ops(out).count("Conv") == 2
    np.testing.assert_allclose(_run(out, x), _run(m, x), rtol=0, atol=1e-5)


def test_built_int8_sface_has_no_float_prelu():
    path = MODELS / "sface_int8.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is missing: run `python -m export setup`")
    ops = _ops(onnx.load(str(path)))
    assert "QLinearConv" in ops or "DequantizeLinear" in ops
    assert "PRelu" not in ops and ops.count("Min") == 10  # the ten PReLUs the conv split leaves
