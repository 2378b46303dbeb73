"""Top-1 accuracy of one method over bits {8,4,3,2,1} on both Fashion-MNIST models (full 10k test set).

Usage: python tools/fmnist_method_grid.py METHOD [--refit]   (e.g. gptq). Prints one line per (model, bits).
"""
import sys

import numpy as np

import onnxspfq
from onnxspfq import CompressConfig, QuantConfig
from onnxspfq.evaluate import evaluate

method, refit = sys.argv[1], "--refit" in sys.argv
z = np.load("models/data/fmnist_test.npz")
x = ((z["images"].astype(np.float32) / 255 - 0.2860) / 0.3530)[:, None]
y = z["labels"]
for model in ("cnn", "mlp"):
    for bits in (8, 4, 3, 2, 1):
        res = onnxspfq.compress(f"models/fmnist_{model}.onnx", "models/data/fmnist_calib.npz", progress=False,
                                config=CompressConfig(method=method, quant=QuantConfig(bits=bits, refit_scale=refit)))
        a = evaluate(f"models/fmnist_{model}.onnx", res.model,
                     [{"input": x[i:i + 2000]} for i in range(0, len(x), 2000)], y)
        print(model, method + ("+refit" if refit else ""), bits, f"{100 * a.top1_accuracy_compressed:.2f}", flush=True)
