"""Activation quantization (--activations int8, W8A8): one per-tensor symmetric int8 scale for the input of each
compressed layer, calibrated on the FLOAT model's values of that tensor over the calibration data; the fake
quantization the compressed model's capture applies to that tensor, so that path following sees (and corrects)
the activation error as well as the weight error; and the QuantizeLinear -> DequantizeLinear pair emitted on it.

Symmetric: the scale maps max|x| (or its percentile) to 127 and the codes live in [-127, 127], stored as int8 with
zero point 0 (TensorRT's only int8 form) or as uint8 with zero point 128 (the same values; onnxruntime CPU's fast
u8 x s8 kernels). QuantizeLinear rounds half to even after an fp32 division and saturates; fake_quant equals
onnxruntime's Q -> DQ bit for bit in both storages (tests/test_activations.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxspfq.config import ActConfig

QMAX = 127
HIST_BINS = 4096  # |x| histogram of the percentile calibration (onnxruntime's HistogramCalibrater uses 2048)


@dataclass
class ActScales:
    """The tensors to quantize (each compressed layer's input) and their scales, computed once per tensor from the
    float model's values (all calibration batches) the first time the capture needs them."""

    config: ActConfig
    tensors: set[str]
    scales: dict[str, float] = field(default_factory=dict)

    def scale(self, name: str, values: list[np.ndarray]) -> float:
        if name not in self.scales:
            self.scales[name] = calibrate(values, self.config)
        return self.scales[name]


def calibrate(values: list[np.ndarray], config: ActConfig) -> float:
    """The int8 scale of one tensor from its float values (one array per batch)."""
    top = max((float(np.max(np.abs(v))) for v in values if v.size), default=0.0)
    if not np.isfinite(top):
        raise ValueError("activation values hold NaN or Inf")
    if top == 0.0:
        return 1.0  # an all-zero tensor: any scale represents it exactly
    if config.calibration == "minmax":
        clip = top
    else:
        hist = np.zeros(HIST_BINS, dtype=np.int64)
        for v in values:
            hist += np.histogram(np.abs(v), bins=HIST_BINS, range=(0.0, top))[0]
        cdf = np.cumsum(hist) / max(int(hist.sum()), 1)
        k = int(np.searchsorted(cdf, config.percentile / 100.0))
        clip = top * min(k + 1, HIST_BINS) / HIST_BINS  # the upper edge of the bin holding the percentile
    return float(np.float32(clip / QMAX))


ZERO_POINT = {"int8": np.int8(0), "uint8": np.uint8(128)}


def fake_quant(x: np.ndarray, scale: float) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x, scale, zero point)) as onnxruntime computes it, in x's float type: the
    same for both storages (uint8 with zero point 128 saturates at the same -128 .. 127 codes)."""
    s = np.float32(scale)
    q = np.clip(np.rint(np.asarray(x, dtype=np.float32) / s), -128, 127)
    return (q * s).astype(x.dtype, copy=False)


def emit(model: onnx.ModelProto, scales: dict[str, float], dtype: str = "uint8") -> onnx.ModelProto:
    """`model` (modified in place and returned) with a QuantizeLinear -> DequantizeLinear pair on each named
    tensor; every node that read the tensor (subgraphs included) reads the de-quantized value; graph outputs keep
    the float tensor."""
    from onnxspfq.graph import all_names, unique_name, walk_nodes

    g = model.graph
    taken = all_names(g)
    renamed, pairs = {}, []
    for name in sorted(scales):
        s_name, z_name = unique_name(f"{name}_act_scale", taken), unique_name(f"{name}_act_zero_point", taken)
        q_name, dq_name = unique_name(f"{name}_act_q", taken), unique_name(f"{name}_act_dq", taken)
        g.initializer.extend([numpy_helper.from_array(np.array(scales[name], np.float32), s_name),
                              numpy_helper.from_array(np.array(ZERO_POINT[dtype]), z_name)])
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
