"""2:4 axis checks, magnitude N:M masks and sparse-initializer output run in onnxruntime CPU."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxspfq.emit_sparse import (
    check_2_4, check_nm, dequantize_result, emit_sparse, encode, nm_mask, sparsity_report, to_sparse_proto,
)
from onnxspfq.errors import OnnxspfqError
from onnxspfq.layers import Layer

from emit_helpers import Result, real_layers, session


CASES = [  # (op, trans_b, shape, reduction axis)
    ("Conv", False, (8, 16, 3, 3), 1),
    ("Conv", False, (4, 8, 5), 1),
    ("MatMul", False, (16, 12), 0),
    ("Gemm", True, (12, 16), 1),
    ("Gemm", False, (16, 12), 0),
]


@pytest.mark.parametrize("op,trans_b,shape,axis", CASES)
def test_mask_gives_2_4_along_reduction_axis(op: str, trans_b: bool, shape: tuple, axis: int) -> None:
    rng = np.random.default_rng(0)
    W = rng.standard_normal(shape)
    mask = nm_mask(W, op, trans_b)
    assert mask.shape == W.shape and mask.mean() == 0.5
    ok, why = check_2_4(W * mask, op, trans_b)
    assert ok, why
    assert not check_2_4(W, op, trans_b)[0]  # dense weights fail
    # the kept entries are the 2 largest |w| in each group of 4 along the axis
    A = np.moveaxis(np.abs(W), axis, -1).reshape(-1, 4)
    K = np.moveaxis(mask, axis, -1).reshape(-1, 4)
    assert np.all(np.sort(A, axis=1)[:, 2:].sum(1) == (A * K).sum(1))


@pytest.mark.parametrize("op,trans_b,shape,axis", CASES)
def test_wrong_axis_rejected(op: str, trans_b: bool, shape: tuple, axis: int) -> None:
    rng = np.random.default_rng(1)
    W = rng.standard_normal(shape)
    wrong = 0 if axis == 1 else 1
    # prune 2:4 along the wrong axis by swapping it into the place nm_mask uses
    Ws = np.swapaxes(W, axis, wrong)
    Wp = np.swapaxes(Ws * nm_mask(Ws, op, trans_b), axis, wrong)
    assert np.count_nonzero(Wp) == W.size // 2
    ok, why = check_2_4(Wp, op, trans_b)
    assert not ok
    assert f"along axis {axis}" in why and f"holds along axis {wrong} instead" in why


def test_conv_channels_not_multiple_of_4_rejected() -> None:
    W = np.zeros((8, 6, 3, 3))  # all zero, but C = 6
    ok, why = check_2_4(W, "Conv")
    assert not ok and "not a multiple of 4" in why
    with pytest.raises(OnnxspfqError, match="not a multiple of 4"):
        nm_mask(np.ones((8, 6, 3, 3)), "Conv")


def test_check_nm_and_bad_input() -> None:
    W = np.zeros((8, 8))
    W[0:2, :] = 1.0  # 2 non-zeros in each first group along axis 0
    assert check_nm(W, "MatMul", n=2, m=4)[0] and not check_nm(W, "MatMul", n=1, m=4)[0]
    with pytest.raises(OnnxspfqError, match="unknown layer op"):
        check_2_4(W, "Add")
    with pytest.raises(OnnxspfqError, match="2-D"):
        check_2_4(np.zeros((4, 4, 4)), "MatMul")
    with pytest.raises(OnnxspfqError, match="0 < n <= m"):
        nm_mask(W, "MatMul", n=5, m=4)


def test_encode_picks_sparse_only_when_smaller() -> None:
    rng = np.random.default_rng(2)
    picked = {}
    for density in (0.05, 0.2, 0.3, 0.36, 0.5, 1.0):
        W = rng.standard_normal((64, 64)).astype(np.float32)
        W[rng.random(W.shape) >= density] = 0
        dense = numpy_helper.from_array(W, "w").ByteSize()
        sparse = to_sparse_proto(W, "w").ByteSize()
        enc = encode(W, "w")
        picked[density] = isinstance(enc, onnx.SparseTensorProto)
        assert picked[density] == (sparse < dense)
        assert enc.ByteSize() == min(sparse, dense)
    # 12 B per non-zero vs 4 B per weight: crossover near 1/3 density
    assert picked[0.05] and picked[0.2] and picked[0.3]
    assert not picked[0.36] and not picked[0.5] and not picked[1.0]


def test_sparsity_report() -> None:
    rng = np.random.default_rng(3)
    W = rng.standard_normal((32, 64)).astype(np.float32)
    W[:, 4:] = 0  # 1/16 density
    r = sparsity_report(W, "MatMul")
    assert r["zeros"] == 32 * 60 and r["zero_fraction"] == 60 / 64
    assert r["format"] == "sparse" and r["bytes"] == r["sparse_bytes"] < r["dense_bytes"]
    assert 6.0 <= r["bits_per_weight"] < 6.5  # 12 B * 8 / 16 = 6 bits per weight plus headers
    assert r["nm_2_4"] is False  # rows 0..3 of each column are all non-zero along axis 0
    d = sparsity_report(W * nm_mask(W, "Gemm", trans_b=True), "Gemm", trans_b=True)
    assert d["nm_2_4"] is True and d["format"] == "sparse"
    full = sparsity_report(rng.standard_normal((32, 64)).astype(np.float32))
    assert full["format"] == "dense" and 32.0 <= full["bits_per_weight"] < 32.2 and "nm_2_4" not in full


def build_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, list[Layer]]:
    """x[b,4,6,6] -> Conv(W1) -> Relu -> Flatten -> MatMul(W2) -> Gemm(W3, transB=1) -> MatMul(W4)."""
    W1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    W2 = rng.standard_normal((288, 16)).astype(np.float32)
    W3 = rng.standard_normal((12, 16)).astype(np.float32)
    W4 = rng.standard_normal((12, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "W2"], ["m"], name="mm"),
        helper.make_node("Gemm", ["m", "W3"], ["gm"], name="gemm", transB=1),
        helper.make_node("MatMul", ["gm", "W4"], ["y"], name="mm2"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((W1, "W1"), (W2, "W2"), (W3, "W3"), (W4, "W4"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, real_layers(model, "conv", "mm", "gemm", "mm2")


def test_emit_sparse_runs_and_matches_dense() -> None:
    rng = np.random.default_rng(4)
    model, (l1, l2, l3, l4) = build_model(rng)
    # conv: 4-bit codes, dense -> dense initializer
    r1 = Result(rng.integers(-7, 8, size=(8, 36)).astype(np.int8), rng.uniform(0.01, 0.1, (8, 1)), 36)
    # mm: ternary codes with 90% zeros, blocked scales -> sparse initializer
    c2 = rng.integers(-1, 2, size=(16, 288)).astype(np.int8)
    c2[rng.random(c2.shape) < 0.85] = 0
    r2 = Result(c2, rng.uniform(0.01, 0.1, (16, 288 // 32)), 32)
    # gemm: magnitude 2:4 pruned float matrix (50% density) -> masked dense
    W3p = l3.W0 * nm_mask(l3.W0, "Gemm", trans_b=True)
    r3 = l3.matrix() * nm_mask(l3.W0, "Gemm", trans_b=True)
    # mm2: all codes zero -> empty sparse tensor
    r4 = Result(np.zeros((8, 12), np.int8), np.ones((8, 1)), 12)
    out = emit_sparse(model, [(l1, r1, 4), (l2, r2, 2), (l3, r3), (l4, r4, 2)])
    onnx.checker.check_model(out)
    onnx.shape_inference.infer_shapes(out)  # non-strict inference passes (strict fails: see module docstring)
    dense_names = {t.name for t in out.graph.initializer}
    sparse_names = {t.values.name for t in out.graph.sparse_initializer}
    assert dense_names == {"W1", "W3"} and sparse_names == {"W2", "W4"}
    assert check_2_4(numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W3")), "Gemm", True)[0]

    # reference: the same compressed weights written dense
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    mats = {"W1": l1.tensor(dequantize_result(r1)), "W2": l2.tensor(dequantize_result(r2)), "W3": W3p,
            "W4": l4.tensor(dequantize_result(r4))}
    for t in ref.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(mats[t.name].astype(np.float32), t.name))
    x = rng.standard_normal((3, 4, 6, 6)).astype(np.float32)
    y_sparse = session(out).run(None, {"x": x})[0]
    y_dense = session(ref).run(None, {"x": x})[0]
    assert np.array_equal(y_sparse, y_dense)
    # and the dense reference itself computes the compressed network (not the float one)
    y_float = session(model).run(None, {"x": x})[0]
    assert not np.allclose(y_dense, y_float)
    # the sparse file is smaller than the masked-dense one
    print(f"\nsparse-initializer model {out.ByteSize()} B vs all-dense compressed {ref.ByteSize()} B "
          f"vs float {model.ByteSize()} B")
    assert out.ByteSize() < ref.ByteSize()


def test_emit_sparse_bad_input() -> None:
    rng = np.random.default_rng(5)
    model, (l1, l2, l3, l4) = build_model(rng)
    r4 = Result(np.zeros((8, 12), np.int8), np.ones((8, 1)), 12)
    with pytest.raises(OnnxspfqError, match="two items"):
        emit_sparse(model, [(l4, r4), (l4, r4)])
    with pytest.raises(OnnxspfqError, match="does not map to the weight"):
        emit_sparse(model, [(l4, Result(np.zeros((4, 12), np.int8), np.ones((4, 1)), 12))])
    ghost = replace(l4, name="ghost", weight="nope")  # names a weight the model does not have
    with pytest.raises(OnnxspfqError, match="not a dense initializer"):
        emit_sparse(model, [(ghost, r4)])
