"""A folder of real images as calibration data, through the command line, with the documented preprocessing."""
import numpy as np
import onnx
import pytest

from onnxspfq.cli import main
from onnxspfq.evaluate import evaluate

Image = pytest.importorskip("PIL.Image")


def test_image_folder_calibration_matches_npz(tmp_path, fmnist_cnn, fmnist_test, capsys):
    x, labels = fmnist_test
    folder = tmp_path / "images"
    folder.mkdir()
    raw = np.rint((x[:32, 0] * 0.3530 + 0.2860) * 255).astype(np.uint8)  # back to the real 8-bit pixels
    for i, img in enumerate(raw):
        Image.fromarray(img, mode="L").save(folder / f"{i:03d}.png")
    out = tmp_path / "cnn.q.onnx"
    code = main(["compress", str(fmnist_cnn), "--calib", str(folder), "-o", str(out), "-q", "--bits", "4",
                 "--image-mean", "0.2860", "--image-std", "0.3530"])
    assert code == 0, capsys.readouterr().err
    # the same samples given as an array must give the same compressed bytes (same seed): preprocessing is exact
    np.savez(tmp_path / "c.npz", input=x[:32])
    out2 = tmp_path / "cnn2.q.onnx"
    assert main(["compress", str(fmnist_cnn), "--calib", str(tmp_path / "c.npz"), "-o", str(out2), "-q",
                 "--bits", "4"]) == 0
    a = evaluate(str(out), str(out2), [{"input": x[:500]}])
    assert a.rel_error < 1e-5, a
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
