"""Shared helpers for the emitter tests (emit_nbits, emit_sparse, emit_qdq).

Layers come from the REAL onnxspfq.graph.find_layers run on the small test model, so the emitters are tested
against the contract the pipeline hands them. Deliberately broken layers (a weight or node name that is not in
the model) are made with dataclasses.replace on a real Layer, so no stand-in Layer class is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort

from onnxspfq.graph import find_layers, node_names
from onnxspfq.fold import fold_weight_chains
from onnxspfq.layers import Layer


@dataclass
class Result:
    """A method result as the emitters read it: int codes (N1, N0), scales (N1, blocks), block size."""

    codes: np.ndarray
    scale: np.ndarray
    block_size: int


def real_layers(model: onnx.ModelProto, *names: str) -> list[Layer]:
    """The graph.Layer of each named node of `model`, as find_layers(fold_weight_chains(model)) reports it.

    find_layers reports a shared weight once (its first user, `shared_with` naming the others); a later user named
    here gets that Layer with its own node name, index, input and output, as the pipeline sees each consumer.
    """
    folded = fold_weight_chains(model)
    layers, skipped = find_layers(folded)
    by_name = {layer.name: layer for layer in layers}
    nodes = dict(zip(node_names(folded.graph), enumerate(folded.graph.node)))
    out = []
    for name in names:
        if name in by_name:
            out.append(by_name[name])
            continue
        first = next((layer for layer in layers if name in layer.shared_with), None)
        if first is None:
            raise KeyError(f"find_layers reports no layer for node {name!r} (found {sorted(by_name)}, "
                           f"skipped {skipped})")
        i, node = nodes[name]
        others = [first.name] + [s for s in first.shared_with if s != name]
        out.append(replace(first, name=name, node_index=i, input=node.input[0], output=node.output[0],
                           shared_with=others))
    return out


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A single-threaded, non-spinning CPU onnxruntime session for `model` (quiet on a 2-core machine)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
