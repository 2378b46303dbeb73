"""Train, export and check the Fashion-MNIST test models (a small CNN and an MLP).

Run from a separate venv with CPU PyTorch (torch is NOT a dependency of onnxspfq), see models/README.md:

    /work/torchenv/bin/python models/fmnist.py

Reads the raw IDX files of the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
trains both models with a fixed seed, exports them to ONNX (opset 17, dynamic batch dim "batch", input "input"
[batch,1,28,28] float32, output "logits"), checks each with onnxruntime on the full 10k test set, and writes the
committed data files under models/data/.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np

MEAN = 0.2860
STD = 0.3530
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
HERE = Path(__file__).resolve().parent
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not) into a numpy array of its stored shape and dtype."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, payload has {data.size} items")
    return data.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def find_idx(data_dir: Path, stem: str) -> Path:
    """Locate ``stem`` or ``stem.gz`` in ``data_dir``."""
    for name in (stem, stem + ".gz"):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(f"{stem}[.gz] not found in {data_dir}; install dataset-fashion-mnist or pass --data-dir")


def load_fmnist(data_dir: Path) -> dict[str, np.ndarray]:
    """Load the four Fashion-MNIST arrays: uint8 images [N,28,28] and uint8 labels [N]."""
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        out[f"{split}_images"] = read_idx(find_idx(data_dir, f"{prefix}-images-idx3-ubyte"))
        out[f"{split}_labels"] = read_idx(find_idx(data_dir, f"{prefix}-labels-idx1-ubyte"))
    assert out["train_images"].shape == (60000, 28, 28) and out["test_images"].shape == (10000, 28, 28)
    return out


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28] as (x/255 - 0.2860)/0.3530, the models' input convention."""
    x = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return ((x - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def build_cnn():
    """Conv(1->16,3x3,pad1)-Relu-MaxPool-Conv(16->32,3x3,pad1)-Relu-MaxPool-Flatten-Gemm(1568->128)-Relu-Gemm(128->10)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def build_mlp():
    """Flatten-Gemm(784->256)-Relu-Gemm(256->128)-Relu-Gemm(128->10)."""
    from torch import nn

    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def train(model, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, batch: int, seed: int) -> None:
    """Adam + cosine decay to zero, cross-entropy, seeded shuffling; prints loss/accuracy per epoch."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    steps = epochs * ((len(xt) + batch - 1) // batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        t0, total, correct, seen = time.time(), 0.0, 0, 0
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            logits = model(xt[idx])
            loss = loss_fn(logits, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
            seen += len(idx)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / seen:.4f} train acc {correct / seen:.4f} "
              f"({time.time() - t0:.1f} s)", flush=True)
    model.eval()


def export_onnx(model, path: Path) -> None:
    """Export with the TorchScript exporter: opset 17, input "input" [batch,1,28,28], output "logits".

    The legacy (dynamo=False) exporter is chosen on purpose: it writes opset 17 directly and gives the plain
    Conv/Relu/MaxPool/Flatten/Gemm graph, without needing onnxscript; its DeprecationWarning is silenced.
    """
    import warnings

    import onnx
    import torch

    dummy = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript.*")
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=17, do_constant_folding=True,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> tuple[float, np.ndarray]:
    """Top-1 accuracy of the ONNX model under onnxruntime (CPU) and its logits."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float((logits.argmax(1) == y).mean()), logits


def write_data(out_dir: Path, data: dict[str, np.ndarray], seed: int) -> None:
    """Write test set (uint8, compressed) and seed-chosen preprocessed calibration sets (256 and first 32)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "fmnist_test.npz",
                        images=data["test_images"].astype(np.uint8), labels=data["test_labels"].astype(np.uint8))
    idx = np.random.default_rng(seed).choice(len(data["train_images"]), size=256, replace=False)
    calib = preprocess(data["train_images"][idx])
    np.savez_compressed(out_dir / "fmnist_calib.npz", input=calib)
    np.savez_compressed(out_dir / "fmnist_calib_small.npz", input=calib[:32])


def main(argv: list[str] | None = None) -> int:
    """Train both models, export, check with onnxruntime, write data files; prints accuracies."""
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cnn-epochs", type=int, default=8)
    ap.add_argument("--mlp-epochs", type=int, default=15)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    data = load_fmnist(args.data_dir)
    x_train, y_train = preprocess(data["train_images"]), data["train_labels"]
    x_test, y_test = preprocess(data["test_images"]), data["test_labels"]
    write_data(args.out_dir / "data", data, args.seed)
    print(f"wrote data files under {args.out_dir / 'data'}")

    for name, build, epochs, lr in (("cnn", build_cnn, args.cnn_epochs, 2e-3), ("mlp", build_mlp, args.mlp_epochs, 1e-3)):
        print(f"training fmnist_{name} ({epochs} epochs, seed {args.seed})", flush=True)
        torch.manual_seed(args.seed)
        model = build()
        train(model, x_train, y_train, epochs=epochs, lr=lr, batch=128, seed=args.seed)
        path = args.out_dir / f"fmnist_{name}.onnx"
        export_onnx(model, path)
        acc, logits = onnx_accuracy(path, x_test, y_test)
        with torch.no_grad():
            ref = model(torch.from_numpy(x_test[:1000])).numpy()
        diff = float(np.abs(ref - logits[:1000]).max())
        print(f"fmnist_{name}: {path} ({path.stat().st_size} bytes) onnxruntime float test accuracy "
              f"{acc * 100:.2f}% on {len(y_test)} images; max |torch - ort| logit diff {diff:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
