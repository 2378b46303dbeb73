"""MatMulNBits output: replace MatMul layers by onnxruntime's `com.microsoft.MatMulNBits` with packed weights.

Why: MatMulNBits stores 8/4/2-bit weights packed (1 B, 0.5 B, 0.25 B per weight plus one scale per block) and is
faster than fp32 for single-row inputs on onnxruntime CPU. It has no Conv form and needs a 2-D constant weight,
so MatMul layers and plain Gemm layers (PyTorch Linear: transB=1, constant bias -> MatMulNBits' bias input) are
converted; the caller emits the rest another way (QDQ).

Storage mapping (exact, with the default zero point 2^(s-1) of the stored bits s):
    bits 8 -> s=8, bits 4 and 3 -> s=4, bits 2 (ternary) and 1 ({-1,+1}) -> s=2; stored q = code + 2^(s-1).
    A 1-bit weight {-d,+d} is stored as q in {1, 3} with scale d. A per-channel scale is repeated over all K blocks.
Measured (onnxruntime 1.32 CPU): accuracy_level 0 or 1 gives fp32 math (~3e-7 relative); 4 quantizes activations
to int8 (~5e-3). 2-bit MatMulNBits rejects block_size > 256.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxspfq.config import levels
from onnxspfq.errors import OnnxspfqError
from onnxspfq.graph import unique_name, used_names, walk_nodes
from onnxspfq.io import Model, as_model
from onnxspfq.layers import MATMUL_OPS

MS_DOMAIN = "com.microsoft"
STORED_BITS = {8: 8, 4: 4, 3: 4, 2: 2, 1: 2}
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class NBitsWeight:
    """One MatMulNBits weight: packed blob [N, k_blocks, B*s/8] uint8, scales [N, k_blocks], stored bits s."""

    blob: np.ndarray
    scales: np.ndarray
    bits: int
    block_size: int
    K: int
    N: int


def _check_codes(codes: np.ndarray, bits: int, name: str) -> None:
    lo, hi = -levels(bits), levels(bits)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise OnnxspfqError(
            f"layer {name!r}: {bits}-bit codes must lie in [{lo}, {hi}], got [{codes.min()}, {codes.max()}]: "
            "pass the codes the quantizer produced for that bit width"
        )
    if bits == 1 and codes.size and np.any(codes == 0):
        raise OnnxspfqError(f"layer {name!r}: 1-bit codes must be -1 or +1, found 0: use bits=2 for ternary codes")


def choose_block_size(K: int, result_block: int, bits: int) -> int | None:
    """Smallest-on-disk MatMulNBits block size (power of 2 in 16..256) whose blocks never straddle two scale
    blocks of the result; None if there is none (result blocks not a multiple of 16 and more than one)."""
    stored = STORED_BITS[bits]
    single = result_block >= K
    best, best_cost = None, None
    for B in BLOCK_SIZES:
        if not single and result_block % B:
            continue
        nblk = -(-K // B)
        cost = nblk * B * stored / 8 + nblk * 4  # bytes per output row: packed codes + fp32 scales
        if best_cost is None or cost < best_cost:
            best, best_cost = B, cost
    return best


def pack_nbits(codes: np.ndarray, scale: np.ndarray, result_block: int, bits: int, block_size: int) -> NBitsWeight:
    """Pack codes (N, K) int8 with scale (N, nblocks) (blocks of `result_block` along K) for MatMulNBits.

    Padding columns (K up to a multiple of block_size) hold the zero point, so they dequantize to 0.
    """
    N, K = codes.shape
    s = STORED_BITS[bits]
    zp = 2 ** (s - 1)
    B = block_size
    nblk = -(-K // B)
    q = np.full((N, nblk * B), zp, dtype=np.uint8)
    q[:, :K] = (codes.astype(np.int16) + zp).astype(np.uint8)
    per = 8 // s
    q = q.reshape(N, nblk, B // per, per)
    blob = np.zeros((N, nblk, B // per), dtype=np.uint8)
    for j in range(per):  # low bits first
        blob |= (q[..., j] << (j * s)).astype(np.uint8)
    # scale of nbits block j = scale of the result block holding its first column
    first = np.minimum(np.arange(nblk) * B, K - 1) // result_block
    scales = np.asarray(scale, dtype=np.float64)[:, first]
    return NBitsWeight(blob=blob, scales=scales, bits=s, block_size=B, K=K, N=N)


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """Unpack a NBitsWeight back to the float weight [K, N] (MatMul layout), float64; for tests and reports."""
    per = 8 // w.bits
    mask = (1 << w.bits) - 1
    q = np.stack([(w.blob >> (j * w.bits)) & mask for j in range(per)], axis=-1).reshape(w.N, -1)
    deq = (q.astype(np.float64) - 2 ** (w.bits - 1)) * np.repeat(w.scales, w.block_size, axis=1)
    return deq[:, : w.K].T


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


@dataclass(frozen=True)
class _Plan:
    owner: onnx.GraphProto  # the graph holding the node (the main graph or an If branch)
    node: onnx.NodeProto
    init: onnx.TensorProto
    K: int
    N: int
    bias: onnx.TensorProto | None


def _plan(graph: onnx.GraphProto, layer: Any, result: Any, bits: int) -> _Plan | str:
    """What the conversion needs, or why the layer cannot become MatMulNBits."""
    if layer.op not in MATMUL_OPS:
        return f"{layer.op} has no MatMulNBits form"
    owner, node = _find_node(graph, layer)
    if node is None:
        return f"no {layer.op} node consumes {layer.weight!r} as input 1"
    init = _find_init(graph, layer.weight)
    if init is None:
        return f"weight {layer.weight!r} is not an initializer"
    if len(init.dims) != 2:
        return f"weight {layer.weight!r} is {len(init.dims)}-D, MatMulNBits needs 2-D"
    if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        return "weight is not float32/float16"
    K, N = int(init.dims[0]), int(init.dims[1])
    bias = None
    if layer.op == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
            return "Gemm with transA or alpha != 1"
        if _attr(node, "transB", 0):
            N, K = K, N
        if len(node.input) > 2 and node.input[2]:
            bias = _find_init(graph, node.input[2])
            if bias is None or _attr(node, "beta", 1.0) != 1.0 or bias.data_type != init.data_type:
                return "Gemm bias is not a constant of the weight's dtype with beta = 1"
            if list(bias.dims) not in ([N], [1, N]):
                return f"Gemm bias shape {list(bias.dims)} is not [N] or [1, N]"
    if choose_block_size(K, int(result.block_size), bits) is None:
        return f"result block size {result.block_size} is not a multiple of 16"
    return _Plan(owner, node, init, K, N, bias)


def nbits_supported(model: onnx.ModelProto, layer: Any, result: Any, bits: int) -> tuple[bool, str]:
    """Whether `layer` can become MatMulNBits, and why not: a MatMul, or a Gemm with transA=0, alpha=1 and a
    constant [N] bias (beta=1) or none, with a 2-D float constant weight as input 1, and result blocks compatible
    with a power-of-2 block size in 16..256."""
    plan = _plan(model.graph, layer, result, bits)
    return (False, plan) if isinstance(plan, str) else (True, "ok")


def _find_node(graph: onnx.GraphProto, layer: Any) -> tuple[onnx.GraphProto | None, onnx.NodeProto | None]:
    """The layer's node and the graph holding it (an If branch's node reads its weight from the main graph)."""
    cands = [(g, n) for _, g, n in walk_nodes(graph)
             if n.op_type == layer.op and len(n.input) > 1 and n.input[1] == layer.weight]
    named = [c for c in cands if c[1].name == layer.name]
    return (named or cands or [(None, None)])[0]


def _find_init(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in graph.initializer if t.name == name), None)


def _unique(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    return unique_name(base, taken | {o for n in graph.node for o in n.output})


def _replace(g: onnx.GraphProto, layer: Any, result: Any, bits: int, plan: _Plan, block_size: int | None,
             accuracy_level: int, source: Model, removed_weights: set[str]) -> None:
    """Replace one planned MatMul / Gemm node by MatMulNBits on the packed codes of `result`."""
    init, node, K, N = plan.init, plan.node, plan.K, plan.N
    codes = np.asarray(result.codes)
    scale = np.asarray(result.scale)
    rb = int(result.block_size)
    if codes.shape != (N, K):
        raise OnnxspfqError(
            f"layer {layer.name!r}: codes shape {codes.shape} does not match weight K={K}, N={N} as (N, K): "
            "pass the result computed for this layer"
        )
    if scale.shape != (N, -(-K // rb)):
        raise OnnxspfqError(
            f"layer {layer.name!r}: scale shape {scale.shape} does not match (N={N}, ceil(K/{rb}))"
        )
    _check_codes(codes, bits, layer.name)
    B = block_size if block_size is not None else choose_block_size(K, rb, bits)
    if not (rb >= K or rb % B == 0):
        raise OnnxspfqError(
            f"layer {layer.name!r}: block_size {B} does not divide the result block size {rb}: "
            "leave block_size unset or pick a divisor"
        )
    packed = pack_nbits(codes, scale, rb, bits, B)
    np_t = helper.tensor_dtype_to_np_dtype(init.data_type)
    a_name = node.input[0]
    b_name = _unique(g, f"{layer.weight}_nbits_q")
    s_name = _unique(g, f"{layer.weight}_nbits_scale")
    g.initializer.append(numpy_helper.from_array(packed.blob, b_name))
    g.initializer.append(numpy_helper.from_array(packed.scales.astype(np_t), s_name))
    inputs = [a_name, b_name, s_name]
    if plan.bias is not None:
        bias_name = plan.bias.name
        if len(plan.bias.dims) == 2:  # [1, N] -> [N]
            bias_name = _unique(g, f"{plan.bias.name}_nbits_bias")
            g.initializer.append(numpy_helper.from_array(source.array(plan.bias).reshape(N), bias_name))
            removed_weights.add(plan.bias.name)
        inputs += ["", "", bias_name]
    new = helper.make_node(
        "MatMulNBits", inputs, list(node.output), name=node.name or layer.name,
        domain=MS_DOMAIN, K=K, N=N, bits=packed.bits, block_size=B, accuracy_level=accuracy_level,
    )
    idx = list(plan.owner.node).index(node)
    plan.owner.node.remove(node)
    plan.owner.node.insert(idx, new)
    removed_weights.add(layer.weight)


def emit_nbits(
    model: onnx.ModelProto,
    items: Sequence[tuple[Any, Any, int]],
    accuracy_level: int = 0,
    block_size: int | None = None,
    source: Model | None = None,
) -> tuple[onnx.ModelProto, list[str]]:
    """Return a copy of `model` with each convertible MatMul / Gemm layer replaced by MatMulNBits (see
    `nbits_supported`), and the names of the layers it did not convert (Conv, Gemm with transA / alpha != 1 /
    non-constant bias, non-2-D weights, result blocks that are no multiple of 16);
    those keep their float weights untouched, for the caller to emit as QDQ.

    items: (layer, result, bits); result.codes (N, K) int8, result.scale (N, nblocks), result.block_size.
    accuracy_level: MatMulNBits attribute; 0 or 1 keep fp32 math (exact to fp32 rounding), 4 uses int8
    activations (faster, ~5e-3 relative deviation).
    block_size: force the MatMulNBits block size (power of 2 in 16..256); None picks the smallest file.
    source: the Model that resolves `model`'s lazily read tensors (a Gemm bias reshaped to [N]).
    """
    source = source or as_model(model)
    if accuracy_level not in ACCURACY_LEVELS:
        raise OnnxspfqError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise OnnxspfqError(f"MatMulNBits block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    skipped: list[str] = []
    removed_weights: set[str] = set()
    for item in items:
        layer, result, bits = item
        if bits not in STORED_BITS:
            raise OnnxspfqError(f"layer {layer.name!r}: unsupported bits {bits!r}: use one of 8, 4, 3, 2, 1")
        plan = _plan(g, layer, result, bits)
        if isinstance(plan, str):
            skipped.append(layer.name)
            continue
        _replace(g, layer, result, bits, plan, block_size, accuracy_level, source, removed_weights)
    still_used = used_names(g) | {o.name for o in g.output}
    for name in removed_weights - still_used:
        t = _find_init(g, name)
        g.initializer.remove(t)
        for vi in [v for v in g.input if v.name == name]:
            g.input.remove(vi)
        for vi in [v for v in g.value_info if v.name == name]:
            g.value_info.remove(vi)
    if removed_weights and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out, skipped
