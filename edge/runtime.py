"""Model runtimes behind one call: ONNX Runtime or LiteRT, picked by the card's `runtime`.

ONNX models run on the execution providers asked for (models.providers, else the card's, else
the CPU only), in order. One this onnxruntime build lacks, or that cannot open the model, is
dropped and the next one tried; the CPU's comes last, always, so no model is left without one."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelError
from .modelcard import CPU_PROVIDER, Card, onnx_external_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProviderChoice:
    providers: tuple[str, ...]  # to ask onnxruntime for, in order, the CPU's last
    dropped: tuple[tuple[str, str], ...]  # (provider, why), in the order asked


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> ProviderChoice:
    """The requested providers this onnxruntime build has, in the order asked, then the CPU's;
    the others with the reason. Pure."""
    keep = [p for p in requested if p in available and p != CPU_PROVIDER]
    dropped = tuple((p, f"not in this onnxruntime build (it has {', '.join(available)})")
                    for p in requested if p not in available and p != CPU_PROVIDER)
    return ProviderChoice((*keep, CPU_PROVIDER), dropped)


def open_session(model: bytes, options, requested: Sequence[str], available: Sequence[str],
                 factory: Callable) -> tuple[object, tuple[tuple[str, str], ...]]:
    """factory(model, options, providers=[...]) on the first of the chosen providers that opens
    the model, falling back down the list; returns the session and every provider dropped, with
    why. Only the CPU's own failure is raised: that one is the model's fault."""
    choice = choose_providers(requested, available)
    dropped, providers = list(choice.dropped), list(choice.providers)
    while True:
        try:
            session = factory(model, options, providers=providers)
            break
        except Exception as e:
            if len(providers) == 1:
                raise
            # its first line, cut short: the reason goes into an audit row
            dropped.append((providers[0], f"cannot open the model: {(str(e).strip() or type(e).__name__).splitlines()[0][:300]}"))
            providers = providers[1:]
    # onnxruntime itself leaves out a provider whose libraries do not load, and retries on the CPU
    # when one fails, with no more than a line in its own log: what the session runs on says so.
    used = session.get_providers()
    dropped += [(p, "onnxruntime opened the model without it") for p in providers if p not in used]
    return session, tuple(dropped)


@dataclass(frozen=True)
class ProviderFallback:
    """A model that runs on fewer providers than asked: logged, and audited at the gate's start."""

    model: str
    asked: tuple[str, ...]
    using: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...]

    def details(self) -> dict:
        return {"model": self.model, "asked": list(self.asked), "using": list(self.using),
                "dropped": {p: why for p, why in self.dropped}}


@dataclass
class Providers:
    """What every ONNX model opened with it is asked to run on, and the fallbacks met so far.
    `available` and `factory` default to onnxruntime's own; tests give their own."""

    requested: Sequence[str] | None = None  # models.providers; None = each card's, else the CPU only
    available: Sequence[str] | None = None
    factory: Callable | None = None
    fallbacks: list[ProviderFallback] = field(default_factory=list)

    def asked(self, card: Card) -> tuple[str, ...]:
        return tuple(self.requested if self.requested is not None else card.providers or (CPU_PROVIDER,))


class OnnxModel:
    def __init__(self, path: Path, threads: int = 1, providers: Sequence[str] = (CPU_PROVIDER,),
                 available: Sequence[str] | None = None, factory: Callable | None = None):
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
            self.session, self.dropped = open_session(
                data, so, providers, ort.get_available_providers() if available is None else available,
                factory or ort.InferenceSession)
        except Exception as e:
            raise ModelError(path, f"onnxruntime cannot load it: {e}") from None
        self.providers = tuple(self.session.get_providers())
        for provider, why in self.dropped:
            log.warning("%s: %s dropped, %s; running on %s", Path(path).name, provider, why, ", ".join(self.providers))
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


def open_model(card: Card, path: Path, threads: int = 1, providers: Providers | None = None):
    """`providers`: what ONNX models run on, and where their fallbacks are kept (None: the card's)."""
    if card.runtime != "onnxruntime":
        return LiteRtModel(path, threads)
    providers = providers or Providers()
    asked = providers.asked(card)
    model = OnnxModel(path, threads, asked, providers.available, providers.factory)
    if model.dropped:
        providers.fallbacks.append(ProviderFallback(card.name, asked, model.providers, model.dropped))
    return model
