"""Rewrite Conv -> BatchNorm -> PReLU chains into ops that have INT8 kernels.

onnxruntime has no INT8 PReLU and its float PReLU is slow (about 70% of SFace's time on 1 thread
here), so a PReLU encoder gains nothing from INT8 as it is. For a PReLU with slopes a <= 1 fed by
y = Conv(x) (batch norm folded in):
    PReLU(y) = a*y + (1 - a)*ReLU(y) = Conv_a(x) + ReLU(Conv_(1-a)(x))
where Conv_k scales each output channel's weights and bias by k >= 0 (so k*ReLU(y) = ReLU(k*y)).
Both convs quantize to QLinearConv (ReLU fused) and the sum to QLinearAdd. A PReLU with a slope
above 1 is left as it is. The rewrite is exact in fp32 (checked by the parity test).

The PReLUs left (slopes above 1, and late layers where doubling a conv would double many weights)
run in float between a DequantizeLinear and a QuantizeLinear. onnxruntime's PRelu broadcasts its
per-channel slope element by element and took 40% of INT8 SFace's time; after quantization each
becomes ReLU(y) + a * Min(y, 0), whose kernels are vectorised (3-4x faster here) and whose result
is the same to float rounding (`split_prelu`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _index(g):
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    return init, prod, uses


def _conv_wb(conv, init):
    w = init[conv.input[1]]
    b = init[conv.input[2]] if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0], np.float32)
    return w, b


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv -> BatchNormalization becomes one Conv with scaled weights and shifted bias."""
    g = model.graph
    init, prod, uses = _index(g)
    new_nodes, new_inits, dropped = [], [], set()
    for n in g.node:
        conv = prod.get(n.input[0]) if n.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type != "Conv" or uses.get(conv.output[0]) != 1 or conv.input[1] not in init:
            new_nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (init[x] for x in n.input[1:5])
        s = gamma / np.sqrt(var + eps)
        w, b = _conv_wb(conv, init)
        wn, bn = conv.name + "_W_bn", conv.name + "_B_bn"
        new_inits += [numpy_helper.from_array((w * s[:, None, None, None]).astype(np.float32), wn),
                      numpy_helper.from_array(((b - mean) * s + beta).astype(np.float32), bn)]
        fused = helper.make_node("Conv", [conv.input[0], wn, bn], [n.output[0]], name=conv.name + "_bn", )
        fused.attribute.extend(conv.attribute)
        dropped.add(id(conv))
        new_nodes.append(fused)
    nodes = [n for n in new_nodes if id(n) not in dropped]
    return _rebuild(model, nodes, new_inits)


def _elements(model: onnx.ModelProto) -> dict[str, int]:
    """Elements per sample of each tensor whose shape inference can tell."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]
        if dims and all(dims):
            out[vi.name] = int(np.prod(dims))
    return out


def decompose_prelu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Returns the rewritten model and how many PReLUs were replaced.

    Only where the PReLU's activation has at least as many elements as the conv has weights: there
    the float PReLU costs time, while the duplicated weights cost little. Late 1x1 convs on 7x7
    maps are the opposite (a million weights, fifty thousand activations) and stay as they are,
    which keeps the INT8 file small."""
    g = model.graph
    init, prod, uses = _index(g)
    elements = _elements(model)
    new_nodes, new_inits, dropped, count = [], [], set(), 0
    for n in g.node:
        conv = prod.get(n.input[0]) if n.op_type == "PRelu" else None
        if (conv is None or conv.op_type != "Conv" or uses.get(conv.output[0]) != 1 or conv.input[1] not in init
                or n.input[1] not in init):
            new_nodes.append(n)
            continue
        w, b = _conv_wb(conv, init)
        a = np.broadcast_to(init[n.input[1]].reshape(-1), (w.shape[0],)).astype(np.float32)
        if np.any(a > 1.0) or elements.get(n.output[0], 0) < w.size:
            new_nodes.append(n)
            continue
        out = n.output[0]
        parts = []
        for tag, k in (("lin", a), ("pos", 1.0 - a)):
            wn, bn, yn = f"{conv.name}_{tag}_W", f"{conv.name}_{tag}_B", f"{out}_{tag}"
            new_inits += [numpy_helper.from_array((w * k[:, None, None, None]).astype(np.float32), wn),
                          numpy_helper.from_array((b * k).astype(np.float32), bn)]
            c = helper.make_node("Conv", [conv.input[0], wn, bn], [yn], name=f"{conv.name}_{tag}")
            c.attribute.extend(conv.attribute)
            parts.append(c)
        relu = helper.make_node("Relu", [f"{out}_pos"], [f"{out}_posrelu"], name=f"{n.name or out}_relu")
        add = helper.make_node("Add", [f"{out}_lin", f"{out}_posrelu"], [out], name=f"{n.name or out}_add")
        new_nodes += parts + [relu, add]
        dropped.add(id(conv))
        count += 1
    nodes = [n for n in new_nodes if id(n) not in dropped]
    return _rebuild(model, nodes, new_inits), count


def split_prelu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every PReLU -> ReLU(y) + a * Min(y, 0) (the slope tensor, often a DequantizeLinear of INT8
    slopes, is used as it is); returns the model and the count."""
    zero = "prelu_split_zero"
    nodes, count = [], 0
    for n in model.graph.node:
        if n.op_type != "PRelu":
            nodes.append(n)
            continue
        y, out, tag = n.input[0], n.output[0], n.name or n.output[0]
        nodes += [helper.make_node("Relu", [y], [f"{out}_pos"], name=f"{tag}_pos"),
                  helper.make_node("Min", [y, zero], [f"{out}_neg"], name=f"{tag}_neg"),
                  helper.make_node("Mul", [f"{out}_neg", n.input[1]], [f"{out}_negslope"], name=f"{tag}_slope"),
                  helper.make_node("Add", [f"{out}_pos", f"{out}_negslope"], [out], name=f"{tag}_sum")]
        count += 1
    if not count:
        return model, 0
    return _rebuild(model, nodes, [numpy_helper.from_array(np.zeros(1, np.float32), zero)]), count


def finish_int8(path) -> int:
    """Post-quantization pass on an INT8 ONNX file (export.quantize's scratch output), in place."""
    model, n = split_prelu(onnx.load(str(path)))
    if n:
        Path(path).write_bytes(model.SerializeToString())
    return n


def _rebuild(model, nodes, extra_inits):
    g = model.graph
    used = {i for n in nodes for i in n.input}
    inits = [i for i in g.initializer if i.name in used] + [i for i in extra_inits if i.name in used]
    graph = helper.make_graph(nodes, g.name, list(g.input), list(g.output), inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    out.ir_version = model.ir_version
    onnx.checker.check_model(out)
    return out


def int8_friendly(src: str, dst: str) -> int:
    from edge.atomic import atomic_write_bytes

    model, n = decompose_prelu(fold_batchnorm(onnx.load(src)))
    atomic_write_bytes(dst, model.SerializeToString())
    return n
