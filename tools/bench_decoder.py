"""Held-out logits agreement of each method on the random-weight Qwen2 decoder (a script, not a test).

The decoder of models/README.md (real Qwen2 architecture, random weights: no real LLM checkpoint exists offline),
the bundled tiny one by default or the 0.6b one from the cache (--model). Calibration 16 x 128 and held-out 8 x 128
random tokens (models/llm_weights.write_tokens, seeds 1 and 2, as models/qwen2.py writes them for 0.6b). Each
config compresses once; `onnxspfq evaluate` compares the logits per position on the held-out tokens (cosine and
top-1 agreement) and on the calibration tokens, all in one run.

Usage:  python tools/bench_decoder.py [--model models/qwen2_tiny.onnx] [--configs default gptq ...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))
import llm_weights  # noqa: E402

import onnx  # noqa: E402

import onnxspfq  # noqa: E402
from onnxspfq import CompressConfig, QuantConfig  # noqa: E402
from onnxspfq.evaluate import evaluate_files  # noqa: E402

CONFIGS = {
    "default": CompressConfig(),
    "gptq": CompressConfig(method="gptq"),
    "gpfq": CompressConfig(method="gpfq"),
    "rtn": CompressConfig(method="rtn"),
    "spfq-stochastic": CompressConfig(quant=QuantConfig(operator="stochastic")),
    "default-3bit": CompressConfig(quant=QuantConfig(bits=3)),
    "gptq-3bit": CompressConfig(method="gptq", quant=QuantConfig(bits=3)),
    "screen0": CompressConfig(quant=QuantConfig(screen=0)),  # every candidate step (the search before screening)
    "screen0-3bit": CompressConfig(quant=QuantConfig(bits=3, screen=0)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "qwen2_tiny.onnx"))
    p.add_argument("--configs", nargs="+", default=["default", "gptq", "gpfq", "rtn", "spfq-stochastic"],
                   choices=sorted(CONFIGS))
    a = p.parse_args()
    vocab = next(d.dim_value for d in onnx.load(a.model, load_external_data=False).graph.output[0].type
                 .tensor_type.shape.dim[-1:])
    with tempfile.TemporaryDirectory() as d:
        calib = llm_weights.write_tokens(f"{d}/calib.npz", vocab, 16, 128, 1)
        held = llm_weights.write_tokens(f"{d}/eval.npz", vocab, 8, 128, 2)
        print(f"{'config':<18} {'held-out cosine':>15} {'top-1 agree':>11} {'calib cosine':>12} {'time s':>7}")
        for name in a.configs:
            t0 = time.perf_counter()
            onnxspfq.compress(a.model, str(calib), output=f"{d}/q.onnx", config=CONFIGS[name], progress=False)
            t = time.perf_counter() - t0
            h = evaluate_files(a.model, f"{d}/q.onnx", str(held), batch_size=1)
            c = evaluate_files(a.model, f"{d}/q.onnx", str(calib), batch_size=1)
            print(f"{name:<18} {h.cosine:>15.4f} {100 * h.top1_agreement:>10.1f}% {c.cosine:>12.4f} {t:>7.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
