"""The graph model of the ONNX pass: load a model, walk its sub-graphs, cut sub-models, make the weight-less copy
the capture runs, and find the compressible layers (weight chains are folded first: fold.py).

A layer is a MatMul / Gemm / Conv / ConvTranspose whose weight is a constant initializer; layers.py holds what
each op's weight and input look like (`Layer`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnxspfq.errors import OnnxspfqError
from onnxspfq.io import Model, as_model, open_model
from onnxspfq.wire import LAZY_MIN_ELEMENTS
from onnxspfq.layers import WEIGHT_OPS, Layer, ineligible, make_layer

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
            name = unique_name(f"{node.op_type}_{i}", taken | existing)
        taken.add(name)
        out.append(name)
    return out


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2` ... : the first not in `taken`, which it joins."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def bodies(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """The sub-graphs of a node (If branches, Loop / Scan bodies) as (attribute name, graph)."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append((a.name, a.g))
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend((a.name, sub) for sub in a.graphs)
    return out


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name of the graph and of its sub-graphs: what a new name must not take (a sub-graph's
    own name would shadow a main-graph one)."""
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    for _, body, node in walk_nodes(graph):
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        names.update(t.name for t in body.initializer)
    return names


def walk_nodes(graph: onnx.GraphProto, where: str = "") -> Iterator[tuple[str, onnx.GraphProto, onnx.NodeProto]]:
    """Every node of the graph and of its sub-graphs at any depth, as (where, the graph that holds it, node);
    `where` is "" in the main graph, else the path of bodies, e.g. "If If_0.then_branch > Loop L.body"."""
    for node in graph.node:
        yield where, graph, node
        for attr, body in bodies(node):
            inner = f"{where} > " if where else ""
            yield from walk_nodes(body, f"{inner}{node.op_type} {node.name or node.output[0]}.{attr}")


def find_node(graph: onnx.GraphProto, name: str) -> tuple[onnx.GraphProto, onnx.NodeProto] | None:
    """The node named `name` anywhere in the graph (sub-graphs included) and the graph that holds it."""
    return next(((g, n) for _, g, n in walk_nodes(graph) if n.name == name), None)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Tensors a node reads: its inputs and the outer-scope names its sub-graphs use (onnx.utils.Extractor sees
    only the inputs, and drops a Constant that only a branch reads)."""
    names = [n for n in node.input if n]
    for _, sub in bodies(node):
        names += sorted(_outer_refs(sub))
    return names


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    refs: set[str] = set()
    for node in graph.node:
        refs.update(n for n in node_reads(node) if n not in local)
        local.update(node.output)
    return refs - local


def upstream(graph: onnx.GraphProto, names: list[str]) -> set[str]:
    """`names` and every tensor they are computed from (sub-graph reads included)."""
    return set(names) | {t for i in needed_nodes(graph, names, set()) for t in node_reads(graph.node[i])}


def needed_nodes(graph: onnx.GraphProto, outputs: list[str], stop: set[str]) -> list[int]:
    """Indices (in order) of the nodes computing `outputs` from the names in `stop`, sub-graph reads included."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in seen:
            continue
        seen.add(i)
        stack += [t for t in node_reads(graph.node[i]) if t not in stop]
    return sorted(seen)


def sub_model(model: onnx.ModelProto, nodes: list[int], inputs: list[str], outputs: list[str],
              infos: dict[str, onnx.ValueInfoProto], constants: list[str] = ()) -> onnx.ModelProto:
    """The model of nodes `nodes` of `model`'s graph, fed `inputs`, returning `outputs` (typed from `infos`; an
    output without one is left untyped), with the initializers and value infos those nodes read.
    `constants` (names typed in `infos`) become initializers without data, whose arrays io.session supplies
    (`initializers`): onnxruntime then treats them as constant weights, not as inputs (module io, session)."""
    g = onnx.GraphProto(name="segment")
    g.node.extend(model.graph.node[i] for i in nodes)
    names = used_names(g) | {o for n in g.node for o in n.output}
    g.input.extend(infos[t] for t in inputs)
    g.initializer.extend(_placeholder(infos[t]) for t in constants)
    g.output.extend(infos.get(t) or onnx.ValueInfoProto(name=t) for t in outputs)
    g.initializer.extend(t for t in model.graph.initializer if t.name in names)
    io = set(inputs) | set(outputs)
    g.value_info.extend(v for v in model.graph.value_info if v.name in names and v.name not in io)
    m = onnx.helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m


def _placeholder(info: onnx.ValueInfoProto) -> onnx.TensorProto:
    """An initializer of `info`'s name, type and (static) shape marked as external data at no location: its array
    is given at session creation (SessionOptions.add_external_initializers), never read from a file."""
    t = onnx.TensorProto(name=info.name, data_type=info.type.tensor_type.elem_type,
                         dims=[d.dim_value for d in info.type.tensor_type.shape.dim],
                         data_location=onnx.TensorProto.EXTERNAL)
    t.external_data.add(key="location", value="supplied-at-session-creation")
    return t


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of the graph or of its sub-graphs (If / Loop / Scan bodies)."""
    return {n for _, _, node in walk_nodes(graph) for n in node.input if n}


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
                                  "weights are compressed as layers (embedding tables: --embeddings)"})
    return layers, skipped


# Op domains onnxruntime's CPU provider runs (the standard ops, its ML ops and its contrib ops)
RUNNABLE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training")


def check_runnable(model: onnx.ModelProto) -> None:
    """Refuse, before any work, a model with ops in domains onnxruntime cannot run (custom ops need their own
    library, which the pass cannot load): calibration runs the model."""
    local = {(f.domain, f.name) for f in model.functions}
    for _, _, n in walk_nodes(model.graph):
        if n.domain not in RUNNABLE_DOMAINS and (n.domain, n.op_type) not in local:
            raise OnnxspfqError(f"node {n.name or n.output[0]!r} is op {n.op_type} of custom domain {n.domain!r}, "
                                "which onnxruntime cannot run without that op's library; calibration runs the model "
                                "in onnxruntime: replace the op or export without it")
