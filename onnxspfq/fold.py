"""Weight chains folded into initializers: a MatMul / Gemm / Conv weight reached through Identity / Transpose /
Cast / Constant nodes becomes one initializer in the layout the node reads, and weights inside If branches and Loop
bodies (at any depth) become main-graph initializers the body reads from the outer scope (branches.py captures
those layers)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxspfq.graph import bodies, node_names, unique_name, used_names, walk_nodes
from onnxspfq.io import DERIVED, Model, as_model
from onnxspfq.layers import WEIGHT_OPS

CHAIN_OPS = ("Identity", "Transpose", "Cast")
BODY_OPS = ("If", "Loop")  # sub-graphs whose weights are lifted (branches.py captures their layers; not Scan)


def constant_attr(node: onnx.NodeProto) -> np.ndarray | None:
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
        value = constant_attr(node)
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
    Weights inside If branches and Loop bodies (at any depth) become main-graph initializers that the body reads
    from the outer scope (the same model to onnxruntime): the capture feeds them and the emitters write them like
    any other weight (branches.py finds and captures those layers). Scan bodies are left as they are.
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
    if any(n.op_type in BODY_OPS for _, _, n in walk_nodes(g)):
        taken = {n.name for _, _, n in walk_nodes(g)}

        def branches(graph: onnx.GraphProto, scopes: list[onnx.GraphProto]) -> None:
            for node in graph.node:
                for _, body in (bodies(node) if node.op_type in BODY_OPS else []):
                    _name_nodes(body, taken)
                    _fold_graph(body, scopes + [body], out, as_proto, main_names)
                    branches(body, scopes + [body])

        branches(g, [g])
    return m if as_proto else out


def _name_nodes(g: onnx.GraphProto, taken: set[str]) -> None:
    """Name a body's unnamed (or, within the body, repeated) nodes with names unused in the whole model: a view
    inlines them beside the main graph's nodes, and the emitters find a layer's node by name."""
    seen: set[str] = set()
    for i, node in enumerate(g.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        node.name = unique_name(f"{g.name or 'body'}/{node.op_type}_{i}", taken)
        seen.add(node.name)


def _fold_graph(g: onnx.GraphProto, scopes: list[onnx.GraphProto], out: Model, as_proto: bool,
                main_names: set[str]) -> None:
    """Fold the weight chains of graph `g` = scopes[-1] (scopes: the main graph, then the enclosing If branches /
    Loop bodies). In a body, folded weights and weight initializers of the body or of an enclosing body move to the
    main graph, renamed (with every read in their scope) where the name is taken there."""
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
            new = unique_name(f"{t}_folded", all_names)
        elif t not in local:
            drop_nodes.add(producers[t].name)
        all_names.add(new)
        main_names.add(new)
        if t in local:  # a branch initializer: moved to the main graph (its readers in the branch follow it)
            _lift(t, new, *local.pop(t), main, out)
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


def _lift(name: str, new: str, owner: onnx.GraphProto, tensor: onnx.TensorProto, main: onnx.GraphProto,
          out: Model) -> None:
    """Move initializer `name` of branch `owner` to the main graph as `new` (renaming its reads in the branch)."""
    moved = onnx.TensorProto()
    moved.CopyFrom(tensor)
    moved.name = new
    main.initializer.append(moved)
    kept = [x for x in owner.initializer if x.name != name]
    del owner.initializer[:]
    owner.initializer.extend(kept)
    if new != name:
        for _, _, reader in walk_nodes(owner):
            reader.input[:] = [new if i == name else i for i in reader.input]
        if name in out.derived:
            out.derived[new] = out.derived[name]


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


