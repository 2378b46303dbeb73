"""capture.py and gram.im2col: im2col against onnxruntime's Conv, and the incremental per-segment capture against
a naive full re-run of the modified model."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxspfq.capture import Capture

from reference_run import run_model
from onnxspfq.graph import find_layers
from onnxspfq.fold import fold_weight_chains
from onnxspfq.gram import Grams, im2col

RNG = np.random.default_rng(1)
# Gram products of float32 rows run in float32 (gram.PRODUCT_DTYPE): entries agree with float64 to about this
# fraction of the matrix's largest (test_float32_gram_products_stay_close_to_float64 bounds it on wide rows)
F32_GRAM = 2e-5


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)),
                     opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def _vi(name, shape):
    return h.make_tensor_value_info(name, TP.FLOAT, shape)


def _run(m, feeds, outputs=None):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(outputs, feeds)


# ------------------------------------------------------------------------------------------------------- im2col
CONVS = {
    "1d_stride_pads": dict(x=(2, 4, 11), w=(5, 4, 3), strides=[2], pads=[2, 1]),
    "2d_stride_pads": dict(x=(2, 3, 9, 7), w=(4, 3, 3, 2), strides=[2, 1], pads=[1, 0, 2, 1]),
    "2d_same_upper": dict(x=(1, 3, 9, 8), w=(4, 3, 3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    "2d_same_lower": dict(x=(1, 2, 7, 6), w=(3, 2, 2, 3), strides=[2, 3], auto_pad="SAME_LOWER"),
    "2d_valid_dilated": dict(x=(2, 2, 9, 9), w=(3, 2, 3, 3), dilations=[2, 3], auto_pad="VALID"),
    "2d_grouped": dict(x=(2, 6, 6, 6), w=(4, 3, 3, 3), group=2, pads=[1, 1, 1, 1], dilations=[1, 2]),
    "2d_depthwise": dict(x=(2, 5, 7, 7), w=(5, 1, 3, 3), group=5, strides=[2, 2], pads=[1, 1, 1, 1]),
    "1d_depthwise_mult": dict(x=(2, 3, 10), w=(6, 1, 4), group=3, auto_pad="SAME_UPPER", strides=[3]),
    "3d": dict(x=(1, 2, 5, 4, 6), w=(3, 2, 2, 3, 2), strides=[1, 2, 2], pads=[0, 1, 1, 1, 0, 0]),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_im2col_matches_onnxruntime_conv_per_group(name):
    spec = dict(CONVS[name])
    xs, ws = spec.pop("x"), spec.pop("w")
    w, b = _w(*ws), _w(ws[0])
    node = h.make_node("Conv", ["x", "W", "B"], ["y"], **spec)
    m = _model([node], [_vi("x", list(xs))], [_vi("y", ["n"] * len(xs))],
               [nh.from_array(w, "W"), nh.from_array(b, "B")])
    (layer,), _ = find_layers(m)
    x = _w(*xs)
    y = _run(m, {"x": x})[0] - b.reshape((1, -1) + (1,) * (len(xs) - 2))
    cols = im2col(x, layer.kernel_shape, layer.strides, layer.pads, layer.dilations)
    assert layer.row_count(x.shape) == cols.shape[0] == layer.rows(x).shape[0]
    W = layer.matrix()
    rows = layer.group_rows()
    assert len(rows) == layer.groups and cols.shape[1] == layer.groups * layer.n0
    for g, r in enumerate(rows):
        yg = cols[:, g * layer.n0:(g + 1) * layer.n0] @ W[r].T         # (N * positions, M / groups)
        ref = np.moveaxis(y[:, r], 1, -1).reshape(-1, r.stop - r.start)
        np.testing.assert_allclose(yg, ref, rtol=1e-4, atol=1e-4)
    sub = np.array([0, 3, cols.shape[0] - 1])
    np.testing.assert_array_equal(im2col(x, layer.kernel_shape, layer.strides, layer.pads, layer.dilations, sub),
                                  cols[sub])


# -------------------------------------------------------------------------------------------- a residual model
def _residual_model():
    """Conv -> Relu -> grouped Conv (SAME_UPPER) -> Relu -> Add(residual) -> depthwise Conv (stride 2) -> Relu ->
    Reshape [N, 8, 16] -> MatMul W_mm (3-D input) -> MatMul W_mm again (shared) -> Flatten -> Gemm (transB)."""
    nodes = [
        h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"]),
        h.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", group=2, auto_pad="SAME_UPPER"),
        h.make_node("Relu", ["c2"], ["r2"]),
        h.make_node("Add", ["r2", "r1"], ["s"]),
        h.make_node("Conv", ["s", "W3"], ["c3"], name="dw", group=8, strides=[2, 2], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c3"], ["r3"]),
        h.make_node("Reshape", ["r3", "shape"], ["t"]),
        h.make_node("MatMul", ["t", "W_mm"], ["m1"], name="mm"),
        h.make_node("MatMul", ["m1", "W_mm"], ["m2"], name="mm_shared"),
        h.make_node("Flatten", ["m2"], ["f"]),
        h.make_node("Gemm", ["f", "W_g", "B_g"], ["y"], name="gemm", transB=1),
    ]
    inits = [nh.from_array(_w(8, 3, 3, 3), "W1"), nh.from_array(_w(8), "B1"),
             nh.from_array(_w(8, 4, 3, 3) * 0.3, "W2"), nh.from_array(_w(8, 1, 3, 3), "W3"),
             nh.from_array(np.array([0, 8, 16], dtype=np.int64), "shape"),
             nh.from_array(_w(16, 16) * 0.3, "W_mm"), nh.from_array(_w(5, 128) * 0.1, "W_g"),
             nh.from_array(_w(5), "B_g")]
    return _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 5])], inits)


def _batches(n_batches=3, size=2):
    return [{"x": _w(size, 3, 8, 8)} for _ in range(n_batches)]


def _compress(w):
    """A stand-in for a quantizer: a coarse grid, so X~ really differs from X downstream."""
    step = np.abs(w).max() / 3
    return (np.round(w / step) * step).astype(np.float32)


def _naive_grams(model, layer, batches, weights):
    """Layer input from the WHOLE modified model (layer inputs added as graph outputs, one run per batch)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend([onnx.ValueInfoProto(name=layer.input)])
    outs_f = run_model(m, batches, None, output_names=[layer.input])
    outs_c = run_model(m, batches, weights, output_names=[layer.input])
    grams = [Grams(layer.n0) for _ in layer.group_rows()]
    for (x,), (xt,) in zip(outs_f, outs_c):
        if layer.op == "Conv":
            pads = layer.pads if layer.pads is not None else layer.resolve_pads(x.shape[2:])
            X = im2col(x, layer.kernel_shape, layer.strides, pads, layer.dilations)
            Xt = im2col(xt, layer.kernel_shape, layer.strides, pads, layer.dilations)
        elif layer.op == "Gemm":
            X, Xt = (x.T, xt.T) if layer.trans_a else (x, xt)
        else:
            X, Xt = x.reshape(-1, layer.n0), xt.reshape(-1, layer.n0)
        for g, gram in enumerate(grams):
            cols = slice(g * layer.n0, (g + 1) * layer.n0)
            gram.add(X[:, cols], Xt[:, cols])
    return grams


def _assert_grams_close(a, b, rtol=1e-6):
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        assert ga.m == gb.m
        for M in ("H", "G", "F"):
            A, B = getattr(ga, M), getattr(gb, M)
            err = float(np.abs(A - B).max() / max(np.abs(B).max(), 1e-30))
            assert err <= rtol, f"{M}: relative difference {err:.3g}"


def test_incremental_capture_equals_naive_rerun():
    model = fold_weight_chains(_residual_model())
    layers, _ = find_layers(model)
    assert [la.name for la in layers] == ["conv1", "conv2", "dw", "mm", "gemm"]
    assert layers[3].shared_with == ["mm_shared"] and [len(la.group_rows()) for la in layers] == [1, 2, 8, 1, 1]
    batches = _batches()
    cap = Capture(model, layers, batches, max_patches=None)
    weights: dict[str, np.ndarray] = {}
    for layer in layers:
        got = cap.grams(layer, dict(weights))
        ref = _naive_grams(model, layer, batches, weights)
        _assert_grams_close(got, ref)
        if weights:  # a compressed earlier layer really changes this input
            assert not np.allclose(got[0].H, got[0].F)
        weights[layer.weight] = layer.tensor(_compress(layer.matrix()))
    # (the gemm comparison above covers the shared weight: the naive run replaces W_mm in BOTH MatMuls)
    cap.close()


def test_capture_resets_on_changed_weights_and_earlier_layer(tmp_path):
    model = fold_weight_chains(_residual_model())
    layers, _ = find_layers(model)
    batches = _batches(2)
    cap = Capture(model, layers, batches, max_patches=None, memory_limit_mb=0, spill_dir=str(tmp_path))
    w1 = {layers[0].weight: layers[0].tensor(_compress(layers[0].matrix()))}
    cap.grams(layers[0], {})
    _assert_grams_close(cap.grams(layers[2], w1), _naive_grams(model, layers[2], batches, w1))
    assert os.listdir(tmp_path) and os.listdir(os.path.join(tmp_path, os.listdir(tmp_path)[0]))  # spilled
    w2 = {layers[0].weight: layers[0].tensor(_compress(layers[0].matrix()) * 0.5)}  # changed weight
    _assert_grams_close(cap.grams(layers[3], w2), _naive_grams(model, layers[3], batches, w2))
    _assert_grams_close(cap.grams(layers[1], w2), _naive_grams(model, layers[1], batches, w2))  # earlier layer
    _assert_grams_close(cap.grams(layers[4], {}), _naive_grams(model, layers[4], batches, {}))
    cap.close()
    assert os.listdir(tmp_path) == []


def test_patch_subsampling_same_rows_seeded():
    model = fold_weight_chains(_residual_model())
    layers, _ = find_layers(model)
    batches = _batches(2)
    a = Capture(model, layers, batches, max_patches=40, seed=3).grams(layers[1], {})
    b = Capture(model, layers, batches, max_patches=40, seed=3).grams(layers[1], {})
    c = Capture(model, layers, batches, max_patches=40, seed=4).grams(layers[1], {})
    full = Capture(model, layers, batches, max_patches=None).grams(layers[1], {})
    assert a[0].m == 40 and full[0].m == 2 * 2 * 64  # the cap is per layer, over both batches
    for g in a:  # X~ = X here, and the same rows were kept in both
        np.testing.assert_allclose(g.H, g.G, rtol=1e-12)  # (BLAS may round X^T X and X^T Y differently)
        np.testing.assert_allclose(g.G, g.F, rtol=1e-12)
    np.testing.assert_array_equal(a[1].H, b[1].H)
    assert not np.array_equal(a[1].H, c[1].H)
    w = {layers[0].weight: layers[0].tensor(_compress(layers[0].matrix()))}
    cap = Capture(model, layers, batches, max_patches=40, seed=3)
    sub = cap.grams(layers[1], w)
    # the kept rows: np.random.default_rng([seed, layer index]) over the patches of all batches, sample-major
    L = layers[1]
    (x,) = zip(*run_model(_with_output(model, "r1"), batches, None, ["r1"]))
    (xt,) = zip(*run_model(_with_output(model, "r1"), batches, w, ["r1"]))
    rows = np.sort(np.random.default_rng([3, 1]).choice(2 * 128, 40, replace=False))
    X = np.concatenate([im2col(xb, L.kernel_shape, L.strides, L.pads, L.dilations) for xb in x])[rows]
    Xt = np.concatenate([im2col(xb, L.kernel_shape, L.strides, L.pads, L.dilations) for xb in xt])[rows]
    ref = [Grams(L.n0) for _ in range(2)]
    for g in range(2):
        ref[g].add(X[:, g * L.n0:(g + 1) * L.n0], Xt[:, g * L.n0:(g + 1) * L.n0])
    _assert_grams_close(sub, ref)


def test_patch_cap_does_not_depend_on_batch_size():
    """The same 6 samples as 3 batches of 2 or 1 batch of 6 keep the same patches (per-layer cap)."""
    model = fold_weight_chains(_residual_model())
    layers, _ = find_layers(model)
    small = _batches(3)
    one = [{"x": np.concatenate([b["x"] for b in small])}]
    w = {layers[0].weight: layers[0].tensor(_compress(layers[0].matrix()))}
    a = Capture(model, layers, small, max_patches=50, seed=1).grams(layers[1], w)
    b = Capture(model, layers, one, max_patches=50, seed=1).grams(layers[1], w)
    assert a[0].m == b[0].m == 50
    _assert_grams_close(a, b)


def test_group_patch_cap_applies_to_grouped_convs_only():
    """group_patches caps the grouped / depthwise Convs (the smaller of the two caps), with the same seeded subset
    max_patches would keep; dense Convs keep max_patches."""
    model = fold_weight_chains(_residual_model())
    layers, _ = find_layers(model)
    conv1, conv2, dw = layers[:3]
    assert (conv1.groups, conv2.groups, dw.groups) == (1, 2, 8)
    batches = _batches()
    w = {conv1.weight: conv1.tensor(_compress(conv1.matrix()))}
    cap = Capture(model, layers, batches, max_patches=None, group_patches=30, seed=2)
    assert cap.grams(conv1, {})[0].m == 3 * 2 * 64
    grouped = cap.grams(conv2, w)
    assert [g.m for g in grouped] == [30, 30]
    _assert_grams_close(grouped, Capture(model, layers, batches, max_patches=30, seed=2).grams(conv2, w), rtol=0)
    both = Capture(model, layers, batches, max_patches=20, group_patches=30, seed=2)
    assert both.grams(conv1, {})[0].m == 20 and {g.m for g in both.grams(dw, w)} == {20}


def test_segment_sessions_take_weights_as_constants(monkeypatch):
    """Each segment's session holds the layer weights as constants (onnxruntime optimises those, not inputs), one
    session per segment and set of weights, and still computes what the whole model computes."""
    import onnxspfq.capture as capture_module
    made, real = [], capture_module.session

    def recorded(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(capture_module, "session", recorded)
    model = fold_weight_chains(_residual_model())
    layers, _ = find_layers(model)
    batches = _batches()
    cap = Capture(model, layers, batches, max_patches=None)
    w = {layers[0].weight: layers[0].tensor(_compress(layers[0].matrix())),
         layers[1].weight: layers[1].tensor(_compress(layers[1].matrix()))}
    _assert_grams_close(cap.grams(layers[2], w), _naive_grams(model, layers[2], batches, w))
    weights = {la.weight for la in layers}
    # segments 1 and 2 read W1 / W2: a float and a compressed session each
    assert len(made) == 4 and all(i.name not in weights for sess in made for i in sess.get_inputs())


def _with_output(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend([onnx.ValueInfoProto(name=name)])
    return m


def test_gemm_trans_a_and_3d_matmul_capture():
    nodes = [h.make_node("Gemm", ["x", "Wa"], ["a"], name="ga", transA=1),     # x [4, 6] -> A^T [6, 4] @ [4, 5]
             h.make_node("Tanh", ["a"], ["t"]),
             h.make_node("Unsqueeze", ["t", "ax"], ["u"]),                      # [1, 6, 5]
             h.make_node("MatMul", ["u", "Wb"], ["y"], name="mb")]
    m = _model(nodes, [_vi("x", [4, 6])], [_vi("y", [1, 6, 3])],
               [nh.from_array(_w(4, 5), "Wa"), nh.from_array(_w(5, 3), "Wb"),
                nh.from_array(np.array([0], dtype=np.int64), "ax")])
    layers, _ = find_layers(m)
    batches = [{"x": _w(4, 6)} for _ in range(3)]
    cap = Capture(m, layers, batches)
    g0 = cap.grams(layers[0], {})
    assert g0[0].m == 3 * 6 and g0[0].n0 == 4
    X = np.concatenate([b["x"].T for b in batches]).astype(np.float64)
    np.testing.assert_allclose(g0[0].F, X.T @ X, rtol=0, atol=F32_GRAM * np.abs(X.T @ X).max())
    w = {"Wa": _compress(layers[0].W0)}
    _assert_grams_close(cap.grams(layers[1], w), _naive_grams(m, layers[1], batches, w))


def test_run_model_replaces_weights():
    model = _residual_model()
    batches = _batches(2)
    w = {"W_g": np.zeros((5, 128), np.float32)}
    out = run_model(model, batches, w)
    bias = nh.to_array([t for t in model.graph.initializer if t.name == "B_g"][0])
    np.testing.assert_allclose(out[1][0], np.broadcast_to(bias, (2, 5)), rtol=1e-6)
    plain = run_model(model, batches)
    assert not np.allclose(plain[0][0], out[0][0])
    with pytest.raises(ValueError, match="not an initializer"):
        run_model(model, batches, {"nope": np.zeros(1)})


# ------------------------------------------------------------------------------------------ Gram build savings
@pytest.mark.parametrize("same", [True, False])
def test_add_groups_equals_one_add_per_group(same):
    """Batched group products = one product per group (to float32 summation order), and the same bits whether
    the rows come row-major (a MatMul's) or channel-major (im2col's transposed view)."""
    g, n0, m = 37, 9, 300
    X = _w(m, g * n0)
    Xt = X if same else X + 0.1 * _w(m, g * n0)
    batched, by_cols, single = ([Grams(n0) for _ in range(g)] for _ in range(3))
    import onnxspfq.gram as gram_module

    old = gram_module.GROUP_CHUNK_VALUES
    try:
        gram_module.GROUP_CHUNK_VALUES = 5 * m * n0  # several chunks, the last one short
        Grams.add_groups(batched, X, Xt)
        Xf = np.asfortranarray(X)
        Grams.add_groups(by_cols, Xf, Xf if same else np.asfortranarray(Xt))
    finally:
        gram_module.GROUP_CHUNK_VALUES = old
    for i, gr in enumerate(single):
        cols = slice(i * n0, (i + 1) * n0)
        gr.add(X[:, cols], Xt[:, cols].copy())  # a copy: the general path, three products
    for a, b, c in zip(batched, single, by_cols):
        assert a.m == b.m == c.m == m
        for name in "FHG":
            assert np.array_equal(getattr(a, name), getattr(c, name))
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0,
                                       atol=F32_GRAM * np.abs(getattr(b, name)).max())


def test_layers_reading_one_tensor_share_one_gram_build():
    """Q, K, V of an attention block read one tensor: the capture builds its Grams once and gives the same
    statistics to each (compressing Q does not change K's input); a layer reading another tensor gets its own."""
    x = _vi("x", ["N", 6])
    nodes = [h.make_node("MatMul", ["x", "Wq"], ["q"], name="q"), h.make_node("MatMul", ["x", "Wk"], ["k"], name="k"),
             h.make_node("Add", ["q", "k"], ["s"], name="add"), h.make_node("MatMul", ["s", "Wo"], ["y"], name="o")]
    m = _model(nodes, [x], [_vi("y", ["N", 3])],
               [nh.from_array(_w(6, 5), "Wq"), nh.from_array(_w(6, 5), "Wk"), nh.from_array(_w(5, 3), "Wo")])
    layers, _ = find_layers(m)
    batches = [{"x": _w(8, 6)} for _ in range(3)]
    with Capture(m, layers, batches, memory_limit_mb=0) as cap:  # spilled arrays too: identity of Held, not data
        gq = cap.grams(layers[0], {})
        gk = cap.grams(layers[1], {"Wq": _w(6, 5)})
        go = cap.grams(layers[2], {"Wq": _w(6, 5), "Wk": _w(6, 5)})
    assert gk is gq and go is not gq
    X = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    np.testing.assert_allclose(gk[0].H, X.T @ X, rtol=0, atol=F32_GRAM * np.abs(X.T @ X).max())
    assert gk[0].H is not go[0].H and go[0].n0 == 5


# ------------------------------------------------------------------------------------------ padding tokens
def _padded_batches(n=3, b=4, seq=7, vocab=40):
    rng = np.random.default_rng(5)
    out = []
    for _ in range(n):
        lengths = rng.integers(1, seq + 1, size=b)
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        out.append({"input_ids": np.where(mask == 1, rng.integers(1, vocab, (b, seq)), 0), "attention_mask": mask})
    return out


def test_padding_rows_are_left_out_of_the_matmul_grams():
    """With a token mask the first layer's Grams are those of the embedding rows at real tokens only; without
    one they include the padding rows."""
    from builders import masked_encoder

    m = masked_encoder()
    layers, _ = find_layers(m)
    batches = _padded_batches()
    E = nh.to_array(next(t for t in m.graph.initializer if t.name == "embed")).astype(np.float64)
    real = np.concatenate([E[b["input_ids"]][b["attention_mask"] != 0] for b in batches])
    every = np.concatenate([E[b["input_ids"]].reshape(-1, E.shape[1]) for b in batches])
    assert len(real) < len(every)
    with Capture(m, layers, batches, token_mask="attention_mask") as cap:
        g = cap.grams(layers[0], {})[0]
    with Capture(m, layers, batches) as cap:
        g_all = cap.grams(layers[0], {})[0]
    assert g.m == len(real) and g_all.m == len(every)
    np.testing.assert_allclose(g.H, real.T @ real, rtol=0, atol=F32_GRAM * np.abs(real.T @ real).max())
    np.testing.assert_allclose(g_all.H, every.T @ every, rtol=0, atol=F32_GRAM * np.abs(every.T @ every).max())


def test_compress_resolves_the_token_mask(tmp_path):
    """auto finds attention_mask and the report names it; a mask of zeros everywhere is refused."""
    from builders import masked_encoder
    from onnxspfq.api import compress
    from onnxspfq.config import CompressConfig
    from onnxspfq.errors import OnnxspfqError

    onnx.save(masked_encoder(), str(tmp_path / "m.onnx"))
    batches = _padded_batches()
    np.savez(tmp_path / "c.npz", **{k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    res = compress(str(tmp_path / "m.onnx"), str(tmp_path / "c.npz"), str(tmp_path / "q.onnx"), progress=False)
    assert res.report.config["token_mask"] == "attention_mask"
    res = compress(str(tmp_path / "m.onnx"), str(tmp_path / "c.npz"), str(tmp_path / "q2.onnx"),
                   CompressConfig(token_mask="none"), progress=False)
    assert res.report.config["token_mask"] == "none"
    np.savez(tmp_path / "z.npz", input_ids=np.concatenate([b["input_ids"] for b in batches]),
             attention_mask=np.zeros((12, 7), np.int64))
    with pytest.raises(OnnxspfqError, match="zero everywhere"):
        compress(str(tmp_path / "m.onnx"), str(tmp_path / "z.npz"), str(tmp_path / "q3.onnx"), progress=False)
    assert not (tmp_path / "q3.onnx").exists()


@pytest.mark.parametrize("shape, kernel, strides, pads, dilations", [
    ((2, 3, 9), (3,), (2,), (1, 2), (1,)),
    ((3, 5, 9, 8), (3, 3), (2, 1), (1, 2, 0, 1), (2, 1)),
    ((2, 4, 7, 7), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    ((2, 6, 5, 6, 7), (3, 2, 3), (1, 2, 1), (1, 0, 1, 1, 1, 0), (1, 1, 2)),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_im2col_equals_the_reference_gather(shape, kernel, strides, pads, dilations, dtype):
    """The channel-major Numba gather = the rows-major fancy-index reference, bit for bit, all rows or a subset."""
    from onnxspfq.gram import patch_count
    from onnxspfq.reference import im2col_reference

    x = RNG.standard_normal(shape).astype(dtype)
    total = patch_count(shape, kernel, strides, pads, dilations)
    for rows in (None, np.sort(RNG.choice(total, total // 3, replace=False))):
        got = im2col(x, kernel, strides, pads, dilations, rows)
        assert got.dtype == dtype
        assert np.array_equal(got, im2col_reference(x, kernel, strides, pads, dilations, rows))


def test_weight_form_grams_hold_what_the_full_grams_give():
    """Layers whose method does not read G (full_grams) get W G^T and w^T F w from their own float output instead
    of G and F: the same figures as from the full Grams of the same capture, for dense, grouped and depthwise
    Convs and a Gemm (X~ = X at the first layer); a layer that reads G, or one with N1 > N0 / 2, keeps G and F."""
    model = fold_weight_chains(_residual_model())
    layers, _ = find_layers(model)
    batches = _batches()
    w = {la.weight: la.tensor(_compress(la.matrix())) for la in layers[:3]}
    full = Capture(model, layers, batches, max_patches=None)
    lean = Capture(model, layers, batches, max_patches=None, full_grams={"conv2"})
    for la, done in zip(layers, [{}, {layers[0].weight: w[layers[0].weight]},
                                 {k: w[k] for k in list(w)[:2]}, w, w]):
        ref, got = full.grams(la, done), lean.grams(la, done)
        assert [g.weighted for g in got] == [la.name in ("conv1", "dw", "gemm")] * len(got), la.name
        W = la.matrix()
        for rows, g, r in zip(la.group_rows(), got, ref):
            assert g.m == r.m and g.same == (la.name == "conv1")
            np.testing.assert_allclose(g.H, r.H, rtol=1e-12)
            wg = r.W_Gt(W[rows])
            np.testing.assert_allclose(g.W_Gt(W[rows]), wg, rtol=0, atol=F32_GRAM * np.abs(wg).max())
            np.testing.assert_allclose(g.w_F_w(W[rows]), r.w_F_w(W[rows]), rtol=F32_GRAM)
            if g.weighted:
                assert g.G is None and g.F is None
                with pytest.raises(ValueError, match="built for another weight"):
                    g.W_Gt(W[rows] * 1.5)
                half = slice(rows.start, rows.start + (rows.stop - rows.start) // 2 or 1)
                np.testing.assert_array_equal(g.rows(half, rows.start).W_Gt(W[half]),
                                              g.W_Gt(W[rows])[: half.stop - half.start])


def test_depthwise_groups_run_as_one_call_with_the_bytes_of_one_call_each(tmp_path, monkeypatch):
    """compress() runs a depthwise Conv's one-row groups as one method call on stacked Grams (api._one_row_groups)
    and emits what one call per group emits: the same codes, the same steps to rounding."""
    import onnxspfq.api as api
    from onnxspfq.api import compress
    path = tmp_path / "m.onnx"
    onnx.save(_residual_model(), path)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([b["x"] for b in _batches(4)]))
    taken = []
    real = api._one_row_groups
    monkeypatch.setattr(api, "_one_row_groups", lambda *a: taken.append(real(*a)) or taken[-1])
    stacked = compress(str(path), str(tmp_path / "calib.npz"), str(tmp_path / "a.onnx"), progress=False)
    assert taken.count(True) == 1  # the depthwise layer; conv2's groups have 4 rows each
    monkeypatch.setattr(api, "_one_row_groups", lambda *a: False)
    each = compress(str(path), str(tmp_path / "calib.npz"), str(tmp_path / "b.onnx"), progress=False)
    a = {t.name: nh.to_array(t) for t in stacked.model.graph.initializer}
    b = {t.name: nh.to_array(t) for t in each.model.graph.initializer}
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype.kind in "iu":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)


def test_reference_outputs_are_the_float_models_outputs():
    """The float frontier's extra segment computes the float model's own output (with the original weight of the
    last layer, whose compressed array the caller holds), read back from spilled arrays; only the float frontier
    keeps what that segment alone reads (here r1, from the first block); it declines over the cap and where the
    output's size is unknown before running."""
    model = fold_weight_chains(_residual_model())
    model.graph.node.extend([h.make_node("Flatten", ["r1"], ["fl1"]),
                             h.make_node("ReduceMean", ["fl1"], ["rm"], axes=[1]),  # [N, 1]
                             h.make_node("Add", ["y", "rm"], ["y2"])])
    model.graph.output.append(_vi("y2", ["N", 5]))
    layers, _ = find_layers(model)
    batches = _batches()
    ref = [r[0] for r in run_model(model, batches, None, output_names=["y2"])]

    def captured(m):
        cap = Capture(m, layers, batches, max_patches=None, memory_limit_mb=0, reference="y2")  # all spilled
        weights: dict[str, np.ndarray] = {}
        for layer in layers:
            cap.grams(layer, dict(weights))
            weights[layer.weight] = layer.tensor(_compress(layer.matrix()))
        return cap

    cap = captured(model)
    assert "r1" in {t for _, t in cap._float.store} and "r1" not in {t for _, t in cap._comp.store}
    got, feeds = cap.reference_outputs(max_values=1 << 20, call_values=1 << 20)  # one call per batch
    assert len(got) == 3 and cap._budget.count > 0 and all(f is b for f, b in zip(feeds, batches))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # y2 is [2, 5] per batch: the batches stop once 12 values are in (as evaluate's run stops at its cap), and a
    # batch over the values of one call is left to the caller, which runs the float model in row slices
    got, feeds = cap.reference_outputs(max_values=12, call_values=1 << 20)
    assert len(got) == len(feeds) == 2 and feeds[1] is batches[1]
    assert cap.reference_outputs(max_values=1 << 20, call_values=9) is None
    cap.close()
    unknown = onnx.ModelProto()
    unknown.CopyFrom(model)
    unknown.graph.output[1].type.tensor_type.shape.dim[0].dim_param = "K"  # no graph input binds it
    assert captured(unknown).reference_outputs(1 << 20, 1 << 20) is None


def test_compress_takes_the_float_reference_from_the_capture(tmp_path, monkeypatch, fmnist_mlp, fmnist_calib_small):
    """The final check runs only the compressed model unless --eval-data is given, and its figures equal a
    check that runs both models."""
    from onnxspfq import evaluate as ev
    from onnxspfq.api import compress

    ran = []
    real_run = ev._run
    monkeypatch.setattr(ev, "_run", lambda model, *a, **k: ran.append(str(model)) or real_run(model, *a, **k))
    out = tmp_path / "q.onnx"
    res = compress(str(fmnist_mlp), str(fmnist_calib_small), str(out), progress=False)
    assert len(ran) == 1 and ran[0].endswith("q.onnx")  # the staged output file
    again = ev.evaluate(str(fmnist_mlp), str(out), [{"input": np.load(fmnist_calib_small)["input"]}])
    assert ran[1:] == [str(fmnist_mlp), str(out)]
    for f in ("cosine", "rel_error", "top1_agreement", "sample_cosine"):
        assert getattr(res.report.agreement, f) == pytest.approx(getattr(again, f), rel=1e-6, abs=1e-9)
    ran.clear()
    compress(str(fmnist_mlp), str(fmnist_calib_small), str(tmp_path / "h.onnx"), progress=False,
             eval_data=str(fmnist_calib_small))
    assert len(ran) == 2 and ran[0] == str(fmnist_mlp) and ran[1].endswith("h.onnx")


def test_float32_gram_products_stay_close_to_float64():
    """The float32 products (gram.PRODUCT_DTYPE) against float64 on rows like a transformer's (offset mean, a few
    outlier columns, 12,288 rows in flushes): every entry of H, G and F within F32_GRAM of the largest, the
    weight-form figures likewise, and float64 rows still take the float64 products."""
    rng = np.random.default_rng(0)
    n0, m = 384, 12288
    X = (rng.standard_normal((m, n0)) + 0.3).astype(np.float32)
    X[:, :4] *= 20.0
    Xt = (X + 0.05 * rng.standard_normal((m, n0))).astype(np.float32)
    W = rng.standard_normal((64, n0)) / np.sqrt(n0)
    g32, w32, g64 = Grams(n0), Grams(n0, W), Grams(n0)
    for lo in range(0, m, 2730):  # the capture's flushes: FLUSH_VALUES / N0 rows each
        g32.add(X[lo:lo + 2730], Xt[lo:lo + 2730])
        w32.add(X[lo:lo + 2730], Xt[lo:lo + 2730])
        g64.add(X[lo:lo + 2730].astype(np.float64), Xt[lo:lo + 2730].astype(np.float64))
    X64, Xt64 = X.astype(np.float64), Xt.astype(np.float64)
    for name, ref in (("H", Xt64.T @ Xt64), ("G", Xt64.T @ X64), ("F", X64.T @ X64)):
        np.testing.assert_allclose(getattr(g64, name), ref, rtol=1e-12)
        err = np.abs(getattr(g32, name) - ref).max() / np.abs(ref).max()
        assert 0 < err <= F32_GRAM, (name, err)
    ref = W @ (Xt64.T @ X64).T
    assert np.abs(w32.W_Gt(W) - ref).max() <= F32_GRAM * np.abs(ref).max()
    np.testing.assert_allclose(w32.w_F_w(W), np.einsum("ij,ij->i", W @ (X64.T @ X64), W), rtol=F32_GRAM)
