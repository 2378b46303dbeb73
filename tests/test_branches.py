"""Layers inside If branches (branches.py, fold.fold_weight_chains): found, captured on the branch the calibration
data takes, compressed, and written back inside the If; the branch not taken, an If whose condition varies and a
Loop body stay float with a reason. The reference for each compressed branch is the same model with that branch
written into the main graph: the If model must give the same codes."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from builders import branchy, looped
from onnxspfq.api import compress
from onnxspfq.cli import main
from onnxspfq.config import CompressConfig, QuantConfig
from onnxspfq.graph import walk_nodes
from onnxspfq.fold import fold_weight_chains


def _calib(path, sr: int | list[int], n: int = 64, width: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    rates = [sr] if isinstance(sr, int) else sr
    for i, r in enumerate(rates):  # one file per rate: a batch has one sr (a scalar input)
        d = path / f"part{i}"
        d.mkdir()
        np.savez(d / "a.npz", x=rng.standard_normal((n, width)).astype(np.float32), sr=np.array(r, np.int64))
    return str(path / "part0") if len(rates) == 1 else [str(path / f"part{i}") for i in range(len(rates))]


def _run(model_path, x, sr):
    # no graph optimisation: the exact DequantizeLinear -> MatMul arithmetic (at onnxruntime's default level its
    # DQ -> MatMul rewrite left the If model and its inlined twin 2e-3 apart; with it off they agree exactly)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x, "sr": np.array(sr, np.int64)})[0]


def _inits(path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("taken, sr", [("then_branch", 16), ("else_branch", 8)])
def test_taken_branch_matches_the_same_branch_in_the_main_graph(tmp_path, taken, sr):
    onnx.save(branchy(), tmp_path / "if.onnx")
    onnx.save(branchy(inline=taken), tmp_path / "flat.onnx")
    calib = _calib(tmp_path, sr)
    cfg = CompressConfig(quant=QuantConfig(bits=4))
    r_if = compress(str(tmp_path / "if.onnx"), calib, str(tmp_path / "q_if.onnx"), cfg, progress=False).report
    r_flat = compress(str(tmp_path / "flat.onnx"), calib, str(tmp_path / "q_flat.onnx"), cfg, progress=False).report
    want = ["mm0", "t_mm1", "t_mm2"] if taken == "then_branch" else ["mm0", "e_mm1"]
    assert [r.name for r in r_if.layers] == [r.name for r in r_flat.layers] == want
    other = "e_mm1" if taken == "then_branch" else "t_mm1"
    reasons = {s["name"]: s["reason"] for s in r_if.skipped}
    assert "which no calibration batch takes" in reasons[other]
    a, b = _inits(tmp_path / "q_if.onnx"), _inits(tmp_path / "q_flat.onnx")
    quantized = [k for k in b if k.endswith("_quantized")]
    assert len(quantized) == len(want)
    for k in quantized + [k.replace("_quantized", "_scale") for k in quantized]:
        np.testing.assert_array_equal(a[k], b[k])
    x = np.random.default_rng(5).standard_normal((7, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "q_if.onnx", x, sr), _run(tmp_path / "q_flat.onnx", x, sr),
                               rtol=1e-5, atol=1e-6)
    # the If and its branches stay; the layer's node still sits in its branch, reading the weight from outside
    out = onnx.load(str(tmp_path / "q_if.onnx"))
    onnx.checker.check_model(out, full_check=True)
    where = {n.name: w for w, _, n in walk_nodes(out.graph)}
    assert where["t_mm1"] == "If rate_if.then_branch" and where["e_mm1"] == "If rate_if.else_branch"
    # the branch not taken keeps its float weights: on its rate the output differs from the float model's only
    # through mm0's quantization, which the float model with mm0's weight de-quantized reproduces exactly
    not_sr = 8 if sr == 16 else 16
    ref = onnx.load(str(tmp_path / "if.onnx"))
    w0 = next(t for t in ref.graph.initializer if t.name == "W0")
    codes, scale = a["W0_quantized"].astype(np.float32), a["W0_scale"]
    w0.CopyFrom(numpy_helper.from_array((codes * scale[None, :]).astype(np.float32), "W0"))
    onnx.save(ref, tmp_path / "ref.onnx")
    np.testing.assert_allclose(_run(tmp_path / "q_if.onnx", x, not_sr), _run(tmp_path / "ref.onnx", x, not_sr),
                               rtol=1e-6, atol=1e-6)


def test_untaken_branch_weights_stay_the_float_ones(tmp_path):
    onnx.save(branchy(), tmp_path / "if.onnx")
    compress(str(tmp_path / "if.onnx"), _calib(tmp_path, 16), str(tmp_path / "q.onnx"), progress=False)
    out = _inits(tmp_path / "q.onnx")
    src = fold_weight_chains(onnx.load(str(tmp_path / "if.onnx")))
    e1 = next(numpy_helper.to_array(t) for t in src.graph.initializer if t.name == "E1")
    np.testing.assert_array_equal(out["E1"], e1)
    assert "T1" not in out and "T1_quantized" in out


def test_both_branches_by_two_runs(tmp_path):
    """The documented way to compress both branches of an If on an input (silero's sample rate)."""
    onnx.save(branchy(), tmp_path / "if.onnx")
    (tmp_path / "c16").mkdir()
    (tmp_path / "c8").mkdir()
    compress(str(tmp_path / "if.onnx"), _calib(tmp_path / "c16", 16), str(tmp_path / "a.onnx"), progress=False)
    r = compress(str(tmp_path / "a.onnx"), _calib(tmp_path / "c8", 8), str(tmp_path / "b.onnx"), progress=False)
    assert [layer.name for layer in r.report.layers] == ["e_mm1"]  # mm0 and the then branch are QDQ already
    names = _inits(tmp_path / "b.onnx")
    assert {"T1_quantized", "T2_quantized", "E1_quantized", "W0_quantized"} <= set(names)


def test_mixed_condition_leaves_the_if_float(tmp_path):
    onnx.save(branchy(), tmp_path / "if.onnx")
    calib = _calib(tmp_path, [16, 8])
    from onnxspfq.calib import load_calibration

    batches = [b for c in calib for b in load_calibration(c, onnx.load(str(tmp_path / "if.onnx")))]
    r = compress(str(tmp_path / "if.onnx"), batches, str(tmp_path / "q.onnx"), progress=False).report
    assert [layer.name for layer in r.layers] == ["mm0"]
    reasons = {s["name"]: s["reason"] for s in r.skipped}
    for name in ("t_mm1", "t_mm2", "e_mm1"):
        assert "condition differs between calibration batches" in reasons[name]


def test_nested_if_is_inlined_level_by_level(tmp_path):
    onnx.save(branchy(nested=True), tmp_path / "if.onnx")
    onnx.save(branchy(nested=True, inline="then_branch"), tmp_path / "flat.onnx")
    calib = _calib(tmp_path, 16)
    r = compress(str(tmp_path / "if.onnx"), calib, str(tmp_path / "q.onnx"), progress=False).report
    assert [layer.name for layer in r.layers] == ["mm0", "t_mm1", "t_mm2"]
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    flat = compress(str(tmp_path / "flat.onnx"), calib, str(tmp_path / "qf.onnx"), progress=False).report
    assert [layer.name for layer in flat.layers] == ["mm0", "t_mm1", "t_mm2"]
    np.testing.assert_allclose(_run(tmp_path / "q.onnx", x, 16), _run(tmp_path / "qf.onnx", x, 16), rtol=1e-5,
                               atol=1e-6)


def test_nbits_replaces_the_node_inside_its_branch(tmp_path):
    onnx.save(branchy(width=32), tmp_path / "if.onnx")
    cfg = CompressConfig(quant=QuantConfig(bits=4), format="nbits")
    compress(str(tmp_path / "if.onnx"), _calib(tmp_path, 16, width=32), str(tmp_path / "q.onnx"), cfg,
             progress=False)
    out = onnx.load(str(tmp_path / "q.onnx"))
    where = {n.name: (w, n.op_type) for w, _, n in walk_nodes(out.graph)}
    assert where["t_mm1"] == ("If rate_if.then_branch", "MatMulNBits")
    assert where["mm0"] == ("", "MatMulNBits") and where["e_mm1"][1] == "MatMul"
    x = np.random.default_rng(3).standard_normal((4, 32)).astype(np.float32)
    ref = _run(tmp_path / "if.onnx", x, 16)
    got = _run(tmp_path / "q.onnx", x, 16)
    assert np.abs(got - ref).max() < 0.5 * np.abs(ref).max()


def test_rtn_without_data_compresses_every_branch(tmp_path):
    onnx.save(branchy(), tmp_path / "if.onnx")
    r = compress(str(tmp_path / "if.onnx"), None, str(tmp_path / "q.onnx"), CompressConfig(method="rtn"),
                 progress=False).report
    assert sorted(layer.name for layer in r.layers) == ["e_mm1", "mm0", "t_mm1", "t_mm2"]
    x = np.ones((2, 16), np.float32)
    for sr in (8, 16):
        assert np.isfinite(_run(tmp_path / "q.onnx", x, sr)).all()


def _loop_inputs(model: onnx.ModelProto, x: np.ndarray, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The inputs of l_mm1 and l_mm2 over the 2 iterations, by running the loop by hand from onnxruntime's h."""
    inits = {t.name: numpy_helper.to_array(t) for t in fold_weight_chains(model).graph.initializer}
    inits.update(weights)
    v = x @ inits["W0"]
    in1, in2 = [], []
    for _ in range(2):
        in1.append(v)
        r = np.maximum(v @ inits["L1"], 0)
        in2.append(r)
        v = r @ inits["L2"]
    return [np.concatenate(in1).astype(np.float64), np.concatenate(in2).astype(np.float64)]


def test_loop_body_layers_get_every_iterations_inputs_exactly(tmp_path):
    """A Loop body's layers are captured over all iterations (their input exposed as a scan output), and once an
    earlier body layer is compressed the next one's X~ is the loop run with that weight (not a stale pass)."""
    from onnxspfq.branches import taken_view, view_layers
    from onnxspfq.capture import Capture

    model = looped()
    from onnxspfq.io import as_model

    view, inner = taken_view(as_model(fold_weight_chains(model)), None)
    layers, skipped, _ = view_layers(view, [], inner)
    assert [layer.name for layer in layers] == ["mm0", "l_mm1", "l_mm2"] and not skipped
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    q = {k: (rng.standard_normal((8, 8)) * 0.3).astype(np.float32) for k in ("W0", "L1")}
    with Capture(view, layers, [{"x": x}]) as cap:
        g1 = cap.grams(layers[1], {"W0": q["W0"]})
        g2 = cap.grams(layers[2], {"W0": q["W0"], "L1": q["L1"]})
    X1, X2 = _loop_inputs(model, x, {})
    Xt1, _ = _loop_inputs(model, x, {"W0": q["W0"]})
    _, Xt2 = _loop_inputs(model, x, q)
    for got, (X, Xt) in ((g1[0], (X1, Xt1)), (g2[0], (X2, Xt2))):
        np.testing.assert_allclose(got.F, X.T @ X, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got.H, Xt.T @ Xt, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got.G, Xt.T @ X, rtol=1e-5, atol=1e-4)


def test_loop_body_layers_are_compressed_and_stay_in_the_body(tmp_path):
    onnx.save(looped(), tmp_path / "loop.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    for fmt in ("qdq", "nbits"):
        out = tmp_path / f"q_{fmt}.onnx"
        assert main(["compress", str(tmp_path / "loop.onnx"), "--calib", str(tmp_path / "c.npz"), "-o", str(out),
                     "--report", str(tmp_path / "r.json"), "--format", fmt, "-q"]) == 0
        rep = json.loads((tmp_path / "r.json").read_text())
        assert [layer["name"] for layer in rep["layers"]] == ["mm0", "l_mm1", "l_mm2"]
        assert rep["agreement"]["cosine"] > 0.98
        m = onnx.load(str(out))
        assert [n.output for n in m.graph.node if n.op_type == "Loop"] == [["y"]]  # the view's scan outputs stay out
        where = {n.name: (w, n.op_type) for w, _, n in walk_nodes(m.graph)}
        assert where["l_mm1"][0] == "Loop loop.body"  # (8 x 8 is too small for MatMulNBits: QDQ either way)


def test_layer_in_an_if_inside_a_loop_is_left_float_with_its_reason(tmp_path, capsys):
    onnx.save(looped(nested_if=True), tmp_path / "loop.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    assert main(["compress", str(tmp_path / "loop.onnx"), "--calib", str(tmp_path / "c.npz"), "-o",
                 str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json"), "-q"]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [layer["name"] for layer in rep["layers"]] == ["mm0", "l_mm1"]
    reason = {s["name"]: s["reason"] for s in rep["skipped"]}["l_mm2"]
    assert "Loop loop" in reason and "left in float" in reason
    assert main(["inspect", str(tmp_path / "loop.onnx")]) == 0
    assert "l_mm2" in capsys.readouterr().out
