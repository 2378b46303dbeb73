"""activations.py (W8A8): the fake quantization against onnxruntime's QuantizeLinear -> DequantizeLinear, the
calibration, the emitted pairs, the capture of the compressed model with quantized activations, and the whole
run on the bundled CNN."""
from __future__ import annotations

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
    np.testing.assert_allclose(g0.H, xq.T @ xq, rtol=1e-10)
    np.testing.assert_allclose(g0.F, x.astype(np.float64).T @ x, rtol=1e-10)
    W = {t.name: nh.to_array(t) for t in m.graph.initializer}
    h_float = np.maximum(x @ W[layers[0].weight], 0)
    h_comp = fake_quant(np.maximum(fake_quant(x, s0) @ W[layers[0].weight], 0), act.scales[layers[1].input])
    np.testing.assert_allclose(g1.H, h_comp.T.astype(np.float64) @ h_comp, rtol=1e-5)
    np.testing.assert_allclose(g1.F, h_float.T.astype(np.float64) @ h_float, rtol=1e-5)


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
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {layer.input for layer in layers}
    assert all("input int8, scale" in r.note for r in res.report.layers)
    assert res.report.agreement.top1_agreement > 0.95
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
