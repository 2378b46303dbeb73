"""Model side of the ONNX pass: load a model, fold constant weight chains, and find the compressible layers.

A layer is a MatMul / Gemm / Conv / ConvTranspose whose weight is a constant initializer; layers.py holds what
each op's weight and input look like (`Layer`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

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


def bodies(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """The sub-graphs of a node (If branches, Loop / Scan bodies) as (attribute name, graph)."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append((a.name, a.g))
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend((a.name, sub) for sub in a.graphs)
    return out


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
              infos: dict[str, onnx.ValueInfoProto]) -> onnx.ModelProto:
    """The model of nodes `nodes` of `model`'s graph, fed `inputs`, returning `outputs` (typed from `infos`; an
    output without one is left untyped), with the initializers and value infos those nodes read."""
    g = onnx.GraphProto(name="segment")
    g.node.extend(model.graph.node[i] for i in nodes)
    names = used_names(g) | {o for n in g.node for o in n.output}
    g.input.extend(infos[t] for t in inputs)
    g.output.extend(infos.get(t) or onnx.ValueInfoProto(name=t) for t in outputs)
    g.initializer.extend(t for t in model.graph.initializer if t.name in names)
    io = set(inputs) | set(outputs)
    g.value_info.extend(v for v in model.graph.value_info if v.name in names and v.name not in io)
    m = onnx.helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of the graph or of its sub-graphs (If / Loop / Scan bodies)."""
    return {n for _, _, node in walk_nodes(graph) for n in node.input if n}


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
    Weights inside If branches (at any depth) become main-graph initializers that the branch reads from the outer
    scope (the same model to onnxruntime): the capture feeds them and the emitters write them like any other
    weight (branches.py finds and captures those layers). Loop / Scan bodies are left as they are.
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
    main_names = {t.name for t in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    _fold_graph(g, [g], out, as_proto, main_names)
    if any(n.op_type == "If" for _, _, n in walk_nodes(g)):
        taken = {n.name for _, _, n in walk_nodes(g)}

        def branches(graph: onnx.GraphProto, scopes: list[onnx.GraphProto]) -> None:
            for node in graph.node:
                for _, body in (bodies(node) if node.op_type == "If" else []):
                    _name_nodes(body, taken)
                    _fold_graph(body, scopes + [body], out, as_proto, main_names)
                    branches(body, scopes + [body])

        branches(g, [g])
    return m if as_proto else out


def _name_nodes(g: onnx.GraphProto, taken: set[str]) -> None:
    """Give the nodes of a branch names unique in the whole model (a view of the model inlines them next to the
    main graph's nodes, and the emitters find a layer's node by name)."""
    seen: set[str] = set()
    for i, node in enumerate(g.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{g.name or 'body'}/{node.op_type}_{i}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)
        seen.add(name)


def _fold_graph(g: onnx.GraphProto, scopes: list[onnx.GraphProto], out: Model, as_proto: bool,
                main_names: set[str]) -> None:
    """Fold the weight chains of graph `g` = scopes[-1] (scopes: the main graph, then the enclosing If branches).
    In a branch, folded weights and weight initializers of the branch or of an enclosing branch move to the main
    graph, renamed (with every read in their scope) where the name is taken there."""
    main = scopes[0]
    local = {t.name: (owner, t) for owner in scopes[1:] for t in owner.initializer}
    inits = {**{t.name: t for t in main.initializer}, **{k: t for k, (_, t) in local.items()}}
    producers = {o: n for n in g.node for o in n.output if o}
    graph_outputs = {o.name for o in g.output}
    all_names = set(producers) | set(inits) | {i.name for i in g.input} | main_names
    folded: dict[str, str] = {}
    drop_nodes: set[str] = set()
    roots: set[str] = set()
    for node in g.node:
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        t = node.input[1]
        if not t or t in folded:
            node.input[1] = folded.get(t, t)
            continue
        if t in inits and t not in local:
            continue
        chain = None if t in local else _chain(t, producers, inits, out)
        if t not in local and chain is None:
            continue
        new = t
        if t in graph_outputs or (g is not main and t in main_names):
            new, k = f"{t}_folded", 1
            while new in all_names:
                new, k = f"{t}_folded_{k}", k + 1
        elif t not in local:
            drop_nodes.add(producers[t].name)
        all_names.add(new)
        main_names.add(new)
        if t in local:  # a branch initializer: moved to the main graph (its readers in the branch follow it)
            owner, tensor = local.pop(t)
            moved = onnx.TensorProto()
            moved.CopyFrom(tensor)
            moved.name = new
            main.initializer.append(moved)
            kept = [x for x in owner.initializer if x.name != t]
            del owner.initializer[:]
            owner.initializer.extend(kept)
            if new != t:
                for _, _, reader in walk_nodes(owner):
                    reader.input[:] = [new if i == t else i for i in reader.input]
                if t in out.derived:
                    out.derived[new] = out.derived[t]
        else:
            dims, dtype, read = chain
            if as_proto:
                main.initializer.append(numpy_helper.from_array(np.asarray(read()), new))
            else:
                main.initializer.append(_derived_tensor(new, dims, dtype))
                out.derived[new] = read
            roots |= _chain_sources(t, producers)
        inits[new] = main.initializer[-1]
        folded[t] = new
        node.input[1] = new
    if drop_nodes or roots:
        _drop_dead_chains(g, drop_nodes, roots, {k: t for k, (_, t) in local.items()} if g is not main else inits,
                          graph_outputs)


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
    used = used_names(g) | graph_outputs
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
    return used_names(g)


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
