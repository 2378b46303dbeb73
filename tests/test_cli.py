"""Bad input through the command line: one-line error naming the problem, non-zero exit, no output left behind."""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxspfq.cli import main


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_clean_failure(code, err, out_dir, must_mention):
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert must_mention.lower() in err.lower(), err
    assert not any(p.name.endswith(".onnx") or ".tmp" in p.name for p in out_dir.iterdir()), list(out_dir.iterdir())


@pytest.fixture()
def calib(tmp_path, fmnist_calib_small):
    return str(fmnist_calib_small)


def _compress_args(model, calib, out, *extra):
    return ["compress", str(model), "--calib", str(calib), "-o", str(out), "-q", *extra]


def test_model_not_a_file(tmp_path, calib, capsys):
    code, err = _run(_compress_args(tmp_path / "missing.onnx", calib, tmp_path / "o.onnx"), capsys)
    _assert_clean_failure(code, err, tmp_path, "missing.onnx")


def test_model_not_onnx(tmp_path, calib, capsys):
    bad = tmp_path / "bad.onnx.txt"
    bad.write_text("this is not a model")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _run(_compress_args(bad, calib, out_dir / "o.onnx"), capsys)
    _assert_clean_failure(code, err, out_dir, "bad.onnx.txt")


def test_model_truncated(tmp_path, calib, fmnist_mlp, capsys):
    data = fmnist_mlp.read_bytes()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _run(_compress_args(trunc, calib, out_dir / "o.onnx"), capsys)
    _assert_clean_failure(code, err, out_dir, "trunc.onnx")


def test_no_compressible_layer(tmp_path, calib, capsys):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 28, 28])
    g = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "relu", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "relu.onnx"
    onnx.save(m, str(path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _run(_compress_args(path, calib, out_dir / "o.onnx"), capsys)
    _assert_clean_failure(code, err, out_dir, "no compressible layer")


def test_unsupported_bits(tmp_path, calib, fmnist_mlp, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SystemExit) as e:
        main(_compress_args(fmnist_mlp, calib, out_dir / "o.onnx", "--bits", "5"))
    err = capsys.readouterr().err
    assert e.value.code != 0 and "--bits" in err and "5" in err
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("case, mention", [
    ("missing", "nope.npz"),
    ("wrong_name", "input"),
    ("wrong_shape", "shape"),
    ("wrong_dtype", "dtype"),
    ("nan", "nan"),
])
def test_bad_calibration(tmp_path, fmnist_mlp, case, mention, capsys):
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    path = tmp_path / "calib.npz"
    if case == "missing":
        path = tmp_path / "nope.npz"
    elif case == "wrong_name":
        np.savez(path, image=x)
    elif case == "wrong_shape":
        np.savez(path, input=x[:, :, :20, :])
    elif case == "wrong_dtype":
        np.savez(path, input=x.astype(np.int64))
    elif case == "nan":
        x[1, 0, 3, 3] = np.nan
        np.savez(path, input=x)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _run(_compress_args(fmnist_mlp, path, out_dir / "o.onnx"), capsys)
    _assert_clean_failure(code, err, out_dir, mention)


def test_output_equals_input(tmp_path, calib, fmnist_mlp, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(fmnist_mlp.read_bytes())
    before = model.read_bytes()
    code, err = _run(_compress_args(model, calib, model), capsys)
    assert code != 0 and len(err.splitlines()) == 1 and "input" in err
    assert model.read_bytes() == before


def test_output_directory_missing(tmp_path, calib, fmnist_mlp, capsys):
    code, err = _run(_compress_args(fmnist_mlp, calib, tmp_path / "no" / "such" / "o.onnx"), capsys)
    _assert_clean_failure(code, err, tmp_path, "directory")


def test_console_script_exit_code(tmp_path, calib):
    """The installed entry point, as a user runs it: non-zero exit and one stderr line."""
    r = subprocess.run([sys.executable, "-m", "onnxspfq.cli", "compress", str(tmp_path / "x.onnx"), "--calib", calib,
                        "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "x.onnx" in r.stderr


@pytest.mark.parametrize("extra, mention", [
    (["--draws", "0"], "draws"),
    (["--bits", "2", "--sparsity", "0.5", "--draws", "4"], "draws"),
    (["--act-order", "--granularity", "block"], "act-order"),
])
def test_bad_option_combinations(tmp_path, calib, fmnist_mlp, capsys, extra, mention):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _run(_compress_args(fmnist_mlp, calib, out_dir / "o.onnx", *extra), capsys)
    _assert_clean_failure(code, err, out_dir, mention)


def test_draws_and_act_order_run_end_to_end(tmp_path, calib, fmnist_mlp, capsys):
    out = tmp_path / "o.onnx"
    code, _ = _run(_compress_args(fmnist_mlp, calib, out, "--bits", "2", "--draws", "3", "--act-order",
                                  "--report", str(tmp_path / "r.json")), capsys)
    assert code == 0 and out.exists()
    import json
    layers = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert all(0 < l["rel_error"] < 1 and 0.3 <= l["c_alpha"] <= 0.8 for l in layers)
