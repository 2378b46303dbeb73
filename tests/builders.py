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


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def mlp(widths: list[int], dtype=np.float32, seed: int = 0, batch: str = "N") -> onnx.ModelProto:
    """x [batch, widths[0]] -> (MatMul -> Relu) ... -> y, weights N(0, 1/fan_in) in `dtype` (float16 models)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype), f"W{i}"))
        last = i == len(widths) - 2
        nodes.append(h.make_node("MatMul", [prev, f"W{i}"], ["y" if last else f"m{i}"], name=f"mm{i}"))
        if not last:
            nodes.append(h.make_node("Relu", [f"m{i}"], [f"r{i}"]))
            prev = f"r{i}"
    return _model(nodes, [h.make_tensor_value_info("x", elem, [batch, widths[0]])],
                  [h.make_tensor_value_info("y", elem, [batch, widths[-1]])], inits)


def gru_head(inp: int = 16, hidden: int = 8, out: int = 4, seed: int = 0) -> onnx.ModelProto:
    """ONNX GRU in its default layout, X [seq, batch, inp] and initial_h [1, batch, hidden] (the batch is axis 1 of
    both), then Y_h [1, batch, hidden] -> MatMul W [hidden, out]: a model whose batch axis is not axis 0."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    f = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32))
    W, R, B, M = f(1, 3 * hidden, inp), f(1, 3 * hidden, hidden), f(1, 6 * hidden), f(hidden, out)
    W.name, R.name, B.name, M.name = "gru_W", "gru_R", "gru_B", "head_W"
    nodes = [h.make_node("GRU", ["X", "gru_W", "gru_R", "gru_B", "", "h0"], ["Y", "Y_h"], hidden_size=hidden,
                         name="gru"),
             h.make_node("MatMul", ["Y_h", "head_W"], ["y"], name="head")]
    return _model(nodes, [h.make_tensor_value_info("X", TensorProto.FLOAT, ["seq", "batch", inp]),
                          h.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", hidden])],
                  [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, "batch", out])], [W, R, B, M])


def token_encoder(vocab: int = 50, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    """input_ids [batch, seq] -> Gather embedding -> MatMul -> hidden [batch, seq, width], whose FIRST output is the
    token ids themselves ([batch, seq], as some sentence-embedding exports list them): outputs whose shape varies
    between unpadded batches."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    E = numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32), "embed")
    W = numpy_helper.from_array((rng.standard_normal((width, width)) / 4).astype(np.float32), "W")
    nodes = [h.make_node("Identity", ["input_ids"], ["ids"]),
             h.make_node("Gather", ["embed", "input_ids"], ["e"]),
             h.make_node("MatMul", ["e", "W"], ["hidden"], name="proj")]
    return _model(nodes, [h.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                  [h.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
                   h.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", width])], [E, W])


def with_if_body(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` plus an If node whose then / else bodies each hold a MatMul with a constant weight (a layer the pass
    leaves alone and `inspect` must list)."""
    from onnx import numpy_helper

    def body(tag: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(np.eye(2, dtype=np.float32), f"{tag}_W")
        c = h.make_node("Constant", [], [f"{tag}_x"], value=numpy_helper.from_array(np.ones((1, 2), np.float32)))
        return h.make_graph([c, h.make_node("MatMul", [f"{tag}_x", f"{tag}_W"], [f"{tag}_y"], name=f"{tag}_mm")],
                            tag, [], [h.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, [1, 2])], [w])

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    g.node.extend([h.make_node("Constant", [], ["cond"], value=h.make_tensor("c", TensorProto.BOOL, [], [True])),
                   h.make_node("If", ["cond"], ["branch"], then_branch=body("then"), else_branch=body("else"),
                               name="branchy")])
    g.output.append(h.make_tensor_value_info("branch", TensorProto.FLOAT, [1, 2]))
    onnx.checker.check_model(m)
    return m


def conv_transpose(c_in: int = 4, c_out: int = 6, kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1),
                   output_padding=(1, 1), dilations=None, bias: bool = True, seed: int = 0,
                   head: bool = False) -> onnx.ModelProto:
    """x [N, c_in, *spatial] -> ConvTranspose (one group) [-> Relu -> Conv 1x1 head when `head`]: an upsampling
    block as PP-OCR detectors and U-Nets have."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    nd = len(kernel)
    W = numpy_helper.from_array((rng.standard_normal((c_in, c_out) + tuple(kernel)) * 0.3).astype(np.float32), "Wt")
    inits, ins = [W], ["x", "Wt"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "bt"))
        ins.append("bt")
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads),
             "output_padding": list(output_padding)}
    if dilations is not None:
        attrs["dilations"] = list(dilations)
    nodes = [h.make_node("ConvTranspose", ins, ["up"], name="deconv", **attrs)]
    out = "up"
    if head:
        inits.append(numpy_helper.from_array((rng.standard_normal((2, c_out) + (1,) * nd) * 0.3).astype(np.float32),
                                             "Wh"))
        nodes += [h.make_node("Relu", ["up"], ["r"]), h.make_node("Conv", ["r", "Wh"], ["y"], name="head")]
        out = "y"
    spatial = ["H", "W", "D"][:nd]
    return _model(nodes, [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in] + spatial)],
                  [h.make_tensor_value_info(out, TensorProto.FLOAT, ["N", c_out if not head else 2] + [None] * nd)],
                  inits)
