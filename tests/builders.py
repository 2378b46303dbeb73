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


def masked_encoder(vocab: int = 40, width: int = 12, seed: int = 0) -> onnx.ModelProto:
    """input_ids and attention_mask [batch, seq] -> Gather embedding -> MatMul -> Relu -> MatMul -> hidden, and
    the masked mean of hidden over the sequence (sentence_embedding [batch, width]): a padded-batch encoder whose
    padding positions do not reach its pooled output."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32), "embed"),
             numpy_helper.from_array((rng.standard_normal((width, width)) / 3).astype(np.float32), "W1"),
             numpy_helper.from_array((rng.standard_normal((width, width)) / 3).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"), numpy_helper.from_array(np.array([1], np.int64), "seq_axis")]
    nodes = [h.make_node("Gather", ["embed", "input_ids"], ["e"]),
             h.make_node("MatMul", ["e", "W1"], ["a"], name="fc1"), h.make_node("Relu", ["a"], ["r"]),
             h.make_node("MatMul", ["r", "W2"], ["hidden"], name="fc2"),
             h.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             h.make_node("Unsqueeze", ["mf", "last"], ["m3"]), h.make_node("Mul", ["hidden", "m3"], ["hm"]),
             h.make_node("ReduceSum", ["hm", "seq_axis"], ["s"], keepdims=0),
             h.make_node("ReduceSum", ["m3", "seq_axis"], ["n"], keepdims=0),
             h.make_node("Div", ["s", "n"], ["sentence_embedding"])]
    ids = [h.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")]
    return _model(nodes, ids, [h.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", width]),
                               h.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", width])], inits)


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


def branchy(width: int = 16, inline: str | None = None, nested: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x [N, width], sr int64 [] -> MatMul W0 -> If(sr == 16) -> y [N, 4]: the then branch holds two MatMuls
    (weight T1 a Constant node of the branch, T2 a branch initializer), the else branch one (E1, a Constant), as
    silero-vad's If on its sample rate does. inline "then_branch" / "else_branch": the same model with that branch
    written into the main graph instead (same names, no If): what compressing the If model must reproduce.
    nested: T2's MatMul sits inside a second If (always true) inside the then branch."""
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    W0, T1, T2, E1 = w(width, width), w(width, width), w(width, 4), w(width, 4)
    const = lambda name, a: h.make_node("Constant", [], [name], value=nh.from_array(a, name + "_value"), name=name)
    inner = [h.make_node("MatMul", ["t_relu", "T2"], ["t_out"], name="t_mm2")]
    if nested:
        body = h.make_graph(inner, "inner", [], [h.make_tensor_value_info("t_out", TensorProto.FLOAT, None)], [])
        flag = h.make_node("Constant", [], ["t_flag"], value=h.make_tensor("f", TensorProto.BOOL, [], [True]),
                           name="t_flag")
        inner = [flag, h.make_node("If", ["t_flag"], ["t_out2"], then_branch=body, else_branch=body, name="t_if")]
    then_nodes = [const("T1", T1), h.make_node("MatMul", ["h", "T1"], ["t1"], name="t_mm1"),
                  h.make_node("Relu", ["t1"], ["t_relu"], name="t_relu")] + inner
    then_out = "t_out2" if nested else "t_out"
    else_nodes = [const("E1", E1), h.make_node("MatMul", ["h", "E1"], ["e_out"], name="e_mm1")]
    then_g = h.make_graph(then_nodes, "then", [], [h.make_tensor_value_info(then_out, TensorProto.FLOAT, None)],
                          [nh.from_array(T2, "T2")])
    else_g = h.make_graph(else_nodes, "else", [], [h.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    head = [h.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
            h.make_node("Constant", [], ["sixteen"], value=h.make_tensor("s", TensorProto.INT64, [], [16]),
                        name="sixteen"),
            h.make_node("Equal", ["sr", "sixteen"], ["is16"], name="is16")]
    inputs = [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width]),
              h.make_tensor_value_info("sr", TensorProto.INT64, [])]
    inits = [nh.from_array(W0, "W0")]
    if inline is None:
        nodes = head + [h.make_node("If", ["is16"], ["y"], then_branch=then_g, else_branch=else_g, name="rate_if")]
    else:
        g = then_g if inline == "then_branch" else else_g
        nodes = head + list(g.node) + [h.make_node("Identity", [g.output[0].name], ["y"], name="out")]
        inits += list(g.initializer)
    return _model(nodes, inputs, [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)


def looped(width: int = 8, seed: int = 0, nested_if: bool = False) -> onnx.ModelProto:
    """x [N, width] -> MatMul W0 -> Loop (2 iterations; body: v -> MatMul L1 -> Relu -> MatMul L2, carried) -> y:
    layers inside a loop body, their input different in every iteration. nested_if: the body's L2 MatMul sits in
    an If inside the body (a layer the capture does not reach)."""
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(seed)
    W0, L1, L2 = ((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32) for _ in range(3))
    second = [h.make_node("MatMul", ["r", "L2"], ["v_sub" if nested_if else "v_out"], name="l_mm2")]
    if nested_if:
        sub = h.make_graph(second, "sub", [], [h.make_tensor_value_info("v_sub", TensorProto.FLOAT, None)])
        second = [h.make_node("Constant", [], ["yes"], value=h.make_tensor("y", TensorProto.BOOL, [], [True]),
                              name="l_yes"),
                  h.make_node("If", ["yes"], ["v_out2"], then_branch=sub, else_branch=sub, name="l_if"),
                  h.make_node("Identity", ["v_out2"], ["v_out"], name="l_id")]
    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"], name="l_cond"),
         h.make_node("MatMul", ["v_in", "L1"], ["m1"], name="l_mm1"),
         h.make_node("Relu", ["m1"], ["r"], name="l_relu")] + second,
        "body", [h.make_tensor_value_info("i", TensorProto.INT64, []),
                 h.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 h.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [h.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         h.make_tensor_value_info("v_out", TensorProto.FLOAT, None)], [nh.from_array(L1, "L1"), nh.from_array(L2, "L2")])
    nodes = [h.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
             h.make_node("Constant", [], ["trips"], value=h.make_tensor("t", TensorProto.INT64, [], [2]), name="trips"),
             h.make_node("Constant", [], ["go"], value=h.make_tensor("g", TensorProto.BOOL, [], [True]), name="go"),
             h.make_node("Loop", ["trips", "go", "h"], ["y"], body=body, name="loop")]
    return _model(nodes, [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                  [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], [nh.from_array(W0, "W0")])


def residual_cnn(seed: int = 0) -> onnx.ModelProto:
    """x [N, 4, 8, 8] -> a ResNet-like net with three Adds after Convs: `res_down` adds a block's Conv output to a
    1 x 1 downsample Conv's (the skip: the shorter branch, read by nothing else), `not_res` adds a Conv's output to
    its own Relu (x + f(x), no residual), `res_sig` adds a Conv's output to a Sigmoid of an earlier tensor (a skip
    no layer reads) -> GlobalAveragePool -> Flatten -> Gemm -> y [N, 3]."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    inits = []

    def conv(name, x, c_in, c_out, k, nodes):
        inits.append(numpy_helper.from_array((rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * k * k))
                                             .astype(np.float32), f"{name}_W"))
        nodes.append(h.make_node("Conv", [x, f"{name}_W"], [f"{name}_y"], name=name, pads=[k // 2] * 4))
        return f"{name}_y"

    n = []
    r0 = conv("c0", "x", 4, 8, 3, n)
    n.append(h.make_node("Relu", [r0], ["r0"]))
    n.append(h.make_node("Relu", [conv("c1", "r0", 8, 8, 3, n)], ["r1"]))
    n.append(h.make_node("Add", [conv("c2", "r1", 8, 8, 3, n), conv("down", "r0", 8, 8, 1, n)], ["a1"], name="res_down"))
    n.append(h.make_node("Relu", ["a1"], ["r2"]))
    t3 = conv("c3", "r2", 8, 8, 1, n)
    n.append(h.make_node("Relu", [t3], ["r3"]))
    n.append(h.make_node("Add", [t3, "r3"], ["a2"], name="not_res"))
    n.append(h.make_node("Sigmoid", ["r2"], ["s"]))
    n.append(h.make_node("Add", [conv("c4", "a2", 8, 8, 3, n), "s"], ["a3"], name="res_sig"))
    n.append(h.make_node("GlobalAveragePool", ["a3"], ["p"]))
    n.append(h.make_node("Flatten", ["p"], ["f"]))
    inits.append(numpy_helper.from_array((rng.standard_normal((8, 3)) / np.sqrt(8)).astype(np.float32), "G_W"))
    n.append(h.make_node("Gemm", ["f", "G_W"], ["y"], name="head"))
    return _model(n, [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                  [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)


def concat_cnn(seed: int = 0, pad: bool = False) -> onnx.ModelProto:
    """x [N, 3, 8, 8] -> a YOLO-like block: Conv c0 -> Relu r0 -> Conv c1 -> Relu r1 -> Conv c2 -> Relu r2,
    Concat(r0, r1, r2) -> `cat` (r0 and r1 are also layer inputs, r2 is not) -> 1 x 1 Conv c3 -> GlobalAveragePool
    -> Flatten -> Gemm -> y [N, 3]. pad: the Concat reads p1, a Pad of zero width of r1 (on r1's grid,
    activations.layout) that a Conv c2b reads too, whose Relu is added to c3's before the pooling."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    inits, n = [], []

    def conv(name, x, c_in, c_out, k, out):
        inits.append(numpy_helper.from_array((rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * k * k))
                                             .astype(np.float32), f"{name}_W"))
        n.append(h.make_node("Conv", [x, f"{name}_W"], [f"{name}_y"], name=name, pads=[k // 2] * 4))
        n.append(h.make_node("Relu", [f"{name}_y"], [out]))

    conv("c0", "x", 3, 8, 3, "r0")
    conv("c1", "r0", 8, 8, 3, "r1")
    mid, last = "r1", "r3"
    conv("c2", "r1", 8, 8, 3, "r2")
    if pad:
        inits.append(numpy_helper.from_array(np.zeros(8, np.int64), "zero_pads"))
        n.append(h.make_node("Pad", ["r1", "zero_pads"], ["p1"]))
        conv("c2b", "p1", 8, 8, 3, "r2b")
        mid, last = "p1", "a"
    n.append(h.make_node("Concat", ["r0", mid, "r2"], ["cat"], name="cat", axis=1))
    conv("c3", "cat", 24, 8, 1, "r3")
    if pad:
        n.append(h.make_node("Add", ["r3", "r2b"], ["a"]))
    n.append(h.make_node("GlobalAveragePool", [last], ["p"]))
    n.append(h.make_node("Flatten", ["p"], ["f"]))
    inits.append(numpy_helper.from_array((rng.standard_normal((8, 3)) / np.sqrt(8)).astype(np.float32), "G_W"))
    n.append(h.make_node("Gemm", ["f", "G_W"], ["y"], name="head"))
    return _model(n, [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                  [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
