"""Model side of the ONNX pass: load a model, fold constant weight chains, and find the compressible layers.

A layer is a MatMul / Gemm / Conv / ConvTranspose whose weight is a constant initializer; layers.py holds what
each op's weight and input look like (`Layer`).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxspfq.errors import OnnxspfqError
from onnxspfq.io import DERIVED, Model, as_model, open_model
from onnxspfq.wire import LAZY_MIN_ELEMENTS
from onnxspfq.layers import WEIGHT_OPS, Layer, ineligible, make_layer

CHAIN_OPS = ("Identity", "Transpose", "Cast")


# --------------------------------------------------------------------------------------------------------- loading
def load_model(path: str | os.PathLike) -> Model:
    """Open and check an ONNX model without reading its large weights (see io.open_model); the file is not changed."""
    return open_model(path)


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


def _chain(name: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto], model: Model,
           depth: int = 0) -> tuple[tuple[int, ...], int, Callable[[], np.ndarray]] | None:
    """(dims, ONNX dtype, reader) of `name` if it is a constant reached through Identity / Transpose / Cast /
    Constant, else None. Nothing is read here: the reader computes the value when it is called."""
    if name in inits:
        t = inits[name]
        return tuple(t.dims), t.data_type, lambda: model.array(t)
    node = producers.get(name)
    if node is None or depth > 64:
        return None
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        value = _constant_attr(node)
        if value is None:
            return None
        return tuple(value.shape), onnx.helper.np_dtype_to_tensor_dtype(value.dtype), lambda: value
    if node.op_type not in CHAIN_OPS or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    src = _chain(node.input[0], producers, inits, model, depth + 1)
    if src is None:
        return None
    dims, dtype, read = src
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Identity":
        return src
    if node.op_type == "Transpose":
        perm = list(attrs["perm"]) if attrs.get("perm") else list(range(len(dims)))[::-1]
        return (tuple(dims[p] for p in perm), dtype,
                lambda: np.ascontiguousarray(np.transpose(read(), perm)))
    to = int(attrs["to"])  # Cast
    return dims, to, lambda: read().astype(onnx.helper.tensor_dtype_to_np_dtype(to))


def fold_weight_chains(model: Model | onnx.ModelProto) -> Model | onnx.ModelProto:
    """A copy of `model` where each MatMul / Gemm / Conv weight reached through Identity / Transpose / Cast /
    Constant nodes is a direct initializer (in the layout the node consumes), and unnamed nodes get unique names.

    The folded tensor keeps the chain's output name; chain nodes and initializers left unused are removed. For a
    Model the folded values are computed when read (nothing is materialised); for a proto they are stored in it.
    """
    as_proto = isinstance(model, onnx.ModelProto)
    src = as_model(model)
    m = onnx.ModelProto()
    m.CopyFrom(src.proto)
    out = Model(proto=m, base_dir=src.base_dir, path=src.path, inline=src.inline, derived=dict(src.derived),
                external=src.external)
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
            chain = _chain(t, producers, inits, out)
            if chain is None:
                continue
            new = t
            if t in graph_outputs:
                new, k = f"{t}_folded", 1
                while new in all_names:
                    new, k = f"{t}_folded_{k}", k + 1
                all_names.add(new)
            else:
                drop_nodes.add(producers[t].name)
            dims, dtype, read = chain
            if as_proto:
                g.initializer.append(numpy_helper.from_array(np.asarray(read()), new))
            else:
                g.initializer.append(_derived_tensor(new, dims, dtype))
                out.derived[new] = read
            inits[new] = g.initializer[-1]
            folded[t] = new
            roots |= _chain_sources(t, producers)
        node.input[1] = folded[t]
    if folded:
        _drop_dead_chains(g, drop_nodes, roots, inits, graph_outputs)
    return m if as_proto else out


def _drop_dead_chains(g: onnx.GraphProto, drop_nodes: set[str], roots: set[str], inits: dict,
                      graph_outputs: set[str]) -> None:
    """Remove the folded chains' nodes, then every Identity / Transpose / Cast / Constant node nobody reads any
    more (repeatedly), then the chains' source initializers left unused."""
    kept = [n for n in g.node if n.name not in drop_nodes]
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


def _derived_tensor(name: str, dims: tuple[int, ...], dtype: int) -> onnx.TensorProto:
    """A data-less initializer whose value the Model computes on read (io.DERIVED marks it)."""
    t = onnx.TensorProto(name=name, dims=list(dims), data_type=dtype, data_location=onnx.TensorProto.EXTERNAL)
    entry = t.external_data.add()
    entry.key, entry.value = "location", DERIVED
    return t


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
def weightless(model: Model | onnx.ModelProto, fed: set[str] | None = None, min_elements: int = LAZY_MIN_ELEMENTS
               ) -> tuple[onnx.ModelProto, set[str]]:
    """A shape-inferred copy of `model` without its large weights: initializers named in `fed` or with at least
    `min_elements` elements become typed graph inputs (the caller feeds them), small ones (shape constants, biases)
    stay. Returns (proto, names turned into inputs). Never serialises the full model (safe above 2 GB)."""
    fed = set(fed or ())
    src = as_model(model)
    model = src.proto
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
        elif t.name in src.derived or t.data_location == onnx.TensorProto.EXTERNAL:
            wl.graph.initializer.append(numpy_helper.from_array(np.asarray(src.array(t)), t.name))
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


# ---------------------------------------------------------------------------------------------------- find_layers
def find_layers(model: Model | onnx.ModelProto, skip: tuple[str, ...] | list[str] = ()) -> tuple[list[Layer], list[dict]]:
    """The compressible layers of `model` (call on fold_weight_chains' output) in topological order, and the
    MatMul / Gemm / Conv nodes left out as {"name", "op", "reason"} (plus one entry counting other op types).

    A weight used by several nodes is compressed once: the first user is the Layer, `shared_with` names the others.
    """
    src = as_model(model)
    g = src.graph
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
    shapes = _value_shapes(weightless(src)[0])

    skipped: list[dict] = []
    eligible: dict[int, str] = {}  # node index -> weight name
    for i, node in enumerate(g.node):
        if node.op_type not in WEIGHT_OPS:
            continue
        reason = ineligible(node, inits, overridable)
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
        layer = make_layer(node, names[i], i, inits[w], shapes, lambda t=inits[w]: src.array(t))
        layer.shared_with = [names[j] for j in consumers[w] if j != i]
        by_weight[w] = layer
        layers.append(layer)
    other = sum(1 for n in g.node if n.op_type not in WEIGHT_OPS and any(t in inits for t in n.input))
    if other:
        skipped.append({"name": "*", "op": "other",
                        "reason": f"{other} node(s) of other op types read initializers; only MatMul / Gemm / Conv "
                                  "weights are compressed"})
    return layers, skipped


def subgraph_layers(model: onnx.ModelProto) -> list[dict]:
    """MatMul / Gemm / Conv nodes inside If / Loop / Scan bodies, as find_layers' left-alone entries: the pass
    compresses the main graph only (a body's inputs cannot be captured by running the model)."""
    out: list[dict] = []

    def walk(graph: onnx.GraphProto, where: str) -> None:
        for node, name in zip(graph.node, node_names(graph)):
            for attr in node.attribute:
                bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for body in bodies:
                    inner = f"{where}{node.op_type} {name}.{attr.name}"
                    for n, nn in zip(body.node, node_names(body)):
                        if n.op_type in WEIGHT_OPS:
                            out.append({"name": nn, "op": n.op_type,
                                        "reason": f"inside the {inner} body; only main-graph layers are compressed"})
                    walk(body, inner + " > ")

    walk(model.graph, "")
    return out


# Op domains onnxruntime's CPU provider runs (the standard ops, its ML ops and its contrib ops)
RUNNABLE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training")


def check_runnable(model: onnx.ModelProto) -> None:
    """Refuse, before any work, a model with ops in domains onnxruntime cannot run (custom ops need their own
    library, which the pass cannot load): calibration runs the model."""
    local = {(f.domain, f.name) for f in model.functions}

    def nodes(graph: onnx.GraphProto):
        for n in graph.node:
            yield n
            for attr in n.attribute:
                for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    yield from nodes(body)

    for n in nodes(model.graph):
        if n.domain not in RUNNABLE_DOMAINS and (n.domain, n.op_type) not in local:
            raise OnnxspfqError(f"node {n.name or n.output[0]!r} is op {n.op_type} of custom domain {n.domain!r}, "
                                "which onnxruntime cannot run without that op's library; calibration runs the model "
                                "in onnxruntime: replace the op or export without it")
