"""End to end on the real Fashion-MNIST CNN and the real 10k test set: SPFQ at 4 bits stays within 1.0 point of the
float model's top-1 accuracy and far above round-to-nearest at 2 bits.

Measured (seed 0, 256 calibration images, onnxruntime 1.32 CPU): float 91.70 %, SPFQ-4 91.65 %, RTN-2 76.85 %.
Margins: 1.0 point to float (20x the measured 0.05), and SPFQ-4 >= RTN-2 + 5 points (measured gap 14.8).
"""
import pytest

from onnxspfq import CompressConfig, QuantConfig, compress
from onnxspfq.evaluate import evaluate


def _accuracy(float_path, model, fmnist_test):
    x, labels = fmnist_test
    batches = [{"input": x[i:i + 1000]} for i in range(0, len(x), 1000)]
    a = evaluate(str(float_path), model, batches, labels, task="classify")
    assert a.samples == 10000
    return a


def test_spfq_4bit_near_float_and_above_rtn_2bit(fmnist_cnn, fmnist_calib, fmnist_test):
    spfq4 = compress(str(fmnist_cnn), str(fmnist_calib), progress=False,
                     config=CompressConfig(method="spfq", quant=QuantConfig(bits=4), seed=0)).model
    rtn2 = compress(str(fmnist_cnn), str(fmnist_calib), progress=False,
                    config=CompressConfig(method="rtn", quant=QuantConfig(bits=2), seed=0)).model
    a4 = _accuracy(fmnist_cnn, spfq4, fmnist_test)
    a2 = _accuracy(fmnist_cnn, rtn2, fmnist_test)
    acc_float, acc_spfq4, acc_rtn2 = a4.top1_accuracy_float, a4.top1_accuracy_compressed, a2.top1_accuracy_compressed
    print(f"float {100 * acc_float:.2f}%  spfq-4 {100 * acc_spfq4:.2f}%  rtn-2 {100 * acc_rtn2:.2f}%")
    assert acc_float == pytest.approx(0.9170, abs=0.0005)  # the committed model's measured accuracy
    assert acc_spfq4 >= acc_float - 0.010
    assert acc_spfq4 >= acc_rtn2 + 0.05


def test_1bit_deterministic_path_following_beats_1bit_rtn(fmnist_cnn, fmnist_calib, fmnist_test):
    """Issue 5's 1-bit claim, as far as it holds: deterministic path following (gpfq, re-fitted scales) beats the
    classical 1-bit baseline sign(w) * mean|w| on the real test set (measured 84.92 % vs 80.83 %). Stochastic SPFQ
    does NOT (22.5 %, 52.2 % with refit; docs/RESULTS.md section 3): that is recorded, not asserted away."""
    gpfq1 = compress(str(fmnist_cnn), str(fmnist_calib), progress=False,
                     config=CompressConfig(method="gpfq", quant=QuantConfig(bits=1, refit_scale=True))).model
    rtn1 = compress(str(fmnist_cnn), str(fmnist_calib), progress=False,
                    config=CompressConfig(method="rtn", quant=QuantConfig(bits=1))).model
    acc_gpfq = _accuracy(fmnist_cnn, gpfq1, fmnist_test).top1_accuracy_compressed
    acc_rtn = _accuracy(fmnist_cnn, rtn1, fmnist_test).top1_accuracy_compressed
    print(f"gpfq-1+refit {100 * acc_gpfq:.2f}%  rtn-1 {100 * acc_rtn:.2f}%")
    assert acc_gpfq >= acc_rtn + 0.02
