"""silero-vad, every Conv inside the If on the sample rate: compress the branch of each rate per method and bits,
and both branches by two runs; then run float and compressed models as deployed (a stream over the held-out prompts, each carrying its own LSTM
state) and compare their speech decisions (p > 0.5) per chunk.

    python tools/bench_silero.py [--bits 4 8] [--methods spfq gpfq gptq rtn] [--chunks 2048]

Needs models/silero_vad.py's cache (it builds it when missing). Prints one line per (rate, bits, method).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("silero_vad_script", ROOT / "models" / "silero_vad.py")
sv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--methods", nargs="+", default=["spfq", "gpfq", "gptq", "rtn"])
    ap.add_argument("--chunks", type=int, default=sv.EVAL_CHUNKS)
    args = ap.parse_args()
    d = sv.DEFAULT_OUT
    if not (d / "silero_16k_eval.npz").exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "silero_vad.py")], check=True)
    from onnxspfq.api import compress
    from onnxspfq.config import CompressConfig, QuantConfig

    model = str(d / "silero_vad.onnx")
    for tag in sv.RATES:
        audio = sv.held_out_stream(tag, args.chunks)
        ref = sv.stream_probs(model, audio, tag, args.chunks) > 0.5
        print(f"{tag}: float model says speech on {ref.mean():.3f} of {args.chunks} held-out chunks")
        for bits in args.bits:
            for method in args.methods:
                with tempfile.TemporaryDirectory() as tmp:
                    out = str(Path(tmp) / "q.onnx")
                    r = compress(model, str(d / f"silero_{tag}_calib.npz"), out,
                                 CompressConfig(method=method, quant=QuantConfig(bits=bits)), progress=False,
                                 batch_axes={"state": 1}, eval_data=str(d / f"silero_{tag}_eval.npz")).report
                    p = sv.stream_probs(out, audio, tag, args.chunks) > 0.5
                print(f"{tag} {bits} bit {method:<5} decision agreement {np.mean(p == ref):.4f}  "
                      f"(teacher-forced output cosine {r.agreement.cosine:.5f}, {len(r.layers)} layers, "
                      f"{r.size_after / 1e6:.3f} MB)")
    both_rates(model, d, args.chunks)


def both_rates(model: str, d: Path, chunks: int) -> None:
    """Both branches by two runs (the 16 kHz branch, then the 8 kHz one on that output), default settings."""
    from onnxspfq.api import compress

    with tempfile.TemporaryDirectory() as tmp:
        a, b = str(Path(tmp) / "a.onnx"), str(Path(tmp) / "b.onnx")
        compress(model, str(d / "silero_16k_calib.npz"), a, progress=False, batch_axes={"state": 1})
        r = compress(a, str(d / "silero_8k_calib.npz"), b, progress=False, batch_axes={"state": 1}).report
        for tag in sv.RATES:
            audio = sv.held_out_stream(tag, chunks)
            ref = sv.stream_probs(model, audio, tag, chunks) > 0.5
            got = sv.stream_probs(b, audio, tag, chunks) > 0.5
            print(f"both rates by two runs ({r.size_after / 1e6:.3f} MB): {tag} decision agreement "
                  f"{np.mean(got == ref):.4f}")


if __name__ == "__main__":
    main()
