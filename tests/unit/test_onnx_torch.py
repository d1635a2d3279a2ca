"""export.onnx_torch: an ONNX CNN graph replayed as a torch module matches onnxruntime."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch rebuild needs torch (requirements-train.txt)")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.errors import ModelError  # noqa: E402
from export.onnx_torch import OnnxModule, load_onnx_module, parity  # noqa: E402
from tests.conftest import MODELS  # noqa: E402


def tiny_encoder(extra_node=None) -> onnx.ModelProto:
    """Every supported op once: asymmetric and symmetric padding, a depthwise conv, both PReLU
    slope shapes, a residual Add, Gemm with transB, Reshape with a 0 dim, Dropout, 1-D batch norm."""
    rng = np.random.default_rng(1)
    c = 4
    inits = {
        "mean": np.float32(127.5), "scale": np.float32(1 / 128),
        "w1": rng.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32), "b1": rng.normal(0, 0.1, c).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, c).astype(np.float32), "be": rng.normal(0, 0.1, c).astype(np.float32),
        "mu": rng.normal(0, 0.1, c).astype(np.float32), "var": rng.uniform(0.5, 2, c).astype(np.float32),
        "slope": rng.uniform(0, 0.5, (c, 1, 1)).astype(np.float32), "slope1": np.array([0.2], np.float32),
        "wd": rng.normal(0, 0.3, (c, 1, 3, 3)).astype(np.float32),
        "fw": rng.normal(0, 0.2, (6, c * 4 * 4)).astype(np.float32), "fb": rng.normal(0, 0.1, 6).astype(np.float32),
        "shape": np.array([0, 6], np.int64), "ratio": np.float32(0.5),
        "g6": rng.uniform(0.5, 1.5, 6).astype(np.float32), "b6": rng.normal(0, 0.1, 6).astype(np.float32),
        "m6": rng.normal(0, 0.1, 6).astype(np.float32), "v6": rng.uniform(0.5, 2, 6).astype(np.float32),
    }
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["m"]),
        helper.make_node("Conv", ["m", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("PRelu", ["bn", "slope"], ["p"]),
        helper.make_node("Conv", ["p", "wd"], ["dw"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c),
        helper.make_node("PRelu", ["dw", "slope1"], ["p1"]),
        helper.make_node("Add", ["p", "p1"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["fc"], transB=1, alpha=0.5),
        helper.make_node("Reshape", ["fc", "shape"], ["rs"]),
        helper.make_node("Dropout", ["rs", "ratio"], ["d"]),
        helper.make_node("BatchNormalization", ["d", "g6", "b6", "m6", "v6"], ["y"], epsilon=2e-5),
    ] + ([extra_node] if extra_node else [])
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_torch_rebuild_matches_onnxruntime_on_every_supported_op(tmp_path):
    model = tiny_encoder()
    x = np.random.default_rng(2).uniform(0, 255, (3, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]
    with torch.no_grad():
        got = OnnxModule(model).eval()(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (3, 6)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_an_unsupported_op_is_an_error_naming_it_and_the_file():
    model = tiny_encoder(helper.make_node("Softmax", ["y"], ["z"]))
    with pytest.raises(ModelError, match="Softmax") as e:
        OnnxModule(model, "enc.onnx")
    assert "enc.onnx" in str(e.value)


def test_a_used_second_output_is_refused():
    model = tiny_encoder()
    model.graph.node[-2].output.append("mask")  # Dropout's mask, now read by the graph's output
    model.graph.output[0].name = "mask"
    with pytest.raises(ModelError, match="only its first output"):
        OnnxModule(model)


def test_sface_rebuild_matches_its_onnx_within_1e4():
    path = MODELS / "sface_fp32.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is missing: run `python -m export setup`")
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    assert parity(path, load_onnx_module(path), x) <= 1e-4
