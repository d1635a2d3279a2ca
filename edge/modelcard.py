"""The model card: the only place the gate learns how to feed a model.

A card is a JSON file beside its model (``model.onnx`` -> ``model.card.json``). Unknown fields are
rejected so a typo cannot silently change how a model is fed, and the model file's sha256 must
match the card before any byte of it reaches a runtime.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ModelError

CARD_SUFFIX = ".card.json"
CPU_PROVIDER = "CPUExecutionProvider"


def providers_problem(names: Sequence[str], known: Sequence[str]) -> str | None:
    """What is wrong with an ordered list of onnxruntime execution providers; None = nothing. A
    name onnxruntime does not know is refused, not dropped at run time like one this build lacks:
    a typo would leave the model on the CPU unnoticed. The CPU's may only come last: onnxruntime
    gives each node to the first provider that runs it, and the CPU runs them all."""
    unknown = [n for n in names if n not in known]
    if unknown:
        return f"{unknown[0]!r} is not an onnxruntime execution provider (it knows {', '.join(known)})"
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
        return f"{twice[0]} is named twice"
    if CPU_PROVIDER in names and names[-1] != CPU_PROVIDER:
        return f"{CPU_PROVIDER} must be last: a provider after it would never be given a node"
    return None


def check_providers(names: Sequence[str] | None) -> Sequence[str] | None:
    """A validator's check of a providers list (a card's or the config's): ValueError naming the
    problem, or the list unchanged."""
    problem = None if names is None else providers_problem(names, known_providers())
    if problem:
        raise ValueError(problem)
    return names


def known_providers() -> list[str]:
    """Every execution provider name the installed onnxruntime knows, whether built in or not."""
    import onnxruntime as ort

    return ort.get_all_providers()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    width: int | None = Field(None, ge=8, le=4096, description="fixed input width; None = follows the frame")
    height: int | None = Field(None, ge=8, le=4096)
    color: Literal["BGR", "RGB"]
    layout: Literal["NCHW", "NHWC"]
    dtype: Literal["float32", "uint8", "int8"] = "float32"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # value = (pixel - mean) / std, per channel, in `color` order
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    dynamic_batch: bool = False
    size_multiple: int = Field(1, ge=1, le=256, description="for size-following detectors: pad to a multiple")


class AlignmentSpec(_Strict):
    size: tuple[int, int]  # output crop width, height
    template: list[tuple[float, float]] = Field(min_length=5, max_length=5)  # 5 keypoints in crop pixels
    method: Literal["similarity"] = "similarity"


class EmbeddingSpec(_Strict):
    dim: int = Field(ge=2, le=4096)
    output: str | None = None  # output tensor name; None = first output


class ScoreSpec(_Strict):
    kind: Literal["cosine"] = "cosine"  # after L2 normalisation; d = ||a-b||^2 = 2 - 2 cos
    higher_is_more_similar: bool = True


class CalibrationSpec(_Strict):
    """Impostor-score quantiles of this encoder on a calibration set (never LFW)."""

    dataset: str
    impostor_pairs: int = Field(ge=1)
    tail: str = ""  # how FMRs rarer than the data can show were obtained
    fmr: list[float]  # ascending-threshold table: fmr[i] = share of impostor scores >= threshold[i]
    threshold: list[float]
    # Door-frame-vs-gallery minus gallery-vs-gallery: how far the tail the gate fits to its own
    # gallery's scores (edge.threshold) sits from the one strangers at the door meet, measured on
    # simulated galleries of the calibration set. 0 where the door embeds as enrollment does.
    gallery_shift: float = Field(0.0, ge=-0.1, le=0.1)
    # Shape k of a stranger's score tail against one enrolled face, P(s >= t) = (1 - k (t - a) / b) ** (1 / k)
    # (edge.threshold): chosen on the same simulated galleries. 0, the exponential tail, errs strict.
    tail_shape: float = Field(0.0, ge=0.0, le=0.5)

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.fmr) != len(self.threshold) or len(self.fmr) < 2:
            raise ValueError("fmr and threshold must be lists of the same length (>= 2)")
        return self


class DetectorSpec(_Strict):
    kind: Literal["yunet", "blazeface"]
    strides: list[int] = []
    score_threshold: float = Field(0.6, ge=0.0, le=1.0)
    nms_iou: float = Field(0.3, ge=0.0, le=1.0)
    max_side: int = Field(640, ge=64, le=4096, description="frames are scaled so their long side is at most this")
    anchors: dict = {}  # BlazeFace SSD anchor options


class LivenessSpec(_Strict):
    crop_scale: float | None = Field(None, ge=1.0, le=6.0, description="crop side / face box side; None only for a fusion, whose members crop")
    live_class: int = Field(ge=0)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    threshold_rule: str = ""  # how the threshold was set, and on what data


class SourceSpec(_Strict):
    package: str
    version: str
    file: str
    license: str
    notes: str = ""


class Card(_Strict):
    schema_version: Literal[1] = 1
    name: str
    task: Literal["face_embedding", "face_detection", "liveness", "face_landmarks"]
    file: str  # model file name, relative to the card
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=1)
    runtime: Literal["onnxruntime", "litert", "fusion"]  # fusion: `file` is a recipe of member encoders (edge/embed.py)
    precision: Literal["fp32", "int8", "int8bq"]
    input: InputSpec
    alignment: AlignmentSpec | None = None
    embedding: EmbeddingSpec | None = None
    score: ScoreSpec | None = None
    calibration: CalibrationSpec | None = None
    detector: DetectorSpec | None = None
    liveness: LivenessSpec | None = None
    providers: list[str] | None = Field(None, max_length=8, description="onnxruntime execution providers to try, in order, CPUExecutionProvider always last whether named or not; the gate's models.providers overrides it; None = the CPU only")
    source: SourceSpec
    accuracy: dict[str, float | str] = {}
    speed: dict[str, float | str] = {}

    @field_validator("providers")
    @classmethod
    def _providers(cls, names):
        return check_providers(names)

    @model_validator(mode="after")
    def _task_fields(self):
        need = {"face_embedding": ("alignment", "embedding", "score"), "face_detection": ("detector",),
                "liveness": ("liveness",), "face_landmarks": ()}[self.task]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"task {self.task} needs {', '.join(missing)}")
        if self.liveness is not None and self.runtime != "fusion" and self.liveness.crop_scale is None:
            raise ValueError("a liveness model needs liveness.crop_scale")
        if self.providers is not None and self.runtime != "onnxruntime":
            raise ValueError(f"providers are onnxruntime's: a {self.runtime} card has none")
        return self

    def preprocess(self, images_bgr: list[np.ndarray]) -> np.ndarray:
        """Turn BGR uint8 images of the card's size into the model's input tensor."""
        std = self.input.std
        if self.input.layout == "NCHW" and std[0] == std[1] == std[2] and std[0] != 0:
            # OpenCV's blob maker does the same arithmetic in one pass, about 8x faster than numpy
            # here (1 ms of a 320x240 detector input); its mean is in the output (colour) order.
            return cv2.dnn.blobFromImages([np.ascontiguousarray(i) for i in images_bgr], 1.0 / float(std[0]), None,
                                          tuple(float(m) for m in self.input.mean), self.input.color == "RGB",
                                          False, cv2.CV_32F)
        x = np.stack(images_bgr).astype(np.float32)
        if self.input.color == "RGB":
            x = x[..., ::-1]
        x = (x - np.asarray(self.input.mean, np.float32)) / np.asarray(self.input.std, np.float32)
        if self.input.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32)


def card_path_for(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name.rsplit(".", 1)[0] + CARD_SUFFIX)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_card(path: str | Path, verify_file: bool = True) -> tuple[Card, Path]:
    """Load and validate a card; return it with the absolute path of its model file.

    `path` may be the card or the model file beside it."""
    path = Path(path)
    if not path.name.endswith(CARD_SUFFIX):
        path = card_path_for(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(path, "model card not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(path, f"model card is not valid JSON: {e}") from None
    try:
        card = Card.model_validate(raw)
    except ValidationError as e:
        raise ModelError(path, f"invalid model card: {_short(e)}") from None
    model_file = (path.parent / card.file).resolve()
    if model_file.parent != path.parent.resolve():
        raise ModelError(path, f"card points outside its folder: {card.file!r}")
    if verify_file:
        if not model_file.is_file():
            raise ModelError(model_file, "model file named by its card is missing")
        if model_file.stat().st_size != card.size_bytes:
            raise ModelError(model_file, f"size {model_file.stat().st_size} does not match card ({card.size_bytes}); truncated or replaced")
        digest = sha256_file(model_file)
        if digest != card.sha256:
            raise ModelError(model_file, f"sha256 {digest[:12]}... does not match its card ({card.sha256[:12]}...)")
    return card, model_file


# ONNX protobuf field numbers (onnx.proto3) on the paths that lead to a stored tensor.
_MODEL_GRAPH, _MODEL_FUNCTIONS, _FUNCTION_NODE = 7, 25, 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    n = shift = 0
    while shift < 70:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def proto_fields(buf: bytes | memoryview):
    """Yield (number, value) for each field of one protobuf message: an int for a varint, a
    memoryview for a length-delimited field, None for a fixed-width one. Malformed bytes raise
    ValueError, so a file this cannot walk is never half-checked."""
    buf = memoryview(buf)
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire} at byte {i}")
        if i > len(buf) or number == 0:
            raise ValueError("truncated or zero-numbered field")
        yield number, value


def _children(buf: memoryview, numbers: tuple[int, ...]):
    return (v for n, v in proto_fields(buf) if n in numbers and isinstance(v, memoryview))


def _tensor_external(buf: memoryview) -> str | None:
    """The external location of one TensorProto ("" when it has none named), or None when stored inside."""
    name, external, location = "", False, ""
    for n, v in proto_fields(buf):
        if n == _TENSOR_NAME and isinstance(v, memoryview):
            name = bytes(v).decode("utf-8", "replace")
        elif n == _TENSOR_DATA_LOCATION and v == _EXTERNAL:
            external = True
        elif n == _TENSOR_EXTERNAL_DATA and isinstance(v, memoryview):
            external = True
            entry = {k: bytes(x).decode("utf-8", "replace") for k, x in proto_fields(v) if isinstance(x, memoryview)}
            if entry.get(1) == "location":  # StringStringEntryProto: key = 1, value = 2
                location = entry.get(2, "")
    return f"{name} ({location})" if external else None


def _graph_external(graph: memoryview) -> list[str]:
    found = []
    for n, v in proto_fields(graph):
        if not isinstance(v, memoryview):
            continue
        if n == _GRAPH_INITIALIZER:
            found.append(_tensor_external(v))
        elif n == _GRAPH_SPARSE_INITIALIZER:
            found += [_tensor_external(t) for t in _children(v, (_SPARSE_VALUES, _SPARSE_INDICES))]
        elif n == _GRAPH_NODE:
            found += _nodes_external([v])
    return [f for f in found if f is not None]


def _nodes_external(nodes) -> list[str]:
    """Constant and control-flow nodes carry tensors and whole subgraphs in their attributes."""
    found = []
    for node in nodes:
        for attr in _children(node, (_NODE_ATTRIBUTE,)):
            for n, v in proto_fields(attr):
                if not isinstance(v, memoryview):
                    continue
                if n in (_ATTR_TENSOR, _ATTR_TENSORS):
                    found.append(_tensor_external(v))
                elif n in (_ATTR_SPARSE, _ATTR_SPARSES):
                    found += [_tensor_external(t) for t in _children(v, (_SPARSE_VALUES, _SPARSE_INDICES))]
                elif n in (_ATTR_GRAPH, _ATTR_GRAPHS):
                    found += _graph_external(v)
    return [f for f in found if f is not None]


def onnx_external_tensors(model: bytes | memoryview) -> list[str]:
    """Every tensor of a serialized ONNX ModelProto whose data lives in another file, as
    "name (location)". The card's sha256 covers the .onnx file alone, so weights read from a
    sibling file could be swapped without it noticing. Read without the onnx package, which the
    device does not install. Raises ValueError on bytes that are not a protobuf message."""
    found = []
    for n, v in proto_fields(model):
        if n == _MODEL_GRAPH and isinstance(v, memoryview):
            found += _graph_external(v)
        elif n == _MODEL_FUNCTIONS and isinstance(v, memoryview):
            found += _nodes_external(_children(v, (_FUNCTION_NODE,)))
    return found


def load_member(recipe_path: Path, card_name: str, sha256: str, kind: str) -> tuple[Card, Path]:
    """One member of a fusion recipe (encoders or PAD models): its card, in the recipe's folder,
    with its file checked; refused when it is itself a fusion (a fusion of fusions, or of itself,
    would never end loading) or is not the model the recipe was made with."""
    # The runtime first, before any file check: a member that is itself a fusion is the fault to
    # name, whatever else is wrong with it.
    if load_card(recipe_path.parent / card_name, verify_file=False)[0].runtime == "fusion":
        raise ModelError(recipe_path, f"member {card_name} is itself a fusion; members must be plain {kind}")
    card, path = load_card(recipe_path.parent / card_name)
    if card.sha256 != sha256:
        raise ModelError(recipe_path, f"member {card_name} is not the model the recipe was made with "
                                      f"(sha256 {card.sha256[:12]}... vs {sha256[:12]}...)")
    return card, path


def write_card(card: Card, model_path: str | Path) -> Path:
    from .atomic import atomic_write_bytes

    out = card_path_for(model_path)
    atomic_write_bytes(out, (json.dumps(card.model_dump(mode="json"), indent=2) + "\n").encode())
    return out


def _short(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()[:5])
