"""Runtime targets (--target): what each runtime runs, how a run is adapted to it, and what it refuses.

    generic   no runtime's rules: every layer as configured (the formats are standard ONNX, onnxruntime runs them)
    ort-cpu   onnxruntime's CPU provider: MatMul / Gemm weights as com.microsoft.MatMulNBits (the kernel that runs
              packed weights without dequantizing them each run; --accuracy-level, default 4 = int8 activations
              inside the kernel), what it cannot hold (Conv) as QDQ; W8A8 with uint8 activations (the u8 x s8
              kernels) on layer inputs and on Conv / Gemm outputs (output_tensors: what QLinearConv / QGemm
              fusion needs). The format and accuracy defaults are config.py's; nothing is refused.
    tensorrt  TensorRT's explicit quantization (docs; TensorRT cannot run on these machines): symmetric only, INT8
              per-channel weights on Conv / Gemm / MatMul with int8 activations (--activations int8, zero point 0),
              INT4 only as block-quantized (block 64 / 128 along K) weight-only MatMul / Gemm on 2-D weights, no
              INT2, no com.microsoft ops, no sparse initializers (2:4 is read from dense weights at build time);
              W8A8 also quantizes the skip input of each residual Add after a Conv (residual_inputs).

A target decides per layer (`plan`): the QuantConfig it runs with, or float (left alone, with the reason), and the
integer type its codes are stored in; `refusals` names the settings the runtime cannot run, before any work.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TARGETS = ("generic", "ort-cpu", "tensorrt")
TRT_BLOCKS = (64, 128)  # TensorRT INT4 block sizes (docs; FORMATS.md)


@dataclass(frozen=True)
class LayerPlan:
    """One layer under a target: the quantization it runs (None: left in float, `why` says why) and the bits of
    the integer type its codes are stored in (None: the codes' own; fewer bits fit exactly: 2-bit {-1, 0, 1} in
    INT4)."""

    quant: object | None
    stored_bits: int | None
    why: str = ""


@dataclass
class Plan:
    """Every layer's LayerPlan (by name) and one line saying what the target changed ("" when nothing)."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    changed: str = ""

    def floats(self) -> dict[str, str]:
        """layer -> why, for the layers the target leaves in float."""
        return {name: p.why for name, p in self.layers.items() if p.quant is None}


def refusals(config) -> str | None:
    """Why the target cannot run `config` (a CompressConfig), or None: checked before any work."""
    q, t = config.quant, config.target
    if t != "tensorrt":
        return None
    fix = ("--activations int8 (INT8 weights and activations on Conv / Gemm / MatMul) or --bits 4 (INT4 weight-only "
           "MatMul / Gemm)")
    if config.format in ("nbits", "sparse"):
        what = "com.microsoft.MatMulNBits is onnxruntime's own op" if config.format == "nbits" else \
            "TensorRT reads dense weights (it finds 2:4 itself at build time: trtexec --sparsity=enable)"
        return f"--target tensorrt cannot read --format {config.format}: {what}; use --format qdq, or float when pruning only"
    if config.embeddings == "int8":
        return ("--target tensorrt reads int8 weights only behind DequantizeLinear, not an int8 embedding table "
                "read by Gather: drop --embeddings int8 (float is the default with this target)")
    if config.avg_bits is not None:
        return f"--target tensorrt runs INT4 weight-only or INT8 with int8 activations, not bits per layer: drop --avg-bits, use {fix}"
    if config.activations is not None:
        if config.activations.dtype != "int8":
            return ("--target tensorrt reads int8 activations with zero point 0 only: use --act-type int8 (the "
                    "default with this target)")
        return None
    if q.bits == 8:
        return (f"--target tensorrt runs 8-bit weights as INT8 only with int8 activations (weight-only INT8 "
                f"runs in float): use {fix}")
    if q.bits is not None and q.nm is not None:
        return (f"--target tensorrt has no kernel for {q.bits}-bit weights with {q.nm[0]}:{q.nm[1]} sparsity: prune "
                "alone (dense float, TensorRT's sparse tactics) or with --activations int8 (INT8 sparse)")
    if q.bits is not None:
        if q.granularity == "layer":
            return ("--target tensorrt's INT4 weights take block-wise scales: drop --granularity layer (the target "
                    "uses blocks along K)")
        if q.granularity == "block" and q.block_size not in TRT_BLOCKS:
            return (f"--target tensorrt's INT4 blocks are {' or '.join(map(str, TRT_BLOCKS))} weights long, not "
                    f"{q.block_size}: use --block-size 128")
        if q.act_order:
            return "--target tensorrt's INT4 weights are block-wise, which --act-order cannot follow: drop --act-order"
    return None


def output_tensors(config, graph, layers: list) -> dict[str, str]:
    """layer name -> the tensor W8A8 also quantizes after that layer, so that the runtime runs it in int8 end to
    end: under ort-cpu each Conv's and Gemm's output, or the output of the Relu / Clip that is its only reader
    (onnxruntime fuses DQ -> Conv [-> Relu / Clip] -> Q into QLinearConv and DQ -> Gemm -> Q into QGemm, folding
    the Relu / Clip into an unsigned Q's range; without the Q both run in float on de-quantized inputs and weights,
    EfficientNet-Lite0 3x slower than float, RESULTS.md section 13; tests/test_targets.py reads the fused graph).
    MatMul needs none (onnxruntime runs DQ -> MatMul with a float output in int8), nor does TensorRT (it places
    its own output quantization: inputs only, its documented placement)."""
    from onnxspfq.activations import layout

    if config.target != "ort-cpu" or config.activations is None:
        return {}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    own = {layer.name: layer.output for layer in layers if layer.op in ("Conv", "Gemm")}
    after = {name: readers.get(t, []) for name, t in own.items()}
    folds = {name: a[0].output[0] for name, a in after.items()
             if len(a) == 1 and a[0].op_type in ("Relu", "Clip") and own[name] not in outputs}
    # folded only into an unsigned Q (its range must lie inside the Clip's)
    unsigned = layout(graph, set(folds.values()), config.activations.dtype)[0]
    out = {}
    for name, t in own.items():
        t = folds[name] if folds.get(name) in unsigned else t
        if readers.get(t):  # a tensor only the graph outputs read keeps its float values
            out[name] = t
    return out


def residual_inputs(config, graph, layers: list) -> dict[str, str]:
    """Skip tensor -> the Add it feeds: under tensorrt W8A8, the input of each residual Add that is not its Conv's
    own output. TensorRT fuses Conv [-> BatchNormalization] -> Add [-> Relu] into one INT8 kernel when the other
    input, the skip connection, is int8 (its Q/DQ placement guide: "quantize the residual input"); a skip that is
    also a layer input is quantized already. Which input is the skip follows ModelOpt's build_non_residual_input_map:
    with a Conv behind one input only, the other, unless it is computed from that Conv's output (x + f(x), not a
    residual); with Convs behind both (a ResNet downsample branch), the input with the shorter path from the graph
    inputs; neither at equal length, nor for an Add of a constant or a graph input."""
    from onnxspfq.graph import upstream

    if config.target != "tensorrt" or config.activations is None:
        return {}
    producer = {o: n for n in graph.node for o in n.output if o}
    consts = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    convs = {layer.output for layer in layers if layer.op == "Conv"}
    depth: dict[str, int] = {}  # the longest path from the graph inputs, in nodes (graph.node is sorted)
    for n in graph.node:
        d = 1 + max((depth.get(i, 0) for i in n.input if i), default=0)
        depth.update((o, d) for o in n.output)

    def backbone(t: str) -> str | None:  # the output of the Conv layer behind t, through BatchNormalization
        while t in producer and producer[t].op_type == "BatchNormalization":
            t = producer[t].input[0]
        return t if t in convs else None

    out = {}
    for n in graph.node:
        if n.op_type != "Add" or len(n.input) != 2 or any(i in consts or i not in producer for i in n.input):
            continue
        (a, b), (ca, cb) = n.input, (backbone(n.input[0]), backbone(n.input[1]))
        if ca is not None and cb is not None:
            if ca == cb or depth[a] == depth[b]:
                continue
            skip = b if depth[a] > depth[b] else a
        elif ca is not None or cb is not None:
            skip, conv = (b, ca) if ca is not None else (a, cb)
            if conv in upstream(graph, [skip]):
                continue
        else:
            continue
        out[skip] = n.name
    return out


def concat_groups(config, graph, tensors: set[str]) -> dict[str, tuple[str, ...]]:
    """Quantized tensor -> the Concat outputs of its one-scale group: under tensorrt W8A8, each Concat whose
    output is quantized joins that output and its quantized inputs (groups that share a tensor merge). TensorRT
    merges a Concat's inputs and output into one tensor; where their Q/DQ scales differ it converts precision
    around the Concat (NVIDIA's YOLOv7 QAT performance guidance: 180 -> 207 qps on Jetson Orin once every Concat's
    scales agree, the implicit-quantization engine's speed). An input nothing else quantizes needs no scale: its Q
    is the output's, moved across the Concat."""
    if config.target != "tensorrt" or config.activations is None:
        return {}
    parent: dict[str, str] = {}

    def root(t: str) -> str:
        while parent.setdefault(t, t) != t:
            t = parent[t]
        return t

    outs = set()
    for n in graph.node:
        if n.op_type == "Concat" and n.output[0] in tensors and any(i in tensors for i in n.input):
            outs.add(n.output[0])
            for i in n.input:
                if i in tensors:
                    parent[root(i)] = root(n.output[0])
    members: dict[str, list[str]] = {}
    for t in parent:
        members.setdefault(root(t), []).append(t)
    return {t: tuple(sorted(o for o in group if o in outs)) for group in members.values() for t in group}


def plan(config, layers: list) -> Plan:
    """Each layer's LayerPlan under config.target, and the line saying what changed (layers: layers.Layer)."""
    from onnxspfq.layers import MATMUL_OPS  # here: layers -> operators -> config imports this module

    q, t = config.quant, config.target
    out = Plan({layer.name: LayerPlan(q, None) for layer in layers})
    if t == "generic":
        convs = sum(layer.op == "Conv" for layer in layers)
        if config.activations is not None and convs:
            out.changed = (f"generic W8A8 quantizes layer inputs only: onnxruntime CPU runs the {convs} Conv(s) in "
                           "int8 only where a quantized input follows one directly; --target ort-cpu quantizes every "
                           "Conv output (QLinearConv)")
        return out
    if t == "ort-cpu":
        mm = sum(layer.op in MATMUL_OPS for layer in layers)
        if config.format == "nbits":
            out.changed = (f"--target ort-cpu: MatMul / Gemm weights as MatMulNBits where it holds them ({mm} "
                           f"layers; accuracy level {config.accuracy_level}), the rest ({len(layers) - mm} layers) "
                           "as QDQ")
        elif config.activations is not None:
            out.changed = f"--target ort-cpu: W8A8 QDQ, activations {config.activations.dtype}"
        return out
    # tensorrt
    if config.activations is not None or q.bits is None:
        out.changed = ("--target tensorrt: INT8 weights and int8 activations (zero point 0)"
                       if config.activations is not None else "--target tensorrt: pruned weights stored dense")
        return out
    # the largest block that divides K (the blocked axis is K / block scales long: docs); a given --block-size only
    blocks = (q.block_size,) if q.granularity == "block" else sorted(TRT_BLOCKS, reverse=True)
    used, floats = {}, {}
    for layer in layers:
        k = layer.n0
        block = next((b for b in blocks if k % b == 0), None)
        if layer.op not in MATMUL_OPS:
            why = f"float: TensorRT's INT4 is weight-only MatMul / Gemm ({layer.op}: --activations int8 for INT8)"
        elif len(layer.shape) != 2:
            why = f"float: TensorRT's block-quantized INT4 takes 2-D weights, not {len(layer.shape)}-D"
        elif block is None:
            why = f"float: K = {k} is no multiple of TensorRT's INT4 block size ({' or '.join(map(str, blocks))})"
        else:
            out.layers[layer.name] = LayerPlan(dataclasses.replace(q, granularity="block", block_size=block), 4)
            used[block] = used.get(block, 0) + 1
            continue
        out.layers[layer.name] = LayerPlan(None, None, why)
        floats[layer.op] = floats.get(layer.op, 0) + 1
    left = ", ".join(f"{n} {op}" for op, n in sorted(floats.items()))
    out.changed = (f"--target tensorrt: {sum(used.values())} MatMul / Gemm layers INT4 weight-only, block "
                   + " / ".join(f"{b} ({n})" for b, n in sorted(used.items(), reverse=True))
                   + (f" ({q.bits}-bit codes stored as INT4: TensorRT reads no INT2)" if q.bits < 3 else "")
                   + (f", {left} layer(s) left float (see the table)" if left else ""))
    return out
