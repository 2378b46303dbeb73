"""graph.py: loading, folding weight chains, finding layers, and the W <-> weight tensor mapping."""
from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxspfq.errors import OnnxspfqError
from onnxspfq.graph import find_layers, load_model
from onnxspfq.fold import fold_weight_chains
from onnxspfq.layers import Layer, conv_pads


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def _vi(name, shape, t=TP.FLOAT):
    return h.make_tensor_value_info(name, t, shape)


def _run(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------------- load_model
def _save(m, path):
    onnx.save(m, str(path))
    return path


def _mlp():
    return _model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_vi("x", ["N", 4])], [_vi("y", ["N", 3])],
                  [nh.from_array(_w(4, 3), "W")])


def test_load_model_ok_and_file_unchanged(tmp_path):
    p = _save(_mlp(), tmp_path / "m.onnx")
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    m = load_model(p)
    assert [n.op_type for n in m.graph.node] == ["MatMul"]
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before


def test_load_model_external_data_from_other_cwd(tmp_path, monkeypatch):
    w = _w(64, 64)
    m = _model([h.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", [2, 64])], [_vi("y", [2, 64])],
               [nh.from_array(w, "W")])
    d = tmp_path / "model"
    d.mkdir()
    onnx.save(m, str(d / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    assert (d / "m.data").exists()
    monkeypatch.chdir(tmp_path)
    loaded = load_model(d / "m.onnx")
    np.testing.assert_array_equal(loaded.array("W"), w)  # read lazily, relative to the model's folder


@pytest.mark.parametrize("case", ["missing", "directory", "garbage", "truncated", "empty", "checker",
                                  "missing_external"])
def test_load_model_errors(tmp_path, case):
    p = tmp_path / "m.onnx"
    if case == "missing":
        match = "not a file"
    elif case == "directory":
        p = tmp_path
        match = "not a file"
    elif case == "garbage":
        p.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01" * 10)
        match = "not"
    elif case == "truncated":
        data = _mlp().SerializeToString()
        p.write_bytes(data[: len(data) // 2])
        match = "not"
    elif case == "empty":
        p.write_bytes(b"")
        match = "not an ONNX model"
    elif case == "checker":
        bad = h.make_model(h.make_graph([h.make_node("Relu", ["nope"], ["y"])], "g", [_vi("x", [1])],
                                        [_vi("y", [1])]), opset_imports=[h.make_opsetid("", 17)])
        bad.ir_version = 9
        p.write_bytes(bad.SerializeToString())
        match = "fails the ONNX checker"
    else:
        m = _model([h.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", [2, 64])], [_vi("y", [2, 64])],
                   [nh.from_array(_w(64, 64), "W")])
        onnx.save(m, str(p), save_as_external_data=True, location="m.data", size_threshold=0)
        os.remove(tmp_path / "m.data")
        match = "external data file .*m.data.* of tensor 'W'.* is missing"
    with pytest.raises(OnnxspfqError, match=match) as ei:
        load_model(p)
    assert "\n" not in str(ei.value)


# ------------------------------------------------------------------------------------------ fold_weight_chains
def _chain_model():
    """MatMul weight via Transpose(init), Gemm weight via Identity(Cast(fp16 init)), Conv weight via Constant."""
    wt = _w(3, 4)   # transposed storage of a [4, 3] MatMul weight
    wg = _w(5, 3).astype(np.float16)
    wc = _w(2, 5, 1, 1)
    nodes = [
        h.make_node("Transpose", ["Wt"], ["W_mm"], perm=[1, 0]),
        h.make_node("MatMul", ["x", "W_mm"], ["a"], name="mm"),
        h.make_node("Cast", ["Wg16"], ["Wg32"], to=TP.FLOAT),
        h.make_node("Identity", ["Wg32"], ["W_gemm"]),
        h.make_node("Gemm", ["a", "W_gemm"], ["b"], transB=1),
        h.make_node("Reshape", ["b", "shp"], ["b4"]),
        h.make_node("Constant", [], ["W_conv"], value=nh.from_array(wc, "wc")),
        h.make_node("Conv", ["b4", "W_conv"], ["y"]),
    ]
    inits = [nh.from_array(wt, "Wt"), nh.from_array(wg, "Wg16"), nh.from_array(np.array([2, 5, 1, 1]), "shp")]
    return _model(nodes, [_vi("x", [2, 4])], [_vi("y", [2, 2, 1, 1])], inits)


def test_fold_weight_chains():
    m = _chain_model()
    before = m.SerializeToString()
    f = fold_weight_chains(m)
    assert m.SerializeToString() == before  # input untouched
    ops = [n.op_type for n in f.graph.node]
    assert ops == ["MatMul", "Gemm", "Reshape", "Conv"]
    inits = {t.name: nh.to_array(t) for t in f.graph.initializer}
    assert "Wt" not in inits and "Wg16" not in inits
    np.testing.assert_array_equal(inits["W_mm"], nh.to_array(m.graph.initializer[0]).T)
    assert inits["W_gemm"].dtype == np.float32
    assert all(n.name for n in f.graph.node) and len({n.name for n in f.graph.node}) == 4
    onnx.checker.check_model(f)
    inferred = onnx.shape_inference.infer_shapes(f, strict_mode=True)
    assert any(v.name == "b" for v in inferred.graph.value_info)
    x = _w(2, 4)
    np.testing.assert_allclose(_run(f, {"x": x})[0], _run(m, {"x": x})[0], rtol=1e-6)
    layers, skipped = find_layers(f)
    assert [(la.op, la.weight) for la in layers] == [("MatMul", "W_mm"), ("Gemm", "W_gemm"), ("Conv", "W_conv")]
    # before folding those weights are not constants
    layers0, skipped0 = find_layers(m)
    assert layers0 == [] and all("run time" in s["reason"] for s in skipped0 if s["op"] != "other")


def test_fold_chain_output_that_is_graph_output():
    wt = _w(3, 4)
    nodes = [h.make_node("Transpose", ["Wt"], ["W_mm"]), h.make_node("MatMul", ["x", "W_mm"], ["y"])]
    m = _model(nodes, [_vi("x", [2, 4])], [_vi("y", [2, 3]), _vi("W_mm", [4, 3])], [nh.from_array(wt, "Wt")])
    f = fold_weight_chains(m)
    onnx.checker.check_model(f)
    x = _w(2, 4)
    for a, b in zip(_run(f, {"x": x}), _run(m, {"x": x})):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    layers, _ = find_layers(f)
    assert layers[0].weight != "W_mm" and layers[0].weight in {t.name for t in f.graph.initializer}


# ---------------------------------------------------------------------------------------------- find_layers
def _layers_model():
    nodes = [
        h.make_node("MatMul", ["x", "W1"], ["h1"], name="mm3d"),                     # 3-D activation
        h.make_node("Reshape", ["h1", "s2"], ["h2"]),
        h.make_node("Gemm", ["h2", "W2"], ["g1"], name="gemm_tb", transB=1),        # W2 [5, 6]
        h.make_node("Gemm", ["g1", "W3"], ["g2"], name="gemm_ta", transA=1),        # A^T [5, 8] @ W3 [8, 4]
        h.make_node("MatMul", ["W4", "g2"], ["g3"], name="const_first"),            # constant on the left
        h.make_node("MatMul", ["g3", "g3t"], ["g4"], name="runtime_w"),
        h.make_node("Transpose", ["g3"], ["g3t"]),
        h.make_node("MatMul", ["x", "W1"], ["h1b"], name="mm_shared"),               # shares W1
        h.make_node("MatMul", ["x", "W5"], ["h3"], name="mm_w3d"),                   # 3-D weight
        h.make_node("Add", ["h3", "h1b"], ["h4"]),
    ]
    # fix node order: Transpose must come before its consumer
    nodes[5], nodes[6] = nodes[6], nodes[5]
    inits = [nh.from_array(_w(6, 6), "W1"), nh.from_array(np.array([8, 6]), "s2"), nh.from_array(_w(5, 6), "W2"),
             nh.from_array(_w(8, 4), "W3"), nh.from_array(_w(3, 5), "W4"), nh.from_array(_w(2, 6, 6), "W5")]
    return _model(nodes, [_vi("x", [2, 4, 6])], [_vi("g4", ["a", "b"]), _vi("h4", ["a", "b", "c"])], inits)


def test_find_layers_kinds_and_reasons():
    m = fold_weight_chains(_layers_model())
    layers, skipped = find_layers(m)
    assert [la.name for la in layers] == ["mm3d", "gemm_tb", "gemm_ta"]
    mm, tb, ta = layers
    assert mm.shared_with == ["mm_shared"] and mm.input_shape == (2, 4, 6)
    assert (tb.trans_b, ta.trans_a, ta.trans_b) == (True, True, False)
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert "first MatMul input" in reasons["const_first"]
    assert "run time" in reasons["runtime_w"]
    assert "rank 3" in reasons["mm_w3d"]
    assert "mm_shared" not in reasons  # compressed through mm3d
    assert reasons["*"].startswith("1 node(s)")  # the Reshape reading its shape initializer


def test_find_layers_skip_and_unknown():
    m = fold_weight_chains(_layers_model())
    layers, skipped = find_layers(m, skip=("gemm_tb", "mm_shared"))
    assert [la.name for la in layers] == ["gemm_ta"]
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert reasons["gemm_tb"] == "skipped by user" and "shares weight W1" in reasons["mm3d"]
    with pytest.raises(OnnxspfqError, match="unknown layer name"):
        find_layers(m, skip=("nope",))


def test_unnamed_nodes_get_stable_names():
    nodes = [h.make_node("MatMul", ["x", "W"], ["a"]), h.make_node("MatMul", ["a", "W2"], ["y"], name="MatMul_0")]
    inits = [nh.from_array(_w(3, 3), "W"), nh.from_array(_w(3, 2), "W2")]
    m = _model(nodes, [_vi("x", [1, 3])], [_vi("y", ["a", "b"])], inits)
    layers, _ = find_layers(m)
    names = [la.name for la in layers]
    assert len(set(names)) == 2 and names[1] == "MatMul_0"
    f = fold_weight_chains(m)
    assert [n.name for n in f.graph.node] == names


# ------------------------------------------------------------------------------------------- W mapping checks
def _output_via_matrix(layer: Layer, a: np.ndarray) -> np.ndarray:
    """Y computed as rows @ matrix().T: checks that row n of matrix() is output neuron n's weights."""
    if layer.op == "MatMul":
        return (a.reshape(-1, layer.n0) @ layer.matrix().T).reshape(a.shape[:-1] + (layer.n1,))
    return (a.T if layer.trans_a else a) @ layer.matrix().T


@pytest.mark.parametrize("kind", ["matmul3d", "gemm", "gemm_tb", "gemm_ta"])
def test_matrix_rows_are_output_neurons(kind):
    if kind == "matmul3d":
        node, xs, w = h.make_node("MatMul", ["x", "W"], ["y"]), (2, 3, 5), _w(5, 4)
    elif kind == "gemm":
        node, xs, w = h.make_node("Gemm", ["x", "W"], ["y"], alpha=1.0), (3, 5), _w(5, 4)
    elif kind == "gemm_tb":
        node, xs, w = h.make_node("Gemm", ["x", "W"], ["y"], transB=1), (3, 5), _w(4, 5)
    else:
        node, xs, w = h.make_node("Gemm", ["x", "W"], ["y"], transA=1), (5, 3), _w(5, 4)
    m = _model([node], [_vi("x", list(xs))], [_vi("y", ["a"] * len(xs))], [nh.from_array(w, "W")])
    (layer,), _ = find_layers(m)
    assert (layer.n1, layer.n0) == (4, 5) and layer.W0.shape[layer.channel_axis] == 4
    assert layer.W0.shape[layer.reduction_axis] == 5 and layer.group_rows() == [slice(0, 4)]
    a = _w(*xs)
    np.testing.assert_allclose(_output_via_matrix(layer, a), _run(m, {"x": a})[0], rtol=1e-5, atol=1e-5)
    W = layer.matrix()
    assert W.dtype == np.float64
    np.testing.assert_array_equal(layer.tensor(W), w)
    q = np.arange(20, dtype=np.int8).reshape(4, 5)
    t = layer.tensor(q)
    assert t.dtype == np.int8 and t.shape == w.shape
    np.testing.assert_array_equal(dataclasses.replace(layer, read=lambda: t).matrix(), q)


def test_conv_layer_attributes_and_groups():
    w = _w(6, 2, 3, 3)
    node = h.make_node("Conv", ["x", "W", "B"], ["y"], group=2, strides=[2, 2], auto_pad="SAME_UPPER",
                       dilations=[1, 2])
    m = _model([node], [_vi("x", [1, 4, 9, 8])], [_vi("y", ["a", "b", "c", "d"])], [nh.from_array(w, "W"),
                                                                   nh.from_array(_w(6), "B")])
    (layer,), _ = find_layers(m)
    assert (layer.groups, layer.kernel_shape, layer.strides, layer.dilations) == (2, (3, 3), (2, 2), (1, 2))
    # SAME_UPPER: out = ceil(in / s); total = (out - 1) s + (k - 1) d + 1 - in; the odd one at the end
    assert layer.pads == (1, 1, 1, 2) == conv_pads((9, 8), (3, 3), (2, 2), (1, 2), "SAME_UPPER", None)
    assert conv_pads((9, 8), (3, 3), (2, 2), (1, 2), "SAME_LOWER", None) == (1, 2, 1, 1)
    assert layer.bias == "B" and layer.channel_axis == 0 and layer.reduction_axis == 1
    assert (layer.n1, layer.n0) == (6, 18) and layer.group_rows() == [slice(0, 3), slice(3, 6)]
    np.testing.assert_array_equal(layer.matrix(), w.reshape(6, -1))
    np.testing.assert_array_equal(layer.tensor(layer.matrix()), w)


def test_conv_same_with_dynamic_spatial_resolves_later():
    node = h.make_node("Conv", ["x", "W"], ["y"], strides=[2], auto_pad="SAME_LOWER")
    m = _model([node], [_vi("x", ["N", 2, "L"])], [_vi("y", ["a", "b", "c"])], [nh.from_array(_w(3, 2, 4), "W")])
    (layer,), _ = find_layers(m)
    assert layer.pads is None
    assert layer.resolve_pads((10,)) == (1, 1) and layer.resolve_pads((11,)) == (2, 1)
    for n in (10, 11):  # the patch count resolves the pads of each input shape too
        assert layer.row_count((2, 2, n)) == layer.rows(_w(2, 2, n)).shape[0] == 2 * 5 + (n == 11) * 2
