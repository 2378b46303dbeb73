"""Embedding tables (--embeddings int8): a Gather that looks rows up in a constant float32 / float16 table along
axis 0 (a transformer's token and position embeddings; MiniLM-L6's are half of its weights) stored as int8 codes
with one symmetric float32 scale per row, read by a Gather on the codes, a Cast and a Mul by the gathered row
scales (then a Cast back for a float16 table):

    Gather(table, ids)  ->  Mul(Cast(Gather(codes, ids), float), Unsqueeze(Gather(scales, ids), -1))

Standard ops only (any runtime), and no whole-table DequantizeLinear per run (onnxruntime would de-quantize all
rows on every call; the Gather reads only the rows asked for). A row is looked up, not multiplied with data, so
there is nothing to fit: nearest rounding, at most half a step (max|row| / 254) per entry. A table that any other
node reads too (a decoder's lm_head tied to its embedding) is left to the layer that owns it; a table several
Gathers read (an encoder-decoder's shared embedding) is stored once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxspfq.io import Model

TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)  # a float16 table: the rows are computed in float32, then cast
MIN_ELEMENTS = 1 << 16  # smaller tables (MiniLM-L6's 2 x 384 token types) are not worth three nodes
QMAX = 127


@dataclass(frozen=True)
class Table:
    """One quantizable embedding table: its initializer, its shape, and the output tensors of the Gathers that
    read it (outputs are unique, unlike node names; an encoder-decoder's shared table has two)."""

    table: str
    shape: tuple[int, int]
    outputs: tuple[str, ...]
    dtype: int = TensorProto.FLOAT  # the table's ONNX element type


def find(model: onnx.ModelProto) -> list[Table]:
    """The 2-D float32 / float16 initializers of >= MIN_ELEMENTS that only main-graph Gathers along axis 0 read."""
    from onnxspfq.graph import walk_nodes

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[tuple[str, onnx.NodeProto]]] = {}  # (where: "" in the main graph, node)
    for where, _, n in walk_nodes(g):
        for i in n.input:
            if i in inits:
                readers.setdefault(i, []).append((where, n))
    outputs = {o.name for o in g.output}
    out = []
    for name, nodes in readers.items():
        t = inits[name]
        if (t.data_type not in TYPES or len(t.dims) != 2 or name in outputs
                or int(t.dims[0]) * int(t.dims[1]) < MIN_ELEMENTS):
            continue
        if all(n.op_type == "Gather" and where == "" and n.input[0] == name and n.input[1] != name
               and next((a.i for a in n.attribute if a.name == "axis"), 0) == 0 for where, n in nodes):
            out.append(Table(name, (int(t.dims[0]), int(t.dims[1])), tuple(n.output[0] for _, n in nodes),
                             int(t.data_type)))
    return out


def check(source: Model, tables: list[Table]) -> None:
    """Refuse, before any work, a table holding NaN or Inf (it has no int8 form)."""
    from onnxspfq.errors import OnnxspfqError

    for tab in tables:
        if not np.all(np.isfinite(source.array(tab.table))):
            raise OnnxspfqError(f"embedding table {tab.table!r} holds NaN or Inf, which int8 cannot store: fix the "
                                "model, or keep the tables float with --embeddings float")


def quantize(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float32 scale per row): scale = max|row| / 127 (1 for an all-zero row), codes = round(row /
    scale) to nearest even, as QuantizeLinear rounds."""
    w = np.asarray(table, dtype=np.float32)
    top = np.max(np.abs(w), axis=1)
    if not np.all(np.isfinite(top)):
        raise ValueError("embedding table holds NaN or Inf")
    scale = np.where(top > 0, top / QMAX, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / scale[:, None]), -QMAX, QMAX).astype(np.int8)
    return codes, scale


def dequantize(codes: np.ndarray, scale: np.ndarray, dtype=np.float32) -> np.ndarray:
    """What the emitted nodes compute for every row: float32(code) * scale, in the table's type."""
    return (codes.astype(np.float32) * scale[:, None]).astype(dtype)


def emit(model: onnx.ModelProto, source: Model, tables: list[Table]) -> tuple[onnx.ModelProto, int, int]:
    """`model` (modified in place) with each table stored as codes + row scales and its Gather rewritten; returns
    (model, bytes of the float tables, bytes of what replaced them)."""
    from onnxspfq.emit_qdq import default_opset
    from onnxspfq.graph import all_names, unique_name

    g = model.graph
    taken = all_names(g)
    gathers = {n.output[0]: n for n in g.node if n.op_type == "Gather"}
    index = {t.name: i for i, t in enumerate(g.initializer)}
    before = after = 0
    opset = default_opset(model)
    after_node: dict[str, list[onnx.NodeProto]] = {}
    for tab in tables:
        codes, scale = quantize(source.array(tab.table))
        before += codes.size * (2 if tab.dtype == TensorProto.FLOAT16 else 4)
        after += codes.nbytes + scale.nbytes
        c_name, s_name = unique_name(f"{tab.table}_int8", taken), unique_name(f"{tab.table}_row_scale", taken)
        g.initializer[index[tab.table]].CopyFrom(numpy_helper.from_array(codes, c_name))
        g.initializer.append(numpy_helper.from_array(scale, s_name))
        if any(i.name == tab.table for i in g.input):  # an initializer listed as an input (IR < 4): no longer one
            kept = [i for i in g.input if i.name != tab.table]
            del g.input[:]
            g.input.extend(kept)
        for output in tab.outputs:
            gather = gathers[output]
            base = gather.name or output
            ids = gather.input[1]
            got, rows, cast, scl = (unique_name(f"{output}_{s}", taken) for s in ("codes", "scales", "float", "scale"))
            gather.input[0], gather.output[0] = c_name, got
            new = [helper.make_node("Gather", [s_name, ids], [rows], name=unique_name(f"{base}_scales", taken)),
                   helper.make_node("Cast", [got], [cast], to=TensorProto.FLOAT, name=unique_name(f"{base}_cast", taken))]
            if opset >= 13:
                axes = unique_name(f"{output}_axes", taken)
                g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
                new.append(helper.make_node("Unsqueeze", [rows, axes], [scl], name=unique_name(f"{base}_unsqueeze", taken)))
            else:
                new.append(helper.make_node("Unsqueeze", [rows], [scl], axes=[-1],
                                            name=unique_name(f"{base}_unsqueeze", taken)))
            wtype = tab.dtype
            product = output if wtype == TensorProto.FLOAT else unique_name(f"{output}_float", taken)
            new.append(helper.make_node("Mul", [cast, scl], [product], name=unique_name(f"{base}_mul", taken)))
            if product != output:  # a float16 table: its readers get float16 rows, as before
                new.append(helper.make_node("Cast", [product], [output], to=wtype,
                                            name=unique_name(f"{base}_cast_back", taken)))
            after_node[got] = new  # by the Gather's new output: names, not message objects, are stable
    rebuilt = []
    for n in g.node:  # each table's new nodes right after its Gather: the list stays sorted
        rebuilt += [n] + after_node.get(n.output[0] if n.output else "", [])
    del g.node[:]
    g.node.extend(rebuilt)
    return model, before, after
