"""Model runtimes behind one call: ONNX Runtime or LiteRT, picked by the card's `runtime`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ModelError
from .modelcard import Card, onnx_external_tensors


class OnnxModel:
    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ModelError(path, f"cannot read it: {e.strerror}") from None
        try:
            external = onnx_external_tensors(data)
        except ValueError as e:
            raise ModelError(path, f"not an ONNX model: {e}") from None
        if external:
            raise ModelError(path, f"keeps weights in external data files its card's sha256 does not cover: "
                                   f"{', '.join(external[:3])}; save the model with its weights inside the .onnx")
        try:
            # The bytes just checked, not the path: the runtime then has no folder to read other files from.
            self.session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(path, f"onnxruntime cannot load it: {e}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, {self.input_name: x})))


class LiteRtModel:
    """LiteRT (ai-edge-litert), falling back to tflite_runtime where only that exists (older Pi images)."""

    def __init__(self, path: Path, threads: int = 1):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter
            except ImportError:
                raise ModelError(path, "needs ai-edge-litert (or tflite_runtime) to run a .tflite model") from None
        try:
            self.interp = Interpreter(model_path=str(path), num_threads=threads)
            self.interp.allocate_tensors()
        except Exception as e:
            raise ModelError(path, f"LiteRT cannot load it: {e}") from None
        self.inp = self.interp.get_input_details()[0]
        self.outs = self.interp.get_output_details()
        self._batch = int(self.inp["shape"][0])

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        results: dict[str, list] = {o["name"]: [] for o in self.outs}
        step = max(self._batch, 1)
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            if self.inp["dtype"] != np.float32:
                scale, zero = self.inp["quantization"]
                chunk = np.clip(np.round(chunk / scale + zero), *_limits(self.inp["dtype"])).astype(self.inp["dtype"])
            self.interp.set_tensor(self.inp["index"], chunk)
            self.interp.invoke()
            for o in self.outs:
                y = self.interp.get_tensor(o["index"])
                if o["dtype"] != np.float32:
                    scale, zero = o["quantization"]
                    y = (y.astype(np.float32) - zero) * scale
                results[o["name"]].append(y)
        return {k: np.concatenate(v) for k, v in results.items()}


def _limits(dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return info.min, info.max


def open_model(card: Card, path: Path, threads: int = 1):
    return (OnnxModel if card.runtime == "onnxruntime" else LiteRtModel)(path, threads)
