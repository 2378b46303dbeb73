"""Checks on the committed real test models and data under models/ (see models/README.md for how they are built).

The accuracy floors are the float accuracies measured by `python models/fmnist.py` (onnxruntime, full 10k test
set) minus 0.5 points.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = Path(__file__).resolve().parent.parent / "models"
DATA = MODELS / "data"
MEASURED_ACCURACY = {"fmnist_cnn": 0.9170, "fmnist_mlp": 0.8989}
EXPECTED_OPS = {
    "fmnist_cnn": ["Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm"],
    "fmnist_mlp": ["Flatten", "Gemm", "Relu", "Gemm", "Relu", "Gemm"],
}
MEAN, STD = 0.2860, 0.3530
MINILM_DIR = Path.home() / ".cache" / "onnxspfq" / "models" / "minilm"


def _load_fmnist_script():
    """Import models/fmnist.py as a module (it needs only numpy at import time; torch is imported lazily)."""
    spec = importlib.util.spec_from_file_location("models_fmnist", MODELS / "fmnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / "fmnist_test.npz") as z:
        return z["images"], z["labels"]


def _preprocess(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)[:, None] / np.float32(255.0)
    return ((x - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def test_test_set_file(test_set):
    images, labels = test_set
    assert images.dtype == np.uint8 and images.shape == (10000, 28, 28)
    assert labels.dtype == np.uint8 and labels.shape == (10000,)
    # The real Fashion-MNIST test set is balanced: 1000 images of each of the 10 classes.
    assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, 1000))
    assert images.max() == 255 and images.min() == 0


@pytest.mark.parametrize("name", ["fmnist_cnn", "fmnist_mlp"])
def test_fmnist_model_structure(name):
    m = onnx.load(str(MODELS / f"{name}.onnx"))
    onnx.checker.check_model(m)
    assert {o.domain: o.version for o in m.opset_import}.get("", None) == 17
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert [n.op_type for n in m.graph.node] == EXPECTED_OPS[name]


@pytest.mark.parametrize("name", ["fmnist_cnn", "fmnist_mlp"])
def test_fmnist_model_accuracy(name, test_set):
    images, labels = test_set
    sess = ort.InferenceSession(str(MODELS / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    x = _preprocess(images)
    logits = np.concatenate([sess.run(["logits"], {"input": x[i:i + 2500]})[0] for i in range(0, len(x), 2500)])
    assert logits.shape == (10000, 10) and logits.dtype == np.float32
    acc = float((logits.argmax(1) == labels).mean())
    assert acc >= MEASURED_ACCURACY[name] - 0.005, f"{name}: {acc:.4f}"
    # Dynamic batch: a batch of 1 and of 7 give the same logits as the big batch.
    one = sess.run(["logits"], {"input": x[3:4]})[0]
    seven = sess.run(["logits"], {"input": x[:7]})[0]
    np.testing.assert_allclose(one, logits[3:4], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(seven, logits[:7], rtol=1e-4, atol=1e-4)


def test_calibration_files():
    with np.load(DATA / "fmnist_calib.npz") as z:
        assert z.files == ["input"]
        calib = z["input"]
    with np.load(DATA / "fmnist_calib_small.npz") as z:
        assert z.files == ["input"]
        small = z["input"]
    assert calib.dtype == np.float32 and calib.shape == (256, 1, 28, 28)
    assert small.dtype == np.float32 and small.shape == (32, 1, 28, 28)
    assert np.array_equal(small, calib[:32])
    assert np.isfinite(calib).all()
    # Preprocessed real images: undoing (x/255 - mean)/std lands on integers 0..255, and they are distinct images.
    raw = (calib * STD + MEAN) * 255.0
    assert np.abs(raw - np.round(raw)).max() < 1e-3
    assert raw.min() > -0.5 and raw.max() < 255.5
    assert len({c.tobytes() for c in calib}) == 256


def test_calibration_comes_from_training_set_not_test_set(test_set):
    images, _ = test_set
    with np.load(DATA / "fmnist_calib_small.npz") as z:
        small = np.round((z["input"][:, 0] * STD + MEAN) * 255.0).astype(np.uint8)
    test_rows = {im.tobytes() for im in images}
    assert not any(im.tobytes() in test_rows for im in small)


def test_fmnist_script_reads_idx_and_preprocesses(tmp_path, test_set):
    fm = _load_fmnist_script()
    images, labels = test_set
    imgs = images[:5]
    header = bytes([0, 0, 0x08, 3]) + np.array([5, 28, 28], dtype=">u4").tobytes()
    (tmp_path / "imgs-idx3-ubyte").write_bytes(header + imgs.tobytes())
    (tmp_path / "labs-idx1-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 0x08, 1]) + np.array([5], dtype=">u4").tobytes() + labels[:5].tobytes()))
    assert np.array_equal(fm.read_idx(tmp_path / "imgs-idx3-ubyte"), imgs)
    assert np.array_equal(fm.read_idx(tmp_path / "labs-idx1-ubyte.gz"), labels[:5])
    assert fm.find_idx(tmp_path, "labs-idx1-ubyte").name == "labs-idx1-ubyte.gz"
    (tmp_path / "bad").write_bytes(header[:4] + np.array([6, 28, 28], dtype=">u4").tobytes() + imgs.tobytes())
    with pytest.raises(ValueError):
        fm.read_idx(tmp_path / "bad")
    np.testing.assert_array_equal(fm.preprocess(imgs), _preprocess(imgs))


@pytest.mark.skipif(not (MINILM_DIR / "minilm_l6_v2.onnx").exists(),
                    reason="MiniLM not built here: run models/minilm.py (see models/README.md)")
def test_minilm_cache_reproduces_reference_embeddings():
    with np.load(MINILM_DIR / "minilm_eval.npz") as z:
        feeds = {k: z[k][:32] for k in ("input_ids", "attention_mask", "token_type_ids")}
        ref = z["sentence_embedding"][:32]
    with np.load(MINILM_DIR / "minilm_calib.npz") as z:
        assert sorted(z.files) == ["attention_mask", "input_ids", "token_type_ids"]
        assert all(z[k].dtype == np.int64 and z[k].ndim == 2 for k in z.files)
    sentences = json.loads((MINILM_DIR / "minilm_sentences.json").read_text())
    assert not set(sentences["calib"]) & set(sentences["eval"])
    sess = ort.InferenceSession(str(MINILM_DIR / "minilm_l6_v2.onnx"), providers=["CPUExecutionProvider"])
    emb = sess.run(["sentence_embedding"], feeds)[0]
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


EFFNET_DIR = Path.home() / ".cache" / "onnxspfq" / "models" / "efficientnet_lite0"


@pytest.mark.skipif(not (EFFNET_DIR / "efficientnet_lite0.onnx").exists(),
                    reason="EfficientNet-Lite0 not built here: run models/efficientnet_lite0.py (see models/README.md)")
def test_efficientnet_cache_reproduces_reference_logits():
    with np.load(EFFNET_DIR / "effnet_eval.npz") as z:
        x, labels, ref = z["input"], z["labels"], z["logits"]
    with np.load(EFFNET_DIR / "effnet_calib.npz") as z:
        assert z.files == ["input"]
        assert z["input"].dtype == np.float32 and z["input"].shape[1:] == (3, 224, 224)
    assert x.shape == (20, 3, 224, 224) and labels.shape == (20,)
    sess = ort.InferenceSession(str(EFFNET_DIR / "efficientnet_lite0.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-3)
    # Measured float top-1 is 18/20 on these photos.
    assert int((logits.argmax(1) == labels).sum()) >= 18


@pytest.mark.skipif(not (EFFNET_DIR / "effnet_photos.npz").exists(),
                    reason="benchmark data, optional (CI does not fetch it): models/photos.py writes it")
def test_benchmark_photos_are_distinct_and_hold_the_evaluation_photos():
    """models/photos.py's set: at least 200 rows, no two rows the same crop, none a calibration crop, and its
    foolbox rows exactly effnet_eval.npz's inputs (one preprocessing)."""
    import json

    with np.load(EFFNET_DIR / "effnet_photos.npz") as z:
        x = z["input"]
    rows = json.loads((EFFNET_DIR / "effnet_photos.json").read_text())["rows"]
    assert len(rows) == len(x) >= 200 and x.dtype == np.float32 and x.shape[1:] == (3, 224, 224)
    assert len({r["sha256"] for r in rows}) == len(rows)
    thumbs = x.reshape(len(x), 3, 28, 8, 28, 8).mean(axis=(1, 3, 5)).reshape(len(x), -1)
    d = np.abs(thumbs[:, None] - thumbs[None]).mean(-1) + np.eye(len(x)) * 1e9
    assert d.min() > 0.01  # (x - 127) / 128 units: no two crops alike
    with np.load(EFFNET_DIR / "effnet_calib.npz") as z:
        calib = z["input"]
    ct = calib.reshape(len(calib), 3, 28, 8, 28, 8).mean(axis=(1, 3, 5)).reshape(len(calib), -1)
    assert np.abs(thumbs[:, None] - ct[None]).mean(-1).min() > 0.01
    with np.load(EFFNET_DIR / "effnet_eval.npz") as z:
        np.testing.assert_array_equal(x[[i for i, r in enumerate(rows) if r["package"] == "foolbox"]], z["input"])
