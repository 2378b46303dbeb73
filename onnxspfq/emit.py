"""The one emitter interface: every output format takes the same items and returns the model, the bytes each
layer's weight takes in it, and the layers it could not hold; `emit` writes those left as QDQ.

Formats: qdq (emit_qdq: DequantizeLinear on packed integers), nbits (emit_nbits: com.microsoft.MatMulNBits for
MatMul / Gemm), sparse (emit_sparse: float weights as sparse initializers where smaller), float (the compressed
float values in the weight's own type: de-quantized codes, or the pruned weights when only pruning).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxspfq.emit_nbits import emit_nbits
from onnxspfq.emit_qdq import dequantize
from onnxspfq.emit_qdq import emit as emit_qdq
from onnxspfq.emit_sparse import emit_sparse
from onnxspfq.errors import OnnxspfqError
from onnxspfq.graph import walk_nodes
from onnxspfq.io import Model, as_model
from onnxspfq.layers import Layer


@dataclass
class Item:
    """One compressed layer: its result (codes and scales; None when pruning only), bits (None: prune only), and
    `values`, the compressed float weight in W0's layout (needed by the float formats when there are no codes)."""

    layer: Layer
    result: object | None
    bits: int | None
    values: np.ndarray | None = None

    def floats(self) -> np.ndarray:
        """The compressed weight as floats in W0's layout."""
        if self.values is not None:
            return self.values
        return self.layer.tensor(dequantize(self.result))


@dataclass
class Emitted:
    """What a format wrote: the model, bytes of each layer's weight tensors in it (by layer name), items left."""

    model: onnx.ModelProto
    nbytes: dict[str, int] = field(default_factory=dict)
    left: list[Item] = field(default_factory=list)


def _sizes(graph: onnx.GraphProto) -> dict[str, int]:
    sizes = {t.name: t.ByteSize() for t in graph.initializer}
    sizes.update({s.values.name: s.ByteSize() for s in graph.sparse_initializer})
    return sizes


def _bytes(graph: onnx.GraphProto, names: dict[str, list[str]]) -> dict[str, int]:
    """Bytes of the tensors each layer's weight became (names: layer -> tensor names); a name not in the graph is
    an emitter bug, not a zero."""
    sizes = _sizes(graph)
    missing = [(layer, n) for layer, ns in names.items() for n in ns if n and n not in sizes]
    if missing:
        raise OnnxspfqError(f"internal check failed: emitted tensors {missing[:3]} are not in the model; please "
                            "report this")
    return {layer: sum(sizes[n] for n in ns if n) for layer, ns in names.items()}


def qdq(model: onnx.ModelProto, items: list[Item], source: Model) -> Emitted:
    out = emit_qdq(model, [(i.layer, i.result, i.bits) for i in items], fmt="qdq")
    dq = {n.output[0]: n for n in out.graph.node if n.op_type == "DequantizeLinear"}
    cast = {n.output[0]: n.input[0] for n in out.graph.node if n.op_type == "Cast"}
    names = {}
    for i in items:
        node = dq.get(i.layer.weight) or dq.get(cast.get(i.layer.weight, ""))
        names[i.layer.name] = list(node.input) if node is not None else [i.layer.weight]
    return Emitted(out, _bytes(out.graph, names))


def nbits(model: onnx.ModelProto, items: list[Item], source: Model, accuracy_level: int = 0) -> Emitted:
    out, rest = emit_nbits(model, [(i.layer, i.result, i.bits) for i in items], accuracy_level=accuracy_level,
                           source=source)
    rest = set(rest)
    nodes = {n.name: n for _, _, n in walk_nodes(out.graph) if n.op_type == "MatMulNBits"}
    done = [i for i in items if i.layer.name not in rest]
    names = {i.layer.name: list(nodes[i.layer.name].input[1:4]) for i in done}  # B, scales, zero points
    return Emitted(out, _bytes(out.graph, names), [i for i in items if i.layer.name in rest])


def sparse(model: onnx.ModelProto, items: list[Item], source: Model) -> Emitted:
    out = emit_sparse(model, [(i.layer, i.layer.matrix(i.floats())) for i in items])
    return Emitted(out, _bytes(out.graph, {i.layer.name: [i.layer.weight] for i in items}))


def float_(model: onnx.ModelProto, items: list[Item], source: Model) -> Emitted:
    """The compressed float values in each weight's own type (float32 / float16 / bfloat16 / double)."""
    values = {i.layer.weight: np.ascontiguousarray(i.floats(), dtype=np.float32).astype(i.layer.weight_dtype)
              for i in items}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return Emitted(out, _bytes(out.graph, {i.layer.name: [i.layer.weight] for i in items}))


FORMATS = {"qdq": qdq, "nbits": nbits, "sparse": sparse, "float": float_}


def emit(fmt: str, model: onnx.ModelProto | Model, items: list[Item], accuracy_level: int = 0) -> Emitted:
    """`model` with every item written in format `fmt`; what the format leaves (e.g. Conv under nbits) as QDQ.
    accuracy_level: MatMulNBits' attribute (nbits only)."""
    if fmt not in FORMATS:
        raise OnnxspfqError(f"unknown output format {fmt!r}: use one of {', '.join(FORMATS)}")
    source = as_model(model)
    if fmt == "nbits":
        out = nbits(source.proto, items, source, accuracy_level)
    else:
        out = FORMATS[fmt](source.proto, items, source)
    if out.left:
        rest = qdq(out.model, out.left, source)
        out = Emitted(rest.model, {**out.nbytes, **rest.nbytes})
    return out
