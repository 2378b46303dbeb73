"""Whole pipeline vs its physical floor, with the per-phase shares (issue 12), all in one process and one run.

Floor = 2 plain onnxruntime forward passes of the float model over the same calibration batches (the float and
the partially compressed model must each run once) + one pass of the path-following kernel per layer (the blocked
Gram kernel on that layer's W shape, X~ != X form, one call per Conv group). The pipeline is `compress()` with the
default method and format, kernels already compiled (a warm-up compress of the bundled MLP runs first).

    python tools/bench_pipeline.py                      # the bundled CNN + the cached MiniLM-L6 / EfficientNet-Lite0
    python tools/bench_pipeline.py --models minilm --method rtn

Phase shares come from cProfile's cumulative times of the driver's own steps (profiling adds ~5-10 %; the ratio is
timed without it, in a separate compress of the same inputs).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "onnxspfq" / "models"
MODELS = {
    "fmnist-cnn": (ROOT / "models" / "fmnist_cnn.onnx", ROOT / "models" / "data" / "fmnist_calib_small.npz", {}),
    "minilm": (CACHE / "minilm" / "minilm_l6_v2.onnx", CACHE / "minilm" / "minilm_calib.npz", {}),
    "efficientnet": (CACHE / "efficientnet_lite0" / "efficientnet_lite0.onnx",
                     CACHE / "efficientnet_lite0" / "effnet_calib.npz", {}),
    "qwen2-tiny": (None, None, {}),  # made by _decoder: random weights from a real architecture (models/README.md)
}
PHASES = [  # (label, function name as cProfile lists it, file suffix); indented labels: parts of the row above
    ("open + checks + calibration", "_open", "api.py"),
    ("capture (onnxruntime runs, Grams)", "grams", "capture.py"),
    ("  segment sessions made", "_session", "capture.py"),
    ("  segment runs (onnxruntime)", ("run", "_advance"), "onnxruntime_inference_collection.py"),
    ("  frontier arrays kept / spilled", "__init__", "spill.py"),
    ("  layer rows (im2col, padding)", "_rows", "capture.py"),
    ("  Gram products", "flush", "capture.py"),
    ("method (search + kernels)", "_quantize_layer", "api.py"),
    ("emit", "_emit_checked", "api.py"),
    ("save", "save_model", "save.py"),
    ("final check + agreement", "_check_and_measure", "api.py"),
]


def floor_seconds(model: str, calib: str, batch_size: int) -> tuple[float, float, float, float]:
    """(floor, two forward passes, kernel pass, two forward passes with the weights fed as inputs) in seconds."""
    from onnxspfq import kernels as K
    from onnxspfq import operators as op
    from onnxspfq.calib import load_calibration
    from onnxspfq.fold import fold_weight_chains
    from onnxspfq.graph import find_layers, load_model, weightless
    from onnxspfq.io import session

    m = load_model(model)
    batches = load_calibration(calib, m.proto, batch_size=batch_size)
    sess = session(model)
    sess.run(None, batches[0])
    t = time.perf_counter()
    for _ in range(2):
        for b in batches:
            sess.run(None, b)
    forward = time.perf_counter() - t
    # the same passes with the weights fed as inputs (how the capture's segments ran before docs/RESULTS.md
    # section 17): onnxruntime optimises constant weights only
    wl, fed = weightless(m)
    fed_sess = session(wl.SerializeToString())
    ws = {name: np.asarray(m.array(name)) for name in fed}
    fed_sess.run(None, {**batches[0], **ws})
    t = time.perf_counter()
    for _ in range(2):
        for b in batches:
            fed_sess.run(None, {**b, **ws})
    fed_forward = time.perf_counter() - t
    layers, _ = find_layers(fold_weight_chains(m))
    rng = np.random.default_rng(0)
    # compile / load this kernel variant outside the timing (the warm-up compress runs other variants: without
    # this the CNN's floor was one compile, 1.3-1.5 s, and its ratio meaningless)
    w = rng.standard_normal((4, 8))
    s, b = op.step_sizes(w, 4, 1.0, "channel", 1)
    K.blocked_merged(w, np.eye(8), np.eye(8), rng.random(w.shape), 1.0, op.stochastic_round, op.grid_params(s, 4), b)
    kernel = 0.0
    for layer in layers:
        n0 = layer.n0
        W = layer.matrix()[: layer.n1 // layer.groups]
        X = rng.standard_normal((max(2 * n0, 64), n0))
        H = X.T @ X
        G = H + 0.01 * np.eye(n0)
        xi = rng.random(W.shape)
        scale, bs = op.step_sizes(W, 4, 1.0, "channel", 1)
        P = op.grid_params(scale, 4)
        t = time.perf_counter()
        for _ in range(layer.groups):
            K.blocked_merged(W, G, H, xi, 1.0, op.stochastic_round, P, bs)
        kernel += time.perf_counter() - t
    return forward + kernel, forward, kernel, fed_forward


def _decoder(tmp: str) -> tuple[Path, Path]:
    """The Qwen2 tiny decoder with its weights materialised, and 16 x 128 random calibration tokens (seed 1, as
    tools/bench_speed.py and tools/bench_decoder.py calibrate it)."""
    sys.path.insert(0, str(ROOT / "models"))
    import llm_weights

    return Path(llm_weights.ensure_tiny()), llm_weights.write_tokens(f"{tmp}/calib.npz", 8192, 16, 128, 1)


def run(name: str, method: str, batch_size: int) -> None:
    from onnxspfq.api import compress
    from onnxspfq.config import CompressConfig

    model, calib, extra = MODELS[name]
    cfg = CompressConfig(method=method, batch_size=batch_size, **extra)
    with tempfile.TemporaryDirectory() as tmp:
        if name == "qwen2-tiny":
            model, calib = _decoder(tmp)
        if not model.exists() or not calib.exists():
            print(f"{name}: skipped ({model} or {calib} missing; see models/README.md)")
            return
        out = os.path.join(tmp, "q.onnx")
        t = time.perf_counter()
        compress(str(model), str(calib), out, cfg, progress=False)
        pipeline = time.perf_counter() - t
        floor, forward, kernel, fed_forward = floor_seconds(str(model), str(calib), batch_size)
        prof = cProfile.Profile()
        prof.enable()
        compress(str(model), str(calib), out, cfg, progress=False)
        prof.disable()
    stats = pstats.Stats(prof)
    total = max(v[3] for k, v in stats.stats.items() if k[2] == "compress" and k[0].endswith("api.py"))
    print(f"{name} ({method}, batch {batch_size}): pipeline {pipeline:.2f} s, floor {floor:.2f} s "
          f"(2 forward passes {forward:.2f} s + kernel pass {kernel:.2f} s): {pipeline / floor:.2f}x the floor")
    print(f"    the 2 forward passes with the weights fed as inputs: {fed_forward:.2f} s "
          f"({fed_forward / forward:.2f}x)")
    for label, fn, suffix in PHASES:
        if isinstance(fn, tuple):  # (function, caller): only the time of the calls from that caller
            fn, caller = fn
            cum = sum(c[3] for k, v in stats.stats.items() if k[2] == fn and k[0].endswith(suffix)
                      for ck, c in v[4].items() if ck[2] == caller)
        else:
            cum = sum(v[3] for k, v in stats.stats.items() if k[2] == fn and k[0].endswith(suffix))
        print(f"    {label:<36} {100 * cum / total:5.1f} %")


def warm_up(method: str) -> None:
    """Compile / load the kernels once, outside the timings: one compress of the bundled MLP."""
    from onnxspfq.api import compress
    from onnxspfq.config import CompressConfig

    with tempfile.TemporaryDirectory() as tmp:
        compress(str(ROOT / "models" / "fmnist_mlp.onnx"), str(ROOT / "models" / "data" / "fmnist_calib_small.npz"),
                 os.path.join(tmp, "w.onnx"), CompressConfig(method=method), progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["fmnist-cnn", "minilm", "efficientnet"], choices=list(MODELS))
    ap.add_argument("--method", default="spfq")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    warm_up(args.method)
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs", file=sys.stderr)
    for name in args.models:
        run(name, args.method, args.batch_size)


if __name__ == "__main__":
    main()
