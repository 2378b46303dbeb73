"""Synthetic models built for a property no bundled model has (size past 2 GB, external data), written tensor by
tensor so that building a model never holds all of its weights. Shared by the tests and tools/bench_memory.py."""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h


def matmul_chain(path: str | os.PathLike, width: int, layers: int, seed: int = 0, batch: str = "N") -> int:
    """x [batch, width] -> (MatMul W_i [width, width] -> Relu) x layers -> y, weights N(0, 1/width) in
    `<path>.data` (external data). Returns the weight bytes written."""
    path = os.fspath(path)
    location = os.path.basename(path) + ".data"
    rng = np.random.default_rng(seed)
    nodes, inits, prev, offset = [], [], "x", 0
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), location), "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
            f.write(w.tobytes())
            t = TensorProto(name=f"W{i}", dims=[width, width], data_type=TensorProto.FLOAT,
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(w.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += w.nbytes
            inits.append(t)
            out = f"h{i}" if i < layers - 1 else "y"
            nodes.append(h.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"mm{i}"))
            nodes.append(h.make_node("Relu", [f"m{i}"], [out], name=f"relu{i}"))
            prev = out
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return offset
