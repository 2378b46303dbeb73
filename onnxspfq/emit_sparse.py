"""N:M (TensorRT 2:4) pattern check and magnitude mask, and sparse-initializer output.

Why: TensorRT uses 2:4 sparse kernels only when every group of 4 consecutive weights along the REDUCTION axis has
at least 2 zeros, and (measured on an H100) cuSPARSELt silently gives wrong results for weights pruned along the
wrong axis, so the tool checks the axis itself. Axis per layout (TensorRT docs):
    Conv W[K, C, R, S]: axis 1 (C), C % 4 == 0; MatMul W[K, N]: axis 0; Gemm transB=1 W[N, K]: axis 1, transB=0: 0.
An ONNX `sparse_initializer` (COO, linear int64 indices: 8 B + value per non-zero) only shrinks the file:
onnxruntime densifies it at load. It is written only when its serialized size is below the dense tensor's.
Trap (onnx 1.23): strict shape inference / `check_model(full_check=True)` fail on a sparse initializer feeding a
dense op ("Input tensors of wrong rank (0)"); plain `check_model` and non-strict inference pass.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxspfq.errors import OnnxspfqError

OPS = ("MatMul", "Gemm", "Conv")


def nm_axis(W0: np.ndarray, op: str, trans_b: bool = False) -> int:
    """The reduction axis TensorRT groups N:M along, for a weight `W0` in the node's own layout."""
    if op not in OPS:
        raise OnnxspfqError(f"unknown layer op {op!r}: use one of {', '.join(OPS)}")
    if op == "Conv":
        if W0.ndim < 3:
            raise OnnxspfqError(f"Conv weight must be at least 3-D [K, C, ...], got shape {W0.shape}")
        return 1
    if W0.ndim != 2:
        raise OnnxspfqError(f"{op} weight must be 2-D, got shape {W0.shape}")
    return 1 if (op == "Gemm" and trans_b) else 0


def _groups(W0: np.ndarray, axis: int, m: int) -> np.ndarray:
    """View W0 as (..., L/m, m) groups of m consecutive entries along `axis`."""
    A = np.moveaxis(W0, axis, -1)
    return A.reshape(*A.shape[:-1], A.shape[-1] // m, m)


def _axis_label(op: str, axis: int) -> str:
    return "C" if op == "Conv" else ("K" if (op == "MatMul") == (axis == 0) else "N")


def check_nm(W0: np.ndarray, op: str, trans_b: bool = False, n: int = 2, m: int = 4) -> tuple[bool, str]:
    """Whether every group of m consecutive weights along the reduction axis has at most n non-zeros."""
    W0 = np.asarray(W0)
    axis = nm_axis(W0, op, trans_b)
    label = _axis_label(op, axis)
    L = W0.shape[axis]
    if L % m:
        return False, (f"{op} weight {W0.shape}: reduction axis {axis} ({label}) has size {L}, not a multiple of "
                       f"{m}; {n}:{m} sparsity needs it")
    nnz = np.count_nonzero(_groups(W0, axis, m), axis=-1)
    bad = nnz > n
    total = nnz.size
    if not bad.any():
        return True, f"{n}:{m} holds along axis {axis} ({label}) in all {total} groups"
    first = np.argwhere(bad)[0]
    others = []
    for ax in range(W0.ndim):
        if ax != axis and W0.shape[ax] % m == 0 and np.all(np.count_nonzero(_groups(W0, ax, m), axis=-1) <= n):
            others.append(ax)
    hint = f"; the pattern holds along axis {others[0]} instead: pruned along the wrong axis" if others else ""
    return False, (f"{int(bad.sum())} of {total} groups along axis {axis} ({label}) have more than {n} non-zeros "
                   f"in {m} (first at group index {tuple(int(i) for i in first)}){hint}")


def check_2_4(W0: np.ndarray, op: str, trans_b: bool = False) -> tuple[bool, str]:
    """TensorRT 2:4 check: at least 2 zeros in every 4 consecutive weights along the reduction axis."""
    return check_nm(W0, op, trans_b, 2, 4)


def nm_mask(W0: np.ndarray, op: str, trans_b: bool = False, n: int = 2, m: int = 4) -> np.ndarray:
    """Magnitude N:M mask (True = keep): the n largest |w| of every m consecutive weights along the reduction
    axis (ties go to the earlier index). `W0 * nm_mask(...)` is the magnitude 2:4 baseline pruner."""
    if not 0 < n <= m:
        raise OnnxspfqError(f"N:M needs 0 < n <= m, got {n}:{m}")
    W0 = np.asarray(W0)
    axis = nm_axis(W0, op, trans_b)
    if W0.shape[axis] % m:
        raise OnnxspfqError(f"{op} weight {W0.shape}: reduction axis {axis} has size {W0.shape[axis]}, not a "
                            f"multiple of {m}: skip this layer for {n}:{m} pruning")
    G = _groups(np.abs(W0), axis, m)
    order = np.argsort(-G, axis=-1, kind="stable")
    keep = np.zeros(G.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    A = keep.reshape(*keep.shape[:-2], -1)
    return np.moveaxis(A, -1, axis)


def dequantize_result(result: Any) -> np.ndarray:
    """codes * scale per block along N0, as a float64 (N1, N0) matrix."""
    codes = np.asarray(result.codes)
    N0 = codes.shape[1]
    scale = np.asarray(result.scale, dtype=np.float64)
    return codes.astype(np.float64) * np.repeat(scale, int(result.block_size), axis=1)[:, :N0]


def to_sparse_proto(W: np.ndarray, name: str) -> onnx.SparseTensorProto:
    """COO sparse tensor: values [nnz] named `name`, linear int64 indices [nnz] into the row-major tensor."""
    flat = np.ascontiguousarray(W).reshape(-1)
    idx = np.flatnonzero(flat)
    values = numpy_helper.from_array(flat[idx], name)
    indices = numpy_helper.from_array(idx.astype(np.int64), f"{name}_indices")
    return helper.make_sparse_tensor(values, indices, list(W.shape))


def encode(W: np.ndarray, name: str) -> onnx.TensorProto | onnx.SparseTensorProto:
    """The smaller of the dense and the COO sparse form of W, by real serialized size (dense on ties)."""
    dense = numpy_helper.from_array(np.ascontiguousarray(W), name)
    sparse = to_sparse_proto(W, name)
    return sparse if sparse.ByteSize() < dense.ByteSize() else dense


def sparsity_report(W0: np.ndarray, op: str | None = None, trans_b: bool = False) -> dict:
    """Fraction of zeros and on-disk cost of W0 in the format `encode` picks (real serialized sizes);
    with `op`, also whether the TensorRT 2:4 pattern holds and why not."""
    W0 = np.asarray(W0)
    dense = numpy_helper.from_array(np.ascontiguousarray(W0), "w").ByteSize()
    sparse = to_sparse_proto(W0, "w").ByteSize()
    zeros = int(W0.size - np.count_nonzero(W0))
    chosen = "sparse" if sparse < dense else "dense"
    nbytes = min(sparse, dense)
    rep = {
        "size": int(W0.size),
        "zeros": zeros,
        "zero_fraction": zeros / W0.size if W0.size else 0.0,
        "dense_bytes": dense,
        "sparse_bytes": sparse,
        "format": chosen,
        "bytes": nbytes,
        "bits_per_weight": 8 * nbytes / W0.size if W0.size else 0.0,
    }
    if op is not None:
        rep["nm_2_4"], rep["nm_2_4_reason"] = check_2_4(W0, op, trans_b)
    return rep


def emit_sparse(model: onnx.ModelProto, items: Sequence[tuple]) -> onnx.ModelProto:
    """Return a copy of `model` whose layer weights are the compressed float weights (codes*scale in the
    initializer's dtype), each written as a COO `sparse_initializer` when that is smaller than dense, else as a
    masked dense initializer.

    items: (layer, result) or (layer, result, bits) tuples (bits unused: values are written as floats); result is
    a codes/scale/block_size object or a float (N1, N0) matrix (e.g. W * nm_mask(...) mapped to (N1, N0)).
    A weight also listed as a graph input stays dense (sparse initializers cannot back a graph input).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    seen: set[str] = set()
    graph_inputs = {i.name for i in g.input}
    for item in items:
        layer, result = item[0], item[1]
        if layer.weight in seen:
            raise OnnxspfqError(f"weight {layer.weight!r} appears in two items: pass one result per weight")
        seen.add(layer.weight)
        init = next((t for t in g.initializer if t.name == layer.weight), None)
        if init is None:
            raise OnnxspfqError(f"layer {layer.name!r}: weight {layer.weight!r} is not a dense initializer of the "
                                "model: pass the model the layers were found in")
        M = np.asarray(result, dtype=np.float64) if isinstance(result, np.ndarray) else dequantize_result(result)
        n1 = int(init.dims[layer.channel_axis])
        if M.ndim != 2 or M.shape[0] != n1 or M.size != int(np.prod(init.dims)):
            raise OnnxspfqError(f"layer {layer.name!r}: result of shape {M.shape} does not map to the weight "
                                f"{tuple(init.dims)} ({n1} rows): pass the result computed for this layer")
        W = np.asarray(layer.tensor(M)).astype(helper.tensor_dtype_to_np_dtype(init.data_type))
        enc = numpy_helper.from_array(np.ascontiguousarray(W), init.name)
        if layer.weight not in graph_inputs:
            enc = encode(W, init.name)
        if isinstance(enc, onnx.SparseTensorProto):
            g.initializer.remove(init)
            g.sparse_initializer.append(enc)
        else:
            init.CopyFrom(enc)
    return out
