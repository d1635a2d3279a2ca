"""The torch-free dlib builder (export.dlib_onnx): it imports no torch, names every tensor the
committed INT8 ranges name, zero-fills like dlib's add_prev, and gives torch's and dlib's
embeddings.

Tests that need the model file skip unless `python -m export fetch` has fetched the dlib group;
the comparisons with torch and dlib run where they are installed (.venv-train)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.dlib_onnx import build_onnx
from tests.unit.test_dlib_import import (DAT, FETCH_HINT, _cos, dat_bytes, faces,  # noqa: F401 (fixtures)
                                          needs_dat, torch_net)

REPO = Path(__file__).resolve().parents[2]
RANGES = REPO / "export" / "calibration" / "dlib.ranges.json"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    if not DAT.is_file():
        pytest.skip(f"{DAT.name} not fetched; {FETCH_HINT}")
    return build_onnx(DAT, tmp_path_factory.mktemp("dlib_onnx") / "dlib_fp32.onnx")


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_imports_no_torch():
    # The device env has no torch: a stray import anywhere below export.dlib_onnx would break setup there.
    code = "import sys; sys.modules['torch'] = None; import export.dlib_onnx"  # any `import torch` now fails
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_add_prev_zero_fills_the_smaller_at_the_end():
    from onnx import TensorProto, helper

    from export.dlib_onnx import ONNX_OPSET, _Graph

    g = _Graph()
    g.shapes.update({"a": (1, 1, 2, 2), "b": (1, 2, 3, 3)})
    g.add_prev("a", "b", "sum")
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(g.shapes[n])) for n in ("a", "b")]
    out = helper.make_tensor_value_info("sum", TensorProto.FLOAT, [1, 2, 3, 3])
    model = helper.make_model(helper.make_graph(g.nodes, "t", inputs, [out], initializer=g.constants),
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"a": np.ones((1, 1, 2, 2), np.float32), "b": np.full((1, 2, 3, 3), 2.0, np.float32)})[0]
    np.testing.assert_array_equal(got[0, 0], [[3, 3, 2], [3, 3, 2], [2, 2, 2]])
    np.testing.assert_array_equal(got[0, 1], np.full((3, 3), 2.0))


@needs_dat
def test_graph_names_every_tensor_of_the_committed_ranges(built):
    model = onnx.load(str(built))
    g = model.graph
    names = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    ranged = set(json.loads(RANGES.read_text())["data"])
    assert ranged <= names, sorted(ranged - names)
    assert [i.name for i in g.input] == ["input"] and [o.name for o in g.output] == ["embedding"]
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (g.input[0], g.output[0])]
    assert dims == [["batch", 3, 150, 150], ["batch", 128]]
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]


def test_bad_dat_writes_nothing(tmp_path, dat_bytes):
    from edge.errors import ModelError

    bad = tmp_path / DAT.name
    bad.write_bytes(dat_bytes[: len(dat_bytes) // 2])
    out = tmp_path / "out" / "dlib_fp32.onnx"
    with pytest.raises(ModelError, match=DAT.name):
        build_onnx(bad, out)
    assert not out.parent.exists()


@needs_dat
def test_int8_from_the_committed_ranges_keeps_to_fp32(built, tmp_path):
    """What build_dlib does with the fp32 file: every ranged tensor is quantized, embeddings hold."""
    from export.build import method
    from export.quantize import quantize

    cache = tmp_path / RANGES.name  # a copy: a cache miss would make onnxruntime rewrite it
    shutil.copy(RANGES, cache)
    q = quantize(built, tmp_path / "dlib_int8.onnx", method("dlib"), None, cache)
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, (2, 3, 150, 150)).astype(np.float32)
    want, got = (_session(p).run(None, {"input": x})[0] for p in (built, q))
    assert _cos(got, want).min() >= 0.99
    assert built.stat().st_size >= 3 * q.stat().st_size


def test_matches_torch_and_dlib(faces, torch_net, built):
    import torch

    from export.dlib_net import L2Normalized, chips_to_input

    items, _ = faces
    chips = np.stack([f[2] for f in items])
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (2, 150, 150, 3), dtype=np.uint8)
    x = chips_to_input(np.concatenate([chips, noise]), torch_net.input_mean)
    with torch.no_grad():
        want = L2Normalized(torch_net)(x).numpy()
    sess = _session(built)
    got = sess.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5
    one = sess.run(None, {"input": x[:1].numpy()})[0]  # dynamic batch
    assert np.abs(one - want[:1]).max() <= 1e-5
    assert _cos(got[: len(items)], np.stack([f[3] for f in items])).min() >= 0.9999
