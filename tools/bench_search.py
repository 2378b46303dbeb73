"""The candidate search's cost and what the screening gives up (issue 12: "the candidate search costs at most 2x
one pass"), all in one process and one run, on the same Grams.

The run walks the model's layers as `compress()` does (the real two-graph capture, each layer fed forward with the
full search's result) and on every layer's Grams runs the configured method
- once with one fixed step (c_alpha = --one-pass, a single path following run: "one pass"),
- with every candidate (screen 0, the search before the screening),
- with each --screens k (the k candidates whose plain rounding has the smallest OPTQ loss, search.Search.screened).
It prints, per model and width, each setting's method time as a multiple of one pass and its summed exact
reconstruction error sum_n ||X w_n - X~ q_n||^2 relative to the full search's ("regret": 0 = the same picks).

    python tools/bench_search.py                                    # CNN + MiniLM-L6, 4 and 3 bits
    python tools/bench_search.py --models efficientnet --bits 4 --screens 1 2 3
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench_pipeline import MODELS, warm_up  # noqa: E402  (the same model / calibration files)


def measure(name: str, bits: int, screens: list[int], one_pass: float, method: str, samples: int | None) -> None:
    from onnxspfq import api
    from onnxspfq.config import CompressConfig, QuantConfig

    model, calib, _ = MODELS[name]
    if not model.exists() or not calib.exists():
        print(f"{name}: skipped ({model} or {calib} missing; see models/README.md)")
        return
    config = CompressConfig(method=method, quant=QuantConfig(bits=bits), samples=samples).resolved()
    run = api._open(str(model), str(calib), None, None, config, None, None, None)
    settings = [("one pass", {"c_alpha": one_pass})] + [(f"screen {k}", {"screen": k}) for k in [0] + screens]
    seconds = {label: 0.0 for label, _ in settings}
    error = {label: 0.0 for label, _ in settings}
    capture = run.capture(config)
    weights: dict = {}
    try:
        for index, layer in enumerate(run.layers):
            grams = capture.grams(layer, weights)
            weights = capture.release(weights)
            W = layer.matrix(dtype=np.float32)
            base = run.layer_config(config, layer)
            configs = [(label, dataclasses.replace(base, quant=dataclasses.replace(base.quant, **change)))
                       for label, change in settings]
            if index == 0:  # every setting once untimed: a kernel variant first used here compiles (or loads)
                for _, lconfig in configs:
                    api._quantize_layer(layer, W, grams, lconfig, np.random.default_rng([0, index]))
            kept = None
            for label, lconfig in configs:
                t = time.perf_counter()
                Q, info, _, _ = api._quantize_layer(layer, W, grams, lconfig, np.random.default_rng([0, index]))
                seconds[label] += time.perf_counter() - t
                error[label] += float(np.sum(info.sq_error))
                if label == "screen 0":
                    kept = Q
            weights[layer.weight] = layer.tensor(kept).astype(np.float32, copy=False)
    finally:
        capture.close()
    print(f"{name} {method} {bits} bit ({len(run.layers)} layers): method seconds, x one pass, error regret vs "
          "every candidate")
    for label, _ in settings:
        print(f"    {label:<10} {seconds[label]:8.2f} s  {seconds[label] / seconds['one pass']:5.2f}x  "
              f"{100 * (error[label] / error['screen 0'] - 1):+7.3f} %", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["fmnist-cnn", "minilm"], choices=list(MODELS))
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    ap.add_argument("--screens", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--one-pass", type=float, default=0.8, help="the fixed c_alpha of the one-pass reference")
    ap.add_argument("--method", default="spfq")
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default: all in the file)")
    args = ap.parse_args()
    warm_up(args.method)
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs", file=sys.stderr)
    for name in args.models:
        for bits in args.bits:
            measure(name, bits, args.screens, args.one_pass, args.method, args.samples)


if __name__ == "__main__":
    main()
