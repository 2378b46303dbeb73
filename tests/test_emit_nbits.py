"""MatMulNBits emission checked against onnxruntime CPU: outputs equal x @ (codes*scale) to fp32 tolerance."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxspfq.emit_nbits import choose_block_size, dequantize_nbits, emit_nbits, pack_nbits
from onnxspfq.errors import OnnxspfqError
from onnxspfq.layers import Layer

from emit_helpers import Result, real_layers, session


def matmul_model(K: int, N: int, rank: int, rng: np.random.Generator) -> tuple[onnx.ModelProto, Layer]:
    W = rng.standard_normal((K, N)).astype(np.float32)
    shape = ["b", 3, K] if rank == 3 else ["b", K]
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    g = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape[:-1] + [N])], [numpy_helper.from_array(W, "W")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return m, real_layers(m, "mm")[0]


def random_result(N: int, K: int, bits: int, rb: int, rng: np.random.Generator) -> Result:
    if bits == 1:
        codes = rng.choice(np.array([-1, 1], np.int8), size=(N, K))
    else:
        L = 1 if bits == 2 else 2 ** (bits - 1) - 1
        codes = rng.integers(-L, L + 1, size=(N, K)).astype(np.int8)
    scale = rng.uniform(0.01, 0.2, size=(N, -(-K // rb)))
    return Result(codes, scale, rb)


def reference(x: np.ndarray, r: Result) -> np.ndarray:
    K = r.codes.shape[1]
    Wq = r.codes.astype(np.float64) * np.repeat(r.scale, r.block_size, axis=1)[:, :K]  # (N, K)
    return x.astype(np.float64) @ Wq.T


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("bits", [8, 4, 3, 2, 1])
@pytest.mark.parametrize("rank", [2, 3])
def test_matches_codes_times_scale(bits: int, rank: int) -> None:
    rng = np.random.default_rng(bits * 10 + rank)
    K, N = 100, 12  # K not a multiple of any block size: padding is exercised
    model, layer = matmul_model(K, N, rank, rng)
    res = random_result(N, K, bits, K, rng)  # per-channel
    out, skipped = emit_nbits(model, [(layer, res, bits)])
    onnx.checker.check_model(out)
    assert skipped == []
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["MatMulNBits"]
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs["bits"] == {8: 8, 4: 4, 3: 4, 2: 2, 1: 2}[bits]
    assert attrs["K"] == K and attrs["N"] == N and attrs["accuracy_level"] == 0
    assert K % attrs["block_size"] != 0
    assert "W" not in {t.name for t in out.graph.initializer}
    x = rng.standard_normal((4, 3, K) if rank == 3 else (4, K)).astype(np.float32)
    y = session(out).run(None, {"x": x})[0]
    assert y.shape == ((4, 3, N) if rank == 3 else (4, N))
    assert rel(y, reference(x, res)) < 1e-5


@pytest.mark.parametrize("bits,rb,force", [(4, 32, None), (4, 64, 16), (2, 512, None), (8, 16, None)])
def test_blocked_scales(bits: int, rb: int, force: int | None) -> None:
    rng = np.random.default_rng(rb + bits)
    K, N = 600, 8
    model, layer = matmul_model(K, N, 2, rng)
    res = random_result(N, K, bits, rb, rng)
    out, skipped = emit_nbits(model, [(layer, res, bits)], block_size=force)
    assert skipped == []
    B = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}["block_size"]
    assert rb % B == 0 and (force is None or B == force) and B <= 256
    x = rng.standard_normal((5, K)).astype(np.float32)
    assert rel(session(out).run(None, {"x": x})[0], reference(x, res)) < 1e-5


def test_pack_roundtrip_exact() -> None:
    rng = np.random.default_rng(3)
    for bits in (8, 4, 3, 2, 1):
        res = random_result(7, 90, bits, 90, rng)
        w = pack_nbits(res.codes, res.scale, 90, bits, 32)
        assert np.array_equal(dequantize_nbits(w), (res.codes * res.scale).T)


def test_block_choice() -> None:
    assert choose_block_size(100, 100, 4) in (16, 32, 64, 128, 256)
    assert choose_block_size(600, 24, 4) is None  # 24 is no multiple of 16 and there are many blocks
    assert choose_block_size(600, 48, 4) == 16
    # per-channel, K = 256: one block of 256 has the fewest scales and no padding
    assert choose_block_size(256, 256, 4) == 256


def test_other_layers_returned_untouched() -> None:
    """Conv, Gemm with alpha != 1 and MatMul with blocks of 3 stay float and are returned as not converted."""
    rng = np.random.default_rng(5)
    K, N, M = 64, 32, 10
    Wc = rng.standard_normal((2, 1, 3, 3)).astype(np.float32)
    W1 = rng.standard_normal((K, N)).astype(np.float32)
    W2 = rng.standard_normal((M, N)).astype(np.float32)  # Gemm transB=1: [M, N]
    W3 = rng.standard_normal((M, M)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["img", "Wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "W2"], ["g"], name="gemm", transB=1, alpha=0.5),
        helper.make_node("MatMul", ["g", "W3"], ["y"], name="mm_blk"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((Wc, "Wc"), (W1, "W1"), (W2, "W2"), (W3, "W3"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K]),
                                       helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", M]),
                           helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    lc, l1, l2, l3 = real_layers(model, "conv", "mm", "gemm", "mm_blk")
    rc = random_result(2, 9, 4, 9, rng)
    r1 = random_result(N, K, 4, K, rng)
    r2 = random_result(M, N, 4, N, rng)
    r3 = random_result(M, M, 4, 3, rng)  # block size 3 with several blocks: no MatMulNBits form
    out, skipped = emit_nbits(model, [(lc, rc, 4), (l1, r1, 4), (l2, r2, 4), (l3, r3, 4)])
    onnx.checker.check_model(out)
    assert skipped == ["conv", "gemm", "mm_blk"]
    assert [n.op_type for n in out.graph.node] == ["Conv", "MatMulNBits", "Gemm", "MatMul"]
    inits = {t.name: t for t in out.graph.initializer}
    assert "W1" not in inits
    for t in model.graph.initializer[:1] + model.graph.initializer[2:]:
        assert inits[t.name].SerializeToString() == t.SerializeToString()
    x = rng.standard_normal((3, K)).astype(np.float32)
    img = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    h = reference(x, r1)
    expect = 0.5 * (h @ W2.T.astype(np.float64)) @ W3.astype(np.float64)
    y, c = session(out).run(None, {"x": x, "img": img})
    assert rel(y, expect) < 1e-5
    assert np.array_equal(c, session(model).run(None, {"x": x, "img": img})[1])


@pytest.mark.parametrize("trans_b,bias_shape", [(1, (6,)), (0, (1, 6)), (1, None)])
def test_gemm_converted_with_bias(trans_b: int, bias_shape: tuple | None) -> None:
    rng = np.random.default_rng(8 + trans_b)
    K, N = 40, 6
    W = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    inits = [numpy_helper.from_array(W, "W")]
    ins = ["x", "W"]
    if bias_shape is not None:
        bias = rng.standard_normal(bias_shape).astype(np.float32)
        inits.append(numpy_helper.from_array(bias, "bias"))
        ins.append("bias")
    node = helper.make_node("Gemm", ins, ["y"], name="gemm", transB=trans_b)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    (layer,) = real_layers(model, "gemm")
    res = random_result(N, K, 3, K, rng)
    out, skipped = emit_nbits(model, [(layer, res, 3)])
    onnx.checker.check_model(out)
    assert skipped == [] and [n.op_type for n in out.graph.node] == ["MatMulNBits"]
    assert {t.name for t in out.graph.initializer} & {"W", "bias"} == ({"bias"} if bias_shape == (N,) else set())
    x = rng.standard_normal((4, K)).astype(np.float32)
    expect = reference(x, res) + (bias.reshape(N) if bias_shape is not None else 0)
    assert rel(session(out).run(None, {"x": x})[0], expect) < 1e-5


def test_real_pytorch_mlp(fmnist_mlp) -> None:
    """The repo's PyTorch-exported MLP (Gemm transB=1 + bias): every layer converts; outputs equal the same model
    with the dequantized weights written as floats."""
    model = onnx.load(str(fmnist_mlp))
    inits = {t.name: t for t in model.graph.initializer}
    items, ref = [], onnx.ModelProto()
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    layers = dict(zip((n.name for n in gemms), real_layers(model, *(n.name for n in gemms))))
    ref.CopyFrom(model)
    ref_inits = {t.name: t for t in ref.graph.initializer}
    for n in model.graph.node:
        if n.op_type != "Gemm":
            continue
        W = numpy_helper.to_array(inits[n.input[1]])  # [N, K] (transB=1)
        s = np.abs(W).max(1, keepdims=True).astype(np.float64) / 7
        codes = np.clip(np.rint(W / s), -7, 7).astype(np.int8)
        items.append((layers[n.name], Result(codes, s, W.shape[1]), 4))
        ref_inits[n.input[1]].CopyFrom(numpy_helper.from_array((codes * s).astype(np.float32), n.input[1]))
    assert len(items) == 3
    out, skipped = emit_nbits(model, items)
    assert skipped == [] and [n.op_type for n in out.graph.node].count("MatMulNBits") == 3
    name = model.graph.input[0].name
    x = np.random.default_rng(9).standard_normal((5, 1, 28, 28)).astype(np.float32)
    y, y_ref = session(out).run(None, {name: x})[0], session(ref).run(None, {name: x})[0]
    assert rel(y, y_ref) < 1e-5
    print(f"\nfmnist_mlp 4-bit MatMulNBits: fp32 {model.ByteSize()} B -> {out.ByteSize()} B "
          f"({out.ByteSize() / model.ByteSize():.4f}), blocks "
          f"{[helper.get_attribute_value(a) for n in out.graph.node for a in n.attribute if a.name == 'block_size']}")
    # packed codes (padded to whole blocks) + fp32 scales + fp32 biases, plus < 2 KiB of graph and headers
    payload = 0
    for n in out.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            nblk = -(-a["K"] // a["block_size"])
            payload += a["N"] * nblk * (a["block_size"] // 2 + 4) + a["N"] * 4
    assert payload <= out.ByteSize() <= payload + 2048


def test_shared_weight_kept_for_other_consumer() -> None:
    rng = np.random.default_rng(6)
    K, N = 32, 16
    W = rng.standard_normal((K, N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="m1"),
             helper.make_node("MatMul", ["x", "W"], ["b"], name="m2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", N]) for n in ("a", "b")],
                          [numpy_helper.from_array(W, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    res = random_result(N, K, 8, K, rng)
    out, skipped = emit_nbits(model, [(real_layers(model, "m2")[0], res, 8)])
    assert skipped == [] and [n.op_type for n in out.graph.node] == ["MatMul", "MatMulNBits"]
    assert out.graph.node[1].name == "m2" and "W" in {t.name for t in out.graph.initializer}
    x = rng.standard_normal((2, K)).astype(np.float32)
    a, b = session(out).run(None, {"x": x})
    assert rel(a, x.astype(np.float64) @ W) < 1e-5 and rel(b, reference(x, res)) < 1e-5


def test_bad_input_raises() -> None:
    rng = np.random.default_rng(7)
    model, layer = matmul_model(40, 8, 2, rng)
    res = random_result(8, 40, 4, 40, rng)
    bad = Result(res.codes.copy(), res.scale, 40)
    bad.codes[0, 0] = 9
    with pytest.raises(OnnxspfqError, match="codes must lie"):
        emit_nbits(model, [(layer, bad, 4)])
    with pytest.raises(OnnxspfqError, match="1-bit codes"):
        emit_nbits(model, [(layer, random_result(8, 40, 2, 40, rng), 1)])
    with pytest.raises(OnnxspfqError, match="codes shape"):
        emit_nbits(model, [(layer, Result(res.codes.T.copy(), res.scale, 40), 4)])
    with pytest.raises(OnnxspfqError, match="unsupported bits"):
        emit_nbits(model, [(layer, res, 5)])
    with pytest.raises(OnnxspfqError, match="block_size"):
        emit_nbits(model, [(layer, res, 4)], block_size=48)
    with pytest.raises(OnnxspfqError, match="accuracy_level"):
        emit_nbits(model, [(layer, res, 4)], accuracy_level=7)


@pytest.mark.parametrize("bits", [8, 4, 3, 2, 1])
def test_file_size_vs_fp32(bits: int) -> None:
    rng = np.random.default_rng(11)
    K, N = 512, 256
    model, layer = matmul_model(K, N, 2, rng)
    res = random_result(N, K, bits, K, rng)
    out, _ = emit_nbits(model, [(layer, res, bits)])
    fp32, nb = model.ByteSize(), out.ByteSize()
    stored = {8: 8, 4: 4, 3: 4, 2: 2, 1: 2}[bits]
    B = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}["block_size"]
    payload = K * N * stored / 8 + N * (K // B) * 4
    print(f"\nMatMulNBits bits={bits} (stored {stored}) K={K} N={N} block={B}: fp32 {fp32} B, nbits {nb} B, "
          f"ratio {nb / fp32:.4f}, {8 * nb / (K * N):.3f} bits/weight")
    assert payload <= nb <= payload + 1024
