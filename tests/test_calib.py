"""calib.py: calibration sources, batching, and one-line errors for bad data."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h

from onnxspfq.calib import load_calibration, model_inputs
from onnxspfq.images import ImagePreprocess
from onnxspfq.errors import OnnxspfqError


def _model(inputs):
    """A model whose inputs are `inputs` [(name, elem type, shape)]; each is reduced to one output."""
    nodes, outs = [], []
    for i, (name, t, shape) in enumerate(inputs):
        nodes.append(h.make_node("Identity", [name], [f"o{i}"]))
        outs.append(h.make_tensor_value_info(f"o{i}", t, shape))
    m = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info(n, t, s) for n, t, s in inputs], outs),
                     opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


TWO = _model([("x", TP.FLOAT, ["N", 3, 4]), ("ids", TP.INT64, ["N", 5])])
ONE = _model([("x", TP.FLOAT, ["N", 3, 4])])
RNG = np.random.default_rng(2)


def _x(n):
    return RNG.standard_normal((n, 3, 4)).astype(np.float32)


def test_model_inputs():
    (s,) = model_inputs(ONE)
    assert (s.name, s.dtype, s.shape) == ("x", np.dtype(np.float32), (None, 3, 4))


def test_npz_batches_and_safe_int_cast(tmp_path):
    x, ids = _x(10), RNG.integers(0, 9, (10, 5)).astype(np.int32)
    np.savez(tmp_path / "c.npz", x=x, ids=ids)
    batches = load_calibration(tmp_path / "c.npz", TWO, batch_size=4)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert all(b["ids"].dtype == np.int64 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), ids)
    assert [b["x"].shape[0] for b in load_calibration(tmp_path / "c.npz", TWO, samples=5, batch_size=4)] == [4, 1]


def test_npy_file_and_folder_of_samples_and_batches(tmp_path):
    x = _x(7)
    np.save(tmp_path / "one.npy", x)
    assert [b["x"].shape[0] for b in load_calibration(tmp_path / "one.npy", ONE, batch_size=3)] == [3, 3, 1]
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "b_01.npy", x[1])        # one sample (rank R-1)
    np.save(d / "a_00.npy", x[0])
    np.save(d / "c_02.npy", x[2:5])      # a batch of three
    batches = load_calibration(d, ONE, batch_size=16)
    assert len(batches) == 1
    np.testing.assert_array_equal(batches[0]["x"], x[:5])  # sorted by file name
    e = tmp_path / "e"
    e.mkdir()
    for i in range(3):
        np.savez(e / f"s{i}.npz", x=x[i], ids=np.arange(5))
    batches = load_calibration(e, TWO, batch_size=2)
    assert [b["ids"].shape for b in batches] == [(2, 5), (1, 5)]


def test_calibration_data_reader_and_python_objects():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": _x(2)}, {"x": _x(3)}])

        def get_next(self):
            return next(self.items, None)

    assert [b["x"].shape[0] for b in load_calibration(Reader(), ONE, batch_size=4)] == [4, 1]
    assert len(load_calibration({"x": _x(3)}, ONE, batch_size=1)) == 3
    assert len(load_calibration([{"x": _x(1)}, {"x": _x(1)}], ONE)) == 1


def test_fixed_batch_dim_one_sample_per_batch():
    m = _model([("x", TP.FLOAT, [1, 3, 4])])
    batches = load_calibration({"x": _x(5)}, m, batch_size=16)
    assert len(batches) == 5 and all(b["x"].shape == (1, 3, 4) for b in batches)
    m2 = _model([("x", TP.FLOAT, [2, 3, 4])])
    with pytest.raises(OnnxspfqError, match="multiple of 2"):
        load_calibration({"x": _x(3)}, m2)


def _bad_cases(tmp_path):
    x = _x(4)
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    np.save(tmp_path / "mixed" / "a.npy", x)
    (tmp_path / "mixed" / "b.png").write_bytes(b"x")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    (tmp_path / "data.txt").write_text("1 2 3")
    np.save(tmp_path / "x.npy", x)
    return {
        "missing name": (dict(source={"x": x}, model=TWO), "lacks model input"),
        "extra name": (dict(source={"x": x, "y": x}, model=ONE), "not model inputs"),
        "wrong rank": (dict(source={"x": x[None, None]}, model=ONE), "rank 3"),
        "static dim": (dict(source={"x": np.zeros((4, 3, 5), np.float32)}, model=ONE), "axis 2 must be 4"),
        "float64": (dict(source={"x": x.astype(np.float64)}, model=ONE), "expects float32"),
        "unsafe int": (dict(source={"x": x, "ids": np.zeros((4, 5), np.uint64)}, model=TWO), "expects int64"),
        "nan": (dict(source={"x": np.where(x > 1, np.nan, x)}, model=ONE), "NaN/Inf"),
        "inf": (dict(source={"x": np.full_like(x, np.inf)}, model=ONE), "NaN/Inf"),
        "zero samples": (dict(source={"x": x[:0]}, model=ONE), "0 samples"),
        "empty reader": (dict(source=[], model=ONE), "empty"),
        "empty folder": (dict(source=tmp_path / "empty", model=ONE), "holds no"),
        "mixed folder": (dict(source=tmp_path / "mixed", model=ONE), "mixes"),
        "no such path": (dict(source=tmp_path / "nope.npz", model=ONE), "does not exist"),
        "corrupt npy": (dict(source=tmp_path / "bad.npy", model=ONE), "cannot read"),
        "suffix": (dict(source=tmp_path / "data.txt", model=ONE), "unsupported calibration file"),
        "npy for 2 inputs": (dict(source=tmp_path / "x.npy", model=TWO), "single-input"),
        "sample counts": (dict(source={"x": x, "ids": np.zeros((3, 5), np.int64)}, model=TWO),
                          "different sample counts"),
        "bad type": (dict(source=3.5, model=ONE), "unsupported calibration source"),
    }


@pytest.mark.parametrize("case", [
    "missing name", "extra name", "wrong rank", "static dim", "float64", "unsafe int", "nan", "inf",
    "zero samples", "empty reader", "empty folder", "mixed folder", "no such path", "corrupt npy", "suffix",
    "npy for 2 inputs", "sample counts", "bad type"])
def test_bad_calibration(tmp_path, case):
    kwargs, match = _bad_cases(tmp_path)[case]
    with pytest.raises(OnnxspfqError, match=match) as ei:
        load_calibration(**kwargs)
    assert "\n" not in str(ei.value)


IMG = _model([("img", TP.FLOAT, ["N", 3, 6, 5])])


def test_images_without_pillow_say_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` fail like a missing install
    with pytest.raises(OnnxspfqError, match="pip install pillow"):
        load_calibration(tmp_path, IMG)


def test_images_with_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (10, 12), color).save(tmp_path / f"im{i}.png")
    pre = ImagePreprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    (b,) = load_calibration(tmp_path, IMG, image_preprocess=pre)
    assert b["img"].shape == (3, 3, 6, 5) and b["img"].dtype == np.float32
    np.testing.assert_allclose(b["img"][0, :, 2, 2], [1, -1, -1], atol=1e-6)   # red, normalised to [-1, 1]
    np.testing.assert_allclose(b["img"][2, :, 0, 0], [-1, -1, 1], atol=1e-6)
    nhwc = _model([("img", TP.FLOAT, ["N", 6, 5, 3])])
    (b2,) = load_calibration(tmp_path, nhwc, image_preprocess={"layout": "NHWC"})
    np.testing.assert_allclose(b2["img"][1, 3, 3], [0, 1, 0], atol=1e-6)
    with pytest.raises(OnnxspfqError, match="size=\\(H, W\\)"):
        load_calibration(tmp_path, _model([("img", TP.FLOAT, ["N", 3, "H", "W"])]))


def test_scalar_input_values_are_never_merged():
    """A rank-0 input (silero's sr) has no sample axis: chunks holding different values stay in separate batches
    (they were merged under the first chunk's value)."""
    from builders import branchy

    m = branchy()
    x = lambda n: np.ones((n, 16), np.float32)
    batches = load_calibration([{"x": x(3), "sr": np.array(16)}, {"x": x(2), "sr": np.array(8)},
                                {"x": x(1), "sr": np.array(8)}], m, batch_size=8)
    assert [(int(b["sr"]), len(b["x"])) for b in batches] == [(16, 3), (8, 3)]
