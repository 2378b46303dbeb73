"""Top-1 of one method at low bits over several seeds on both Fashion-MNIST models (full 10k test set).

Stochastic methods vary with the seed; this shows the spread behind a single-seed table cell.
Usage: python tools/fmnist_seeds.py [--method spfq] [--bits 1 2] [--seeds 5] [--models cnn] [--max-patches N] [--screen K]
"""
import argparse

import numpy as np

import onnxspfq
from onnxspfq import CompressConfig, QuantConfig
from onnxspfq.evaluate import evaluate

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--method", default="spfq")
p.add_argument("--bits", type=int, nargs="+", default=[1, 2])
p.add_argument("--seeds", type=int, default=5)
p.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=("cnn", "mlp"))
p.add_argument("--screen", type=int, default=None, help="QuantConfig.screen (default: the method's own)")
p.add_argument("--max-patches", type=int, default=CompressConfig.max_patches,
               help="Conv im2col patches per layer (the seed picks them; the MLP has no Conv)")
a = p.parse_args()
z = np.load("models/data/fmnist_test.npz")
x = ((z["images"].astype(np.float32) / 255 - 0.2860) / 0.3530)[:, None]
y = z["labels"]
for model in a.models:
    for bits in a.bits:
        accs = []
        for seed in range(a.seeds):
            res = onnxspfq.compress(f"models/fmnist_{model}.onnx", "models/data/fmnist_calib.npz", progress=False,
                                    config=CompressConfig(method=a.method, seed=seed, quant=QuantConfig(bits=bits, screen=a.screen),
                                                          max_patches=a.max_patches))
            r = evaluate(f"models/fmnist_{model}.onnx", res.model,
                         [{"input": x[i:i + 2000]} for i in range(0, len(x), 2000)], y)
            accs.append(100 * r.top1_accuracy_compressed)
        print(model, a.method, bits, f"max_patches {a.max_patches} screen {a.screen}", " ".join(f"{v:.2f}" for v in accs),
              f"mean {np.mean(accs):.2f} min {min(accs):.2f} max {max(accs):.2f}", flush=True)
