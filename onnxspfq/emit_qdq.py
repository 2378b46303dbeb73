"""Write quantized weights back into an ONNX model as DequantizeLinear on packed INT8 / INT4 / INT2 constants.

For each compressed weight initializer `w` the float initializer is removed and a node
`DequantizeLinear(w_quantized, w_scale) -> w` takes its place. Because the node's output keeps the original
name, every consumer of `w` (shared weights, tied embeddings, subgraphs) reads the de-quantized weight without
rewiring. Zero points are omitted (symmetric codes, zero point 0), as TensorRT requires.

Storage: bits 8 -> INT8 (opset 13), bits 4 and 3 -> INT4 (opset 21), bits 2 and 1 -> INT2 (opset 25);
block-wise scales need opset 21. The default-domain opset is raised only as far as needed, never lowered, and
`ir_version` is set to the smallest IR that supports it (onnx 1.23 would write IR 14, which older onnxruntime
rejects).

Layers and results are duck-typed (see graph.Layer and the methods' results):
  layer: .name, .op, .weight, .shape, .channel_axis, .reduction_axis, .tensor(M) -> M in W0's layout
  result: .codes int8 (N1, N0), .scale float64 (N1, nblocks), .block_size (N0 when not blocked)
"""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from onnxspfq.config import levels
from onnxspfq.errors import OnnxspfqError
from onnxspfq.graph import all_names, find_node, unique_name
from onnxspfq.layers import MATMUL_OPS, WEIGHT_OPS

MAX_OPSET = 25  # DequantizeLinear-28 / FLOAT4E2M1 have no onnxruntime CPU kernel
EMITS = ("qdq", "float")  # what emit() writes; the formats a run offers are config.FORMATS
_DEFAULT_DOMAINS = ("", "ai.onnx")

# bits -> (numpy storage dtype, ONNX type name, minimum opset of DequantizeLinear on that type)
_STORAGE: dict[int, tuple[Any, str, int]] = {
    8: (np.int8, "INT8", 13),
    4: (ml_dtypes.int4, "INT4", 21),
    3: (ml_dtypes.int4, "INT4", 21),
    2: (ml_dtypes.int2, "INT2", 25),
    1: (ml_dtypes.int2, "INT2", 25),
}
_BLOCKWISE_OPSET = 21


def dequantize(result: Any) -> np.ndarray:
    """codes * scale as an (N1, N0) float32 matrix, computed exactly as DequantizeLinear does (fp32 product)."""
    codes = np.asarray(result.codes)
    scale = np.asarray(result.scale, dtype=np.float32)
    per_column = np.repeat(scale, result.block_size, axis=1)[:, : codes.shape[1]]
    return codes.astype(np.float32) * per_column


def _nblocks(n0: int, block_size: int) -> int:
    return -(-n0 // block_size)


def _validate(layer: Any, result: Any, bits: int) -> None:
    """Check one (layer, result, bits) triple against the contract; OnnxspfqError names what is wrong."""
    where = f"layer {layer.name!r} (weight {layer.weight!r})"
    if bits not in _STORAGE:
        raise OnnxspfqError(f"{where}: unsupported bits {bits!r}; use one of 8, 4, 3, 2, 1")
    if layer.op not in WEIGHT_OPS:
        raise OnnxspfqError(f"{where}: unsupported op {layer.op!r}; only {', '.join(WEIGHT_OPS)} weights are emitted")
    codes, scale = np.asarray(result.codes), np.asarray(result.scale)
    if codes.dtype != np.int8 or codes.ndim != 2:
        raise OnnxspfqError(f"{where}: codes must be a 2-D int8 array (N1, N0), got {codes.dtype} {codes.shape}")
    n1, n0 = codes.shape
    if np.shape(layer.tensor(codes)) != tuple(layer.shape):
        raise OnnxspfqError(f"{where}: codes {codes.shape} do not map to the weight's shape {tuple(layer.shape)}")
    if not isinstance(result.block_size, (int, np.integer)) or result.block_size < 1:
        raise OnnxspfqError(f"{where}: block_size must be a positive int, got {result.block_size!r}")
    if scale.shape != (n1, _nblocks(n0, int(result.block_size))):
        raise OnnxspfqError(
            f"{where}: scale shape {scale.shape} != (N1, ceil(N0 / block_size)) = "
            f"{(n1, _nblocks(n0, int(result.block_size)))}; pass one scale per channel and block"
        )
    if not np.all(np.isfinite(scale)):
        raise OnnxspfqError(f"{where}: scale has NaN or Inf values; re-run the quantizer on finite weights")
    k = levels(bits)
    if codes.size and int(np.abs(codes.astype(np.int16)).max()) > k:
        raise OnnxspfqError(f"{where}: codes exceed the {bits}-bit range [-{k}, {k}]; quantize with bits={bits}")


def _blocked(result: Any) -> bool:
    return np.asarray(result.scale).shape[1] > 1


def _group_by_weight(items: list[tuple[Any, Any, int]]) -> dict[str, tuple[Any, Any, int]]:
    """One entry per weight initializer; layers sharing a weight must carry the same quantized weight."""
    groups: dict[str, tuple[Any, Any, int]] = {}
    for layer, result, bits in items:
        _validate(layer, result, bits)
        if layer.weight not in groups:
            groups[layer.weight] = (layer, result, bits)
            continue
        first, first_result, first_bits = groups[layer.weight]
        same = (
            first_bits == bits
            and first.channel_axis == layer.channel_axis
            and np.array_equal(first.tensor(np.asarray(first_result.codes)), layer.tensor(np.asarray(result.codes)))
            and np.array_equal(first.tensor(dequantize(first_result)), layer.tensor(dequantize(result)))
        )
        if not same:
            raise OnnxspfqError(
                f"weight {layer.weight!r} is shared by layers {first.name!r} and {layer.name!r} but they were "
                "quantized differently: quantize the shared weight once and pass the same result for both"
            )
    return groups


def required_opset(bits: set[int], blocked: bool) -> tuple[int, str]:
    """The lowest default-domain opset whose DequantizeLinear holds these weights, and why (for --opset)."""
    need, why = 0, ""
    for b in sorted(bits):
        if _STORAGE[b][2] > need:
            need, why = _STORAGE[b][2], f"{b}-bit weights are stored as {_STORAGE[b][1]}"
    if blocked and _BLOCKWISE_OPSET > need:
        need, why = _BLOCKWISE_OPSET, "block-wise scales"
    return need, why


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset."""
    for op in model.opset_import:
        if op.domain in _DEFAULT_DOMAINS:
            return op.version
    raise OnnxspfqError("the model imports no default-domain ('ai.onnx') opset: it is not a standard ONNX model")


def min_ir_version(opset: int) -> int:
    """Smallest IR version whose onnx release supports `opset` (from onnx.helper.VERSION_TABLE)."""
    for _release, ir, ai_onnx, *_rest in helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return ir
    raise OnnxspfqError(f"opset {opset} is newer than this onnx package knows: upgrade onnx")


def raise_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Return `model` at default-domain opset >= `target` (converted when lower), with a matching IR version."""
    current = default_opset(model)
    if current < target:
        try:
            model = version_converter.convert_version(model, target)
        except Exception as exc:  # the converter raises several C++ error types
            raise OnnxspfqError(
                f"cannot convert the model from opset {current} to {target} ({str(exc).splitlines()[0][:200]}): "
                f"convert it to opset >= {target} yourself or use fewer bits' formats needing a lower opset"
            ) from exc
    model.ir_version = min_ir_version(max(current, target))
    return model


def _find_initializer(graph: onnx.GraphProto, name: str) -> int:
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            return i
    raise OnnxspfqError(
        f"weight {name!r} is not an initializer of the main graph: only constant weights stored as initializers "
        "can be emitted (fold Constant nodes into initializers first)"
    )


def _check_consumer(graph: onnx.GraphProto, layer: Any) -> None:
    found = find_node(graph, layer.name)  # an If branch's node reads its weight from the main graph
    if found is None:
        raise OnnxspfqError(f"no node named {layer.name!r} in the model: pass layers found on this same model")
    node = found[1]
    if not (len(node.input) > 1 and node.input[1] == layer.weight and node.op_type == layer.op):
        raise OnnxspfqError(
            f"node {layer.name!r} ({node.op_type}) does not read {layer.weight!r} as its weight input: "
            "pass layers found on this same model"
        )


def _emit_qdq(model: onnx.ModelProto, groups: dict[str, tuple[Any, Any, int]]) -> onnx.ModelProto:
    needed = 0
    for layer, result, bits in groups.values():
        needed = max(needed, _STORAGE[bits][2])
        if _blocked(result):
            if layer.op not in MATMUL_OPS:
                raise OnnxspfqError(
                    f"layer {layer.name!r}: block-wise scales are not supported for {layer.op}; use per-channel "
                    "granularity for convolutions"
                )
            needed = max(needed, _BLOCKWISE_OPSET)
    model = raise_opset(model, needed)
    if default_opset(model) > MAX_OPSET:
        raise OnnxspfqError(
            f"model opset {default_opset(model)} > {MAX_OPSET}: onnxruntime has no CPU DequantizeLinear kernel "
            "there; export the model at opset <= 25"
        )
    graph = model.graph
    taken = all_names(graph)
    dq_nodes = []
    for name, (layer, result, bits) in groups.items():
        idx = _find_initializer(graph, name)
        wtype = graph.initializer[idx].data_type
        storage = _STORAGE[bits][0]
        q = np.ascontiguousarray(layer.tensor(np.asarray(result.codes))).astype(storage)
        q_name = unique_name(f"{name}_quantized", taken)
        s_name = unique_name(f"{name}_scale", taken)
        if _blocked(result):
            # (N1, nblocks) into W0's 2-D layout: blocks run along the reduction axis, channels along the other
            scale = np.asarray(result.scale, dtype=np.float32)
            scale = np.ascontiguousarray(scale if layer.channel_axis == 0 else scale.T)
            attrs = {"axis": int(layer.reduction_axis), "block_size": int(result.block_size)}
        else:
            scale = np.asarray(result.scale, dtype=np.float32).reshape(-1)
            attrs = {"axis": int(layer.channel_axis)}
        del graph.initializer[idx]
        graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
        # An initializer listed as a graph input (IR < 4 style) would clash with the node output of the same name.
        inputs = [v for v in graph.input if v.name != name]
        if len(inputs) != len(graph.input):
            del graph.input[:]
            graph.input.extend(inputs)
        # float16 / bfloat16 / double weights: DequantizeLinear to float32 (its scale type at every opset this
        # emits), then Cast to the weight's own type, so the consumer sees the type it was exported with
        dq_out = name if wtype == TensorProto.FLOAT else unique_name(f"{name}_dq", taken)
        dq_nodes.append(
            helper.make_node(
                "DequantizeLinear", [q_name, s_name], [dq_out], name=unique_name(f"{name}_DequantizeLinear", taken), **attrs
            )
        )
        if dq_out != name:
            dq_nodes.append(helper.make_node("Cast", [dq_out], [name], to=wtype, name=unique_name(f"{name}_Cast", taken)))
    # DQ nodes read only initializers, so placing them first keeps the node list topologically sorted.
    nodes = dq_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def explicit_zero_points(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (modified in place) with an explicit all-zero zero point on every weight DequantizeLinear that has
    none (the same codes and values): onnxruntime fuses DQ -> Gemm -> Q into QGemm only with it (tests/test_targets.py
    reads the fused graph). For W8A8 on onnxruntime (TensorRT's documented form omits them)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    taken = all_names(graph)
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and len(n.input) == 2 and n.input[0] in inits and n.input[1] in inits:
            codes, scale = inits[n.input[0]], inits[n.input[1]]
            z_name = unique_name(f"{n.input[0]}_zero_point", taken)
            zeros = np.zeros(tuple(scale.dims), helper.tensor_dtype_to_np_dtype(codes.data_type))
            graph.initializer.append(numpy_helper.from_array(zeros, z_name))
            n.input.append(z_name)
    return model


def emit(model: onnx.ModelProto, items: list[tuple[Any, Any, int]], fmt: str = "qdq") -> onnx.ModelProto:
    """Return a new model whose listed weights are quantized; `model` itself is not modified.

    fmt "qdq": packed integer weights behind DequantizeLinear (opset / IR raised as needed).
    fmt "float": the same initializers holding codes * scale as float32, opset unchanged (for inspection).
    """
    if fmt not in EMITS:
        raise OnnxspfqError(f"unknown output format {fmt!r}: use one of {', '.join(EMITS)}")
    groups = _group_by_weight(items)
    for layer, _result, _bits in items:
        init = model.graph.initializer[_find_initializer(model.graph, layer.weight)]
        if tuple(init.dims) != tuple(layer.shape):
            raise OnnxspfqError(
                f"weight {layer.weight!r} has shape {tuple(init.dims)} in the model but {tuple(layer.shape)} in "
                f"layer {layer.name!r}: pass layers found on this same model"
            )
        _check_consumer(model.graph, layer)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if fmt == "float":  # the one float writer is emit.float_ (it also writes prune-only weights)
        from onnxspfq.emit import Item, float_

        return float_(out, [Item(layer, result, bits) for layer, result, bits in groups.values()], None).model
    return _emit_qdq(out, groups)
