"""Model side of the ONNX pass: load a model, fold constant weight chains, and find the compressible layers.

A layer is a MatMul / Gemm / Conv whose weight is a constant initializer. `Layer.matrix()` maps the weight to the
N1 x N0 matrix W of ALGORITHM.md Section 1 (rows = output neurons) and `Layer.tensor()` maps it back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxspfq.errors import OnnxspfqError

WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
CHAIN_OPS = ("Identity", "Transpose", "Cast")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


# --------------------------------------------------------------------------------------------------------- loading
def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model (external data is read relative to the file's folder); the file is not changed."""
    p = Path(path)
    if not p.is_file():
        raise OnnxspfqError(f"model file not found: {str(p)!r} is not a file; pass the path of an .onnx model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise OnnxspfqError(f"{str(p)!r} is not a readable ONNX model (truncated or not ONNX: {_one_line(e)}); "
                            "re-export or re-download it") from None
    if model.ir_version == 0 or not model.HasField("graph") or (len(model.graph.node) == 0
                                                                 and len(model.graph.output) == 0):
        raise OnnxspfqError(f"{str(p)!r} is not an ONNX model (no graph or IR version found); "
                            "pass an .onnx file exported by a framework")
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as e:
        raise OnnxspfqError(f"cannot read the external weight data of {str(p)!r} ({_one_line(e)}); keep the data "
                            "file(s) next to the model under the names the model records") from None
    try:
        if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(p))
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        raise OnnxspfqError(f"{str(p)!r} fails the ONNX checker: {_one_line(e)}; fix or re-export the model") from None
    return model


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


# ----------------------------------------------------------------------------------------------------- node names
def node_names(graph: onnx.GraphProto) -> list[str]:
    """Unique, deterministic names for the graph's nodes: the node's own name, or `<op>_<index>` if empty/taken."""
    taken: set[str] = set()
    out: list[str] = []
    existing = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        name = node.name
        if not name or name in taken:
            base = f"{node.op_type}_{i}"
            name, k = base, 1
            while name in taken or name in existing:
                name, k = f"{base}_{k}", k + 1
        taken.add(name)
        out.append(name)
    return out


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of the graph or of its sub-graphs (If / Loop / Scan bodies)."""
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= _used_names(sub)
    return used


# -------------------------------------------------------------------------------------------------------- folding
def _constant_attr(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def _chain_value(name: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto],
                 depth: int = 0) -> np.ndarray | None:
    """Value of `name` if it is a constant reached through Identity / Transpose / Cast / Constant, else None."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is None or depth > 64:
        return None
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        return _constant_attr(node)
    if node.op_type not in CHAIN_OPS or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    src = _chain_value(node.input[0], producers, inits, depth + 1)
    if src is None:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Identity":
        return src
    if node.op_type == "Transpose":
        perm = attrs.get("perm")
        return np.ascontiguousarray(np.transpose(src, list(perm) if perm else None))
    return src.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))  # Cast


def fold_weight_chains(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where each MatMul / Gemm / Conv weight reached through Identity / Transpose / Cast /
    Constant nodes is a direct initializer (in the layout the node consumes), and unnamed nodes get unique names.

    The folded tensor keeps the chain's output name; chain nodes and initializers left unused are removed.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for node, name in zip(g.node, node_names(g)):
        node.name = name
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output if o}
    graph_outputs = {o.name for o in g.output}
    all_names = set(producers) | set(inits) | {i.name for i in g.input}
    folded: dict[str, str] = {}
    drop_nodes: set[str] = set()
    roots: set[str] = set()
    for node in g.node:
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        t = node.input[1]
        if not t or t in inits:
            continue
        if t not in folded:
            value = _chain_value(t, producers, inits)
            if value is None:
                continue
            new = t
            if t in graph_outputs:
                new, k = f"{t}_folded", 1
                while new in all_names:
                    new, k = f"{t}_folded_{k}", k + 1
                all_names.add(new)
            else:
                drop_nodes.add(producers[t].name)
            g.initializer.append(numpy_helper.from_array(np.asarray(value), new))
            inits[new] = g.initializer[-1]
            folded[t] = new
            roots |= _chain_sources(t, producers)
        node.input[1] = folded[t]
    if not folded:
        return m
    kept = [n for n in g.node if n.name not in drop_nodes]
    # dead chain nodes: repeatedly drop Identity / Transpose / Cast / Constant nodes whose outputs nobody reads
    while True:
        used = _used_names_nodes(kept) | graph_outputs
        dead = [n for n in kept if n.op_type in CHAIN_OPS + ("Constant",) and not any(o in used for o in n.output)]
        if not dead:
            break
        dead_names = {n.name for n in dead}
        kept = [n for n in kept if n.name not in dead_names]
    del g.node[:]
    g.node.extend(kept)
    used = _used_names(g) | graph_outputs
    unused = {r for r in roots if r in inits and r not in used}
    if unused:
        keep_inits = [t for t in g.initializer if t.name not in unused]
        del g.initializer[:]
        g.initializer.extend(keep_inits)
        keep_inputs = [i for i in g.input if i.name not in unused]
        del g.input[:]
        g.input.extend(keep_inputs)
    return m


def _used_names_nodes(nodes: list[onnx.NodeProto]) -> set[str]:
    g = onnx.GraphProto()
    g.node.extend(nodes)
    return _used_names(g)


def _chain_sources(name: str, producers: dict[str, onnx.NodeProto]) -> set[str]:
    """Names along a chain (used to find initializers that became unused after folding)."""
    out = {name}
    node = producers.get(name)
    while node is not None and node.op_type in CHAIN_OPS and node.input:
        out.add(node.input[0])
        node = producers.get(node.input[0])
    return out


# ------------------------------------------------------------------------------------------------ weightless copy
def weightless(model: onnx.ModelProto, fed: set[str] | None = None, min_elements: int = 1024
               ) -> tuple[onnx.ModelProto, set[str]]:
    """A shape-inferred copy of `model` without its large weights: initializers named in `fed` or with at least
    `min_elements` elements become typed graph inputs (the caller feeds them), small ones (shape constants, biases)
    stay. Returns (proto, names turned into inputs). Never serialises the full model (safe above 2 GB)."""
    fed = set(fed or ())
    g = model.graph
    wl = onnx.ModelProto()
    wl.ir_version = model.ir_version
    wl.opset_import.extend(model.opset_import)
    wl.functions.extend(model.functions)
    wl.graph.name = g.name
    wl.graph.node.extend(g.node)
    wl.graph.input.extend(g.input)
    wl.graph.output.extend(g.output)
    wl.graph.value_info.extend(g.value_info)
    declared = {i.name for i in g.input}
    moved: set[str] = set()
    for t in g.initializer:
        n_el = int(np.prod(t.dims)) if len(t.dims) else 1
        if t.name in fed or n_el >= min_elements:
            moved.add(t.name)
            if t.name not in declared:
                wl.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            wl.graph.initializer.append(t)
    try:
        wl = onnx.shape_inference.infer_shapes(wl, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; missing types are filled at run time
        pass
    return wl, moved


def _value_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    shapes: dict[str, tuple[int | None, ...]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


# ---------------------------------------------------------------------------------------------------------- Layer
@dataclass
class Layer:
    """One compressible node: MatMul (constant B = W0 [K, N]), Gemm (constant B) or Conv (W0 [M, C/g, *k]).

    matrix() is W (N1 x N0, float64), rows = output neurons; tensor() is its exact inverse.
    pads are ONNX order (begins then ends), resolved from auto_pad with the inferred input shape; None when the
    input's spatial size is unknown before run time (use resolve_pads).
    """

    name: str
    op: str
    input: str
    output: str
    weight: str
    W0: np.ndarray
    node_index: int = 0
    groups: int = 1
    kernel_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] | None = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    trans_a: bool = False
    trans_b: bool = False
    alpha: float = 1.0
    bias: str | None = None
    weight_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    input_shape: tuple[int | None, ...] | None = None
    shared_with: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.W0.shape)

    @property
    def channel_axis(self) -> int:
        """Axis of W0 that indexes the N1 output neurons (per-channel scales live along it)."""
        if self.op == "Conv":
            return 0
        if self.op == "Gemm":
            return 0 if self.trans_b else 1
        return 1

    @property
    def reduction_axis(self) -> int:
        """Axis of W0 summed over by the node (Conv: 1, the input channels; the kernel axes follow it)."""
        if self.op == "Conv":
            return 1
        if self.op == "Gemm":
            return 1 if self.trans_b else 0
        return 0

    @property
    def n1(self) -> int:
        return int(self.W0.shape[self.channel_axis])

    @property
    def n0(self) -> int:
        return int(self.W0.size // self.n1)

    def matrix(self) -> np.ndarray:
        """W (N1 x N0) float64: MatMul B.T, Gemm B (transB) or B.T, Conv W0.reshape(M, -1)."""
        w = np.asarray(self.W0, dtype=np.float64)
        if self.op == "Conv":
            return np.ascontiguousarray(w.reshape(w.shape[0], -1))
        if self.op == "Gemm" and self.trans_b:
            return np.ascontiguousarray(w)
        return np.ascontiguousarray(w.T)

    def tensor(self, W: np.ndarray) -> np.ndarray:
        """Inverse of matrix(): W (N1 x N0) back to W0's shape and layout (float32, or W's dtype if integer)."""
        W = np.asarray(W)
        if W.shape != (self.n1, self.n0):
            raise ValueError(f"layer {self.name}: expected a ({self.n1}, {self.n0}) matrix, got {W.shape}")
        dtype = W.dtype if np.issubdtype(W.dtype, np.integer) else np.float32
        if self.op == "Conv":
            out = W.reshape(self.W0.shape)
        elif self.op == "Gemm" and self.trans_b:
            out = W
        else:
            out = W.T
        return np.ascontiguousarray(out, dtype=dtype)

    def group_rows(self) -> list[slice]:
        """Row slices of matrix() per Conv group (one slice covering all rows for MatMul / Gemm / groups=1)."""
        g = self.groups if self.op == "Conv" else 1
        per = self.n1 // g
        return [slice(i * per, (i + 1) * per) for i in range(g)]

    def resolve_pads(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Conv pads (begins then ends) for an input of the given spatial size, honouring auto_pad."""
        return conv_pads(spatial, self.kernel_shape, self.strides, self.dilations, self.auto_pad,
                         self.pads if self.auto_pad in ("NOTSET", "") else None)


def conv_pads(spatial: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...],
              dilations: tuple[int, ...], auto_pad: str, pads: tuple[int, ...] | None) -> tuple[int, ...]:
    """ONNX Conv padding rules: explicit pads, VALID, or SAME_UPPER / SAME_LOWER (extra pad at the end / begin)."""
    nd = len(kernel)
    if auto_pad in ("NOTSET", ""):
        return tuple(pads) if pads else (0,) * (2 * nd)
    if auto_pad == "VALID":
        return (0,) * (2 * nd)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        if auto_pad == "SAME_UPPER":
            begins.append(small), ends.append(total - small)
        else:
            begins.append(total - small), ends.append(small)
    return tuple(begins + ends)


# ---------------------------------------------------------------------------------------------------- find_layers
def find_layers(model: onnx.ModelProto, skip: tuple[str, ...] | list[str] = ()) -> tuple[list[Layer], list[dict]]:
    """The compressible layers of `model` (call on fold_weight_chains' output) in topological order, and the
    MatMul / Gemm / Conv nodes left out as {"name", "op", "reason"} (plus one entry counting other op types).

    A weight used by several nodes is compressed once: the first user is the Layer, `shared_with` names the others.
    """
    g = model.graph
    names = node_names(g)
    skip = tuple(skip)
    unknown = [s for s in skip if s not in set(names)]
    if unknown:
        sample = ", ".join(n for n, nd in zip(names, g.node) if nd.op_type in WEIGHT_OPS)[:200]
        raise OnnxspfqError(f"unknown layer name(s) to skip: {', '.join(unknown)}; use node names such as: {sample}")
    inits = {t.name: t for t in g.initializer}
    overridable = {i.name for i in g.input}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(g.node):
        for t in set(node.input):
            if t in inits:
                consumers.setdefault(t, []).append(i)
    shapes = _value_shapes(weightless(model)[0])

    skipped: list[dict] = []
    eligible: dict[int, str] = {}  # node index -> weight name
    for i, node in enumerate(g.node):
        if node.op_type not in WEIGHT_OPS:
            continue
        reason = _ineligible(node, inits, overridable)
        if reason is None and names[i] in skip:
            reason = "skipped by user"
        if reason is None:
            eligible[i] = node.input[1]
        else:
            skipped.append({"name": names[i], "op": node.op_type, "reason": reason})
    blocked = {w: names[j] for w, users in consumers.items() for j in users if names[j] in skip}

    layers: list[Layer] = []
    by_weight: dict[str, Layer] = {}
    for i in sorted(eligible):
        node, w = g.node[i], eligible[i]
        if w in blocked:
            skipped.append({"name": names[i], "op": node.op_type,
                            "reason": f"shares weight {w} with skipped node {blocked[w]}"})
            continue
        if w in by_weight:
            continue
        layer = _make_layer(node, names[i], i, inits[w], shapes)
        layer.shared_with = [names[j] for j in consumers[w] if j != i]
        by_weight[w] = layer
        layers.append(layer)
    other = sum(1 for n in g.node if n.op_type not in WEIGHT_OPS and any(t in inits for t in n.input))
    if other:
        skipped.append({"name": "*", "op": "other",
                        "reason": f"{other} node(s) of other op types read initializers; only MatMul / Gemm / Conv "
                                  "weights are compressed"})
    return layers, skipped


def _ineligible(node: onnx.NodeProto, inits: dict, overridable: set[str]) -> str | None:
    """Why a MatMul / Gemm / Conv node cannot be compressed, or None."""
    if node.domain not in ("", "ai.onnx"):
        return f"op in domain {node.domain!r}"
    if len(node.input) < 2:
        return "node has no weight input"
    a, b = node.input[0], node.input[1]
    if b not in inits:
        if node.op_type == "MatMul" and a in inits:
            return "constant is the first MatMul input (only activation @ constant is supported)"
        return "weight is computed at run time (not a constant initializer)"
    if a in inits:
        return "both inputs are constants"
    t = inits[b]
    if t.data_type not in FLOAT_TYPES:
        return f"weight dtype {onnx.helper.tensor_dtype_to_string(t.data_type)} is not floating point"
    rank = len(t.dims)
    if node.op_type in ("MatMul", "Gemm") and rank != 2:
        return f"weight has rank {rank} (only 2-D weights are compressed)"
    if node.op_type == "Conv" and rank not in (3, 4, 5):
        return f"Conv weight has rank {rank} (1-D, 2-D and 3-D Conv are supported)"
    if t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data:
        return "weight data was not loaded (load the model with its external data)"
    return None


def _make_layer(node: onnx.NodeProto, name: str, index: int, init: onnx.TensorProto,
                shapes: dict[str, tuple[int | None, ...]]) -> Layer:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    raw = numpy_helper.to_array(init)
    layer = Layer(name=name, op=node.op_type, input=node.input[0], output=node.output[0], weight=init.name,
                  W0=np.ascontiguousarray(raw, dtype=np.float32), node_index=index, weight_dtype=raw.dtype,
                  input_shape=shapes.get(node.input[0]),
                  bias=node.input[2] if len(node.input) > 2 and node.input[2] else None)
    if node.op_type == "Gemm":
        layer.trans_a = bool(attrs.get("transA", 0))
        layer.trans_b = bool(attrs.get("transB", 0))
        layer.alpha = float(attrs.get("alpha", 1.0))
    elif node.op_type == "Conv":
        nd = raw.ndim - 2
        layer.groups = int(attrs.get("group", 1))
        layer.kernel_shape = tuple(int(k) for k in attrs.get("kernel_shape", raw.shape[2:]))
        layer.strides = tuple(int(s) for s in attrs.get("strides", (1,) * nd))
        layer.dilations = tuple(int(d) for d in attrs.get("dilations", (1,) * nd))
        ap = attrs.get("auto_pad", b"NOTSET")
        layer.auto_pad = ap.decode() if isinstance(ap, bytes) else str(ap)
        explicit = tuple(int(p) for p in attrs.get("pads", (0,) * (2 * nd)))
        if layer.auto_pad in ("NOTSET", "", "VALID"):
            layer.pads = conv_pads((), layer.kernel_shape, layer.strides, layer.dilations, layer.auto_pad, explicit)
        else:
            shp = layer.input_shape
            spatial = shp[2:] if shp is not None and len(shp) == nd + 2 else None
            layer.pads = (None if spatial is None or any(s is None for s in spatial) else
                          conv_pads(tuple(spatial), layer.kernel_shape, layer.strides, layer.dilations,
                                    layer.auto_pad, None))
    return layer
