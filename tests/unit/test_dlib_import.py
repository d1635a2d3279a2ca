"""dlib .dat import: the reader's primitives by hand, hostile files, parity with dlib itself,
the ONNX export and the alignment template.

Tests that need the model file skip unless `python -m export fetch` has fetched the dlib group;
parity tests also need dlib (dlib-bin, in requirements-train) and torch."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from edge.errors import ModelError
from export import dlib_dat
from export.dlib_dat import parse, read_dat

RAW = Path(__file__).resolve().parents[2] / "models" / "raw"
DAT = RAW / "dlib_face_recognition_resnet_model_v1.dat"
SP5 = RAW / "dlib_shape_predictor_5_face_landmarks.dat"
SP68 = RAW / "dlib_shape_predictor_68_face_landmarks.dat"
IMAGES = RAW / "images"
NO_TORCH = "torch not installed (export tests run in .venv-train)"
FETCH_HINT = "run `python -m export fetch --group dlib` (or export.fetch.fetch({'dlib'}))"
SP_HINT = "run `python -m export fetch --group dlib-test` (dlib's landmark models, test references only)"

needs_dat = pytest.mark.skipif(not DAT.is_file(), reason=f"{DAT.name} not fetched; {FETCH_HINT}")


def _cursor(data: bytes) -> dlib_dat._Cursor:
    return dlib_dat._Cursor(data, Path("hand.dat"))


# --- primitives, by hand --------------------------------------------------------------------

def test_integers_control_byte_then_little_endian_magnitude():
    c = _cursor(bytes([0x01, 0x2A, 0x81, 0x05, 0x02, 0x80, 0x12, 0x00, 0x83, 0x01, 0x00, 0x01]))
    assert [c.int(), c.int(), c.int(), c.int(), c.int()] == [42, -5, 0x1280, 0, -(1 + (1 << 16))]
    assert c.pos == 12


@pytest.mark.parametrize("data, problem", [
    (bytes([0x09] + [0] * 9), "control byte"),  # 9-byte integer: larger than any C++ integer
    (bytes([0x11, 0x00]), "control byte"),  # reserved bits set
    (bytes([0x02, 0x80]), "truncated"),  # says 2 bytes, has 1
    (b"", "truncated"),
])
def test_bad_integers(data, problem):
    with pytest.raises(ModelError, match=problem) as e:
        _cursor(data).int("x")
    assert "hand.dat" in str(e.value)


def test_floats_are_mantissa_times_two_to_exponent():
    # dlib's margin 0.04f: mantissa 0xa3d70a, exponent -28
    c = _cursor(bytes([0x03, 0x0A, 0xD7, 0xA3, 0x81, 0x1C, 0x01, 0x03, 0x01, 0x02, 0x01, 0x00, 0x01, 0x7D]))
    assert c.float() == 0xA3D70A / 2 ** 28 == pytest.approx(0.04, rel=1e-7)
    assert c.float() == 12.0  # 3 * 2^2
    assert c.float() == 0.0  # 0 * 2^125


def test_float_special_values_and_overflow():
    inf = bytes([0x01, 0x00, 0x02]) + (32000).to_bytes(2, "little")
    nan = bytes([0x01, 0x00, 0x02]) + (32002).to_bytes(2, "little")
    assert _cursor(inf).float() == math.inf
    assert math.isnan(_cursor(nan).float())
    with pytest.raises(ModelError, match="overflows"):
        _cursor(bytes([0x01, 0x01, 0x02]) + (2000).to_bytes(2, "little")).float()


def test_strings_bools_and_tensors():
    floats = struct.pack("<2f", 1.5, -2.0)
    c = _cursor(bytes([0x01, 0x03]) + b"abc" + b"10" + bytes([0x01, 0x02, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x02]) + floats)
    assert c.str() == "abc"
    assert (c.bool(), c.bool()) == (True, False)
    t = c.tensor()
    assert t.shape == (1, 1, 1, 2) and t.dtype == np.float32
    np.testing.assert_array_equal(t.ravel(), [1.5, -2.0])
    with pytest.raises(ModelError, match="is not '0' or '1'"):
        _cursor(b"\x01").bool()


def test_huge_declared_tensor_fails_without_allocating():
    # version 2, then dims 2^30 x 2^30 x 1 x 1: rejected by the size bound before any read
    big = bytes([0x04]) + (1 << 30).to_bytes(4, "little")
    with pytest.raises(ModelError, match="too large|outside"):
        _cursor(bytes([0x01, 0x02]) + big + big + bytes([0x01, 0x01, 0x01, 0x01])).tensor()
    # plausible dims, but the data is not there
    with pytest.raises(ModelError, match="truncated"):
        _cursor(bytes([0x01, 0x02, 0x01, 0x01, 0x01, 0x01, 0x01, 0x04, 0x01, 0x04]) + b"\0" * 63).tensor()


# --- pure maths, by hand ----------------------------------------------------------------------

def test_fold_affine_by_hand():
    pytest.importorskip("torch", reason=NO_TORCH)
    from export.dlib_net import fold_affine

    w = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(2, 1, 1, 2)
    w2, b2 = fold_affine(w, np.array([0.5, -1.0], np.float32), np.array([2.0, 0.5], np.float32), np.array([1.0, 3.0], np.float32))
    np.testing.assert_allclose(w2.ravel(), [2.0, 4.0, 1.5, 2.0])
    np.testing.assert_allclose(b2, [2.0, 2.5])  # 0.5*2+1, -1*0.5+3


def test_add_prev_zero_fills_the_smaller_at_the_end():
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    from export.dlib_net import add_prev

    a = torch.ones(1, 1, 2, 2)
    b = torch.full((1, 2, 3, 3), 2.0)
    out = add_prev(a, b)
    assert out.shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(out[0, 0].numpy(), [[3, 3, 2], [3, 3, 2], [2, 2, 2]])
    np.testing.assert_array_equal(out[0, 1].numpy(), np.full((3, 3), 2.0))
    assert torch.equal(add_prev(b, a), out)


def test_template_from_dlib_mean_face_by_hand():
    pytest.importorskip("torch", reason=NO_TORCH)
    from export.dlib_net import DLIB_TEMPLATE_150, template_from_mean_face

    t = np.array(template_from_mean_face(150, 0.25))
    # chip = (0.25 + p) / 1.5 * 150 = (0.25 + p) * 100
    eye_left_x = (0.121737 + 0.187122 + 0.265825 + 0.334606 + 0.260918 + 0.182743) / 6
    np.testing.assert_allclose(t[0], [(0.25 + eye_left_x) * 100, (0.25 + 1.295942 / 6) * 100], atol=1e-6)
    np.testing.assert_allclose(t[2], [74.0127, 76.5625], atol=1e-6)  # nose tip, point 30
    np.testing.assert_allclose(t[3], [50.4149, 103.0233], atol=1e-6)  # mouth corner 48
    # dlib's mean face is symmetric about x = 0.490127 (to its 6 printed digits): so are the eyes and mouth
    np.testing.assert_allclose(t[0, 0] + t[1, 0], 2 * 74.0127, atol=1e-3)
    np.testing.assert_allclose(t[3, 0] + t[4, 0], 2 * 74.0127, atol=1e-3)
    np.testing.assert_allclose(DLIB_TEMPLATE_150, t, atol=1e-4)
    assert t[0, 0] < t[1, 0] and t[3, 0] < t[4, 0]  # image-left before image-right, as Detection


# --- the real file and hostile variants of it ----------------------------------------------

@pytest.fixture(scope="module")
def dat_bytes() -> bytes:
    if not DAT.is_file():
        pytest.skip(f"{DAT.name} not fetched; {FETCH_HINT}")
    return DAT.read_bytes()


@needs_dat
def test_reads_the_face_network():
    net = read_dat(DAT)
    kinds = [layer.kind for layer in net.layers]
    assert kinds.count("con") == kinds.count("affine") == 29
    assert net.input_size == (150, 150)
    np.testing.assert_allclose(net.input_mean, (122.782, 117.001, 104.298), atol=1e-4)
    fc = net.layers[-1]
    assert fc.kind == "fc" and fc.tensors["weight"].shape == (256, 128) and "bias" not in fc.tensors
    # dlib pads only stride-1 windows: the stem, max pool and all down-sampling convs are unpadded
    for layer in net.layers:
        if layer.kind in ("con", "max_pool", "avg_pool"):
            p = layer.params
            want = p["nr"] // 2 if p["stride_y"] == 1 else 0
            assert (p["padding_y"], p["padding_x"]) == (want, want), layer


@pytest.mark.parametrize("cut", [0, 1, 5, 40, 300, 330, 400, 1000, 20_000, 11_000_000, -1000, -1])
def test_truncated_file(tmp_path, dat_bytes, cut):
    p = tmp_path / "cut.dat"
    p.write_bytes(dat_bytes[:cut])
    with pytest.raises(ModelError) as e:
        read_dat(p)
    assert e.value.path == str(p) and "byte" in e.value.problem


@pytest.mark.parametrize("head", [b"\x89PNG\r\n\x1a\n", b"\x08\x07\x12\x07pytorch", b"\x01\x01\x0dloss_metric_3"])
def test_wrong_magic(tmp_path, dat_bytes, head):
    p = tmp_path / "wrong.dat"
    p.write_bytes(head + dat_bytes[len(head):])
    with pytest.raises(ModelError, match="not a dlib network file"):
        read_dat(p)


def test_random_bytes_empty_missing_and_directory(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        p = tmp_path / f"random{i}.dat"
        p.write_bytes(rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes())
        with pytest.raises(ModelError):
            read_dat(p)
    (tmp_path / "empty.dat").write_bytes(b"")
    with pytest.raises(ModelError, match="truncated"):
        read_dat(tmp_path / "empty.dat")
    with pytest.raises(ModelError, match="not found"):
        read_dat(tmp_path / "missing.dat")
    with pytest.raises(ModelError, match="directory"):
        read_dat(tmp_path)


def test_trailing_bytes(dat_bytes):
    with pytest.raises(ModelError, match="trailing"):
        parse(dat_bytes + b"\x00", "extra.dat")


def test_flipped_structure_bytes_fail_cleanly(dat_bytes):
    """A corrupted header byte either still parses or raises ModelError, never anything else,
    and the module builder then accepts the structure or raises ModelError."""
    pytest.importorskip("torch", reason=NO_TORCH)
    from export.dlib_net import from_dlib

    rng = np.random.default_rng(1)
    data = bytearray(dat_bytes)
    outcomes = set()
    for pos in rng.integers(0, 400, 25):
        bad = bytearray(data)
        bad[pos] ^= int(rng.integers(1, 256))
        try:
            from_dlib(parse(bytes(bad), "flipped.dat"), "flipped.dat")
            outcomes.add("ok")
        except ModelError as e:
            assert "flipped.dat" in str(e)
            outcomes.add("error")
    assert "error" in outcomes


# --- parity with dlib on real faces -----------------------------------------------------------

@pytest.fixture(scope="module")
def faces():
    """(rgb image, dlib rectangle, dlib's 150x150 chip, dlib's descriptor) for the sample faces."""
    dlib = pytest.importorskip("dlib", reason="dlib not installed (dlib-bin, requirements-train.txt): the parity reference")
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("torch", reason=NO_TORCH)
    for f, hint in ((DAT, FETCH_HINT), (SP5, SP_HINT)):
        if not f.is_file():
            pytest.skip(f"{f.name} not fetched; {hint}")
    detector = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(SP5))
    rec = dlib.face_recognition_model_v1(str(DAT))
    out = []
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "obama_partial_face.jpg", "astronaut.png"):
        bgr = cv2.imread(str(IMAGES / name), cv2.IMREAD_COLOR)
        if bgr is None:
            pytest.skip(f"sample image {name} not fetched; {FETCH_HINT}")
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        for rect in detector(rgb, 0):
            chip = dlib.get_face_chip(rgb, sp(rgb, rect), size=150, padding=0.25)
            out.append((rgb, rect, chip, np.array(rec.compute_face_descriptor(chip), np.float32)))
    assert len(out) >= 6, "dlib should find a face in each sample image"
    return out, rec


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def torch_net():
    pytest.importorskip("torch", reason=NO_TORCH)
    from export.dlib_net import load_dat

    if not DAT.is_file():
        pytest.skip(f"{DAT.name} not fetched; {FETCH_HINT}")
    return load_dat(DAT)


def test_torch_matches_dlib_raw_output(faces, torch_net):
    import torch

    from export.dlib_net import chips_to_input

    items, _ = faces
    chips = np.stack([f[2] for f in items])
    ref = np.stack([f[3] for f in items])
    with torch.no_grad():
        got = torch_net(chips_to_input(chips, torch_net.input_mean)).numpy()
    assert got.shape == (len(items), 128)
    assert _cos(got, ref).min() >= 0.9999
    # not normalised, like dlib's (norms about 1.4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """What setup builds (export.dlib_onnx, no torch)."""
    from export.dlib_onnx import build

    if not DAT.is_file():
        pytest.skip(f"{DAT.name} not fetched; {FETCH_HINT}")
    return build(RAW, tmp_path_factory.mktemp("dlib_build"))


def test_onnx_matches_torch_and_dlib_through_its_card(faces, torch_net, built):
    import onnxruntime as ort
    import torch

    from edge.modelcard import load_card
    from export.dlib_net import DLIB_TEMPLATE_150, L2Normalized, chips_to_input

    onnx_path, card_path = built
    card, model_file = load_card(card_path)
    assert model_file == onnx_path.resolve() and onnx_path.name == "dlib_fp32.onnx"
    assert (card.input.width, card.input.height, card.input.color, card.input.layout) == (150, 150, "RGB", "NCHW")
    assert card.embedding.dim == 128 and card.alignment.template == [tuple(p) for p in DLIB_TEMPLATE_150]
    assert card.source.package == "face_recognition_models" and card.source.license == "CC0"

    items, _ = faces
    chips = np.stack([f[2] for f in items])
    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    x = chips_to_input(chips, torch_net.input_mean)
    with torch.no_grad():
        want = L2Normalized(torch_net)(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4
    one = sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0]  # dynamic batch
    assert np.abs(one - want[:1]).max() <= 1e-4

    # The gate's path: BGR chip -> card.preprocess -> ONNX, against dlib's own descriptor.
    fed = card.preprocess([c[..., ::-1] for c in chips])
    emb = sess.run(None, {sess.get_inputs()[0].name: fed})[0]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert _cos(emb, np.stack([f[3] for f in items])).min() >= 0.9999


def test_bad_dat_writes_nothing(tmp_path, dat_bytes):
    from export.dlib_onnx import DAT_NAME, build

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / DAT_NAME).write_bytes(dat_bytes[: len(dat_bytes) // 2])
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=DAT_NAME):
        build(raw, out)
    assert not out.exists() or not any(out.iterdir())


def test_template_aligns_like_dlib_chips(faces):
    """Eye centres, nose tip and mouth corners (the gate detector's keypoints, here from dlib's
    68-point predictor) aligned onto the template give dlib-chip embeddings."""
    dlib = pytest.importorskip("dlib")
    align = pytest.importorskip("edge.align", reason="edge/align.py not available yet")
    from export.dlib_net import DLIB_TEMPLATE_150

    if not SP68.is_file():
        pytest.skip(f"{SP68.name} not fetched; {SP_HINT}")
    sp68 = dlib.shape_predictor(str(SP68))
    items, rec = faces
    for rgb, rect, _, ref in items:
        s = sp68(rgb, rect)
        p = np.array([(s.part(i).x, s.part(i).y) for i in range(68)], np.float64)
        kps = np.array([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
        chip = align.warp(rgb, align.similarity_transform(kps, np.array(DLIB_TEMPLATE_150)), (150, 150))
        emb = np.array(rec.compute_face_descriptor(chip), np.float32)
        assert _cos(emb, ref) >= 0.98


def test_build_dlib_makes_the_int8_model_from_the_committed_ranges(faces, tmp_path):
    """`python -m export build --dlib`: the INT8 model comes from export/calibration/ (no images
    needed), keeps to fp32 on dlib's own chips, is at least 3x smaller, and a second run is a no-op."""
    pytest.importorskip("onnxscript", reason="onnxscript not installed: torch's dynamo ONNX exporter needs it")
    from edge.embed import load_encoder
    from export.build import build_dlib

    made = build_dlib(tmp_path, quiet=True)
    assert sorted(p.name for p in made) == ["dlib_fp32.card.json", "dlib_int8.card.json"]
    e32, e8 = load_encoder(tmp_path / "dlib_fp32.card.json"), load_encoder(tmp_path / "dlib_int8.card.json")
    assert e8.card.precision == "int8" and e8.card.calibration is not None and e32.card.calibration is not None
    assert e8.card.input == e32.card.input and e8.card.alignment == e32.card.alignment
    chips_bgr = [np.ascontiguousarray(f[2][..., ::-1]) for f in faces[0]]  # dlib chips are RGB; cards take BGR
    cos = (e32.embed_images(chips_bgr) * e8.embed_images(chips_bgr)).sum(1)
    assert cos.min() >= 0.99, cos
    assert (tmp_path / "dlib_fp32.onnx").stat().st_size >= 3 * (tmp_path / "dlib_int8.onnx").stat().st_size
    assert build_dlib(tmp_path, quiet=True) == []
