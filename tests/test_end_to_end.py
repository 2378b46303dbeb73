"""The whole pass on the real Fashion-MNIST models: every bits value emits a valid model that runs, and quality
is measured on the real 10k test set."""
import numpy as np
import onnx
import pytest

from onnxspfq import CompressConfig, QuantConfig, compress
from onnxspfq.evaluate import evaluate


def _accuracy(float_path, q_model, x, labels):
    a = evaluate(str(float_path), q_model, [{"input": x[i:i + 1000]} for i in range(0, len(x), 1000)], labels)
    return a.top1_accuracy_float, a.top1_accuracy_compressed, a


@pytest.mark.parametrize("bits", [8, 4, 3, 2, 1])
def test_every_bits_value_emits_a_runnable_model(tmp_path, fmnist_cnn, fmnist_calib_small, bits):
    before = fmnist_cnn.read_bytes()
    out = tmp_path / f"cnn{bits}.onnx"
    res = compress(str(fmnist_cnn), str(fmnist_calib_small), output=str(out), progress=False,
                   config=CompressConfig(quant=QuantConfig(bits=bits)))
    assert fmnist_cnn.read_bytes() == before, "the input model must never be modified"
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    assert len(res.report.layers) == 4
    assert res.report.size_after < res.report.size_before
    assert res.report.agreement.samples == 32
    # the tool's own measurement of the emitted file must match a fresh evaluation of the saved file
    ag = evaluate(str(fmnist_cnn), str(out), [{"input": np.load(fmnist_calib_small)["input"]}])
    assert ag.cosine == pytest.approx(res.report.agreement.cosine, abs=1e-6)


def test_spfq_4bit_close_to_float_on_real_test_set(tmp_path, fmnist_cnn, fmnist_calib, fmnist_test):
    x, labels = fmnist_test
    res = compress(str(fmnist_cnn), str(fmnist_calib), progress=False,
                   config=CompressConfig(quant=QuantConfig(bits=4)))
    acc_f, acc_q, ag = _accuracy(fmnist_cnn, res.model, x, labels)
    print(f"float {acc_f:.4f}  spfq-4bit {acc_q:.4f}  top1-agreement {ag.top1_agreement:.4f}  cos {ag.cosine:.5f}")
    assert acc_q >= acc_f - 0.01
    assert ag.top1_agreement >= 0.97


def test_reported_layer_error_matches_a_direct_computation(fmnist_mlp, fmnist_calib_small):
    """The report's Gram-based error of the first Gemm equals ||X W^T - X Q^T||^2 / ||X W^T||^2 computed directly
    from the calibration images (the first layer's input is the flattened image, X~ = X there)."""
    from onnx import numpy_helper

    res = compress(str(fmnist_mlp), str(fmnist_calib_small), progress=False,
                   config=CompressConfig(quant=QuantConfig(bits=2)))
    X = np.load(fmnist_calib_small)["input"].reshape(32, -1).astype(np.float64)
    first = res.report.layers[0]
    src = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fmnist_mlp)).graph.initializer}
    node = next(n for n in res.model.graph.node if n.name == first.name)
    dq = next(n for n in res.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == node.input[1])
    init = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    codes, scale = init[dq.input[0]].astype(np.float64), init[dq.input[1]].astype(np.float64)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    Q = codes * np.expand_dims(scale, 1 - axis)  # per-channel scale along `axis` of the 2-D weight
    W = src[node.input[1]].astype(np.float64)
    rel = np.sum((X @ W.T - X @ Q.T) ** 2) / np.sum((X @ W.T) ** 2)  # Gemm transB=1: W is [N, K]
    assert first.rel_error == pytest.approx(rel, rel=1e-4)


def test_opset_is_pinned_or_raised_and_said(tmp_path, fmnist_mlp, fmnist_calib_small):
    """--opset pins the output's opset; without it the opset is raised only as far as the stored weights need,
    and the report says so (int8: opset 13, below the model's 17, so unchanged; INT4: 21)."""
    from onnxspfq.api import compress
    from onnxspfq.config import CompressConfig, QuantConfig
    from onnxspfq.emit_qdq import default_opset

    runs = {"pinned": CompressConfig(quant=QuantConfig(bits=8), opset=21), "int8": CompressConfig(quant=QuantConfig(bits=8)),
            "int4": CompressConfig()}
    got = {}
    for k, cfg in runs.items():
        res = compress(str(fmnist_mlp), str(fmnist_calib_small), str(tmp_path / f"{k}.onnx"), cfg, progress=False)
        got[k] = (default_opset(onnx.load(str(tmp_path / f"{k}.onnx"))), res.report.opset)
    assert got["pinned"] == (21, "opset raised 17 -> 21")
    assert got["int8"] == (17, "opset 17")
    assert got["int4"][0] == 21 and got["int4"][1].startswith("opset raised 17 -> 21 (what the stored weights need")
