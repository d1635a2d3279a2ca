"""edge.search: the INT8 first pass bounds every score, and the best two come out as the float
product gives them."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from edge.match import identify
from edge.search import GalleryIndex, _int8_rows, field, gemm_model, top2_candidates, varint


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gallery():
    rng = np.random.default_rng(0)
    m = _unit(rng.normal(size=(6000, 256)))
    m[100] = m[200]  # a duplicate enrollment: a tie for the top
    return m, GalleryIndex(m, min_rows=1000)


def test_top2_candidates_by_hand():
    approx = np.array([0.9, 0.8, 0.5, 0.78, 0.1])
    # lower bounds 0.85 0.75 0.45 0.73 0.05 -> second-largest 0.75; uppers >= 0.75: rows 0, 1, 3
    assert top2_candidates(approx, np.full(5, 0.05)).tolist() == [True, True, False, True, False]
    assert top2_candidates(np.array([0.3, 0.1]), np.zeros(2)).all()


def test_every_int8_score_is_within_its_bound(gallery):
    m, index = gallery
    rng = np.random.default_rng(1)
    for q in _unit(rng.normal(size=(5, 256))):
        approx, bound = index.approximate(q)
        assert np.all(np.abs(approx - m.astype(np.float64) @ q) <= bound)
        assert 0 < bound.max() < 0.05  # tight enough to leave few candidates


def test_best_and_runner_up_equal_the_float_product(gallery):
    m, index = gallery
    names = [f"p{i}" for i in range(len(m))]
    rng = np.random.default_rng(2)
    probes = np.concatenate([_unit(m[rng.integers(0, len(m), 20)] + 0.04 * rng.normal(size=(20, 256))),
                             _unit(rng.normal(size=(20, 256))), m[[100, 5]]])
    for q in probes:
        full, got = m @ q, index.scores(q)
        a, b = identify(full, names, 0.5, 0.02), identify(got, names, 0.5, 0.02)
        assert (a.identity, a.runner_up, a.accepted, a.reason) == (b.identity, b.runner_up, b.accepted, b.reason)
        assert a.score == pytest.approx(b.score, abs=1e-6) and a.runner_up_score == pytest.approx(b.runner_up_score, abs=1e-6)
        assert np.isfinite(got).sum() < len(m) // 10  # the float pass ran on a few rows only


def test_a_small_gallery_is_searched_in_float_with_every_score():
    m = _unit(np.random.default_rng(3).normal(size=(50, 16)))
    index = GalleryIndex(m)
    assert index.session is None
    np.testing.assert_array_equal(index.scores(m[7]), m @ m[7])


@pytest.mark.parametrize("n,expected", [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"),
                                        (150, b"\x96\x01"), (300, b"\xac\x02"), (16384, b"\x80\x80\x01")])
def test_varint_by_hand(n, expected):
    assert varint(n) == expected


def test_protobuf_fields_by_hand():
    assert field(1, 150) == b"\x08\x96\x01"  # the protobuf encoding guide's example: key (1 << 3 | 0), varint
    assert field(2, b"testing") == b"\x12\x07testing"  # key (2 << 3 | 2), length, bytes
    assert field(9, b"") == b"\x4a\x00"
    assert field(16, 1) == b"\x80\x01\x01"  # a field number above 15 takes a two-byte key


def test_the_int8_pass_needs_no_onnx_package(monkeypatch):
    """The device installs onnxruntime, not onnx: with onnx unimportable the index still builds,
    and its integer products are exact."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    rng = np.random.default_rng(4)
    m = _unit(rng.normal(size=(300, 32)))
    index = GalleryIndex(m, min_rows=100)
    assert index.session is not None
    codes, _, _ = _int8_rows(m)
    q8 = rng.integers(0, 256, size=32, dtype=np.uint8)
    dots = index.session.run(None, {"q": q8[None]})[0][0]
    assert dots.dtype == np.int32
    np.testing.assert_array_equal(dots, codes.astype(np.int64) @ (q8.astype(np.int64) - 128))


def test_the_hand_written_model_is_the_one_onnx_would_build():
    onnx = pytest.importorskip("onnx", reason="onnx (requirements-export.txt) checks the bytes; the device has none")
    from onnx import TensorProto, helper, numpy_helper

    codes = np.arange(-6, 6, dtype=np.int8).reshape(4, 3)
    model = onnx.load_from_string(gemm_model(codes))
    onnx.checker.check_model(model, full_check=True)
    want = helper.make_model(helper.make_graph(
        [helper.make_node("MatMulInteger", ["q", "gallery", "q_zero"], ["dots"])], "gallery_search",
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 3])],
        [helper.make_tensor_value_info("dots", TensorProto.INT32, [1, 4])],
        [numpy_helper.from_array(np.ascontiguousarray(codes.T), "gallery"),
         numpy_helper.from_array(np.array(128, np.uint8), "q_zero")]),
        opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert model == want
