"""emit_qdq and io: emitted QDQ models pass the checker, run in onnxruntime and match codes * scale."""
from __future__ import annotations

import os
from dataclasses import replace

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxspfq import io as oio
from onnxspfq import save as osave
from onnxspfq.config import levels
from onnxspfq.emit_qdq import dequantize, emit, min_ir_version
from onnxspfq.errors import OnnxspfqError

from emit_helpers import Result, real_layers

RNG = np.random.default_rng(0)


def rtn(W: np.ndarray, bits: int, block_size: int | None = None) -> Result:
    """Round-to-nearest symmetric quantization of an (N1, N0) matrix, per channel or per block."""
    n1, n0 = W.shape
    b = block_size or n0
    nb = -(-n0 // b)
    k = levels(bits)
    codes = np.zeros((n1, n0), np.int8)
    scale = np.zeros((n1, nb))
    for j in range(nb):
        blk = W[:, j * b : (j + 1) * b].astype(np.float64)
        if bits == 1:
            s = np.abs(blk).mean(axis=1)
            c = np.where(blk >= 0, 1, -1)
        else:
            s = np.abs(blk).max(axis=1) / k
            c = np.clip(np.rint(blk / s[:, None]), -k, k)
        codes[:, j * b : (j + 1) * b], scale[:, j] = c, s
    return Result(codes, scale, b)


# --- small models ----------------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits, opset=17, ir=8):
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def matmul_model(K=24, N=16, opset=17, ir=8):
    W = RNG.standard_normal((K, N)).astype(np.float32)
    m = _model(
        [h.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [h.make_tensor_value_info("x", TP.FLOAT, [4, K])],
        [h.make_tensor_value_info("y", TP.FLOAT, [4, N])],
        [nh.from_array(W, "W")],
        opset,
        ir,
    )
    return m, real_layers(m, "mm")[0], {"x": RNG.standard_normal((4, K)).astype(np.float32)}


def gemm_model(trans_b, K=24, N=16):
    W = RNG.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    C = RNG.standard_normal(N).astype(np.float32)
    m = _model(
        [h.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=int(trans_b), alpha=0.7)],
        [h.make_tensor_value_info("x", TP.FLOAT, [4, K])],
        [h.make_tensor_value_info("y", TP.FLOAT, [4, N])],
        [nh.from_array(W, "W"), nh.from_array(C, "C")],
    )
    return m, real_layers(m, "gemm")[0], {"x": RNG.standard_normal((4, K)).astype(np.float32)}


def conv_model(group):
    cin, cout = 4, 6
    W = RNG.standard_normal((cout, cin // group, 3, 3)).astype(np.float32)
    B = RNG.standard_normal(cout).astype(np.float32)
    m = _model(
        [h.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", group=group, pads=[1, 1, 1, 1])],
        [h.make_tensor_value_info("x", TP.FLOAT, [2, cin, 5, 5])],
        [h.make_tensor_value_info("y", TP.FLOAT, [2, cout, 5, 5])],
        [nh.from_array(W, "W"), nh.from_array(B, "B")],
    )
    return m, real_layers(m, "conv")[0], {"x": RNG.standard_normal((2, cin, 5, 5)).astype(np.float32)}


BUILDERS = {
    "matmul": lambda: matmul_model(),
    "gemm_transB0": lambda: gemm_model(False),
    "gemm_transB1": lambda: gemm_model(True),
    "conv": lambda: conv_model(1),
    "conv_grouped": lambda: conv_model(2),
}


def run(model: onnx.ModelProto, feeds) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), oio.session_options(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def assert_close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


EXPECTED = {8: ("INT8", 17, 8), 4: ("INT4", 21, 10), 3: ("INT4", 21, 10), 2: ("INT2", 25, 13), 1: ("INT2", 25, 13)}


# --- emit: every op x bits --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 3, 2, 1])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_emit_matches_float_codes_times_scale(kind, bits):
    model, layer, feeds = BUILDERS[kind]()
    before = model.SerializeToString()
    res = rtn(layer.matrix(), bits)
    q = emit(model, [(layer, res, bits)])
    ref = emit(model, [(layer, res, bits)], fmt="float")
    assert model.SerializeToString() == before

    onnx.checker.check_model(q, full_check=True)
    type_name, opset, ir = EXPECTED[bits]
    assert (opset_of(q), q.ir_version) == (opset, ir)
    assert opset_of(ref) == 17 and ref.ir_version == 8  # float output leaves opset / IR alone

    # the float reference holds exactly codes * scale in the weight's layout
    expect_w = layer.tensor(res.codes.astype(np.float64) * np.repeat(res.scale, res.block_size, axis=1))
    np.testing.assert_allclose(nh.to_array(init(ref, "W")), expect_w, rtol=1e-6)

    # the QDQ graph: the float initializer is gone, a DQ node produces "W" from the packed codes
    assert "W" not in {t.name for t in q.graph.initializer}
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and list(dq[0].output) == ["W"] and len(dq[0].input) == 2
    assert h.get_attribute_value(dq[0].attribute[0]) == layer.channel_axis
    packed = init(q, dq[0].input[0])
    assert TP.DataType.Name(packed.data_type) == type_name
    np.testing.assert_array_equal(nh.to_array(packed).astype(np.int8), layer.tensor(res.codes))
    assert nh.to_array(init(q, dq[0].input[1])).shape == (res.codes.shape[0],)

    assert_close(run(q, feeds), run(ref, feeds))


def test_file_size_shrinks_with_bits(tmp_path):
    model, layer, _ = matmul_model(K=256, N=256)
    size = {"float": oio.model_size_bytes(model)}
    for bits in (8, 4, 2):
        q = emit(model, [(layer, rtn(layer.matrix(), bits), bits)])
        path = tmp_path / f"m{bits}.onnx"
        osave.save_model_atomic(q, path)
        size[bits] = os.path.getsize(path)
        assert size[bits] == oio.model_size_bytes(q)
    assert 0.24 < size[8] / size["float"] < 0.27
    assert 0.48 < size[4] / size[8] < 0.53
    assert 0.23 < size[2] / size[8] < 0.28


# --- block-wise ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("kind", ["matmul", "gemm_transB0", "gemm_transB1"])
def test_blockwise(kind, bits):
    model, layer, feeds = {
        "matmul": lambda: matmul_model(K=20, N=6),
        "gemm_transB0": lambda: gemm_model(False, K=20, N=6),
        "gemm_transB1": lambda: gemm_model(True, K=20, N=6),
    }[kind]()
    res = rtn(layer.matrix(), bits, block_size=8)  # 3 blocks, the last one partial
    assert res.scale.shape == (6, 3)
    q = emit(model, [(layer, res, bits)])
    onnx.checker.check_model(q, full_check=True)
    assert opset_of(q) == max(21, EXPECTED[bits][1])
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: h.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": layer.reduction_axis, "block_size": 8}
    assert_close(run(q, feeds), run(emit(model, [(layer, res, bits)], fmt="float"), feeds))
    # the blocks matter: one scale per channel would give a different weight
    per_channel = Result(res.codes, res.scale[:, :1], 20)
    assert not np.allclose(dequantize(per_channel), dequantize(res))


def test_blockwise_conv_rejected():
    model, layer, _ = conv_model(1)
    res = rtn(layer.matrix(), 4, block_size=18)  # N0 = 36 -> 2 blocks
    with pytest.raises(ValueError, match="block-wise"):
        emit(model, [(layer, res, 4)])


# --- shared weights ---------------------------------------------------------------------------------------
def shared_model():
    K = 8
    W = RNG.standard_normal((K, K)).astype(np.float32)
    nodes = [
        h.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
        h.make_node("Relu", ["a"], ["r"]),
        h.make_node("MatMul", ["r", "W"], ["y"], name="mm2"),
        h.make_node("Gather", ["W", "idx"], ["g"], axis=0),  # a consumer that is not a compressible layer
    ]
    m = _model(
        nodes,
        [h.make_tensor_value_info("x", TP.FLOAT, [3, K])],
        [h.make_tensor_value_info("y", TP.FLOAT, [3, K]), h.make_tensor_value_info("g", TP.FLOAT, [2, K])],
        [nh.from_array(W, "W"), nh.from_array(np.array([1, 5], np.int64), "idx")],
    )
    feeds = {"x": RNG.standard_normal((3, K)).astype(np.float32)}
    return (m, *real_layers(m, "mm1", "mm2"), feeds)


def _run_all(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), oio.session_options(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("both", [True, False])
def test_shared_weight_all_consumers_read_dq(both):
    model, l1, l2, feeds = shared_model()
    res = rtn(l1.matrix(), 4)
    items = [(l1, res, 4), (l2, res, 4)] if both else [(l1, res, 4)]
    q = emit(model, items)
    onnx.checker.check_model(q, full_check=True)
    assert [n.op_type for n in q.graph.node].count("DequantizeLinear") == 1
    assert "W" not in {t.name for t in q.graph.initializer}
    y, g = _run_all(q, feeds)
    y_ref, g_ref = _run_all(emit(model, items, fmt="float"), feeds)
    assert_close(y, y_ref)
    assert_close(g, g_ref)
    np.testing.assert_allclose(g, dequantize(res).T[[1, 5]], rtol=1e-6)  # Gather saw codes * scale


def test_shared_weight_quantized_differently_rejected():
    model, l1, l2, _ = shared_model()
    with pytest.raises(OnnxspfqError, match="shared"):
        emit(model, [(l1, rtn(l1.matrix(), 4), 4), (l2, rtn(l2.matrix(), 8), 8)])


# --- opset handling ---------------------------------------------------------------------------------------
def opset11_model():
    """Ops whose semantics or signature changed after opset 11: Softmax (2-D coercion), Squeeze/Unsqueeze and
    ReduceSum (axes attribute -> input), Clip."""
    W = RNG.standard_normal((6, 8)).astype(np.float32)
    nodes = [
        h.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
        h.make_node("Softmax", ["a"], ["b"], axis=1),
        h.make_node("Unsqueeze", ["b"], ["c"], axes=[0]),
        h.make_node("Squeeze", ["c"], ["d"], axes=[0]),
        h.make_node("ReduceSum", ["d"], ["e"], axes=[2], keepdims=1),
        h.make_node("Clip", ["e", "lo", "hi"], ["y"]),
    ]
    m = _model(
        nodes,
        [h.make_tensor_value_info("x", TP.FLOAT, [2, 3, 6])],
        [h.make_tensor_value_info("y", TP.FLOAT, [2, 3, 1])],
        [nh.from_array(W, "W"), nh.from_array(np.array(-1.0, np.float32), "lo"),
         nh.from_array(np.array(2.0, np.float32), "hi")],
        opset=11,
        ir=6,
    )
    return m, real_layers(m, "mm")[0], {"x": RNG.standard_normal((2, 3, 6)).astype(np.float32)}


@pytest.mark.parametrize("bits,opset,ir", [(8, 13, 7), (4, 21, 10), (2, 25, 13)])
def test_opset11_conversion(bits, opset, ir):
    model, layer, feeds = opset11_model()
    before = model.SerializeToString()
    res = rtn(layer.matrix(), bits)
    q = emit(model, [(layer, res, bits)])
    assert model.SerializeToString() == before
    assert (opset_of(q), q.ir_version) == (opset, ir)
    onnx.checker.check_model(q, full_check=True)
    ref = emit(model, [(layer, res, bits)], fmt="float")
    assert opset_of(ref) == 11
    y_ref = run(ref, feeds)
    # opset-11 Softmax(axis=1) normalises over axes 1 and 2 together (opset 13+ would use axis 1 only)
    np.testing.assert_allclose(y_ref.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert_close(run(q, feeds), y_ref)


def test_opset13_reducemean_converted_to_21():
    W = RNG.standard_normal((6, 8)).astype(np.float32)
    model = _model(
        [h.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
         h.make_node("ReduceMean", ["a"], ["y"], axes=[1], keepdims=0)],  # axes became an input at opset 18
        [h.make_tensor_value_info("x", TP.FLOAT, [3, 6])],
        [h.make_tensor_value_info("y", TP.FLOAT, [3])],
        [nh.from_array(W, "W")],
        opset=13,
        ir=7,
    )
    layer, feeds = real_layers(model, "mm")[0], {"x": RNG.standard_normal((3, 6)).astype(np.float32)}
    res = rtn(layer.matrix(), 3)
    q = emit(model, [(layer, res, 3)])
    assert (opset_of(q), q.ir_version) == (21, 10)
    onnx.checker.check_model(q, full_check=True)
    assert_close(run(q, feeds), run(emit(model, [(layer, res, 3)], fmt="float"), feeds))


def test_opset_never_lowered():
    model, layer, feeds = matmul_model(opset=22, ir=11)
    q = emit(model, [(layer, rtn(layer.matrix(), 8), 8)])
    assert opset_of(q) == 22 and q.ir_version == min_ir_version(22) == 10
    onnx.checker.check_model(q, full_check=True)
    run(q, feeds)


def test_min_ir_version_table():
    assert [min_ir_version(o) for o in (11, 13, 17, 21, 25)] == [6, 7, 8, 10, 13]


# --- bad input --------------------------------------------------------------------------------------------
def test_bad_inputs_rejected():
    model, layer, _ = matmul_model()
    res = rtn(layer.matrix(), 4)
    with pytest.raises(OnnxspfqError, match="format"):
        emit(model, [(layer, res, 4)], fmt="int4")
    with pytest.raises(OnnxspfqError, match="bits"):
        emit(model, [(layer, res, 5)])
    with pytest.raises(OnnxspfqError, match="range"):
        emit(model, [(layer, rtn(layer.matrix(), 8), 4)])
    with pytest.raises(OnnxspfqError, match="scale shape"):
        emit(model, [(layer, Result(res.codes, res.scale[:3], res.block_size), 4)])
    with pytest.raises(OnnxspfqError, match="NaN"):
        emit(model, [(layer, Result(res.codes, res.scale * np.nan, res.block_size), 4)])
    with pytest.raises(OnnxspfqError, match="not an initializer"):
        emit(model, [(replace(layer, weight="nope"), res, 4)])
    with pytest.raises(OnnxspfqError, match="no node named"):
        emit(model, [(replace(layer, name="other"), res, 4)])


def test_int2_packing_is_four_per_byte():
    codes = np.array([-1, 0, 1, 1, -1, -1, 0, 0], np.int8)
    t = nh.from_array(codes.astype(ml_dtypes.int2), "c")
    assert len(t.raw_data) == 2
    np.testing.assert_array_equal(nh.to_array(t).astype(np.int8), codes)


# --- io ---------------------------------------------------------------------------------------------------
def test_session_options_pins_fp32():
    so = oio.session_options()
    assert so.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_model_size_bytes_is_serialized_size():
    model, _, _ = matmul_model()
    assert oio.model_size_bytes(model) == len(model.SerializeToString())


def test_save_atomic_roundtrip(tmp_path):
    model, _, _ = matmul_model()
    path = tmp_path / "m.onnx"
    osave.save_model_atomic(model, path)
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert onnx.load(path).SerializeToString() == model.SerializeToString()


def test_save_atomic_failure_leaves_nothing(tmp_path, monkeypatch):
    model, layer, _ = matmul_model()
    path = tmp_path / "m.onnx"

    def boom(src, dst):
        raise OSError("simulated failure at rename")

    monkeypatch.setattr(oio.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        osave.save_model_atomic(model, path)
    assert os.listdir(tmp_path) == []
    # an existing file at the target stays intact
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="simulated"):
        osave.save_model_atomic(model, path)
    assert os.listdir(tmp_path) == ["m.onnx"] and path.read_bytes() == b"old"


def test_save_atomic_missing_directory(tmp_path):
    model, _, _ = matmul_model()
    with pytest.raises(OnnxspfqError, match="does not exist"):
        osave.save_model_atomic(model, tmp_path / "missing" / "m.onnx")
    assert os.listdir(tmp_path) == []
    with pytest.raises(OnnxspfqError, match="is a directory"):
        osave.save_model_atomic(model, tmp_path)


def test_save_external_data(tmp_path):
    model, layer, feeds = matmul_model(K=64, N=64)
    q = emit(model, [(layer, rtn(layer.matrix(), 4), 4)])
    before = q.SerializeToString()
    path = tmp_path / "big.onnx"
    osave.save_model_atomic(q, path, external_data_threshold=0)
    assert q.SerializeToString() == before  # caller's proto restored
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert os.path.getsize(tmp_path / "big.onnx.data") >= 64 * 64 // 2
    header = onnx.load(path, load_external_data=False)
    assert any(t.data_location == TP.EXTERNAL for t in header.graph.initializer)
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), oio.session_options(), providers=["CPUExecutionProvider"])
    assert_close(sess.run(None, feeds)[0], run(q, feeds))


def test_save_external_failure_leaves_nothing(tmp_path, monkeypatch):
    model, _, _ = matmul_model(K=64, N=64)
    before = model.SerializeToString()

    def boom(src, dst):
        raise OSError("simulated failure at rename")

    monkeypatch.setattr(oio.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        osave.save_model_atomic(model, tmp_path / "big.onnx", external_data_threshold=0)
    assert os.listdir(tmp_path) == []
    assert model.SerializeToString() == before


def test_save_rejects_unloaded_external_tensors(tmp_path):
    model, _, _ = matmul_model(K=64, N=64)
    osave.save_model_atomic(model, tmp_path / "a.onnx", external_data_threshold=0)
    header = onnx.load(tmp_path / "a.onnx", load_external_data=False)
    with pytest.raises(OnnxspfqError, match="external"):
        osave.save_model_atomic(header, tmp_path / "b.onnx")
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "a.onnx.data"]
