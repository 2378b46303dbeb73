"""What a new user meets first (issue 10): defaults that just work, inspect, the report's provenance, models with
an unusual batch axis, float16 weights, outputs that vary in shape, and the poor-result warning."""
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxspfq.calib import load_calibration, model_inputs
from onnxspfq.cli import main
from onnxspfq.evaluate import evaluate

from builders import gru_head, mlp, token_encoder, with_if_body


def test_output_defaults_beside_the_input(tmp_path, fmnist_mlp, fmnist_calib_small, capsys):
    model = tmp_path / "net.onnx"
    shutil.copy(fmnist_mlp, model)
    assert main(["compress", str(model), "--calib", str(fmnist_calib_small), "-q"]) == 0
    assert (tmp_path / "net.q.onnx").exists()
    assert "wrote " + str(tmp_path / "net.q.onnx") in capsys.readouterr().out


def test_rtn_needs_no_calibration(tmp_path, fmnist_cnn, capsys):
    out = tmp_path / "q.onnx"
    assert main(["compress", str(fmnist_cnn), "--method", "rtn", "-o", str(out), "-q",
                 "--report", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "not measured" in err and err.count("\n") == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["agreement"] is None and report["warnings"]
    # data-free rtn with identity Grams picks each channel's step by the weight-space error: a real 4-bit model
    with np.load(fmnist_cnn.parent / "data" / "fmnist_calib.npz") as z:
        x = z["input"]
    ag = evaluate(str(fmnist_cnn), str(out), [{"input": x}])
    assert ag.top1_agreement > 0.9, ag


def test_version_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "onnxspfq", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("onnxspfq ")


def test_skip_before_the_model_argument(tmp_path, fmnist_mlp, fmnist_calib_small):
    layers = [n.name for n in onnx.load(str(fmnist_mlp)).graph.node if n.op_type in ("Gemm", "MatMul")]
    out = tmp_path / "q.onnx"
    assert main(["compress", "--skip", layers[0], str(fmnist_mlp), "--calib", str(fmnist_calib_small), "-o", str(out),
                 "--report", str(tmp_path / "r.json"), "-q"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert layers[0] in [s["name"] for s in report["skipped"]]
    assert layers[0] not in [r["name"] for r in report["layers"]]


def test_inspect_lists_inputs_outputs_and_if_bodies(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(with_if_body(mlp([6, 5, 3])), str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "IR 8" in out and "opset ai.onnx 17" in out and "no external data" in out
    assert "input   x" in out and "float" in out and "[N, 6]" in out
    assert "output  y" in out and "output  branch" in out
    assert "mm0" in out and "compressible" in out
    assert "then_mm" in out and "else_mm" in out
    assert "compressible if the calibration data takes If branchy.then_branch" in out


def test_report_records_provenance(tmp_path, fmnist_mlp, fmnist_calib_small):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    argv = ["compress", str(fmnist_mlp), "--calib", str(fmnist_calib_small), "-o", str(out), "--report", str(rep), "-q"]
    assert main(argv) == 0
    r = json.loads(rep.read_text())
    assert r["input_sha256"] == hashlib.sha256(fmnist_mlp.read_bytes()).hexdigest()
    assert r["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert {"onnxspfq", "onnx", "onnxruntime", "numpy", "numba"} <= set(r["versions"])
    assert r["versions"]["onnxruntime"] == ort.__version__
    q = r["config"]["quant"]
    assert q["operator"] == "nearest" and q["path"] == "projected" and q["act_order"] is True
    assert q["draws"] == 1 and q["C"] == 1.0 and q["bits"] == 4
    assert {l["path"] for l in r["layers"]} == {"projected"}


def test_pruning_defaults_to_the_operator_that_measured_best(tmp_path, fmnist_mlp, fmnist_calib_small):
    rep = tmp_path / "r.json"
    assert main(["compress", str(fmnist_mlp), "--calib", str(fmnist_calib_small), "-o", str(tmp_path / "q.onnx"),
                 "--sparsity", "0.5", "--report", str(rep), "-q"]) == 0
    assert json.loads(rep.read_text())["config"]["quant"]["operator"] == "nearest"


def test_poor_agreement_warns_with_the_better_setting(tmp_path, fmnist_cnn, fmnist_calib_small, capsys):
    rep = tmp_path / "r.json"
    assert main(["compress", str(fmnist_cnn), "--calib", str(fmnist_calib_small), "-o", str(tmp_path / "q.onnx"),
                 "--sparsity", "0.9", "--operator", "stochastic", "--report", str(rep), "-q"]) == 0
    err = capsys.readouterr().err
    assert "poor output agreement" in err and "--operator nearest" in err
    warnings = json.loads(rep.read_text())["warnings"]
    assert len(warnings) == 1 and "worst layers" in warnings[0]


def test_evaluate_reads_the_bundled_test_set(fmnist_cnn, capsys):
    data = str(fmnist_cnn.parent / "data" / "fmnist_test.npz")
    assert main(["evaluate", str(fmnist_cnn), str(fmnist_cnn), "--data", data, "--samples", "2000",
                 "--image-mean", "0.2860", "--image-std", "0.3530"]) == 0
    figures = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    # the float model's own accuracy on those 2,000 test images, preprocessed as it was trained (models/fmnist.py)
    assert 0.88 < float(figures["top1_accuracy_float"]) < 0.95
    assert float(figures["top1_agreement"]) == 1.0


def test_batch_axis_from_the_shared_symbolic_dim(tmp_path):
    m = gru_head()
    specs = {s.name: s.batch_axis for s in model_inputs(m)}
    assert specs == {"X": 1, "h0": 1}
    rng = np.random.default_rng(0)
    calib = {"X": rng.standard_normal((5, 40, 16)).astype(np.float32),
             "h0": rng.standard_normal((1, 40, 8)).astype(np.float32)}
    batches = load_calibration(calib, m, batch_size=16)
    assert [b["X"].shape for b in batches] == [(5, 16, 16), (5, 16, 16), (5, 8, 16)]
    assert [b["h0"].shape for b in batches] == [(1, 16, 8), (1, 16, 8), (1, 8, 8)]
    np.testing.assert_array_equal(np.concatenate([b["X"] for b in batches], axis=1), calib["X"])
    path = tmp_path / "gru.onnx"
    onnx.save(m, str(path))
    np.savez(tmp_path / "c.npz", **calib)
    assert main(["compress", str(path), "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "q.onnx"), "-q",
                 "--bits", "8"]) == 0


def test_batch_axis_option_overrides(tmp_path):
    m = gru_head()
    specs = {s.name: s.batch_axis for s in model_inputs(m, {"h0": 1, "X": 1})}
    assert specs == {"X": 1, "h0": 1}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5, 16)).astype(np.float32)  # a caller who stores samples first: not this model
    with pytest.raises(Exception, match="sample counts|shape"):
        load_calibration({"X": x, "h0": np.zeros((1, 40, 8), np.float32)}, m)


@pytest.mark.parametrize("fmt, extra", [("qdq", []), ("nbits", []), ("float", []), ("sparse", ["--sparsity", "0.5"])])
def test_float16_models_in_every_format(tmp_path, fmt, extra):
    path = tmp_path / "fp16.onnx"
    onnx.save(mlp([64, 96, 10], dtype=np.float16), str(path))
    x = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float16)
    np.savez(tmp_path / "c.npz", x=x)
    out = tmp_path / "q.onnx"
    assert main(["compress", str(path), "--calib", str(tmp_path / "c.npz"), "-o", str(out), "--format", fmt, "-q",
                 *extra]) == 0
    onnx.checker.check_model(str(out))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    assert y.dtype == np.float16
    ag = evaluate(str(path), str(out), [{"x": x}])
    assert ag.cosine > 0.9, ag


def test_agreement_on_outputs_that_vary_in_shape(tmp_path, capsys):
    """The first output is [batch, seq] token ids and the calibration is unpadded (sequences of 5, 9 and 7
    tokens): the final check compares per shape instead of crashing after the run."""
    path = tmp_path / "enc.onnx"
    onnx.save(token_encoder(), str(path))
    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, 50, (4, n))} for n in (5, 9, 7)]
    from onnxspfq.api import compress

    res = compress(str(path), calib, output=str(tmp_path / "q.onnx"), progress=False)
    a = res.report.agreement
    assert a.output == "ids" and a.samples == 12 and a.cosine == pytest.approx(1.0)
    res2 = compress(str(path), calib, output=str(tmp_path / "q2.onnx"), progress=False, compare_output="hidden")
    assert res2.report.agreement.output == "hidden" and 0.9 < res2.report.agreement.cosine < 1.0
    # evaluate without --output on the same unpadded data
    outs = evaluate(str(path), str(tmp_path / "q.onnx"), calib)
    assert outs.samples == 12


def test_eval_data_measures_the_final_check_on_held_out_inputs(tmp_path, fmnist_mlp, fmnist_calib_small):
    """--eval-data: the final agreement runs on those inputs (here 300 test images), and the report says so."""
    with np.load(fmnist_mlp.parent / "data" / "fmnist_test.npz") as z:
        x = ((z["images"][:300].astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None]
    np.savez(tmp_path / "held.npz", input=x)
    rep = tmp_path / "r.json"
    assert main(["compress", str(fmnist_mlp), "--calib", str(fmnist_calib_small), "-o", str(tmp_path / "q.onnx"),
                 "--eval-data", str(tmp_path / "held.npz"), "--report", str(rep), "-q"]) == 0
    r = json.loads(rep.read_text())
    assert r["agreement_data"].startswith("held out") and r["agreement"]["samples"] == 300
    direct = evaluate(str(fmnist_mlp), str(tmp_path / "q.onnx"), [{"input": x}])
    assert r["agreement"]["cosine"] == pytest.approx(direct.cosine, rel=1e-6)


def test_eval_data_reads_an_npz_as_evaluate_does(tmp_path):
    """--eval-data takes the file `onnxspfq evaluate --data` takes: labels and stored outputs beside the inputs."""
    path = tmp_path / "m.onnx"
    onnx.save(mlp([6, 5, 3]), str(path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((32, 6)).astype(np.float32))
    np.savez(tmp_path / "e.npz", x=rng.standard_normal((20, 6)).astype(np.float32), labels=np.arange(20) % 3,
             logits=np.zeros((20, 3), np.float32))
    rep = tmp_path / "r.json"
    assert main(["compress", str(path), "--calib", str(tmp_path / "c.npz"), "--eval-data", str(tmp_path / "e.npz"),
                 "-o", str(tmp_path / "q.onnx"), "--report", str(rep), "-q"]) == 0
    r = json.loads(rep.read_text())
    assert r["agreement_data"].startswith("held out") and r["agreement"]["samples"] == 20
