"""dlib's ResNet face encoder (`dlib_face_recognition_resnet_model_v1.dat`) as a torch module, its
ONNX export, alignment template and model card.

dlib's network (dnn_face_recognition_ex.cpp) is a 29-conv ResNet on a 150x150 RGB chip:
stem conv 7x7/2 + affine + relu + max pool 3x3/2, then residual units of two 3x3 convs (each
followed by an affine, i.e. batch norm folded at training end), average global pooling and a
128-d fc without bias. Two dlib rules differ from the usual torch conventions and both change
the output completely if missed: dlib pads a window by size/2 only when its stride is 1 (stem,
max pool, stride-2 convs and pools are unpadded; the file records the padding and we use it),
and `add_prev` of two tensors of different shapes yields the larger shape with the smaller one
zero-filled at the end (extra channels, bottom rows, right columns), which happens at every
widening down-sampling unit and where the skip path's 2x2 pool keeps one more row/col than
the stride-2 conv (8 -> 3 vs 4, 4 -> 1 vs 2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge.align import DLIB_TEMPLATE_150
from edge.errors import ModelError
from edge.modelcard import (AlignmentSpec, Card, EmbeddingSpec, InputSpec, ScoreSpec, SourceSpec, sha256_file,
                            write_card)

from .dlib_dat import DlibNet, Layer, read_dat

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150
CHIP_PADDING = 0.25  # what face_recognition and dlib's example pass to get_face_chip_details
EMBEDDING_DIM = 128
ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4  # max |onnx - torch| on the L2-normalised embedding

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


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum has the larger size in each dim; the smaller tensor is zero-filled
    at the end (extra channels, bottom rows, right columns)."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))
    return _grow(a, c, h, w) + _grow(b, c, h, w)


def _grow(t: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    if tuple(t.shape[1:]) == (c, h, w):
        return t
    return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))


class _Unit(nn.Module):
    """One dlib residual unit: relu(add_prev(affine(conv(relu(affine(conv(x))))), skip(x)))."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, pool: tuple[int, int] | None):
        super().__init__()
        self.conv1, self.conv2, self.pool = conv1, conv2, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        skip = F.avg_pool2d(x, self.pool[0], self.pool[1]) if self.pool else x
        return F.relu(add_prev(y, skip))


class DlibResNet(nn.Module):
    """Input: N x 3 x 150 x 150 planar RGB, (pixel - input_mean) / 256. Output: N x 128, not
    normalised (dlib compares Euclidean distances with 0.6)."""

    def __init__(self, stem: nn.Conv2d, pool: tuple[int, int, int], units: list[_Unit], fc: nn.Linear,
                 input_mean: tuple[float, float, float], input_size: tuple[int, int]):
        super().__init__()
        self.stem, self.pool, self.units, self.fc = stem, pool, nn.ModuleList(units), fc
        self.input_mean, self.input_size = input_mean, input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), self.pool[0], self.pool[1], self.pool[2])
        for unit in self.units:
            x = unit(x)
        return self.fc(x.mean(dim=(2, 3)))


class L2Normalized(nn.Module):
    """The gate scores cosine on unit vectors, so the exported graph ends in an L2 normalisation."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), p=2.0, dim=1, eps=1e-12)


class _Layers:
    """Walks the parsed layer list, checking it against the architecture this module implements."""

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

    def conv(self, in_channels: int) -> nn.Conv2d:
        """A con layer and the affine after it, folded into one Conv2d."""
        at = self.i
        con, aff = self.take("con"), self.take("affine")
        w, b = con.tensors["weight"], con.tensors["bias"]
        p = con.params
        if w.shape[1] != in_channels:
            raise ModelError(self.path, f"layer {at}: conv expects {w.shape[1]} input channels, gets {in_channels}")
        if aff.params["mode"] != 0 or aff.tensors["gamma"].shape != (w.shape[0],) or b.shape != (w.shape[0],):
            raise ModelError(self.path, f"layer {at + 1}: affine does not match the {w.shape[0]} channels of its conv")
        w, b = fold_affine(w, b, aff.tensors["gamma"], aff.tensors["beta"])
        m = nn.Conv2d(w.shape[1], w.shape[0], (p["nr"], p["nc"]), (p["stride_y"], p["stride_x"]),
                      (p["padding_y"], p["padding_x"]), bias=True)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(w))
            m.bias.copy_(torch.from_numpy(b))
        return m

    def pool(self, kind: str) -> tuple[int, int, int]:
        at = self.i
        p = self.take(kind).params
        if p["nr"] != p["nc"] or p["stride_y"] != p["stride_x"] or p["padding_y"] != p["padding_x"] or p["nr"] == 0:
            raise ModelError(self.path, f"layer {at}: only square, equal-stride {kind} windows are supported: {p}")
        return p["nr"], p["stride_y"], p["padding_y"]


def from_dlib(net: DlibNet, path: str | Path = "<dlib net>") -> DlibResNet:
    path = Path(path)
    if net.input_size != (CHIP_SIZE, CHIP_SIZE):
        raise ModelError(path, f"input size {net.input_size}, expected {CHIP_SIZE}x{CHIP_SIZE}")
    s = _Layers(net, path)
    stem = s.conv(3)
    s.take("relu")
    pool = s.pool("max_pool")
    channels = stem.out_channels
    units = []
    # Each unit is  tag1, conv, affine, relu, conv, affine, then either add_prev1 (identity skip) or
    # tag2, skip1, avg_pool, add_prev2 (down-sampling skip), then relu; tags and skips read as "mark".
    while s.peek() == "mark":
        s.take("mark")
        c1 = s.conv(channels)
        s.take("relu")
        c2 = s.conv(c1.out_channels)
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
        units.append(_Unit(c1, c2, down))
        channels = max(channels, c2.out_channels)
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
    fc = nn.Linear(w.shape[0], w.shape[1], bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
    model = DlibResNet(stem, pool, units, fc, net.input_mean, net.input_size)
    return model.eval()


def load_dat(path: str | Path) -> DlibResNet:
    return from_dlib(read_dat(path), path)


def chips_to_input(chips_rgb: np.ndarray, mean: tuple[float, float, float]) -> torch.Tensor:
    """N x 150 x 150 x 3 RGB uint8 chips -> the network input, as dlib's input_rgb_image_sized."""
    x = (np.asarray(chips_rgb, np.float32) - np.asarray(mean, np.float32)) / np.float32(256.0)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _probe(mean: tuple[float, float, float]) -> torch.Tensor:
    """A fixed batch of two chip-like inputs for the export's self-check."""
    rng = np.random.default_rng(0)
    return chips_to_input(rng.integers(0, 256, (2, CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8), mean)


def export_onnx(dat_path: str | Path, onnx_path: str | Path) -> Path:
    """dlib .dat -> fp32 ONNX (opset 18, one file, dynamic batch) ending in an L2 normalisation.

    The file appears only after onnxruntime reproduces torch within ONNX_TOLERANCE on a probe."""
    return _export(load_dat(dat_path), Path(onnx_path))


def _export(net: DlibResNet, onnx_path: Path) -> Path:
    import onnx
    import onnxruntime as ort

    from edge.atomic import atomic_write_bytes

    model = L2Normalized(net).eval()
    probe = _probe(net.input_mean)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.onnx.export(model, (probe,), dynamo=True, opset_version=ONNX_OPSET, external_data=False,
                                    input_names=["input"], output_names=["embedding"],
                                    dynamic_shapes={"x": {0: batch}}, verbose=False)
        want = model(probe).numpy()
    proto = program.model_proto
    proto.producer_name = "facegate-export"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": probe.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if not diff <= ONNX_TOLERANCE:
        raise ModelError(onnx_path, f"exported graph differs from torch by {diff:.2e} (> {ONNX_TOLERANCE}); not written")
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
    """models/raw/<dat> -> out_dir/dlib_fp32.onnx and its card; returns both paths."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    dat = raw_dir / DAT_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    net = load_dat(dat)
    onnx_path = _export(net, out_dir / "dlib_fp32.onnx")
    # dlib stores the means as floats (122.782f...); the card keeps the decimal values dlib was given.
    mean = tuple(round(m, 3) for m in net.input_mean)
    card = write_card(dlib_card("dlib_fp32", onnx_path, "fp32", mean), onnx_path)
    return [onnx_path, card]
