"""Reader for dlib's own serialization of a DNN (`.dat`), enough for dlib's ResNet face encoder.

The stream is written by dlib's nested `add_layer` templates, so it is not a flat list: the loss
layer comes first, then one version integer per layer from the output inwards (2 = computational
layer, 1 = tag or skip layer, which carry nothing else, 3 = the layer sitting on the input), then
the input layer, then each computational layer's details from the input outwards, each followed
by dlib's training state (three flags and three usually empty tensors). Tag and skip layers are
indistinguishable in the file (their ids are template parameters), so the reader reports them as
`mark` and the network builder checks their positions against the architecture it knows.

Everything read from the file is bounded: integers by their declared byte count, strings and
tensors by the bytes left, layer counts by a fixed limit, so a truncated or hostile file fails
with a ModelError naming the file, the byte offset and what was being read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import ModelError

MAX_FILE_BYTES = 256 << 20  # the face model is 22 MB; anything this large is not one
MAX_LAYERS = 4096
MAX_NAME = 64  # layer type tags such as "con_4"; a longer string means the stream is off track
MAX_FLOATS = 64 << 20

# dlib's float_details marks non-finite values with these exponents.
_SPECIAL_EXPONENTS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}


@dataclass(frozen=True)
class Layer:
    kind: str  # "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc", "mark"
    version: str  # dlib's type tag as written, e.g. "con_4"
    params: dict[str, int | float] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class DlibNet:
    loss: str  # e.g. "loss_metric_2"
    loss_params: dict[str, float]
    input_kind: str  # e.g. "input_rgb_image_sized"
    input_mean: tuple[float, float, float]  # R, G, B; dlib feeds (pixel - mean) / 256
    input_size: tuple[int, int]  # rows, cols
    layers: list[Layer]  # from the input to the output (the loss layer excluded)


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data = memoryview(data)
        self.pos = 0
        self.path = path
        self.where = "header"

    def fail(self, problem: str) -> ModelError:
        return ModelError(self.path, f"not a dlib network file: {problem} at byte {self.pos} ({self.where})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > len(self.data) - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes, {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, what: str = "integer") -> int:
        ctrl = self.take(1, what)[0]
        size = ctrl & 0x0F
        if ctrl & 0x70 or size > 8:
            raise self.fail(f"bad integer control byte 0x{ctrl:02x} for {what}")
        mag = int.from_bytes(self.take(size, what), "little")
        return -mag if ctrl & 0x80 else mag

    def count(self, what: str, limit: int) -> int:
        v = self.int(what)
        if not 0 <= v <= limit:
            raise self.fail(f"{what} = {v} is outside 0..{limit}")
        return v

    def float(self, what: str = "float") -> float:
        mantissa = self.int(what + " mantissa")
        exponent = self.int(what + " exponent")
        if exponent in _SPECIAL_EXPONENTS:
            return _SPECIAL_EXPONENTS[exponent]
        if not -32768 <= exponent <= 32767:
            raise self.fail(f"{what} exponent {exponent} is not a 16-bit integer")
        try:
            return math.ldexp(mantissa, exponent)
        except OverflowError:
            raise self.fail(f"{what} overflows a double") from None

    def str(self, what: str = "string", limit: int = MAX_NAME) -> str:
        n = self.count(what + " length", limit)
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not ASCII") from None

    def bool(self, what: str = "flag") -> bool:
        ch = self.take(1, what)[0]
        if ch not in (0x30, 0x31):  # dlib writes bools as the characters '0' and '1'
            raise self.fail(f"{what} byte 0x{ch:02x} is not '0' or '1'")
        return ch == 0x31

    def dims(self, what: str) -> tuple[int, int, int, int]:
        d = tuple(self.count(f"{what} dim", MAX_FLOATS) for _ in range(4))
        if math.prod(d) > MAX_FLOATS:
            raise self.fail(f"{what} shape {d} is too large")
        return d  # type: ignore[return-value]

    def tensor(self, what: str = "tensor") -> np.ndarray:
        version = self.int(what + " version")
        if version != 2:
            raise self.fail(f"{what} version {version} (only 2 is known)")
        shape = self.dims(what)
        raw = self.take(4 * math.prod(shape), what + " data")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self, what: str) -> tuple[int, int, int, int]:
        version = self.int(what + " version")
        if version != 1:
            raise self.fail(f"{what} alias version {version} (only 1 is known)")
        return self.dims(what)


def _slice(c: _Cursor, params: np.ndarray, offset: int, shape: tuple[int, ...], what: str) -> np.ndarray:
    n = math.prod(shape)
    if offset + n > params.size:
        raise c.fail(f"{what} of shape {shape} at offset {offset} exceeds the {params.size} parameters")
    return params.reshape(-1)[offset:offset + n].reshape(shape).copy()


def _window(c: _Cursor, params: dict) -> None:
    for k in ("nr", "nc"):
        params[k] = c.count(k, 4096)
    for k in ("stride_y", "stride_x"):
        params[k] = c.count(k, 4096)
        if params[k] < 1:
            raise c.fail(f"{k} must be >= 1")
    for k in ("padding_y", "padding_x"):
        params[k] = c.count(k, 4096)


def _details(c: _Cursor) -> Layer:
    version = c.str("layer type")
    c.where = f"{c.where}, {version}"
    if version == "con_4":
        p = c.tensor("con params")
        params: dict = {"num_filters": c.count("num_filters", 1 << 16)}
        _window(c, params)
        filt = c.alias("filters")
        bias = c.alias("biases")
        for k in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
            params[k] = c.float(k)
        if filt[0] != params["num_filters"] or filt[2:] != (params["nr"], params["nc"]):
            raise c.fail(f"filter shape {filt} disagrees with num_filters/nr/nc")
        w = _slice(c, p, 0, filt, "filters")
        b = _slice(c, p, w.size, (bias[1],), "biases")
        if w.size + b.size != p.size:
            raise c.fail(f"con has {p.size} parameters, filters and biases use {w.size + b.size}")
        return Layer("con", version, params, {"weight": w, "bias": b})
    if version == "affine_":
        p = c.tensor("affine params")
        g = c.alias("gamma")
        bshape = c.alias("beta")
        mode = c.int("affine mode")
        if mode not in (0, 1) or g != bshape or 2 * math.prod(g) != p.size:
            raise c.fail(f"affine mode {mode}, gamma {g}, beta {bshape} and {p.size} parameters disagree")
        n = math.prod(g)
        # dlib's layer_mode: CONV_MODE = 0 (per channel), FC_MODE = 1 (per element)
        return Layer("affine", version, {"mode": mode},
                     {"gamma": _slice(c, p, 0, (n,), "gamma"), "beta": _slice(c, p, n, (n,), "beta")})
    if version == "relu_":
        return Layer("relu", version)
    if version == "add_prev_":
        return Layer("add_prev", version)
    if version in ("max_pool_2", "avg_pool_2"):
        params = {}
        _window(c, params)
        return Layer(version[:-2], version, params)
    if version == "fc_2":
        params = {"num_outputs": c.count("num_outputs", 1 << 20), "num_inputs": c.count("num_inputs", 1 << 24)}
        p = c.tensor("fc params")
        w = c.alias("weights")
        b = c.alias("biases")
        params["bias_mode"] = c.int("bias mode")
        for k in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
            params[k] = c.float(k)
        nw = math.prod(w)
        # dlib stores fc weights input-major: a (num_inputs, num_outputs) matrix.
        if w[0] * w[1] != nw or w[0] != params["num_inputs"] or w[1] != params["num_outputs"]:
            raise c.fail(f"fc weights {w} disagree with {params['num_inputs']} inputs, {params['num_outputs']} outputs")
        tensors = {"weight": _slice(c, p, 0, (w[0], w[1]), "fc weights")}
        # bias_mode: FC_HAS_BIAS = 0, FC_NO_BIAS = 1
        used = nw
        if params["bias_mode"] == 0:
            tensors["bias"] = _slice(c, p, nw, (math.prod(b),), "fc biases")
            used += math.prod(b)
        elif params["bias_mode"] != 1:
            raise c.fail(f"unknown fc bias mode {params['bias_mode']}")
        if used != p.size:
            raise c.fail(f"fc has {p.size} parameters, weights and biases use {used}")
        return Layer("fc", version, params, tensors)
    raise c.fail(f"unsupported layer type {version!r}")


def _training_state(c: _Cursor, with_grad_final: bool) -> None:
    """Skip what dlib's add_layer saves for training: three flags, then x_grad, cached_output and
    params_grad (grad_final for the layer on the input); normally empty."""
    for what in ("setup flag", "stale flag", "disabled flag"):
        c.bool(what)
    for what in ("x_grad", "cached_output", "grad_final" if with_grad_final else "params_grad"):
        c.tensor(what)


def parse(data: bytes, path: str | Path = "<bytes>") -> DlibNet:
    path = Path(path)
    c = _Cursor(data, path)
    version = c.int("loss layer version")
    if version != 1:
        raise c.fail(f"loss layer version {version} (only 1 is known)")
    loss = c.str("loss type")
    if loss != "loss_metric_2":
        raise c.fail(f"unsupported loss layer {loss!r}")
    loss_params = {"margin": c.float("margin"), "distance_threshold": c.float("distance threshold")}

    # One version per layer from the output inwards until the layer on the input (2 or 3).
    c.where = "layer versions"
    marks: list[int] = []
    while True:
        v = c.int("layer version")
        if v == 3:
            break
        if v not in (1, 2):
            raise c.fail(f"layer version {v} (expected 1, 2 or 3)")
        marks.append(v)
        if len(marks) > MAX_LAYERS:
            raise c.fail(f"more than {MAX_LAYERS} layers")

    c.where = "input layer"
    input_kind = c.str("input type")
    if input_kind != "input_rgb_image_sized":
        raise c.fail(f"unsupported input layer {input_kind!r}")
    mean = (c.float("avg_red"), c.float("avg_green"), c.float("avg_blue"))
    size = (c.count("input rows", 4096), c.count("input cols", 4096))

    layers: list[Layer] = []
    c.where = "layer 0"
    layers.append(_details(c))
    _training_state(c, with_grad_final=True)
    c.int("sample expansion factor")
    for i, v in enumerate(reversed(marks), start=1):
        if v == 1:
            layers.append(Layer("mark", "tag_or_skip"))
            continue
        c.where = f"layer {i}"
        layers.append(_details(c))
        _training_state(c, with_grad_final=False)
    if c.pos != len(c.data):
        c.where = "end"
        raise c.fail(f"{len(c.data) - c.pos} unexpected trailing bytes")
    return DlibNet(loss, loss_params, input_kind, mean, size, layers)


def read_dat(path: str | Path) -> DlibNet:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ModelError(path, f"{size} bytes is too large for a dlib network file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(path, "dlib network file not found") from None
    except IsADirectoryError:
        raise ModelError(path, "is a directory, not a dlib network file") from None
    return parse(data, path)
