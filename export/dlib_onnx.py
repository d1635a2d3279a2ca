"""dlib's ResNet face encoder (`dlib_face_recognition_resnet_model_v1.dat`) as an fp32 ONNX graph
written with onnx.helper from export.dlib_dat's reader, without torch.

The device setup has no torch, so the graph is written here, node for node as torch's dynamo
exporter wrote it from export.dlib_net's module (how it was first made): same input, output, opset,
operators, attributes, weights (the affine folded into each conv in float64) and tensor names. The
names matter: the committed INT8 ranges (export/calibration/dlib.ranges.json) are keyed by the names
that exporter gave (conv2d_7, relu_22, pad_3, add_325, ...), so the same ranges quantize this graph
to the same INT8 model. The semantics are export.dlib_net's (its docstring explains
dlib's stride-1-only padding and the zero-filling `add_prev`); the layer walk (`architecture`),
the alignment template and the card live here and export.dlib_net builds its torch module
from the same walk, so setup needs no torch and the two paths cannot drift apart.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.align import DLIB_TEMPLATE_150
from edge.errors import ModelError
from edge.modelcard import (AlignmentSpec, Card, EmbeddingSpec, InputSpec, ScoreSpec, SourceSpec, sha256_file,
                            write_card)

from .dlib_dat import DlibNet, Layer, read_dat

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150
CHIP_PADDING = 0.25  # what face_recognition and dlib's example pass to get_face_chip_details
ONNX_OPSET = 18
EMBEDDING_DIM = 128
IR_VERSION = 10  # what torch's exporter wrote; onnxruntime 1.31 reads up to 11
L2_EPS = 1e-12  # F.normalize's eps in export.dlib_net.L2Normalized

# torch's FX graph numbers every aten.add it traces, including ones the export later drops, so
# the residual sums are add_30, add_56, ... rather than add, add_1, ...: one name per unit, as
# the torch export of the dlib face network (14 units) named them.
TORCH_ADD_NAMES = ("add_30", "add_56", "add_82", "add_118", "add_144", "add_170", "add_196", "add_232",
                   "add_258", "add_284", "add_325", "add_351", "add_377", "add_413")
# onnxscript's names for the constants it created; pads vectors get one name per distinct value.
_PAD_CONSTANTS = ("val_2", "val_3", "val_4", "val_5")
_BATCH = "batch"


@dataclass(frozen=True)
class Conv:
    weight: np.ndarray  # out, in, rows, cols; dlib's affine folded in
    bias: np.ndarray
    stride: tuple[int, int]  # y, x
    padding: tuple[int, int]  # y, x, as the file records it (dlib pads only stride-1 windows)


@dataclass(frozen=True)
class Unit:
    conv1: Conv
    conv2: Conv
    pool: tuple[int, int] | None  # the skip path's avg pool (size, stride); None for an identity skip


@dataclass(frozen=True)
class Architecture:
    stem: Conv
    pool: tuple[int, int, int]  # max pool size, stride, padding
    units: list[Unit]
    fc: np.ndarray  # outputs x inputs (torch's Linear layout; dlib stores it input-major)
    input_size: tuple[int, int]


# dlib's mean face (get_face_chip_details, 68-point branch): normalised (x, y) of the landmarks the
# gate's detectors give, in 0..1 face units. Eyes are the centroid of their six contour points.
_MEAN_FACE_68 = {
    36: (0.121737, 0.216423), 37: (0.187122, 0.178758), 38: (0.265825, 0.179852),
    39: (0.334606, 0.231733), 40: (0.260918, 0.245099), 41: (0.182743, 0.244077),
    42: (0.645647, 0.231733), 43: (0.714428, 0.179852), 44: (0.793132, 0.178758),
    45: (0.858516, 0.216423), 46: (0.79751, 0.244077), 47: (0.719335, 0.245099),
    30: (0.490127, 0.515625),  # nose tip
    48: (0.254149, 0.780233), 54: (0.726104, 0.780233),  # mouth corners
}
# The gate's keypoint order (edge.records.Detection): image-left eye, image-right eye, nose tip,
# image-left mouth corner, image-right mouth corner. 68-point indices 36-41 are the eye seen on
# the image's left.
_TEMPLATE_POINTS_68 = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))


def template_from_mean_face(size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> list[tuple[float, float]]:
    """The 5 gate keypoints of dlib's mean face in a size x size chip with dlib's padding:
    p_chip = (padding + p) / (1 + 2 padding) * size, as get_face_chip_details places them."""
    out = []
    for idx in _TEMPLATE_POINTS_68:
        x, y = np.mean([_MEAN_FACE_68[i] for i in idx], axis=0)
        out.append((float((padding + x) / (1 + 2 * padding) * size), float((padding + y) / (1 + 2 * padding) * size)))
    return out


# DLIB_TEMPLATE_150 (edge/align.py) is derived by template_from_mean_face() above.


def fold_affine(weight: np.ndarray, bias: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """conv followed by a per-channel affine (gamma * y + beta) as one conv, computed in float64."""
    g = gamma.astype(np.float64)
    w = weight.astype(np.float64) * g[:, None, None, None]
    b = bias.astype(np.float64) * g + beta.astype(np.float64)
    return w.astype(np.float32), b.astype(np.float32)


class _Layers:
    """Walks the parsed layer list, checking it against the architecture the graph implements."""

    def __init__(self, net: DlibNet, path: Path):
        self.layers, self.i, self.path = net.layers, 0, path

    def peek(self) -> str | None:
        return self.layers[self.i].kind if self.i < len(self.layers) else None

    def take(self, kind: str) -> Layer:
        got = self.peek()
        if got != kind:
            raise ModelError(self.path, f"layer {self.i}: expected {kind}, found {got or 'the end'}; "
                                        "not the dlib ResNet face-encoder architecture")
        self.i += 1
        return self.layers[self.i - 1]

    def conv(self, in_channels: int) -> Conv:
        """A con layer and the affine after it, folded into one conv."""
        at = self.i
        con, aff = self.take("con"), self.take("affine")
        w, b = con.tensors["weight"], con.tensors["bias"]
        p = con.params
        if w.shape[1] != in_channels:
            raise ModelError(self.path, f"layer {at}: conv expects {w.shape[1]} input channels, gets {in_channels}")
        if aff.params["mode"] != 0 or aff.tensors["gamma"].shape != (w.shape[0],) or b.shape != (w.shape[0],):
            raise ModelError(self.path, f"layer {at + 1}: affine does not match the {w.shape[0]} channels of its conv")
        w, b = fold_affine(w, b, aff.tensors["gamma"], aff.tensors["beta"])
        return Conv(w, b, (p["stride_y"], p["stride_x"]), (p["padding_y"], p["padding_x"]))

    def pool(self, kind: str) -> tuple[int, int, int]:
        at = self.i
        p = self.take(kind).params
        if p["nr"] != p["nc"] or p["stride_y"] != p["stride_x"] or p["padding_y"] != p["padding_x"] or p["nr"] == 0:
            raise ModelError(self.path, f"layer {at}: only square, equal-stride {kind} windows are supported: {p}")
        return p["nr"], p["stride_y"], p["padding_y"]


def architecture(net: DlibNet, path: str | Path = "<dlib net>") -> Architecture:
    path = Path(path)
    if net.input_size != (CHIP_SIZE, CHIP_SIZE):
        raise ModelError(path, f"input size {net.input_size}, expected {CHIP_SIZE}x{CHIP_SIZE}")
    s = _Layers(net, path)
    stem = s.conv(3)
    s.take("relu")
    pool = s.pool("max_pool")
    channels = stem.weight.shape[0]
    units = []
    # Each unit is  tag1, conv, affine, relu, conv, affine, then either add_prev1 (identity skip) or
    # tag2, skip1, avg_pool, add_prev2 (down-sampling skip), then relu; tags and skips read as "mark".
    while s.peek() == "mark":
        s.take("mark")
        c1 = s.conv(channels)
        s.take("relu")
        c2 = s.conv(c1.weight.shape[0])
        down = None
        if s.peek() == "mark":
            s.take("mark")
            s.take("mark")
            size, stride, pad = s.pool("avg_pool")
            if pad:
                raise ModelError(path, f"layer {s.i - 1}: padded skip pooling is not supported")
            down = (size, stride)
        s.take("add_prev")
        s.take("relu")
        units.append(Unit(c1, c2, down))
        channels = max(channels, c2.weight.shape[0])
    at = s.i
    g = s.take("avg_pool").params
    if g["nr"] != 0 or g["nc"] != 0:
        raise ModelError(path, f"layer {at}: expected a global average pool, found a {g['nr']}x{g['nc']} window")
    fc_layer = s.take("fc")
    w = fc_layer.tensors["weight"]  # (inputs, outputs): dlib stores it input-major
    if w.shape[0] != channels or "bias" in fc_layer.tensors:
        raise ModelError(path, f"layer {at + 1}: fc of shape {w.shape} does not follow {channels} channels without bias")
    if s.i != len(net.layers):
        raise ModelError(path, f"layer {s.i}: unexpected {s.peek()} after the fc layer")
    if len(units) != len(TORCH_ADD_NAMES):
        # The committed ranges name this network's tensors; another depth would not match them.
        raise ModelError(path, f"{len(units)} residual units, expected {len(TORCH_ADD_NAMES)} "
                               "(dlib_face_recognition_resnet_model_v1)")
    return Architecture(stem, pool, units, np.ascontiguousarray(w.T), net.input_size)


Shape = tuple[int | str, ...]


class _Graph:
    """Nodes in the order torch's exporter writes them, their outputs named as its FX graph names
    them: the first of each op bare (conv2d), then conv2d_1, conv2d_2, ..."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.params: list[onnx.TensorProto] = []
        self.constants: list[onnx.TensorProto] = []
        self.infos: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, Shape] = {}
        self.counts: Counter[str] = Counter()
        self.pads: dict[tuple[int, ...], str] = {}

    def name(self, op: str) -> str:
        n = self.counts[op]
        self.counts[op] += 1
        return op if n == 0 else f"{op}_{n}"

    def param(self, name: str, array: np.ndarray) -> str:
        self.params.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        self.constants.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], out: str, shape: Shape, node_name: str | None = None,
             elem_type: int = TensorProto.FLOAT, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=node_name or f"node_{out}", **attrs))
        self.shapes[out] = shape
        self.infos.append(helper.make_tensor_value_info(out, elem_type, list(shape)))
        return out

    def conv(self, x: str, conv: Conv, prefix: str) -> str:
        w = self.param(f"{prefix}.weight", conv.weight)
        b = self.param(f"{prefix}.bias", conv.bias)
        (py, px), (sy, sx), (kr, kc) = conv.padding, conv.stride, conv.weight.shape[2:]
        n, _, h, wd = self.shapes[x]
        shape = (n, conv.weight.shape[0], (h + 2 * py - kr) // sy + 1, (wd + 2 * px - kc) // sx + 1)
        return self.node("Conv", [x, w, b], self.name("conv2d"), shape, group=1, pads=[py, px, py, px],
                         auto_pad="NOTSET", strides=[sy, sx], dilations=[1, 1], kernel_shape=[kr, kc])

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], self.name("relu"), self.shapes[x])

    def pool(self, op: str, x: str, size: int, stride: int, pad: int) -> str:
        n, c, h, w = self.shapes[x]
        shape = (n, c, (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1)
        window = dict(pads=[pad] * 4, auto_pad="NOTSET", strides=[stride, stride], kernel_shape=[size, size],
                      ceil_mode=0)
        if op == "MaxPool":
            return self.node(op, [x], self.name("max_pool2d"), shape, storage_order=0, dilations=[1, 1], **window)
        return self.node(op, [x], self.name("avg_pool2d"), shape, count_include_pad=1, **window)

    def grow(self, x: str, c: int, h: int, w: int) -> str:
        """dlib's add_prev zero-fills the smaller operand at the end of each dim (export.dlib_net._grow)."""
        n, xc, xh, xw = self.shapes[x]
        if (xc, xh, xw) == (c, h, w):
            return x
        pads = (0, 0, 0, 0, 0, c - xc, h - xh, w - xw)
        if pads not in self.pads:
            k = len(self.pads)
            name = _PAD_CONSTANTS[k] if k < len(_PAD_CONSTANTS) else f"val_pads_{k}"
            self.pads[pads] = self.constant(name, np.array(pads, np.int64))
        return self.node("Pad", [x, self.pads[pads]], self.name("pad"), (n, c, h, w), mode="constant")

    def add_prev(self, y: str, skip: str, out: str) -> str:
        c, h, w = (max(self.shapes[y][i], self.shapes[skip][i]) for i in (1, 2, 3))
        a, b = self.grow(y, c, h, w), self.grow(skip, c, h, w)
        return self.node("Add", [a, b], out, (self.shapes[y][0], c, h, w))


def to_onnx(arch: Architecture) -> onnx.ModelProto:
    """N x 3 x 150 x 150 planar RGB, (pixel - input_mean) / 256 -> N x 128 'embedding', L2-normalised
    (export.dlib_net.L2Normalized over DlibResNet)."""
    g = _Graph()
    rows, cols = arch.input_size
    x = "input"
    inp = helper.make_tensor_value_info(x, TensorProto.FLOAT, [_BATCH, 3, rows, cols])
    g.shapes[x] = (_BATCH, 3, rows, cols)
    # The batch size feeds the Expand before the final Div, as torch's expand(N, 128) exported it.
    batch = g.node("Shape", [x], "val_0", (1,), node_name="node_Shape_0", elem_type=TensorProto.INT64, start=0, end=1)

    x = g.relu(g.conv(x, arch.stem, "net.stem"))
    x = g.pool("MaxPool", x, *arch.pool)
    for i, unit in enumerate(arch.units):
        y = g.conv(g.relu(g.conv(x, unit.conv1, f"net.units.{i}.conv1")), unit.conv2, f"net.units.{i}.conv2")
        skip = g.pool("AveragePool", x, *unit.pool, 0) if unit.pool else x
        x = g.relu(g.add_prev(y, skip, TORCH_ADD_NAMES[i]))

    n, c = g.shapes[x][:2]
    axes = g.constant("val_9", np.array([2, 3], np.int64))
    x = g.node("ReduceMean", [x, axes], "mean", (n, c), noop_with_empty_axes=0, keepdims=0)
    fc = g.param("net.fc.weight", arch.fc)
    dim = arch.fc.shape[0]
    linear = g.node("Gemm", [x, fc], "linear", (n, dim), beta=1.0, transB=1, alpha=1.0, transA=0)
    # F.normalize: x / max(||x||, eps), the norm expanded to x's shape before the division.
    axis = g.constant("val_12", np.array([1], np.int64))
    norm = g.node("ReduceL2", [linear, axis], "linalg_vector_norm", (n, 1), noop_with_empty_axes=0, keepdims=1)
    eps = g.constant("val_14", np.array(L2_EPS, np.float32))
    norm = g.node("Clip", [norm, eps], "clamp_min", (n, 1))
    width = g.constant("val_17", np.array([dim], np.int64))
    target = g.node("Concat", [batch, width], "val_18", (2,), node_name="node_Concat_17",
                    elem_type=TensorProto.INT64, axis=0)
    norm = g.node("Expand", [norm, target], "expand", (n, dim))
    g.nodes.append(helper.make_node("Div", [linear, norm], ["embedding"], name="node_div"))
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [n, dim])

    graph = helper.make_graph(g.nodes, "main_graph", [inp], [out], initializer=g.params + g.constants,
                              value_info=g.infos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="facegate-export", producer_version="dlib_onnx")
    model.ir_version = IR_VERSION
    return model


def _check(model: onnx.ModelProto, onnx_path: Path) -> bytes:
    """The file appears only if onnx's checker and onnxruntime accept the graph and it maps a
    probe batch to finite unit vectors (the numerics are tested against torch and dlib)."""
    import onnxruntime as ort

    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    probe = rng.uniform(-0.5, 0.5, (2, *sess.get_inputs()[0].shape[1:])).astype(np.float32)
    got = sess.run(None, {"input": probe})[0]
    unit = np.isfinite(got).all() and np.abs(np.linalg.norm(got, axis=1) - 1).max() <= 1e-5
    if got.shape != (2, EMBEDDING_DIM) or not unit:
        raise ModelError(onnx_path, f"built graph gives {got.shape} non-unit or non-finite embeddings; not written")
    return data


def build_onnx(dat_path: str | Path, onnx_path: str | Path) -> Path:
    """dlib .dat -> fp32 ONNX (opset 18, one file, dynamic batch) ending in an L2 normalisation,
    node for node the graph torch's exporter wrote from export.dlib_net's module, without torch."""
    from edge.atomic import atomic_write_bytes

    dat_path, onnx_path = Path(dat_path), Path(onnx_path)
    data = _check(to_onnx(architecture(read_dat(dat_path), dat_path)), onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(onnx_path, data)
    return onnx_path


SOURCE = SourceSpec(package="face_recognition_models", version="0.3.0",
                    file=f"face_recognition_models/models/{DAT_NAME}", license="CC0",
                    notes="dlib ResNet-29 face encoder (Davis King), read from dlib's .dat and exported by facegate")


def dlib_card(name: str, model_file: Path, precision: str, mean: tuple[float, float, float], **extra) -> Card:
    return Card(name=name, task="face_embedding", file=model_file.name, sha256=sha256_file(model_file),
                size_bytes=model_file.stat().st_size, runtime="onnxruntime", precision=precision,
                input=InputSpec(width=CHIP_SIZE, height=CHIP_SIZE, color="RGB", layout="NCHW",
                                mean=mean, std=(256.0, 256.0, 256.0), dynamic_batch=True),
                alignment=AlignmentSpec(size=(CHIP_SIZE, CHIP_SIZE), template=DLIB_TEMPLATE_150),
                embedding=EmbeddingSpec(dim=EMBEDDING_DIM), score=ScoreSpec(), source=SOURCE, **extra)


def build(raw_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """models/raw/<dat> -> out_dir/dlib_fp32.onnx and its card; returns both paths. No torch."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    dat = raw_dir / DAT_NAME
    onnx_path = build_onnx(dat, out_dir / "dlib_fp32.onnx")
    # dlib stores the means as floats (122.782f...); the card keeps the decimal values dlib was given.
    mean = tuple(round(m, 3) for m in read_dat(dat).input_mean)
    return [onnx_path, write_card(dlib_card("dlib_fp32", onnx_path, "fp32", mean), onnx_path)]
