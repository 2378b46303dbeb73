"""Every output format through the whole pass on the real Fashion-MNIST models: the emitted model loads and runs
in onnxruntime and computes exactly what its de-quantized float weights compute."""
import numpy as np
import onnx
import pytest

from onnxspfq import CompressConfig, QuantConfig, compress
from onnxspfq.emit_sparse import check_2_4
from onnxspfq.evaluate import evaluate, run
from onnxspfq.graph import find_layers
from onnxspfq.fold import fold_weight_chains


def _float_twin(model_path, calib, quant, tmp_path):
    """The same run written with --format float: de-quantized weights in the original float graph."""
    return compress(str(model_path), str(calib), progress=False,
                    config=CompressConfig(quant=quant, format="float")).model


@pytest.mark.parametrize("bits", [4, 2, 1])
def test_nbits_matches_float_weights(tmp_path, fmnist_mlp, fmnist_calib_small, fmnist_test, bits):
    quant = QuantConfig(bits=bits)
    res = compress(str(fmnist_mlp), str(fmnist_calib_small), output=str(tmp_path / "m.onnx"), progress=False,
                   config=CompressConfig(quant=quant, format="nbits"))
    ops = {n.op_type for n in res.model.graph.node}
    assert "MatMulNBits" in ops and "Gemm" not in ops
    x = fmnist_test[0][:256]
    a = evaluate(_float_twin(fmnist_mlp, fmnist_calib_small, quant, tmp_path), str(tmp_path / "m.onnx"),
                 [{"input": x}])
    assert a.rel_error < 1e-5
    stored = {4: 4, 2: 2, 1: 2}[bits]  # MatMulNBits has no 1-bit form: {-d, +d} are exact 2-bit codes
    bpw = [r.bits_per_weight for r in res.report.layers]
    assert all(stored < b < stored + 0.8 for b in bpw), bpw  # + block scales and K padding


def test_nbits_falls_back_to_qdq_for_conv(tmp_path, fmnist_cnn, fmnist_calib_small):
    res = compress(str(fmnist_cnn), str(fmnist_calib_small), progress=False,
                   config=CompressConfig(quant=QuantConfig(bits=4), format="nbits"))
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("DequantizeLinear") == 2
    onnx.checker.check_model(res.model, full_check=True)


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_unstructured_pruning_hits_target_and_writes_sparse(tmp_path, fmnist_mlp, fmnist_calib_small, fmnist_test,
                                                           sparsity):
    out = tmp_path / "p.onnx"
    res = compress(str(fmnist_mlp), str(fmnist_calib_small), output=str(out), progress=False,
                   config=CompressConfig(quant=QuantConfig(bits=None, sparsity=sparsity), format="sparse"))
    for r in res.report.layers:
        assert abs(r.sparsity - sparsity) <= 0.01, (r.name, r.sparsity)
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    dense = {t.name for t in m.graph.initializer}
    sparse = {s.values.name for s in m.graph.sparse_initializer}
    layers, _ = find_layers(fold_weight_chains(onnx.load(str(fmnist_mlp))))
    # sparse storage only where it is smaller: 12 B per non-zero beats 4 B dense below ~1/3 density
    for layer in layers:
        assert layer.weight in (sparse if sparsity > 0.7 else dense), layer.weight
    ref = run(_float_twin(fmnist_mlp, fmnist_calib_small, QuantConfig(bits=None, sparsity=sparsity), tmp_path),
              [{"input": fmnist_test[0][:128]}])[0]
    got = run(str(out), [{"input": fmnist_test[0][:128]}])[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_joint_quantization_and_2_4_pruning(tmp_path, fmnist_cnn, fmnist_calib_small):
    res = compress(str(fmnist_cnn), str(fmnist_calib_small), progress=False,
                   config=CompressConfig(quant=QuantConfig(bits=4, nm=(2, 4))))
    byname = {r.name: r for r in res.report.layers}
    layers, _ = find_layers(fold_weight_chains(onnx.load(str(fmnist_cnn))))
    init = {t.name: t for t in res.model.graph.initializer}
    for layer in layers:
        r = byname[layer.name]
        if layer.op == "Conv" and layer.W0.shape[1] % 4:
            assert r.nm is None and "not applicable" in r.note  # first conv: 1 input channel
            continue
        assert r.nm == "2:4" and r.sparsity >= 0.5
        # the stored integer codes themselves hold 2:4 along the axis TensorRT reads
        q_name = next(n.input[0] for n in res.model.graph.node
                      if n.op_type == "DequantizeLinear" and n.output[0] == layer.weight)
        codes = onnx.numpy_helper.to_array(init[q_name]).astype(np.int8)
        ok, why = check_2_4(codes, layer.op, layer.trans_b)
        assert ok, why


def test_prune_only_2_4_leaves_uncoverable_layer_in_float(tmp_path, fmnist_cnn, fmnist_calib_small):
    """The first Conv has 1 input channel: 2:4 cannot cover it, so it is reported and left as it was."""
    res = compress(str(fmnist_cnn), str(fmnist_calib_small), progress=False,
                   config=CompressConfig(quant=QuantConfig(bits=None, nm=(2, 4)), format="sparse"))
    skipped = {s["name"]: s["reason"] for s in res.report.skipped}
    assert "not applicable" in skipped["/0/Conv"] and "left in float" in skipped["/0/Conv"]
    assert [r.name for r in res.report.layers] == ["/3/Conv", "/7/Gemm", "/9/Gemm"]
    assert all(r.nm == "2:4" and r.sparsity >= 0.5 for r in res.report.layers)
    before = {t.name: t for t in onnx.load(str(fmnist_cnn)).graph.initializer}
    after = {t.name: t for t in res.model.graph.initializer}
    conv0 = next(n for n in res.model.graph.node if n.name == "/0/Conv").input[1]
    assert after[conv0].SerializeToString() == before[conv0].SerializeToString()
