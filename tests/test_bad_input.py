"""The bad-input contract, case by case through the real command line (issue 10): exit code 2, one stderr line
that names the problem, no traceback, no file left behind, every input byte-identical afterwards.

Each case builds its files in a fresh folder from the bundled Fashion-MNIST MLP and calibration set (or a small
graph where the case needs a property they lack) and runs `onnxspfq.cli.main` in-process.
"""
import hashlib
import os
import shutil
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from onnxspfq.cli import main


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture()
def ws(tmp_path, fmnist_mlp, fmnist_calib_small):
    """A folder with m.onnx, c.npz and an out/ folder; returns a namespace of paths."""
    shutil.copy(fmnist_mlp, tmp_path / "m.onnx")
    shutil.copy(fmnist_calib_small, tmp_path / "c.npz")
    (tmp_path / "out").mkdir()
    return tmp_path


def _x(n=8):
    return np.random.default_rng(0).standard_normal((n, 1, 28, 28)).astype(np.float32)


def _truncated_npz(d):
    np.savez(d / "bad.npz", input=_x())
    data = (d / "bad.npz").read_bytes()
    (d / "bad.npz").write_bytes(data[: len(data) // 2])


def _crc_npz(d):
    np.savez(d / "bad.npz", input=_x())
    data = bytearray((d / "bad.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte inside the array payload: zip CRC mismatch
    (d / "bad.npz").write_bytes(bytes(data))


def _object_npz(d):
    np.savez(d / "bad.npz", input=np.array([{"a": 1}, None], dtype=object))


def _not_zip_npz(d):
    (d / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")


def _custom_op_model(d):
    w = numpy_helper.from_array(np.ones((784, 10), np.float32), "W")
    g = helper.make_graph([helper.make_node("Flatten", ["input"], ["f"]),
                           helper.make_node("Mystery", ["f"], ["f2"], domain="acme.ops", name="mystery"),
                           helper.make_node("MatMul", ["f2", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("input", TP.FLOAT, ["N", 1, 28, 28])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 10])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme.ops", 1)]),
              str(d / "m.onnx"))


def _relu_model(d):
    g = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "relu",
                          [helper.make_tensor_value_info("input", TP.FLOAT, ["N", 1, 28, 28])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 1, 28, 28])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(d / "m.onnx"))


def _overflow_calib(d):
    x = np.full((8, 1, 28, 28), 3e38, np.float32)
    x[:, :, ::2] *= -1
    np.savez(d / "c.npz", input=x)


def _external_model(d):
    from builders import matmul_chain

    matmul_chain(d / "ext.onnx", 64, 2)
    np.savez(d / "x.npz", x=np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))


def _bfloat16_model(d):
    import ml_dtypes

    from builders import mlp

    onnx.save(mlp([64, 32, 10], dtype=ml_dtypes.bfloat16), str(d / "bf.onnx"))
    np.savez(d / "x.npz", x=np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))


def _garbage_model(d):
    (d / "m.onnx").write_bytes(b"\x08\x07" + os.urandom(64))


def _truncated_model(d):
    data = (d / "m.onnx").read_bytes()
    (d / "m.onnx").write_bytes(data[: len(data) // 2])


def _empty_folder(d):
    (d / "calibdir").mkdir()


C = ["compress", "{m}", "--calib", "{c}", "-o", "{out}/q.onnx", "-q"]
E = ["evaluate", "{m}", "{m}", "--data", "{c}"]

# (id, argv template, setup or None, words the one error line must contain)
CASES = [
    # outputs that would destroy an input, or collide
    ("report-is-model", C + ["--report", "{m}"], None, ["--report", "m.onnx", "input"]),
    ("report-is-calib", C + ["--report", "{c}"], None, ["--report", "c.npz"]),
    ("report-is-output", C + ["--report", "{out}/q.onnx"], None, ["same file"]),
    ("report-is-output-data", C + ["--report", "{out}/q.onnx.data"], None, ["same file", "external data"]),
    ("output-is-input-data", ["compress", "{d}/ext.onnx", "--calib", "{d}/x.npz", "-o", "{d}/ext.onnx.data"],
     _external_model, ["-o", "ext.onnx.data"]),
    ("report-is-input-data", ["compress", "{d}/ext.onnx", "--calib", "{d}/x.npz", "-o", "{out}/q.onnx", "--report",
                              "{d}/ext.onnx.data"], _external_model, ["--report", "ext.onnx.data"]),
    # ext2.onnx reads ext.onnx.data; writing -o ext.onnx would write ext.onnx.data over the weights being read
    ("output-data-is-input", ["compress", "{d}/ext2.onnx", "--calib", "{d}/x.npz", "-o", "{d}/ext.onnx"],
     lambda d: (_external_model(d), shutil.copy(d / "ext.onnx", d / "ext2.onnx")), ["ext.onnx.data"]),
    ("output-is-model", ["compress", "{m}", "--calib", "{c}", "-o", "{m}", "-q"], None, ["-o", "input"]),
    ("output-is-calib", ["compress", "{m}", "--calib", "{c}", "-o", "{c}", "-q"], None, ["-o", "c.npz"]),
    ("json-is-model", E + ["--json", "{m}"], None, ["--json", "m.onnx"]),
    ("json-is-data", E + ["--json", "{c}"], None, ["--json", "c.npz"]),
    ("output-empty", ["compress", "{m}", "--calib", "{c}", "-o", "", "-q"], None, ["empty"]),
    ("output-is-folder", ["compress", "{m}", "--calib", "{c}", "-o", "{out}", "-q"], None, ["folder"]),
    ("output-folder-missing", ["compress", "{m}", "--calib", "{c}", "-o", "{d}/no/q.onnx", "-q"], None,
     ["does not exist"]),
    ("report-folder-missing", C + ["--report", "{d}/no/r.json"], None, ["--report", "does not exist"]),
    ("json-folder-missing", E + ["--json", "{d}/no/r.json"], None, ["--json", "does not exist"]),
    # bad model files
    ("model-missing", ["compress", "{d}/nope.onnx", "--calib", "{c}", "-o", "{out}/q.onnx"], None, ["nope.onnx"]),
    ("model-garbage", C, _garbage_model, ["m.onnx"]),
    ("model-truncated", C, _truncated_model, ["m.onnx"]),
    ("model-custom-op", C, _custom_op_model, ["mystery", "acme.ops"]),
    ("model-no-layer", C, _relu_model, ["no compressible layer"]),
    ("model-bfloat16-cpu", ["compress", "{d}/bf.onnx", "--calib", "{d}/x.npz", "-o", "{out}/q.onnx"], _bfloat16_model,
     ["MatMul", "float32"]),
    ("inspect-missing", ["inspect", "{d}/nope.onnx"], None, ["nope.onnx"]),
    ("evaluate-second-missing", ["evaluate", "{m}", "{d}/nope.onnx", "--data", "{c}"], None, ["nope.onnx"]),
    # bad calibration data
    ("calib-missing", ["compress", "{m}", "--calib", "{d}/nope.npz", "-o", "{out}/q.onnx"], None, ["nope.npz"]),
    ("calib-truncated", ["compress", "{m}", "--calib", "{d}/bad.npz", "-o", "{out}/q.onnx"], _truncated_npz,
     ["bad.npz"]),
    ("calib-bad-crc", ["compress", "{m}", "--calib", "{d}/bad.npz", "-o", "{out}/q.onnx"], _crc_npz, ["bad.npz"]),
    ("calib-object-array", ["compress", "{m}", "--calib", "{d}/bad.npz", "-o", "{out}/q.onnx"], _object_npz,
     ["bad.npz"]),
    ("calib-not-zip", ["compress", "{m}", "--calib", "{d}/bad.npz", "-o", "{out}/q.onnx"], _not_zip_npz, ["bad.npz"]),
    ("calib-empty-folder", ["compress", "{m}", "--calib", "{d}/calibdir", "-o", "{out}/q.onnx"], _empty_folder,
     ["calibdir"]),
    ("calib-overflow", C, _overflow_calib, ["overflow"]),
    ("calib-wrong-key", C, lambda d: np.savez(d / "c.npz", image=_x()), ["input", "image"]),
    ("calib-wrong-shape", C, lambda d: np.savez(d / "c.npz", input=_x()[:, :, :20]), ["shape"]),
    ("calib-wrong-dtype", C, lambda d: np.savez(d / "c.npz", input=_x().astype(np.complex64)), ["dtype"]),
    ("calib-nan", C, lambda d: np.savez(d / "c.npz", input=np.where(_x() > 2, np.nan, _x())), ["nan"]),
    ("calib-images-wrong-type", C, lambda d: np.savez(d / "c.npz", images=_x()), ["images", "uint8"]),
    ("eval-data-missing", C + ["--eval-data", "{d}/nope.npz"], None, ["nope.npz"]),
    ("report-is-eval-data", C + ["--eval-data", "{c}", "--report", "{c}"], None, ["--report", "c.npz"]),
    ("evaluate-data-missing", ["evaluate", "{m}", "{m}", "--data", "{d}/nope.npz"], None, ["nope.npz"]),
    ("method-needs-calib", ["compress", "{m}", "--method", "gptq", "-o", "{out}/q.onnx"], None, ["--calib"]),
    ("default-needs-calib", ["compress", "{m}", "-o", "{out}/q.onnx"], None, ["--calib", "rtn"]),
    # numbers out of range
    ("C-inf", C + ["--C", "inf"], None, ["C", "finite"]),
    ("C-nan", C + ["--C", "nan"], None, ["C"]),
    ("C-below-one", C + ["--C", "0.5"], None, ["C", ">= 1"]),
    ("c-alpha-inf", C + ["--c-alpha", "inf"], None, ["c_alpha", "finite"]),
    ("c-alpha-zero", C + ["--c-alpha", "0"], None, ["c_alpha"]),
    ("c-alpha-negative", C + ["--c-alpha", "-1"], None, ["c_alpha"]),
    ("sparsity-negative", C + ["--sparsity", "-0.1"], None, ["sparsity", "[0, 1)"]),
    ("sparsity-nan", C + ["--sparsity", "nan"], None, ["sparsity"]),
    ("sparsity-one", C + ["--sparsity", "1"], None, ["sparsity"]),
    ("sparsity-bad-nm", C + ["--sparsity", "3:2"], None, ["3:2"]),
    ("sparsity-text", C + ["--sparsity", "half"], None, ["--sparsity", "half"]),
    ("bits-five", C + ["--bits", "5"], None, ["--bits"]),
    ("seed-negative", C + ["--seed", "-1"], None, ["seed"]),
    ("image-size-zero", C + ["--image-size", "0", "0"], None, ["image size"]),
    ("image-mean-nan", C + ["--image-mean", "nan"], None, ["finite"]),
    ("batch-size-zero", C + ["--batch-size", "0"], None, ["batch_size"]),
    ("samples-zero", C + ["--samples", "0"], None, ["samples"]),
    ("max-patches-zero", C + ["--max-patches", "0"], None, ["max_patches"]),
    ("damp-too-large", C + ["--method", "gptq", "--damp", "1.5"], None, ["damp"]),
    ("order-zero", C + ["--order", "0"], None, ["order"]),
    ("draws-zero", C + ["--draws", "0"], None, ["draws"]),
    ("block-size-zero", C + ["--granularity", "block", "--block-size", "0"], None, ["block_size"]),
    ("evaluate-k-zero", E + ["--k", "0", "--task", "embed"], None, ["k"]),
    # options the chosen method would ignore
    ("C-with-rtn", C + ["--method", "rtn", "--C", "2"], None, ["--C", "spfq"]),
    ("C-with-auto-C", C + ["--auto-C", "--C", "2"], None, ["--C", "--auto-C"]),
    ("draws-with-rtn", C + ["--method", "rtn", "--draws", "3"], None, ["--draws"]),
    ("draws-with-nearest", C + ["--operator", "nearest", "--draws", "3"], None, ["--draws", "stochastic"]),
    ("operator-with-gptq", C + ["--method", "gptq", "--operator", "nearest"], None, ["--operator", "gptq"]),
    ("refit-with-rtn", C + ["--method", "rtn", "--refit-scale"], None, ["--refit-scale", "rtn"]),
    ("act-order-with-rtn", C + ["--method", "rtn", "--act-order"], None, ["--act-order", "rtn"]),
    ("auto-C-with-gptq", C + ["--method", "gptq", "--auto-C"], None, ["--auto-C", "gptq"]),
    ("damp-with-spfq-plain", C + ["--path", "plain", "--damp", "0.1"], None, ["--damp", "gptq"]),
    ("order-with-gpfq", C + ["--method", "gpfq", "--order", "2"], None, ["--order", "spfq"]),
    ("path-with-gptq", C + ["--method", "gptq", "--path", "best"], None, ["--path", "gptq"]),
    ("C-with-projected-path", C + ["--path", "projected", "--C", "2"], None, ["--C", "plain"]),
    ("auto-C-with-projected-path", C + ["--auto-C"], None, ["--auto-C", "--path plain"]),
    ("unknown-path", C + ["--path", "curved"], None, ["--path", "plain"]),
    ("avg-bits-with-bits", C + ["--avg-bits", "3", "--bits", "4"], None, ["--bits", "--avg-bits"]),
    ("avg-bits-out-of-range", C + ["--avg-bits", "9"], None, ["--avg-bits", "[2, 8]"]),
    ("stored-bits-without-avg-bits", C + ["--stored-bits", "3"], None, ["--stored-bits", "--avg-bits"]),
    ("stored-bits-out-of-range", C + ["--avg-bits", "3", "--stored-bits", "1.5"], None, ["--stored-bits", "[2, 8]"]),
    ("avg-bits-with-pruning", C + ["--avg-bits", "3", "--sparsity", "0.5"], None, ["--avg-bits", "--sparsity"]),
    ("avg-bits-float-format", C + ["--avg-bits", "3", "--format", "float"], None, ["--avg-bits", "qdq"]),
    ("avg-bits-without-calib", ["compress", "{m}", "-o", "{out}/q.onnx", "-q", "--method", "rtn", "--avg-bits", "3"],
     None, ["--avg-bits", "--calib"]),
    ("block-size-without-block", C + ["--block-size", "64"], None, ["--block-size", "granularity block"]),
    # contradictory settings
    ("qdq-without-bits", C + ["--sparsity", "0.5", "--format", "qdq"], None, ["--format qdq", "--bits"]),
    ("draws-with-pruning", C + ["--bits", "2", "--sparsity", "0.5", "--draws", "4"], None, ["--draws"]),
    ("act-order-with-block", C + ["--act-order", "--granularity", "block"], None, ["--act-order"]),
    ("one-bit-pruned", C + ["--bits", "1", "--sparsity", "0.5"], None, ["1-bit"]),
    # names that do not exist
    ("skip-unknown", C + ["--skip", "no_such_layer"], None, ["no_such_layer"]),
    ("output-name-unknown", C + ["--output", "no_such_output"], None, ["no_such_output"]),
    ("evaluate-output-unknown", E + ["--output", "no_such_output"], None, ["no_such_output"]),
    ("activations-with-4-bits", C + ["--activations", "int8", "--bits", "4"], None, ["--activations", "--bits 8"]),
    ("activations-with-nbits", C + ["--activations", "int8", "--format", "nbits"], None, ["--activations", "qdq"]),
    ("act-calibration-alone", C + ["--act-calibration", "minmax"], None, ["--activations int8"]),
    ("act-percentile-out-of-range", C + ["--activations", "int8", "--act-percentile", "20"], None,
     ["--act-percentile", "(50, 100]"]),
    ("opset-below-model", C + ["--opset", "7"], None, ["opset", "never lowers"]),
    ("opset-too-low-for-int4", C + ["--opset", "19", "--bits", "4"], None, ["--opset", "INT4", "21"]),
    ("opset-too-high", C + ["--opset", "30"], None, ["--opset", "7..25"]),
    ("target-unknown", C + ["--target", "tpu"], None, ["--target", "tpu"]),
    ("tensorrt-nbits", C + ["--target", "tensorrt", "--format", "nbits"], None, ["tensorrt", "nbits", "onnxruntime"]),
    ("tensorrt-int8-embeddings", C + ["--target", "tensorrt", "--embeddings", "int8"], None,
     ["tensorrt", "Gather", "--embeddings int8"]),
    ("unknown-embeddings", C + ["--embeddings", "int4"], None, ["--embeddings", "int8"]),
    ("tensorrt-sparse-format", C + ["--target", "tensorrt", "--sparsity", "0.5", "--format", "sparse"], None,
     ["tensorrt", "sparse", "dense"]),
    ("tensorrt-weight-only-int8", C + ["--target", "tensorrt", "--bits", "8"], None,
     ["tensorrt", "8-bit", "--activations int8"]),
    ("tensorrt-uint8-activations", C + ["--target", "tensorrt", "--activations", "int8", "--act-type", "uint8"], None,
     ["tensorrt", "zero point 0", "--act-type int8"]),
    ("tensorrt-int4-2to4", C + ["--target", "tensorrt", "--bits", "4", "--sparsity", "2:4"], None,
     ["tensorrt", "4-bit", "2:4"]),
    ("tensorrt-avg-bits", C + ["--target", "tensorrt", "--avg-bits", "4"], None, ["tensorrt", "--avg-bits"]),
    ("tensorrt-block-size", C + ["--target", "tensorrt", "--granularity", "block", "--block-size", "32"], None,
     ["tensorrt", "64 or 128", "--block-size"]),
    ("tensorrt-layer-granularity", C + ["--target", "tensorrt", "--granularity", "layer"], None,
     ["tensorrt", "block", "--granularity layer"]),
    ("tensorrt-act-order", C + ["--target", "tensorrt", "--act-order"], None, ["tensorrt", "--act-order"]),
    ("tensorrt-every-layer-float", C + ["--target", "tensorrt", "--skip", "/3/Gemm,/5/Gemm"], None,
     ["tensorrt", "float", "784", "nothing to do"]),
    ("accuracy-level-without-nbits", C + ["--accuracy-level", "4"], None, ["--accuracy-level", "--format nbits"]),
    ("accuracy-level-out-of-range", C + ["--format", "nbits", "--accuracy-level", "7"], None, ["--accuracy-level"]),
    ("token-mask-unknown", C + ["--token-mask", "nope"], None, ["--token-mask", "nope", "input"]),
    ("token-mask-empty", C + ["--token-mask", ""], None, ["--token-mask"]),
    ("token-mask-not-2d", C + ["--token-mask", "input"], None, ["--token-mask", "rank"]),
    ("batch-axis-syntax", C + ["--batch-axis", "input"], None, ["--batch-axis", "INPUT=AXIS"]),
    ("batch-axis-unknown-input", C + ["--batch-axis", "x=0"], None, ["--batch-axis", "x"]),
    ("batch-axis-out-of-range", C + ["--batch-axis", "input=7"], None, ["--batch-axis", "rank"]),
]


@pytest.mark.parametrize("case, argv, setup, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ws, case, argv, setup, words, capsys):
    if setup is not None:
        setup(ws)
    fmt = {"m": str(ws / "m.onnx"), "c": str(ws / "c.npz"), "out": str(ws / "out"), "d": str(ws)}
    args = [a.format(**fmt) for a in argv]
    before = {p: _sha(p) for p in ws.rglob("*") if p.is_file()}
    try:
        code = main(args)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.startswith("onnxspfq"), err
    for w in words:
        assert w.lower() in err.lower(), (w, err)
    after = {p: _sha(p) for p in ws.rglob("*") if p.is_file()}
    assert after == before, "a file was written, changed or removed"
    assert not [p for p in ws.rglob("*") if ".tmp" in p.name or "probe" in p.name]


def test_unwritable_folder_is_refused_before_work(ws, capsys):
    """A folder without write permission (as a non-root user sees it; root writes anywhere, so this is skipped)."""
    if os.geteuid() == 0:
        pytest.skip("root can write in a read-only folder")
    ro = ws / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code = main(["compress", str(ws / "m.onnx"), "--calib", str(ws / "c.npz"), "-o", str(ro / "q.onnx"), "-q"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "cannot write" in err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_failed_commit_leaves_neither_file(tmp_path):
    """Staging.commit: when the model cannot be moved into place (here its target is a non-empty folder), the
    report already moved is taken back and the file it replaced restored: both outputs or neither."""
    from onnxspfq.errors import OnnxspfqError
    from onnxspfq.output_files import Staging

    report, model = tmp_path / "r.json", tmp_path / "q.onnx"
    report.write_text("old report")
    with Staging([str(report), str(model)]) as st:
        with open(st.path(str(report)), "w") as f:
            f.write("new report")
        with open(st.path(str(model)), "w") as f:
            f.write("model")
        model.mkdir()
        (model / "keep").write_text("x")  # os.replace(file, non-empty folder) fails
        with pytest.raises(OnnxspfqError, match="cannot write"):
            st.commit()
    assert report.read_text() == "old report"
    assert model.is_dir() and [p.name for p in model.iterdir()] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "r.json"]


def test_written_files_follow_the_umask(ws):
    old = os.umask(0o022)
    try:
        assert main(["compress", str(ws / "m.onnx"), "--calib", str(ws / "c.npz"), "-o", str(ws / "out" / "q.onnx"),
                     "--report", str(ws / "out" / "r.json"), "-q", "--method", "rtn"]) == 0
    finally:
        os.umask(old)
    for name in ("q.onnx", "r.json"):
        assert (os.stat(ws / "out" / name).st_mode & 0o777) == 0o644, name


def test_truncated_zip_member_is_one_line(ws, capsys):
    """A zip whose member list is intact but whose data is cut (np.load succeeds, reading the array fails)."""
    np.savez(ws / "two.npz", input=_x(64))
    with zipfile.ZipFile(ws / "two.npz") as z:
        info = z.infolist()[0]
    data = (ws / "two.npz").read_bytes()
    (ws / "two.npz").write_bytes(data[: info.header_offset + 200] + data[-200:])
    code = main(["compress", str(ws / "m.onnx"), "--calib", str(ws / "two.npz"), "-o", str(ws / "out" / "q.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "two.npz" in err, err
    assert list((ws / "out").iterdir()) == []



def test_sigterm_mid_run_leaves_nothing(ws):
    """SIGTERM while the layers are being compressed: exit 130, no output, no staging folder left."""
    import signal
    import subprocess
    import sys
    import time

    out = ws / "out" / "q.onnx"
    p = subprocess.Popen([sys.executable, "-m", "onnxspfq", "compress", str(ws / "m.onnx"), "--calib",
                          str(ws / "c.npz"), "-o", str(out), "--bits", "2", "--operator", "stochastic", "--draws", "256"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "compressing layers" not in seen and p.poll() is None:  # the progress bar: inside the layer loop
        seen += p.stderr.read(1)
    time.sleep(0.5)
    assert p.poll() is None, "the run ended before the signal"
    p.send_signal(signal.SIGTERM)
    err = seen + p.communicate(timeout=60)[1]
    assert p.returncode == 130, err
    assert "interrupted" in err.strip().splitlines()[-1]
    assert list((ws / "out").iterdir()) == []
