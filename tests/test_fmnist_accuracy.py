"""End to end on the real Fashion-MNIST CNN and the real 10k test set: SPFQ at 4 bits stays within 1.0 point of the
float model's top-1 accuracy and far above round-to-nearest at 2 bits.

Measured (seed 0, 256 calibration images, onnxruntime 1.32 CPU): float 91.70 %, SPFQ-4 91.50 %, RTN-2 70.27 %
(per-channel step multipliers chosen by the Gram error; 76.85 % with the earlier layer-wide choice).
Margins: 1.0 point to float (5x the measured 0.20), and SPFQ-4 >= RTN-2 + 5 points (measured gap 21.2).
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


@pytest.mark.parametrize("model, margin", [("cnn", 0.015), ("mlp", 0.03)])
def test_1bit_spfq_beats_1bit_rtn(request, model, margin):
    """Issue 5: default stochastic SPFQ at 1 bit (c_n per channel, best of 8 draws) beats the classical 1-bit
    baseline sign(w) * mean|w| on the real test set. Measured over seeds 0-4 (docs/RESULTS.md section 4): CNN
    83.38-84.38 % vs RTN 80.83 % (gap >= 2.5 points), MLP 82.60-83.83 % vs 76.77 % (gap >= 5.8); margins 1.5 / 3."""
    path, calib = request.getfixturevalue(f"fmnist_{model}"), request.getfixturevalue("fmnist_calib")
    spfq1, rtn1 = (compress(str(path), str(calib), progress=False,
                            config=CompressConfig(method=m, quant=QuantConfig(bits=1), seed=0)).model
                   for m in ("spfq", "rtn"))
    test = request.getfixturevalue("fmnist_test")
    acc_spfq = _accuracy(path, spfq1, test).top1_accuracy_compressed
    acc_rtn = _accuracy(path, rtn1, test).top1_accuracy_compressed
    print(f"{model}: spfq-1 {100 * acc_spfq:.2f}%  rtn-1 {100 * acc_rtn:.2f}%")
    assert acc_spfq >= acc_rtn + margin
