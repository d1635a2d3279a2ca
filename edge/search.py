"""Gallery search: a probe's cosine scores against K enrolled embeddings, exact where it matters.

A 1:N search is one matrix-vector product, bound by memory: 100,000 fused 256-d float32 rows are
100 MB to read per query, 6.6 ms on one thread here. Above MIN_ROWS the index keeps an INT8 copy
(one scale per row) packed once into onnxruntime's integer GEMM, a quarter of the bytes. Its
approximate scores come with a bound on their quantization error, so every row that could be the
best or the runner-up is known and scored again in float32; the rest are provably below the
runner-up. The best two, which are all the matcher uses, are exact.

The one-node ONNX graph is written here as protobuf bytes: the onnx package that would build it is
an export-time dependency, not installed on the device.
"""
from __future__ import annotations

import numpy as np

from .match import cosine_scores

MIN_ROWS = 4096  # below this the float product is already fast and the INT8 pass has nothing to save
_ZERO = 128  # the query's uint8 zero point: onnxruntime's fast integer kernels take uint8 x int8
_UINT8, _INT8, _INT32 = 2, 3, 6  # onnx TensorProto.DataType


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int, low 7-bit group first."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(number: int, value: int | bytes) -> bytes:
    """One protobuf field: an int as a varint (wire type 0), bytes length-delimited (wire type 2)."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def _tensor(name: str, dtype: int, dims: tuple[int, ...], raw: bytes) -> bytes:
    """TensorProto: dims = 1, data_type = 2, name = 8, raw_data = 9."""
    return b"".join([*(field(1, d) for d in dims), field(2, dtype), field(8, name.encode()), field(9, raw)])


def _value_info(name: str, dtype: int, dims: tuple[int, ...]) -> bytes:
    """ValueInfoProto {name = 1, type = 2: TypeProto {tensor_type = 1: {elem_type = 1, shape = 2:
    TensorShapeProto {dim = 1: {dim_value = 1}}}}}."""
    shape = b"".join(field(1, field(1, d)) for d in dims)
    return field(1, name.encode()) + field(2, field(1, field(1, dtype) + field(2, shape)))


def gemm_model(codes: np.ndarray) -> bytes:
    """Serialized ONNX ModelProto (IR 8, opset 13): dots = MatMulInteger(q, gallery, q_zero) with q
    a 1 x d uint8 query and the K x d int8 `codes`, transposed, as the constant `gallery`."""
    k, d = codes.shape
    node = b"".join([field(1, b"q"), field(1, b"gallery"), field(1, b"q_zero"), field(2, b"dots"),
                     field(4, b"MatMulInteger")])  # NodeProto: input = 1, output = 2, op_type = 4
    graph = b"".join([  # GraphProto: node = 1, name = 2, initializer = 5, input = 11, output = 12
        field(1, node), field(2, b"gallery_search"),
        field(5, _tensor("gallery", _INT8, (d, k), np.ascontiguousarray(codes.T, np.int8).tobytes())),
        field(5, _tensor("q_zero", _UINT8, (), bytes([_ZERO]))),
        field(11, _value_info("q", _UINT8, (1, d))), field(12, _value_info("dots", _INT32, (1, k)))])
    # ModelProto: ir_version = 1, graph = 7, opset_import = 8 (OperatorSetIdProto: domain = 1, version = 2)
    return b"".join([field(1, 8), field(7, graph), field(8, field(1, b"") + field(2, 13))])


def _int8_rows(matrix: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row symmetric INT8: codes, scales, and each row's quantization error norm (float32, in
    chunks: a 100,000-row gallery would otherwise need several 200 MB temporaries; float32
    rounding of these norms is far inside the bound's slack)."""
    peak = np.abs(matrix).max(axis=1)
    scale = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    codes = np.empty(matrix.shape, np.int8)
    err = np.empty(len(matrix), np.float64)
    for i in range(0, len(matrix), chunk):
        rows, s = matrix[i:i + chunk], scale[i:i + chunk, None]
        c = np.clip(np.rint(rows / s), -127, 127)
        codes[i:i + chunk] = c
        err[i:i + chunk] = np.linalg.norm(rows - c * s, axis=1)
    return codes, scale.astype(np.float64), err


def top2_candidates(approx: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Rows whose exact score may be among the best two, given |exact - approx| <= bound: those
    whose upper bound reaches the second-largest lower bound (at least two rows score at or above
    it, so the runner-up does). Pure; returns a boolean mask."""
    if len(approx) <= 2:
        return np.ones(len(approx), bool)
    lo = approx - bound
    second_lo = np.partition(lo, -2)[-2]
    return approx + bound >= second_lo


class GalleryIndex:
    """The enrolled matrix (rows L2-normalised) as the matcher searches it."""

    def __init__(self, matrix: np.ndarray, threads: int = 1, min_rows: int = MIN_ROWS):
        self.matrix = np.ascontiguousarray(matrix, np.float32)
        self.session = None
        if len(self.matrix) >= min_rows:
            self._build(threads)

    def _build(self, threads: int) -> None:
        import onnxruntime as ort

        codes, self.scale, self.err = _int8_rows(self.matrix)
        self.norms = np.linalg.norm(self.matrix, axis=1).astype(np.float64)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        # The gallery is a constant of the graph, so onnxruntime packs it once, here, not per query.
        # The CPU's on every board, whatever models.providers says: the pass is bound by memory
        # bandwidth, which a Jetson's GPU shares with its CPU, and the rows it keeps are rescored in
        # float32 by numpy on the CPU anyway; a GPU would add a copy each way per query.
        self.session = ort.InferenceSession(gemm_model(codes), so, providers=["CPUExecutionProvider"])

    def approximate(self, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """INT8 scores of every row and the bound on each one's error (float64)."""
        q = probe.astype(np.float64)
        peak = float(np.abs(q).max())
        qs = peak / 127.0 if peak > 0 else 1.0
        q8 = (np.clip(np.rint(q / qs), -127, 127) + _ZERO).astype(np.uint8)
        q_hat = (q8.astype(np.float64) - _ZERO) * qs
        dots = self.session.run(None, {"q": q8[None]})[0][0].astype(np.float64)
        approx = dots * qs * self.scale
        # exact - approx = (q - q_hat).g + q_hat.(g - g_hat), bounded by Cauchy-Schwarz; the
        # small constant covers float rounding of the sums.
        bound = np.linalg.norm(q - q_hat) * self.norms + np.linalg.norm(q_hat) * self.err + 1e-6
        return approx, bound

    def scores(self, probe: np.ndarray) -> np.ndarray:
        """K scores: exact float32 cosines where a row may rank in the top two, -inf where it
        provably does not (for a small gallery, every score exact)."""
        if self.session is None:
            return cosine_scores(self.matrix, probe)
        approx, bound = self.approximate(probe)
        rows = np.flatnonzero(top2_candidates(approx, bound))
        out = np.full(len(self.matrix), -np.inf, np.float32)
        out[rows] = cosine_scores(self.matrix[rows], probe)
        return out
