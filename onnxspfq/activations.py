"""Activation quantization (--activations int8, W8A8): one per-tensor 8-bit scale for the input of each
compressed layer (and, where the target fuses them, its output: targets.output_tensors), calibrated on the FLOAT
model's values of that tensor over the calibration data; the fake quantization the compressed model's capture
applies to that tensor, so that path following sees (and corrects) the activation error as well as the weight
error; and the QuantizeLinear -> DequantizeLinear pair emitted on it.

Symmetric: the scale maps max|x| (or its percentile) to 127 and the codes live in [-127, 127], stored as int8 with
zero point 0 (TensorRT's only int8 form) or as uint8 with zero point 128 (the same values; onnxruntime CPU's fast
u8 x s8 kernels). Unsigned, with uint8 storage only: a tensor that cannot be negative (a Relu's output, a Clip's
at min >= 0, and what value-moving ops make of them: `layout`) maps its max to 255 at zero point 0, twice the
resolution, and it is the form onnxruntime needs to fold the Relu / Clip into a QLinearConv. A tensor that a
value-moving op (MaxPool, Pad, Reshape, ...) makes from another quantized tensor is on that tensor's grid and
shares its scale: no second rounding. QuantizeLinear rounds half to even after an fp32 division and saturates;
fake_quant equals onnxruntime's Q -> DQ bit for bit in every storage (tests/test_activations.py).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxspfq.config import ActConfig

QMAX = 127
UQMAX = 255  # the unsigned codes' top
# ops whose output holds only values of their first input (or zeros, for Pad at constant 0): a tensor they make from
# a quantized tensor is on its grid, and non-negative when that one is
SAME_GRID = ("MaxPool", "Pad", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
HIST_BINS = 4096  # |x| histogram of the percentile calibration (onnxruntime's HistogramCalibrater uses 2048)


@dataclass
class ActScales:
    """The tensors to quantize and their scales, computed once per tensor from the float model's values (all
    calibration batches) the first time the capture needs them; `unsigned`: those quantized at zero point 0 over
    0 .. 255; `shared`: tensor -> the quantized tensor whose scale it takes (quantized before it: the capture
    quantizes in graph order); `groups`: see set_groups."""

    config: ActConfig
    tensors: set[str]
    unsigned: set[str] = field(default_factory=set)
    shared: dict[str, str] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    # tensor -> the Concat outputs of its one-scale group (targets.concat_groups): every member takes the largest
    # of those outputs' own scales (set_groups), before the capture quantizes the first of them
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def set_groups(self, own: dict[str, float]) -> None:
        """Each group member's scale from its group's Concat outputs' own scales `own`."""
        for t, outs in self.groups.items():
            self.scales[t] = max(own[o] for o in outs)

    def scale(self, name: str, values: list[np.ndarray]) -> float:
        if name not in self.scales:
            self.scales[name] = (self.scales[self.shared[name]] if name in self.shared
                                 else calibrate(values, self.config, name in self.unsigned))
        return self.scales[name]

    def fake_quant(self, name: str, x: np.ndarray) -> np.ndarray:
        """x (values of tensor `name`) through its Q -> DQ pair (scale() first)."""
        return fake_quant(x, self.scales[name], name in self.unsigned)


def calibrate(values: list[np.ndarray], config: ActConfig, unsigned: bool = False) -> float:
    """The 8-bit scale of one tensor from its float values (one array per batch); unsigned: the values are >= 0
    and take the codes 0 .. 255."""
    return calibrate_many(lambda: ([v] for v in values), config, [unsigned])[0]


def calibrate_many(passes: Callable[[], Iterable[list[np.ndarray]]], config: ActConfig,
                   unsigned: list[bool]) -> list[float]:
    """calibrate() for several tensors at once: passes() yields, per batch, one array per tensor, and is called
    once for max|x| and once more for the percentile's histogram (each call may run the model again: nothing is
    held across batches)."""
    n = len(unsigned)
    tops = [0.0] * n
    for vals in passes():
        for i, v in enumerate(vals):
            if v.size:
                top = float(np.max(np.abs(v)))
                if not np.isfinite(top):
                    raise ValueError("activation values hold NaN or Inf")
                tops[i] = max(tops[i], top)
    clips = list(tops)
    if config.calibration != "minmax" and any(tops):
        hists = [np.zeros(HIST_BINS, dtype=np.int64) for _ in range(n)]
        for vals in passes():
            for i, v in enumerate(vals):
                if tops[i] > 0:
                    hists[i] += np.histogram(np.abs(v), bins=HIST_BINS, range=(0.0, tops[i]))[0]
        for i, hist in enumerate(hists):
            cdf = np.cumsum(hist) / max(int(hist.sum()), 1)
            k = int(np.searchsorted(cdf, config.percentile / 100.0))
            clips[i] = tops[i] * min(k + 1, HIST_BINS) / HIST_BINS  # the upper edge of the bin holding the percentile
    out = []
    for clip, uns in zip(clips, unsigned):
        if clip == 0.0:
            out.append(1.0)  # an all-zero tensor: any scale represents it exactly
            continue
        top_code = UQMAX if uns else QMAX
        s = np.float32(clip / top_code)
        if s * np.float32(top_code) > clip:  # never past the clip: a Clip(0, 6) folds into Q only if 255 s <= 6
            s = np.nextafter(s, np.float32(0))
        out.append(float(s))
    return out


ZERO_POINT = {"int8": np.int8(0), "uint8": np.uint8(128)}
UNSIGNED_ZERO_POINT = np.uint8(0)


def fake_quant(x: np.ndarray, scale: float, unsigned: bool = False) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x, scale, zero point)) as onnxruntime computes it, in x's float type: the
    same for both signed storages (uint8 with zero point 128 saturates at the same -128 .. 127 codes); unsigned:
    uint8 at zero point 0, codes 0 .. 255."""
    s = np.float32(scale)
    q = np.clip(np.rint(np.asarray(x, dtype=np.float32) / s), *((0, UQMAX) if unsigned else (-128, 127)))
    return (q * s).astype(x.dtype, copy=False)


def layout(graph: onnx.GraphProto, tensors: set[str], dtype: str) -> tuple[set[str], dict[str, str]]:
    """(the tensors of `tensors` that cannot be negative, quantized unsigned where the storage is uint8; tensor ->
    the quantized tensor whose scale it shares, for those a chain of SAME_GRID ops makes from another one)."""
    from onnxspfq.fold import constant_attr

    producer = {o: n for n in graph.node for o in n.output if o}
    inits = {t.name: t for t in graph.initializer}

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            t = inits[name]
            return None if t.data_location == onnx.TensorProto.EXTERNAL else numpy_helper.to_array(t)
        n = producer.get(name)
        return constant_attr(n) if n is not None and n.op_type == "Constant" else None

    def moves(n: onnx.NodeProto) -> bool:  # holds only its first input's values
        if n.op_type != "Pad":
            return n.op_type in SAME_GRID
        mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), "constant")
        value = next((a.f for a in n.attribute if a.name == "value"), 0.0)  # opset < 11
        if len(n.input) > 2 and n.input[2]:
            v = const(n.input[2])
            value = None if v is None else float(np.max(np.abs(v)))
        return mode != "constant" or value == 0.0

    def nonneg(name: str, depth: int = 0) -> bool:
        n = producer.get(name)
        if n is None or depth > 64:
            return False
        if n.op_type == "Relu":
            return True
        if n.op_type == "Clip":
            low = (next((a.f for a in n.attribute if a.name == "min"), None) if len(n.input) < 2
                   else const(n.input[1]) if n.input[1] else None)
            return low is not None and float(np.min(low)) >= 0.0
        return moves(n) and nonneg(n.input[0], depth + 1)

    def source(name: str) -> str | None:
        n = producer.get(name)
        for _ in range(64):
            if n is None or not moves(n):
                return None
            if n.input[0] in tensors:
                return n.input[0]
            n = producer.get(n.input[0])
        return None

    unsigned = {t for t in tensors if nonneg(t)} if dtype == "uint8" else set()
    shared = {t: s for t in tensors if (s := source(t)) is not None}
    for t, s in shared.items():  # a tensor on another's grid is quantized as that one is
        unsigned.discard(t)
        root = s
        while root in shared:
            root = shared[root]
        if root in unsigned:
            unsigned.add(t)
    return unsigned, shared


def emit(model: onnx.ModelProto, scales: dict[str, float], dtype: str = "uint8",
         unsigned: set[str] | frozenset = frozenset(), shared: dict[str, str] | None = None) -> onnx.ModelProto:
    """`model` (modified in place and returned) with a QuantizeLinear -> DequantizeLinear pair on each named
    tensor (those in `unsigned` at uint8 zero point 0); every node that read the tensor (subgraphs included) reads
    the de-quantized value; graph outputs keep the float tensor.

    A Pad making a quantized tensor from another on the same grid (`shared`) gets no pair: its values are already
    on that grid (the pair would change nothing), and onnxruntime folds a Pad that feeds a Conv into the Conv's
    own pads, so DQ -> Pad -> Conv -> Q still becomes one QLinearConv; with a pair after it the Pad stays, in
    float, between a DequantizeLinear and a QuantizeLinear over the whole tensor (EfficientNet-Lite0 pads before
    each strided depthwise Conv; tests/test_activations.py reads the fused graph)."""
    from onnxspfq.graph import all_names, unique_name, walk_nodes

    g = model.graph
    taken = all_names(g)
    producer = {o: n for n in g.node for o in n.output if o}
    shared = shared or {}
    on_grid = {t for t in scales if (n := producer.get(t)) is not None and n.op_type == "Pad"
               and n.input[0] == shared.get(t) and n.input[0] in scales}
    renamed, pairs = {}, []
    for name in sorted(set(scales) - on_grid):
        s_name, z_name = unique_name(f"{name}_act_scale", taken), unique_name(f"{name}_act_zero_point", taken)
        q_name, dq_name = unique_name(f"{name}_act_q", taken), unique_name(f"{name}_act_dq", taken)
        g.initializer.extend([numpy_helper.from_array(np.array(scales[name], np.float32), s_name),
                              numpy_helper.from_array(np.array(UNSIGNED_ZERO_POINT if name in unsigned
                                                               else ZERO_POINT[dtype]), z_name)])
        pairs.append((name, [helper.make_node("QuantizeLinear", [name, s_name, z_name], [q_name],
                                              name=unique_name(f"{name}_QuantizeLinear", taken)),
                             helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_name],
                                              name=unique_name(f"{name}_DequantizeLinear", taken))]))
        renamed[name] = dq_name
    for _, _, n in walk_nodes(g):
        for i, t in enumerate(n.input):
            if t in renamed:
                n.input[i] = renamed[t]
    # each pair right after its tensor's producer (graph inputs: first), so the node list stays sorted
    produced_at = {o: i for i, n in enumerate(g.node) for o in n.output}
    nodes = list(g.node)
    for name, pair in sorted(pairs, key=lambda p: -produced_at.get(p[0], -1)):
        at = produced_at.get(name, -1) + 1
        nodes[at:at] = pair
    del g.node[:]
    g.node.extend(nodes)
    return model
