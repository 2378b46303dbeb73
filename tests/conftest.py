import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def fmnist_cnn() -> Path:
    return MODELS / "fmnist_cnn.onnx"


@pytest.fixture(scope="session")
def fmnist_mlp() -> Path:
    return MODELS / "fmnist_mlp.onnx"


@pytest.fixture(scope="session")
def fmnist_calib_small() -> Path:
    return MODELS / "data" / "fmnist_calib_small.npz"


@pytest.fixture(scope="session")
def fmnist_calib() -> Path:
    return MODELS / "data" / "fmnist_calib.npz"


@pytest.fixture(scope="session")
def fmnist_test():
    """The real Fashion-MNIST test set (10k images), preprocessed as the models expect, and its labels."""
    import numpy as np

    with np.load(MODELS / "data" / "fmnist_test.npz") as z:
        images, labels = z["images"], z["labels"]
    x = ((images.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None, :, :]
    return x, labels.astype(np.int64)
