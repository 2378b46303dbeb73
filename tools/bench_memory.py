"""Peak memory (whole-process max RSS) of `onnxspfq compress` against the targets of the real-size issue:
any model <= 1.5 x its weight bytes + 1 GB; MiniLM-L6 <= 600 MB; flat in the calibration set size (Fashion-MNIST
CNN, 256 -> 8192 samples: <= +10 %). Each case runs as its own process (ru_maxrss of the child), one after another
in the same run.

    python tools/bench_memory.py                 # CNN 256 vs 8192 samples, tiny Qwen2, MiniLM when built
    python tools/bench_memory.py --large         # + a 2.2 GB external-data MatMul chain (minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "models"))
CLI = [sys.executable, "-m", "onnxspfq.cli"]


def weight_bytes(model: str) -> int:
    from onnxspfq.io import open_model
    return open_model(model).weight_bytes()


def run(args: list[str]) -> tuple[float, float, int]:
    """(peak RSS MB, wall s, exit code) of one child process."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *CLI, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss_kb, rc = out.stdout.split()[-2:]
    if int(rc):
        print(out.stderr[-2000:], file=sys.stderr)
    return int(rss_kb) / 1024, wall, int(rc)


def fmnist_calib(n: int, path: str) -> None:
    with np.load(ROOT / "models" / "data" / "fmnist_test.npz") as z:
        x = ((z["images"][:n].astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None]
    np.savez(path, input=x)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--large", action="store_true", help="also the 2.2 GB external-data chain")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        def case(name: str, model: str, calib: str, extra: list[str], limit_mb: float) -> None:
            rss, wall, rc = run(["compress", model, "--calib", calib, "-o", os.path.join(d, "out.onnx"), "-q", *extra])
            wb = weight_bytes(model) / 2**20
            rows.append(dict(case=name, weights_mb=round(wb, 1), peak_rss_mb=round(rss, 1), limit_mb=round(limit_mb, 1),
                             within=rss <= limit_mb, wall_s=round(wall, 1), rc=rc))
            print(json.dumps(rows[-1]), flush=True)

        cnn = str(ROOT / "models" / "fmnist_cnn.onnx")
        for n in (256, 8192):
            fmnist_calib(n, os.path.join(d, f"c{n}.npz"))
        case("fmnist_cnn 256 samples", cnn, os.path.join(d, "c256.npz"), [], 1.5 * weight_bytes(cnn) / 2**20 + 1024)
        base = rows[-1]["peak_rss_mb"]
        case("fmnist_cnn 8192 samples", cnn, os.path.join(d, "c8192.npz"), [], 1.1 * base)
        try:
            from llm_weights import ensure_tiny, write_tokens
            tiny = str(ensure_tiny(d))
            write_tokens(os.path.join(d, "tiny_calib.npz"), 8192, 16, 128, seed=0)
            for extra in ([], ["--method", "gptq", "--format", "nbits"]):
                case(f"qwen2 tiny 16x128 tokens {' '.join(extra) or '(default)'}", tiny,
                     os.path.join(d, "tiny_calib.npz"), extra, 1.5 * weight_bytes(tiny) / 2**20 + 1024)
        except ImportError as e:
            print(f"qwen2 tiny skipped: {e}")
        minilm = Path.home() / ".cache" / "onnxspfq" / "models" / "minilm"
        if (minilm / "minilm_l6_v2.onnx").exists():
            case("minilm-l6 (default, 256 padded)", str(minilm / "minilm_l6_v2.onnx"), str(minilm / "minilm_calib.npz"),
                 [], 600)
        else:
            print("minilm skipped: not built (models/minilm.py)")
        if a.large:
            from builders import matmul_chain
            matmul_chain(os.path.join(d, "big.onnx"), 4096, 33)
            np.savez(os.path.join(d, "big_calib.npz"),
                     x=np.random.default_rng(0).standard_normal((32, 4096)).astype(np.float32))
            for method in ("rtn", "gptq"):
                case(f"2.2 GB MatMul chain ({method})", os.path.join(d, "big.onnx"), os.path.join(d, "big_calib.npz"),
                     ["--method", method], 1.5 * weight_bytes(os.path.join(d, "big.onnx")) / 2**20 + 1024)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
