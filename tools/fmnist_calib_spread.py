"""Top-1 of each method on both Fashion-MNIST models over several calibration sets (a script, not a test).

The methods are deterministic at 3-8 bits, so a single-run table hides how much a 0.1-point difference depends on
which 256 images calibrated it. Each calibration set is 256 images drawn (seeded) from the 60k training images of
Debian's dataset-fashion-mnist (models/fmnist.py reads them; the committed fmnist_calib.npz is one such set); every
method compresses with every set, and the full 10k test set scores it. Prints per method: each set's top-1, the
mean, and the mean difference to gptq over the same sets (paired).

Usage:  python tools/fmnist_calib_spread.py [--bits 4 3] [--sets 5] [--configs default gptq gpfq rtn ...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))
import fmnist  # noqa: E402  (models/fmnist.py: the IDX reader and the input convention)

import onnxspfq  # noqa: E402
from onnxspfq import CompressConfig, QuantConfig  # noqa: E402
from onnxspfq.evaluate import evaluate  # noqa: E402

CONFIGS = {  # name: (method, QuantConfig fields beyond bits)
    "default": ("spfq", {}),
    "gptq": ("gptq", {}),
    "gpfq": ("gpfq", {}),
    "rtn": ("rtn", {}),
    "spfq-stochastic": ("spfq", {"operator": "stochastic"}),
    "default-no-align": ("spfq", {"align_ridge": float("inf")}),
    "default-no-act-order": ("spfq", {"act_order": False}),
    "best": ("spfq", {"path": "best"}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--sets", type=int, default=5)
    p.add_argument("--models", nargs="+", default=["cnn", "mlp"])
    p.add_argument("--configs", nargs="+", default=["default", "gptq", "gpfq", "rtn"], choices=sorted(CONFIGS))
    a = p.parse_args()
    data = fmnist.load_fmnist(fmnist.DEFAULT_DATA_DIR)
    x, y = fmnist.preprocess(data["test_images"]), data["test_labels"].astype(np.int64)
    test = [{"input": x[i:i + 2000]} for i in range(0, len(x), 2000)]
    train = fmnist.preprocess(data["train_images"])
    with tempfile.TemporaryDirectory() as d:
        sets = []
        for s in range(a.sets):
            idx = np.random.default_rng(1000 + s).choice(len(train), 256, replace=False)
            sets.append(f"{d}/calib{s}.npz")
            np.savez(sets[-1], input=train[idx])
        for model in a.models:
            path = str(ROOT / "models" / f"fmnist_{model}.onnx")
            for bits in a.bits:
                acc = {}
                for name in a.configs:
                    method, fields = CONFIGS[name]
                    acc[name] = []
                    for calib in sets:
                        cfg = CompressConfig(method=method, quant=QuantConfig(bits=bits, **fields))
                        res = onnxspfq.compress(path, calib, config=cfg, progress=False)
                        acc[name].append(100 * evaluate(path, res.model, test, y).top1_accuracy_compressed)
                for name in a.configs:
                    v = np.array(acc[name])
                    diff = v - np.array(acc["gptq"]) if "gptq" in acc else v * np.nan
                    print(f"{model} {bits} bit {name:<20} " + " ".join(f"{t:.2f}" for t in v)
                          + f"  mean {v.mean():.2f}  vs gptq {diff.mean():+.2f} (min {diff.min():+.2f}, max "
                          f"{diff.max():+.2f})", flush=True)


if __name__ == "__main__":
    main()
