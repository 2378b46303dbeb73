"""The command line end to end (the bad-input battery is tests/test_bad_input.py)."""
import subprocess
import sys

import pytest

from onnxspfq.cli import main


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture()
def calib(tmp_path, fmnist_calib_small):
    return str(fmnist_calib_small)


def _compress_args(model, calib, out, *extra):
    return ["compress", str(model), "--calib", str(calib), "-o", str(out), "-q", *extra]


def test_console_script_exit_code(tmp_path, calib):
    """The installed entry point, as a user runs it: non-zero exit and one stderr line."""
    r = subprocess.run([sys.executable, "-m", "onnxspfq.cli", "compress", str(tmp_path / "x.onnx"), "--calib", calib,
                        "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "x.onnx" in r.stderr


def test_draws_and_act_order_run_end_to_end(tmp_path, calib, fmnist_mlp, capsys):
    out = tmp_path / "o.onnx"
    code, _ = _run(_compress_args(fmnist_mlp, calib, out, "--bits", "2", "--operator", "stochastic", "--draws", "3", "--act-order",
                                  "--report", str(tmp_path / "r.json")), capsys)
    assert code == 0 and out.exists()
    import json
    layers = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert all(0 < l["rel_error"] < 1 and 0.3 <= l["c_alpha"] <= 0.8 for l in layers)
