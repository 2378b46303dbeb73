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
