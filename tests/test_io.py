"""Lazy opening, tensor-by-tensor saving and the external-data contract (io.py), on the real models and on
synthetic external-data chains (tests/builders.py)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builders import matmul_chain
from onnxspfq.cli import main
from onnxspfq.errors import OnnxspfqError
from onnxspfq.io import open_model
from onnxspfq.save import save_model


def test_open_reads_no_weights_and_values_match(fmnist_cnn):
    m = open_model(fmnist_cnn)
    full = onnx.load(str(fmnist_cnn))
    assert m.proto.ByteSize() < 10_000 < os.path.getsize(fmnist_cnn)  # the header only: weights stay on disk
    assert set(m.inline) == {t.name for t in full.graph.initializer if t.raw_data and len(t.raw_data) >= 4096}
    for t in full.graph.initializer:
        np.testing.assert_array_equal(m.array(t.name), onnx.numpy_helper.to_array(t))


@pytest.mark.parametrize("external", [False, True])
def test_save_roundtrip_is_exact(fmnist_mlp, tmp_path, external):
    m = open_model(fmnist_mlp)
    out = tmp_path / "m.onnx"
    save_model(m.proto, out, m, external=external)
    assert (tmp_path / "m.onnx.data").exists() == external
    back = open_model(out)
    again = tmp_path / "again.onnx"
    save_model(back.proto, again, back, external=False)  # external -> inline gives the original file's bytes
    assert again.read_bytes() == fmnist_mlp.read_bytes()
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # readable by others, as open() would make
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_external_model_compresses_to_external_output_from_another_cwd(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    matmul_chain(src / "chain.onnx", 64, 3)
    rng = np.random.default_rng(0)
    np.savez(src / "calib.npz", x=rng.standard_normal((16, 64)).astype(np.float32))
    before = (src / "chain.onnx.data").read_bytes()
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the model's folder, not the working directory
    out = tmp_path / "out"
    out.mkdir()
    assert main(["compress", "in/chain.onnx", "--calib", "in/calib.npz", "-o", "out/q.onnx", "--bits", "8", "-q"]) == 0
    assert (out / "q.onnx.data").exists() and (src / "chain.onnx.data").read_bytes() == before
    assert sorted(os.listdir(out)) == ["q.onnx", "q.onnx.data"]
    onnx.checker.check_model(str(out / "q.onnx"), full_check=True)
    sess = ort.InferenceSession(str(out / "q.onnx"), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(src / "chain.onnx"), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((4, 64)).astype(np.float32)
    a, b = ref.run(None, {"x": x})[0], sess.run(None, {"x": x})[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05  # 8 bits: the written weights are the quantized ones


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_bad_external_data_is_one_line_exit_2_nothing_written(tmp_path, capsys, damage):
    matmul_chain(tmp_path / "chain.onnx", 64, 3)
    data = tmp_path / "chain.onnx.data"
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[: 64 * 64 * 4 * 2 + 100])  # W2 loses most of its bytes
    np.savez(tmp_path / "calib.npz", x=np.ones((4, 64), np.float32))
    code = main(["compress", str(tmp_path / "chain.onnx"), "--calib", str(tmp_path / "calib.npz"),
                 "-o", str(tmp_path / "q.onnx"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "chain.onnx.data" in err and ("'W0'" in err if damage == "missing" else "'W2'" in err)
    assert ("missing" if damage == "missing" else "truncated") in err
    assert not (tmp_path / "q.onnx").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    matmul_chain(tmp_path / "chain.onnx", 64, 1)
    m = onnx.load(str(tmp_path / "chain.onnx"), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../chain.onnx.data"
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "m.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(OnnxspfqError, match="outside the model's folder"):
        open_model(sub / "m.onnx")


@pytest.mark.large
def test_model_over_2gb_compresses_in_bounded_memory(tmp_path):
    """A 2.2 GB external-data chain: inspect and compress work, the output loads in onnxruntime. (Minutes on 2
    cores: run with `-m large`; tools/bench_memory.py records its time and peak memory.)"""
    nbytes = matmul_chain(tmp_path / "big.onnx", 4096, 33)
    assert nbytes > 2**31
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 4096)).astype(np.float32))
    assert main(["inspect", str(tmp_path / "big.onnx")]) == 0
    assert main(["compress", str(tmp_path / "big.onnx"), "--calib", str(tmp_path / "calib.npz"), "--method", "rtn",
                 "-o", str(tmp_path / "q.onnx"), "-q"]) == 0
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((1, 4096), np.float32)})[0].shape == (1, 4096)
