"""A plain ONNX CNN graph as a torch module, so ONNX-born encoders (SFace) take the same
torch -> TFLite path as the dlib network.

Only the ops of such encoders are supported (convolutions, batch norm, PReLU / ReLU, elementwise
arithmetic, flatten / reshape, Gemm, dropout at inference); anything else is a clear error
naming the file and the op, never a silently different network. The graph is replayed node by
node with torch functional ops, so the module computes exactly what the ONNX graph says."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge.errors import ModelError

PARITY_TOLERANCE = 1e-4  # max |torch - onnxruntime| on the L2-normalised embedding


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxModule(nn.Module):
    def __init__(self, model, source: str | Path = "<onnx>"):
        from onnx import numpy_helper

        super().__init__()
        g = model.graph
        consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant":
                consts[n.output[0]] = numpy_helper.to_array(_attrs(n)["value"])
        feeds = [i.name for i in g.input if i.name not in consts]
        if len(feeds) != 1 or len(g.output) != 1:
            raise ModelError(source, f"need one input and one output, got inputs {feeds} and {len(g.output)} outputs")
        self.input_name, self.output_name = feeds[0], g.output[0].name
        self._attr = {}
        for k, (name, arr) in enumerate(consts.items()):
            self._attr[name] = f"c{k}"
            self.register_buffer(f"c{k}", torch.from_numpy(np.array(arr, dtype=arr.dtype)))
        used = {i for n in g.node for i in n.input} | {self.output_name}
        self.nodes = []
        for n in g.node:
            if n.op_type == "Constant":
                continue
            if n.op_type not in _OPS:
                raise ModelError(source, f"op {n.op_type} (node {n.name or n.output[0]}) is not supported by the torch rebuild")
            if any(o in used for o in n.output[1:]):
                raise ModelError(source, f"{n.op_type} node {n.name or n.output[0]}: only its first output may be used")
            a = _attrs(n)
            if n.op_type == "Reshape":  # the target shape must be a constant: it becomes a Python tuple
                if n.input[1] not in consts:
                    raise ModelError(source, f"Reshape {n.name or n.output[0]}: shape is not a constant")
                a["shape"] = tuple(int(v) for v in consts[n.input[1]])
            if n.op_type == "Conv" and a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise ModelError(source, f"Conv {n.name or n.output[0]}: auto_pad is not supported")
            self.nodes.append((n.op_type, list(n.input), n.output[0], a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}

        def get(name: str):
            return env[name] if name in env else getattr(self, self._attr[name])

        for op, ins, out, a in self.nodes:
            env[out] = _OPS[op](get, ins, a)
        return env[self.output_name]


def _conv(get, ins, a):
    w = get(ins[1])
    b = get(ins[2]) if len(ins) > 2 and ins[2] else None
    x = get(ins[0])
    pads = list(a.get("pads", [0] * 4))
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        # ONNX pads are all begins then all ends; F.pad wants (last-dim begin, end, ...) pairs.
        x = F.pad(x, [p for i in reversed(range(half)) for p in (pads[i], pads[half + i])])
        pads = [0] * len(pads)
    return F.conv2d(x, w, b, stride=tuple(a.get("strides", [1, 1])), padding=tuple(pads[:half]),
                    dilation=tuple(a.get("dilations", [1, 1])), groups=int(a.get("group", 1)))


def _prelu(get, ins, a):
    x, slope = get(ins[0]), get(ins[1])
    if x.dim() > 1 and slope.numel() == x.shape[1]:
        return F.prelu(x, slope.reshape(-1))
    return torch.where(x >= 0, x, x * slope)


def _gemm(get, ins, a):
    x, w = get(ins[0]), get(ins[1])
    if a.get("transA", 0):
        x = x.t()
    if not a.get("transB", 0):
        w = w.t()
    y = F.linear(x, w) * float(a.get("alpha", 1.0))
    if len(ins) > 2 and ins[2]:
        y = y + float(a.get("beta", 1.0)) * get(ins[2])
    return y


def _flatten(get, ins, a):
    x = get(ins[0])
    axis = int(a.get("axis", 1)) % max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _reshape(get, ins, a):
    x = get(ins[0])
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(a["shape"])]
    return x.reshape(shape)


_OPS = {
    "Add": lambda get, ins, a: get(ins[0]) + get(ins[1]),
    "Sub": lambda get, ins, a: get(ins[0]) - get(ins[1]),
    "Mul": lambda get, ins, a: get(ins[0]) * get(ins[1]),
    "Div": lambda get, ins, a: get(ins[0]) / get(ins[1]),
    "Conv": _conv,
    "BatchNormalization": lambda get, ins, a: F.batch_norm(get(ins[0]), get(ins[3]), get(ins[4]), get(ins[1]), get(ins[2]),
                                                          False, 0.0, float(a.get("epsilon", 1e-5))),
    "PRelu": _prelu,
    "Relu": lambda get, ins, a: F.relu(get(ins[0])),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Gemm": _gemm,
    "Dropout": lambda get, ins, a: get(ins[0]),  # inference: identity
    "Identity": lambda get, ins, a: get(ins[0]),
}


def load_onnx_module(path: str | Path) -> OnnxModule:
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ModelError(path, f"not a readable ONNX model: {e}") from None
    return OnnxModule(model, path).eval()


def parity(path: str | Path, module: nn.Module, x: np.ndarray) -> float:
    """max |torch - onnxruntime| on the L2-normalised outputs for input x (NCHW float32)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    norm = lambda y: y / np.linalg.norm(y, axis=1, keepdims=True)  # noqa: E731
    return float(np.abs(norm(got.reshape(len(x), -1)) - norm(want.reshape(len(x), -1))).max())
