"""Layers inside If branches and Loop bodies: which branch the calibration data takes, and a view of the model with
that branch inlined and each Loop body layer's input exposed, in which those layers are found, captured and
compressed like main-graph layers.

Why a view: onnxruntime runs a branch inside the If node and cannot return a tensor computed there, but it returns
every tensor of the view. fold_weight_chains (fold.py) has already made each weight inside a branch a main-graph
initializer that the branch reads from the outer scope, so the weights fed to the view's capture and written by the
emitters are the model's own: the output keeps the If and both branches, only the weights change.

The condition of each If that holds layers is evaluated on every calibration batch, level by level (an inlined
branch's own Ifs are decided next). Left in float, each with its reason: the layers of a branch the data never takes,
of an If whose condition differs between batches (a view follows one branch), of sub-graphs nested inside a Loop
body, and of Scan bodies. A layer directly in a Loop body is captured over all iterations: its input becomes an
extra scan output of the Loop in the view (loop_layers). Without calibration data (rtn), nothing runs: the view holds every branch's nodes so that all
their layers are found (it is only read, never run).
"""
from __future__ import annotations

import onnx
from onnx import helper

from onnxspfq.errors import OnnxspfqError
from onnxspfq.graph import (bodies, find_layers, needed_nodes, node_reads, sub_model, unique_name, walk_nodes,
                            weightless)
from onnxspfq.io import Model, session
from onnxspfq.layers import WEIGHT_OPS, Layer, ineligible, make_layer


def holds_layers(node: onnx.NodeProto) -> bool:
    """Whether a node's sub-graphs (at any depth) hold a weight op."""
    return any(n.op_type in WEIGHT_OPS for _, body in bodies(node) for _, _, n in walk_nodes(body))


def taken_view(model: Model, batches: list[dict] | None) -> tuple[Model, list[dict]]:
    """(the view, left-alone entries for the layers it does not hold); `model` itself when no If or Loop holds
    layers (the view is a copy that loop_layers may change)."""
    if not any(n.op_type in ("If", "Loop") and holds_layers(n) for n in model.graph.node):
        return model, _body_layers_left(model.graph, set())  # (Scan bodies)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    view = Model(proto=proto, base_dir=model.base_dir, path=model.path, inline=model.inline,
                 derived=model.derived, external=model.external)
    left: list[dict] = []
    mixed: set[str] = set()
    while True:
        ifs = [n for n in proto.graph.node if n.op_type == "If" and n.name not in mixed and holds_layers(n)]
        if not ifs:
            break
        if batches is None:  # data-free: every branch's nodes, for finding layers only
            for node in ifs:
                _inline(proto.graph, node, [b for _, b in bodies(node)], outputs=False)
            continue
        for node, seen in zip(ifs, _conditions(view, ifs, batches)):
            if len(seen) > 1:
                mixed.add(node.name)
                continue
            taken = "then_branch" if seen == {True} else "else_branch"
            for attr, body in bodies(node):
                if attr != taken:
                    left += [{"name": n.name, "op": n.op_type,
                              "reason": f"inside If {node.name}.{attr}, which no calibration batch takes (its "
                                        f"condition was always {seen == {True}}): left in float; calibrate with "
                                        "inputs that take it to compress it"}
                             for _, _, n in walk_nodes(body) if n.op_type in WEIGHT_OPS]
            _inline(proto.graph, node, [dict(bodies(node))[taken]], outputs=True)
    return view, left + _body_layers_left(proto.graph, mixed)


def _body_layers_left(graph: onnx.GraphProto, mixed: set[str]) -> list[dict]:
    """Left-alone entries for the weight ops the view keeps inside sub-graphs (loop_layers takes those directly
    in a Loop body)."""
    out = []
    for node in graph.node:
        for attr, body in bodies(node):
            if node.op_type == "If" and node.name in mixed:
                why = (f"inside If {node.name}, whose condition differs between calibration batches: left in float "
                       "(the capture follows one branch); calibrate with inputs that all take the same branch")
            elif node.op_type == "Loop":
                why = (f"inside a sub-graph of the Loop {node.name} body: left in float (only layers directly in "
                       "a loop body are captured)")
            else:
                why = f"inside the {node.op_type} {node.name}.{attr} body: left in float ({node.op_type} bodies are not captured)"
            out += [{"name": n.name, "op": n.op_type, "reason": why} for where, _, n in walk_nodes(body)
                    if n.op_type in WEIGHT_OPS and (node.op_type != "Loop" or where)]
    return out


def loop_layers(view: Model, skip: list[str]) -> tuple[list[Layer], list[dict]]:
    """The layers directly inside the view's Loop bodies, each input exposed as an extra scan output of its Loop
    (stacked over the iterations: Layer.stacked), and left-alone entries for those that cannot be.

    The view is changed in place (it is the capture's own copy). Body weights are main-graph initializers
    (fold_weight_chains), so the capture feeds them; when a body layer is compressed, the capture sees its fed
    weight change and runs the loop again for the next one (its consistency check), so X~ is exact."""
    g = view.graph
    inits = {t.name: t for t in g.initializer}
    overridable = {i.name for i in g.input}
    taken = {n.name for _, _, n in walk_nodes(g)} | {o for _, _, n in walk_nodes(g) for o in n.output}
    layers, left, seen = [], [], set()
    for index, node in enumerate(g.node):
        if node.op_type != "Loop":
            continue
        body = dict(bodies(node))["body"]
        for inner in list(body.node):
            if inner.op_type not in WEIGHT_OPS:
                continue
            reason = ineligible(inner, inits, overridable)
            if reason is None and inner.name in skip:
                reason = "skipped by user"
            if reason is None and inner.input[1] in seen:
                continue  # a weight shared inside the body: compressed once, at its first user
            if reason is not None:
                left.append({"name": inner.name, "op": inner.op_type, "reason": reason})
                continue
            seen.add(inner.input[1])
            scan = _expose(body, node, inner.input[0], taken)
            layer = make_layer(inner, inner.name, index, inits[inner.input[1]], {},
                               lambda t=inits[inner.input[1]]: view.array(t))
            layer.input, layer.stacked = scan, True
            layers.append(layer)
    return layers, left


def _expose(body: onnx.GraphProto, loop: onnx.NodeProto, name: str, taken: set[str]) -> str:
    """Add `name` (a body tensor) as a scan output of `loop`; returns the Loop's new output holding it."""
    inner, outer = unique_name(f"{name}__iteration", taken), unique_name(f"{name}__iterations", taken)
    body.node.append(helper.make_node("Identity", [name], [inner], name=unique_name(f"{inner}_node", taken)))
    body.output.append(onnx.ValueInfoProto(name=inner))
    loop.output.append(outer)
    return outer


def _conditions(view: Model, ifs: list[onnx.NodeProto], batches: list[dict]) -> list[set[bool]]:
    """The values each If's condition takes over the calibration batches (onnxruntime on the float model)."""
    wl, fed = weightless(view)
    conds = [n.input[0] for n in ifs]
    wanted = list(dict.fromkeys(conds))
    sources = {i.name for i in wl.graph.input}
    nodes = needed_nodes(wl.graph, wanted, sources)
    reads = {t for i in nodes for t in node_reads(wl.graph.node[i])} | set(wanted)
    inputs = [i for i in wl.graph.input if i.name in reads]
    infos = {v.name: v for v in list(wl.graph.value_info) + list(wl.graph.input) + list(wl.graph.output)}
    sub = sub_model(wl, nodes, [i.name for i in inputs], wanted, infos)
    sess = session(sub.SerializeToString())
    weights = {i.name: view.array(i.name) for i in inputs if i.name in fed}
    names = [o.name for o in sub.graph.output]
    seen: dict[str, set[bool]] = {c: set() for c in names}
    for feed in batches:
        values = sess.run(names, {**{i.name: feed[i.name] for i in inputs if i.name not in fed}, **weights})
        for c, v in zip(names, values):
            if v.size != 1:
                raise OnnxspfqError(f"the condition {c!r} of an If holds {v.size} values on the calibration data, "
                                    "not one: the model does not run on this data; check the calibration inputs")
            seen[c].add(bool(v.reshape(()).item()))
    return [seen[c] for c in conds]


def _inline(g: onnx.GraphProto, node: onnx.NodeProto, branches: list[onnx.GraphProto], outputs: bool) -> None:
    """Replace `node` in `g` by the nodes of `branches` (and, with outputs, Identity nodes from the branch's
    outputs to the If's outputs), the branches' initializers and value infos with them."""
    i = list(g.node).index(node)
    new: list[onnx.NodeProto] = []
    for body in branches:
        new += list(body.node)
        g.initializer.extend(body.initializer)
        g.value_info.extend(body.value_info)
        if outputs:
            new += [helper.make_node("Identity", [b.name], [o], name=f"{node.name}/{o}")
                    for b, o in zip(body.output, node.output) if o]
    rest = list(g.node)
    del g.node[:]
    g.node.extend(rest[:i] + new + rest[i + 1:])


def view_layers(view: Model, skip: list[str], inner: list[dict], strict: bool = True
                ) -> tuple[list[Layer], list[dict], list[dict]]:
    """The view's layers in topological order (a Loop body's at its Loop's place) and what is left alone.
    strict: refuse --skip names the view does not hold (the all-branch view holds every node)."""
    present = {n.name for _, _, n in walk_nodes(view.graph)}
    unknown = [s for s in skip if s not in present]
    main = {n.name for n in view.graph.node}
    layers, skipped = find_layers(view, skip=[s for s in skip if s in main])
    if unknown and strict:
        find_layers(view, skip=unknown)  # its one-line error naming them and the names there are
    looped, left = loop_layers(view, skip)
    return sorted(layers + looped, key=lambda layer: layer.node_index), skipped + left, inner
