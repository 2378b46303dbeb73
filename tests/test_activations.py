"""activations.py (W8A8): the fake quantization against onnxruntime's QuantizeLinear -> DequantizeLinear, the
calibration, the emitted pairs, the capture of the compressed model with quantized activations, and the whole
run on the bundled CNN."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxspfq.activations import QMAX, ActScales, calibrate, emit, fake_quant
from onnxspfq.capture import Capture
from onnxspfq.config import ActConfig
from onnxspfq.graph import find_layers

from builders import mlp

RNG = np.random.default_rng(3)


def _qdq_model(scale: float, dtype: str) -> onnx.ModelProto:
    from onnxspfq.activations import ZERO_POINT

    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [None])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [None])],
                     [nh.from_array(np.array(scale, np.float32), "s"), nh.from_array(np.array(ZERO_POINT[dtype]), "z")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("scale", [0.1, 0.0371, 3.0])
def test_fake_quant_equals_onnxruntime_bit_for_bit(scale, dtype):
    """Ties (x / scale = k + 0.5, rounded to even), saturation beyond 127 * scale, and ordinary values."""
    s = np.float32(scale)
    ties = (np.arange(-140, 140) + 0.5).astype(np.float32) * s
    x = np.concatenate([ties, RNG.standard_normal(5000).astype(np.float32) * 60 * s, [0.0, -0.0, 1e30, -1e30]])
    x = x.astype(np.float32)
    sess = ort.InferenceSession(_qdq_model(scale, dtype).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": x})[0], fake_quant(x, scale))


@pytest.mark.parametrize("scale", [0.1, 0.0371, 6.0 / 255])
def test_unsigned_fake_quant_equals_onnxruntime_bit_for_bit(scale):
    """uint8 at zero point 0: ties, saturation at 0 and at 255 * scale, ordinary values."""
    from onnxspfq.activations import UNSIGNED_ZERO_POINT

    s = np.float32(scale)
    ties = (np.arange(-5, 270) + 0.5).astype(np.float32) * s
    x = np.concatenate([ties, np.abs(RNG.standard_normal(5000)).astype(np.float32) * 100 * s, [0.0, 1e30, -1e30]])
    x = x.astype(np.float32)
    m = _qdq_model(scale, "uint8")
    m.graph.initializer[1].CopyFrom(nh.from_array(np.array(UNSIGNED_ZERO_POINT), "z"))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": x})[0], fake_quant(x, scale, unsigned=True))


def test_unsigned_scale_never_past_the_clip():
    """A Clip(0, 6) folds into an unsigned Q only when 255 * scale <= 6: the float32 scale is rounded down."""
    for top in (6.0, 1.0, 0.1, 3.3, 255.0):
        x = [np.array([0.0, top], np.float32)]
        s = calibrate(x, ActConfig("minmax"), unsigned=True)
        assert np.float32(s) * np.float32(255) <= np.float32(top)
        assert s == pytest.approx(top / 255, rel=1e-6)


def test_layout_finds_non_negative_tensors_and_shared_grids():
    """Relu / Clip at min >= 0 outputs are non-negative, and so is what MaxPool / Pad at 0 / Flatten make of them;
    Clip at min < 0 or Pad at a non-zero value are not; a tensor a value-moving chain makes from another quantized
    tensor shares its grid (and its sign)."""
    from onnxspfq.activations import layout

    inits = [nh.from_array(np.array(0.0, np.float32), "zero"), nh.from_array(np.array(-1.0, np.float32), "neg"),
             nh.from_array(np.array(6.0, np.float32), "six"), nh.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1]), "p"),
             nh.from_array(np.array(2.0, np.float32), "two")]
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2]),
             h.make_node("Flatten", ["m"], ["f"]),
             h.make_node("Clip", ["x", "zero", "six"], ["c6"]), h.make_node("Pad", ["c6", "p"], ["pad0"]),
             h.make_node("Pad", ["c6", "p", "two"], ["pad2"]),
             h.make_node("Clip", ["x", "neg", "six"], ["cneg"]), h.make_node("Add", ["r", "r"], ["sum"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 2, 4, 4])],
                     [h.make_tensor_value_info(t, TP.FLOAT, None) for t in ("f", "pad0", "pad2", "cneg", "sum")],
                     inits)
    everything = {"x", "r", "m", "f", "c6", "pad0", "pad2", "cneg", "sum"}
    unsigned, shared = layout(g, everything, "uint8")
    assert unsigned == {"r", "m", "f", "c6", "pad0"}
    assert shared == {"m": "r", "f": "m", "pad0": "c6"}
    assert layout(g, everything, "int8")[0] == set()  # int8 storage: zero point 0 only, symmetric
    unsigned, shared = layout(g, {"f", "pad0", "x"}, "uint8")  # nothing quantized upstream: no sharing
    assert unsigned == {"f", "pad0"} and shared == {}


def test_capture_quantizes_a_tensor_inside_a_segment_before_its_readers():
    """A quantized tensor that is no layer input (an ort-cpu Conv output) sits between two layers: the capture
    cuts the model there, so the next layer's X~ is computed from its fake-quantized values; the scale comes from
    the float values; X is unchanged."""
    m = mlp([6, 5, 4], seed=4)
    layers, _ = find_layers(m)
    mid = m.graph.node[0].output[0]  # the first MatMul's output, read by the Relu
    batches = [{"x": RNG.standard_normal((32, 6)).astype(np.float32)} for _ in range(2)]
    act = ActScales(ActConfig("minmax"), {mid})
    with Capture(m, layers, batches, act=act) as cap:
        cap.grams(layers[0], {})
        g1 = cap.grams(layers[1], {})[0]
    x = np.concatenate([b["x"] for b in batches])
    W = {t.name: nh.to_array(t) for t in m.graph.initializer}
    y = x @ W[layers[0].weight]
    assert act.scales[mid] == pytest.approx(np.abs(y).max() / QMAX, rel=1e-6)
    h_comp = np.maximum(fake_quant(y, act.scales[mid]), 0).astype(np.float64)
    np.testing.assert_allclose(g1.H, h_comp.T @ h_comp, rtol=1e-5)
    h_float = np.maximum(y, 0).astype(np.float64)
    np.testing.assert_allclose(g1.F, h_float.T @ h_float, rtol=1e-5)


def test_calibration_minmax_and_percentile():
    x = RNG.standard_normal((2000, 8)).astype(np.float32)
    x[3, 2] = 80.0  # one outlier
    batches = [x[:1000], x[1000:]]
    assert calibrate(batches, ActConfig("minmax")) == pytest.approx(80.0 / QMAX, rel=1e-6)
    p = calibrate(batches, ActConfig("percentile", 99.9))
    assert 3.0 / QMAX < p < 10.0 / QMAX  # the percentile of |N(0, 1)| (about 3.3), not the outlier
    assert calibrate(batches, ActConfig("percentile", 100.0)) == pytest.approx(80.0 / QMAX, rel=1e-6)
    assert calibrate([np.zeros((4, 4), np.float32)], ActConfig()) == 1.0


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_emitted_pairs_compute_the_fake_quantized_model(dtype):
    """Q -> DQ on the input of each MatMul: with onnxruntime's optimisations off, the emitted model is the float
    model evaluated on fake-quantized layer inputs, exactly; with its defaults (int8 kernels) it stays close."""
    m = mlp([6, 5, 4], seed=1)
    layers, _ = find_layers(m)
    scales = {layer.input: 0.02 * (i + 1) for i, layer in enumerate(layers)}
    q = emit(onnx.ModelProto.FromString(m.SerializeToString()), scales, dtype)
    onnx.checker.check_model(q)
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) == len(layers)
    x = RNG.standard_normal((16, 6)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    W = {t.name: nh.to_array(t) for t in m.graph.initializer}
    want = x
    for node in m.graph.node:  # MatMul -> Relu -> MatMul
        want = (fake_quant(want, scales[node.input[0]]) @ W[node.input[1]] if node.op_type == "MatMul"
                else np.maximum(want, 0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    fused = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(fused, want, rtol=0.05, atol=0.05 * np.abs(want).max())


def test_capture_sees_the_quantized_activations():
    """X~ of every layer is computed from fake-quantized layer inputs (propagated downstream), X from the float
    model; the scales come from the float values."""
    m = mlp([6, 5, 4], seed=2)
    layers, _ = find_layers(m)
    batches = [{"x": RNG.standard_normal((32, 6)).astype(np.float32)} for _ in range(2)]
    act = ActScales(ActConfig("minmax"), {layer.input for layer in layers})
    with Capture(m, layers, batches, act=act) as cap:
        g0 = cap.grams(layers[0], {})[0]
        g1 = cap.grams(layers[1], {})[0]
    x = np.concatenate([b["x"] for b in batches])
    s0 = act.scales[layers[0].input]
    assert s0 == pytest.approx(np.abs(x).max() / QMAX, rel=1e-6)
    xq = fake_quant(x, s0).astype(np.float64)
    # the Gram products run in float32 (gram.PRODUCT_DTYPE): entries within 2e-5 of the largest
    np.testing.assert_allclose(g0.H, xq.T @ xq, rtol=0, atol=2e-5 * np.abs(xq.T @ xq).max())
    F = x.astype(np.float64).T @ x
    np.testing.assert_allclose(g0.F, F, rtol=0, atol=2e-5 * np.abs(F).max())
    W = {t.name: nh.to_array(t) for t in m.graph.initializer}
    h_float = np.maximum(x @ W[layers[0].weight], 0)
    h_comp = fake_quant(np.maximum(fake_quant(x, s0) @ W[layers[0].weight], 0), act.scales[layers[1].input])
    H1, F1 = h_comp.T.astype(np.float64) @ h_comp, h_float.T.astype(np.float64) @ h_float
    np.testing.assert_allclose(g1.H, H1, rtol=0, atol=2e-5 * np.abs(H1).max())
    np.testing.assert_allclose(g1.F, F1, rtol=0, atol=2e-5 * np.abs(F1).max())


def test_w8a8_run_on_the_cnn(tmp_path, fmnist_cnn, fmnist_calib_small):
    """The whole run: int8 weights and activations on every layer input, the checker passes, onnxruntime runs it,
    and the report measures the agreement and names each input's scale."""
    from onnxspfq.api import compress
    from onnxspfq.config import CompressConfig, QuantConfig

    out = tmp_path / "q.onnx"
    res = compress(str(fmnist_cnn), str(fmnist_calib_small), str(out),
                   CompressConfig(quant=QuantConfig(bits=8), activations=ActConfig()), progress=False)
    q = onnx.load(str(out))
    layers, _ = find_layers(onnx.load(str(fmnist_cnn)))
    quantized = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert set(quantized) == {layer.input for layer in layers}
    zero = {t.name: nh.to_array(t) for t in q.graph.initializer}
    # the image is signed (zero point 128); every later input is a Relu's (through MaxPool / Flatten): unsigned
    first = q.graph.input[0].name
    assert {t: int(zero[n.input[2]]) for t, n in quantized.items()} == {
        t: 128 if t == first else 0 for t in quantized}
    assert all(("input int8, scale" if layer.input == first else "input uint8, scale") in r.note
               for layer, r in zip(layers, res.report.layers))
    # on the 10k test set this run agrees with the float model on 95.2 % of images (docs/RESULTS.md section 16), so
    # 32 images expect 1.5 disagreements: the bound allows 3
    assert res.report.agreement.top1_agreement >= 29 / 32 and res.report.agreement.cosine > 0.99
    assert res.report.config["quant"]["align_ridge"] == float("inf")  # the W8A8 default: no alignment


def test_w8a8_default_ridge_and_a_given_one():
    """Under --activations int8 the projected path runs without alignment unless --align-ridge is given; weight-only
    runs keep the weight-only default; other methods have nothing to resolve."""
    from onnxspfq.config import ALIGN_RIDGE, CompressConfig, QuantConfig

    w8a8 = CompressConfig(quant=QuantConfig(bits=8), activations=ActConfig())
    assert w8a8.resolved().quant.ridge == float("inf")
    given = CompressConfig(quant=QuantConfig(bits=8, align_ridge=2.0), activations=ActConfig())
    assert given.resolved().quant.ridge == 2.0
    assert CompressConfig().resolved().quant.ridge == ALIGN_RIDGE
    gptq = CompressConfig(method="gptq", quant=QuantConfig(bits=8), activations=ActConfig())
    assert gptq.resolved() is gptq



def test_w8a8_on_a_model_with_if_branches(tmp_path):
    """A layer inside the If branch the data takes reads a main-graph tensor: that tensor gets the Q -> DQ pair
    (consumers inside the branch rewired), the output runs and the report names each input's scale."""
    from builders import branchy
    from onnxspfq.api import compress
    from onnxspfq.config import CompressConfig, QuantConfig

    onnx.save(branchy(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=RNG.standard_normal((32, 16)).astype(np.float32), sr=np.array(8, np.int64))
    res = compress(str(tmp_path / "m.onnx"), str(tmp_path / "c.npz"), str(tmp_path / "q.onnx"),
                   CompressConfig(quant=QuantConfig(bits=8), activations=ActConfig()), progress=False)
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    assert [r.name for r in res.report.layers] == ["mm0", "e_mm1"]
    assert all("input int8, scale" in r.note for r in res.report.layers)
    assert res.report.agreement.cosine > 0.99


def test_pad_between_quantized_tensors_gets_no_pair_and_folds_into_the_conv():
    """Relu -> Pad -> Conv -> Q with both tensors quantized on one grid: the Pad output (already on the grid) gets
    no pair, onnxruntime folds the Pad into the Conv (a pair after the Pad would leave a float Pad between DQ
    and Q), and the model computes exactly the float model on the fake-quantized Relu output; signed grid too."""
    from onnxspfq.activations import layout

    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    for relu in (True, False):
        first = [h.make_node("Relu", ["x"], ["r"])] if relu else [h.make_node("Identity", ["x"], ["r"])]
        nodes = first + [h.make_node("Pad", ["r", "p"], ["padded"]), h.make_node("Conv", ["padded", "wd"], ["y"]),
                         h.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0)]
        wscale = np.abs(w).reshape(4, -1).max(1) / 127
        wq = np.rint(w / wscale[:, None, None, None]).astype(np.int8)
        g = h.make_graph(nodes[-1:] + nodes[:-1], "g", [h.make_tensor_value_info("x", TP.FLOAT, [2, 3, 6, 6])],
                         [h.make_tensor_value_info("y", TP.FLOAT, [2, 4, 6, 6])],
                         [nh.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1]), "p"), nh.from_array(wq, "wq"),
                          nh.from_array(wscale.astype(np.float32), "ws")])
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
        m.ir_version = 8
        tensors = {"r", "padded", "y"}
        unsigned, shared = layout(m.graph, tensors, "uint8")
        assert shared == {"padded": "r"} and unsigned == ({"r", "padded"} if relu else set())
        q = emit(onnx.ModelProto.FromString(m.SerializeToString()), {"r": 0.03, "padded": 0.03, "y": 0.05},
                 "uint8", unsigned, shared)
        onnx.checker.check_model(q)
        assert {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"} == {"r", "y"}
        x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        got = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        r = fake_quant(np.maximum(x, 0) if relu else x, 0.03, unsigned=relu)
        want = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"x": r})[0]  # Relu / Identity of fake-quantized values: the same values
        np.testing.assert_array_equal(got, want)
        # y is a graph output, so its pair is read by nothing: only the Q before the Pad and the Conv remain
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tempfile.mkdtemp()) / "opt.onnx")
        ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
        assert "Pad" not in ops, ops


def test_activation_scales_leave_padding_tokens_out():
    """With a token mask the scale comes from the real tokens only: padding positions (here 1000x larger) would
    otherwise set a minmax scale and starve every real value of resolution."""
    w = RNG.standard_normal((6, 4)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, ["b", "s", 6]),
                      h.make_tensor_value_info("attention_mask", TP.INT64, ["b", "s"])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["b", "s", 4])], [nh.from_array(w, "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    layers, _ = find_layers(m)
    x = RNG.standard_normal((3, 5, 6)).astype(np.float32)
    mask = np.ones((3, 5), np.int64)
    mask[:, 3:] = 0
    x[:, 3:] *= 1000.0
    batch = [{"x": x, "attention_mask": mask}]
    for token_mask, want in (("attention_mask", np.abs(x[:, :3]).max()), (None, np.abs(x).max())):
        act = ActScales(ActConfig("minmax"), {"x"})
        with Capture(m, layers, batch, act=act, token_mask=token_mask) as cap:
            cap.grams(layers[0], {})
        assert act.scales["x"] == pytest.approx(want / QMAX, rel=1e-6)
