"""Few calibration rows vs the projected path's damping (a script, not a test).

A 3-layer 64-wide MatMul chain with random weights (tests/builders.matmul_chain: synthetic, as the property needs
control over the number of calibration rows m against N0 = 64), calibrated on m standard-normal rows and measured on
256 held-out rows: relative output error ||y - y_float|| / ||y_float|| of each setting at 8 and 4 bits, all in one
run. The default spfq raises the damping of its projected path to methods.FEW_ROWS_DAMP when m < 2 N0; the rows
with --damp show what the projected path does at one fixed damping.

Usage:  python tools/bench_few_rows.py [--rows 16 64 256]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from builders import matmul_chain  # noqa: E402

from onnxspfq.cli import main as cli  # noqa: E402

SETTINGS = {"gpfq": ["--method", "gpfq"], "gptq (damp 0.01)": ["--method", "gptq"],
            "spfq default": [], "spfq default with the few-rows rule off": None,
            "spfq --damp 0.1": ["--damp", "0.1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", type=int, default=[16, 64, 256])
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model = f"{d}/chain.onnx"
        matmul_chain(model, 64, 3)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((256, 64)).astype(np.float32)
        ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        print(f"{'setting':<56} " + " ".join(f"m={m:<4} b={b}" for m in a.rows for b in (8, 4)))
        for name, extra in SETTINGS.items():
            errs = []
            for m in a.rows:
                np.savez(f"{d}/calib.npz", x=np.random.default_rng(m).standard_normal((m, 64)).astype(np.float32))
                for bits in ("8", "4"):
                    argv = ["compress", model, "--calib", f"{d}/calib.npz", "-o", f"{d}/q.onnx", "--bits", bits, "-q"]
                    if extra is None:  # the default with the plain damping: disable the rule for this row
                        from onnxspfq import methods
                        keep, methods.FEW_ROWS_DAMP = methods.FEW_ROWS_DAMP, 0.0
                        try:
                            cli(argv)
                        finally:
                            methods.FEW_ROWS_DAMP = keep
                    else:
                        cli(argv + extra)
                    y = ort.InferenceSession(f"{d}/q.onnx", providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                    errs.append(float(np.linalg.norm(y - ref) / np.linalg.norm(ref)))
            print(f"{name:<56} " + " ".join(f"{e:<10.4f}" for e in errs), flush=True)


if __name__ == "__main__":
    main()
