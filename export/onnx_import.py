"""ONNX import: turn a shipped ONNX model into a clean fp32 graph the quantizer and runtimes accept.

Registry models arrive in shapes onnxruntime handles badly: weights block-quantized
(DequantizeLinear with block_size, opset 21) so the runtime cannot constant-fold them, every
weight also declared as a graph input (so onnxruntime demands it as a feed), and fixed input
sizes. Import folds every node whose inputs are all constants into an initializer (evaluated by
onnx's reference runtime, so the dequantization maths is onnx's, not ours), drops graph inputs
that are initializers or unused, and makes the batch (and, for detectors, the spatial) dims free.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from edge.errors import ModelError


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load a model, refusing external data that points outside the model's folder."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ModelError(path, "model file not found") from None
    except Exception as e:  # protobuf raises DecodeError or RuntimeError for truncated files
        raise ModelError(path, f"not a readable ONNX model ({type(e).__name__}: {e})") from None
    base = path.parent.resolve()
    for t in _all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = dict((e.key, e.value) for e in t.external_data).get("location", "")
            target = (base / loc).resolve()
            if base not in target.parents:
                raise ModelError(path, f"external data of tensor {t.name!r} points outside the model folder: {loc!r}")
    try:
        onnx.load_external_data_for_model(model, str(base))
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelError(path, f"ONNX model fails validation ({type(e).__name__}: {e})") from None
    return model


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    input_names = {i.name for i in g.input}
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    # A graph input that is also an initializer is an overridable default; an importer treats it
    # as the constant it is in practice.
    keep: list[onnx.NodeProto] = []
    opset = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    for node in g.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
            continue
        ins = [i for i in node.input if i]
        if ins and all(i in consts for i in ins) and node.op_type not in ("Dropout",):
            sub = helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output])
            ev = ReferenceEvaluator(helper.make_model(sub, opset_imports=opset))
            outs = ev.run(None, {i: consts[i] for i in ins})
            for name, val in zip(node.output, outs):
                consts[name] = np.asarray(val)
            continue
        keep.append(node)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    new_inits = [numpy_helper.from_array(v.astype(np.float32) if v.dtype == np.float64 else v, name)
                 for name, v in consts.items() if name in used]
    real_inputs = [i for i in g.input if i.name in used and i.name not in consts]
    graph = helper.make_graph(keep, g.name, real_inputs, list(g.output), new_inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="facegate-export")
    out.ir_version = model.ir_version
    return out


def free_dims(model: onnx.ModelProto, batch: bool = True, spatial: bool = False) -> onnx.ModelProto:
    """Replace fixed batch (and H, W for size-following detectors) dims by symbolic ones."""
    for vi in list(model.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if batch:
            dims[0].dim_param = "N"
        if spatial and len(dims) == 4:
            dims[2].dim_param, dims[3].dim_param = "H", "W"
    for vi in model.graph.output:
        dims = vi.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            if (batch and k == 0) or (spatial and k == 1):
                d.dim_param = "N" if k == 0 else "A"
    del model.graph.value_info[:]
    return model


def import_onnx(src: str | Path, dst: str | Path, spatial: bool = False, batch: bool = True) -> Path:
    """src (any ONNX face model) -> dst (clean fp32 ONNX), written atomically."""
    from edge.atomic import atomic_write_bytes

    model = free_dims(fold_constants(load_onnx(src)), batch=batch, spatial=spatial)
    model = onnx.shape_inference.infer_shapes(model)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelError(src, f"import produced an invalid graph: {e}") from None
    atomic_write_bytes(dst, model.SerializeToString())
    return Path(dst)
