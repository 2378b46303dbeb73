"""Inference speed of each output against the float model and onnxruntime's own quantizers, with each output's
quality next to its speed, on onnxruntime CPU (issue 14). One run: every output is built first, then all are timed
in interleaved rounds (each round runs every output once at each batch size), so machine noise hits them alike.

Outputs per model (a row says "n/a" with the reason where one does not apply):
  float               the model as given
  onnxspfq w4         the default run (weight-only 4-bit QDQ, spfq)
  onnxspfq w4 nbits   --format nbits (MatMul / Gemm weights as com.microsoft.MatMulNBits, accuracy level 0)
  onnxspfq w4 ort-cpu --target ort-cpu (MatMulNBits at its default accuracy level 4: int8 activations inside the
                      kernel; Conv as QDQ)
  onnxspfq w4 tensorrt --target tensorrt (INT4 block-wise weight-only MatMul / Gemm, the rest float): TensorRT's
                      form, timed here on onnxruntime CPU only because TensorRT cannot run on these machines; its
                      quality is what TensorRT would compute up to fp16 rounding
  onnxspfq w8a8       --activations int8 (W8A8 QDQ: int8 per-channel weights, each layer input uint8: zero point
                      128, or 0 where the tensor cannot be negative)
  onnxspfq w8a8 ort-cpu --target ort-cpu --activations int8: Conv / Gemm outputs quantized too, so onnxruntime
                      runs them as QLinearConv / QGemm
  onnxspfq w8a8 int8  --activations int8 --act-type int8 (zero point 0, TensorRT's form: symmetric only)
  ort dynamic         onnxruntime quantize_dynamic (int8 weights, activations quantized at run time)
  ort static          onnxruntime quantize_static (QDQ, per channel int8 weights, uint8 activations, MinMax)
  ort nbits           onnxruntime MatMulNBitsQuantizer, 4-bit RTN, block 32 (MatMul weights only)
Sessions: what a user gets, onnxruntime's default options (all optimisations; the weight-only QDQ outputs are then
rewritten by onnxruntime into int8-activation kernels, FORMATS.md), intra-op threads = the machine's cores. Quality
is measured with those same sessions on the model's evaluation data: Fashion-MNIST top-1 (10k test images),
MiniLM-L6 cosine of sentence_embedding to the float model's (512 held-out sentences), EfficientNet-Lite0 top-1
agreement with the float model and top-1 on the 20 labelled photos, the random-weight Qwen2 decoder (qwen2_tiny)
top-1 agreement and cosine of the logits per position on 8 x 128 held-out random tokens. Latency: median over
the rounds; the decoder graph has no KV cache, so its rows are one token (a decode step's shapes) and a 128-token
prefill of one sequence.

    pip install -e ".[bench]"   # onnxruntime's MatMulNBits quantizer imports onnx-ir
    python tools/bench_speed.py [--models fmnist_cnn minilm efficientnet_lite0 qwen2_tiny] [--outputs LABEL ...]
                                [--rounds 20] [--json F] [--md F]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "models"))
from bench_models import _calibration, _eval_batches, _ort_quantize, model_files  # noqa: E402

DECODER = "qwen2_tiny"  # random weights from a real architecture (models/README.md): no checkpoint offline
BATCH = {"fmnist_cnn": 64, "fmnist_mlp": 64, "minilm": 16, "efficientnet_lite0": 16, DECODER: 128}
CALIB = {"fmnist_cnn": {}, "fmnist_mlp": {}, "minilm": {"samples": 256, "calib": "unpadded", "batch_size": 1},
         "efficientnet_lite0": {"samples": 150, "batch_size": 50}, DECODER: {"batch_size": 4}}


def _files(name: str, tmp: str) -> dict:
    """model_files, and for the decoder its materialised weights with 16 x 128 calibration and 8 x 128 held-out
    random tokens (tools/bench_decoder.py's)."""
    if name != DECODER:
        return model_files(name)
    import llm_weights

    model = llm_weights.ensure_tiny()
    vocab = 8192
    return {"model": model, "calib": llm_weights.write_tokens(f"{tmp}/calib.npz", vocab, 16, 128, 1),
            "eval": llm_weights.write_tokens(f"{tmp}/eval.npz", vocab, 8, 128, 2)}


def _eval(name: str, files: dict):
    """(batches, labels, reference, output) as bench_models._eval_batches gives them; the decoder: its held-out
    tokens, one sequence per batch, logits compared per position."""
    if name != DECODER:
        return _eval_batches(name, files, 512 if name == "minilm" else None)
    with np.load(files["eval"]) as z:
        data = {k: z[k] for k in z.files}
    return [{k: v[i:i + 1] for k, v in data.items()} for i in range(len(data["input_ids"]))], None, None, "logits"
OUTPUTS = ("float", "onnxspfq w4", "onnxspfq w4 nbits", "onnxspfq w4 ort-cpu", "onnxspfq w4 tensorrt",
           "onnxspfq w8a8", "onnxspfq w8a8 ort-cpu", "onnxspfq w8a8 int8", "ort dynamic", "ort static", "ort nbits")


def build(name: str, tmp: str, files: dict, wanted: tuple[str, ...] = OUTPUTS) -> dict[str, str]:
    """The outputs `wanted` of one model (float always): label -> path, or label -> "n/a: why"."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxspfq.api import compress
    from onnxspfq.calib import load_calibration
    from onnxspfq.config import ActConfig, CompressConfig, QuantConfig
    from onnxspfq.errors import OnnxspfqError

    spec = {"model": name, **CALIB[name]}
    calib = _calibration(name, files, spec)
    out = {"float": str(files["model"])}
    ours = {"onnxspfq w4": CompressConfig(), "onnxspfq w4 nbits": CompressConfig(format="nbits"),
            "onnxspfq w4 ort-cpu": CompressConfig(target="ort-cpu"),
            "onnxspfq w4 tensorrt": CompressConfig(target="tensorrt"),
            "onnxspfq w8a8": CompressConfig(quant=QuantConfig(bits=8), activations=ActConfig()),
            "onnxspfq w8a8 ort-cpu": CompressConfig(quant=QuantConfig(bits=8), activations=ActConfig(),
                                                    target="ort-cpu"),
            "onnxspfq w8a8 int8": CompressConfig(quant=QuantConfig(bits=8), activations=ActConfig(dtype="int8"))}
    for label, cfg in ours.items():
        if label not in wanted:
            continue
        cfg = dataclasses.replace(cfg, samples=spec.get("samples"), batch_size=spec.get("batch_size", 16))
        path = os.path.join(tmp, label.replace(" ", "_") + ".onnx")
        t = time.perf_counter()
        try:
            compress(str(files["model"]), calib, path, cfg, progress=False)
        except OnnxspfqError as err:  # a target that leaves every layer float: the row says why
            out[label] = f"n/a: {err}"
            continue
        print(f"  built {name} {label} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        out[label] = path
    feeds = load_calibration(calib, onnx.load(str(files["model"])), samples=spec.get("samples"),
                             batch_size=spec.get("batch_size", 16))
    if "ort dynamic" in wanted:
        path = os.path.join(tmp, "ort_dynamic.onnx")
        quantize_dynamic(str(files["model"]), path, weight_type=QuantType.QInt8)
        out["ort dynamic"] = path
    for label, kind in (("ort static", "ort-static-w8a8"), ("ort nbits", "ort-nbits-rtn")):
        if label not in wanted:
            continue
        path = os.path.join(tmp, label.replace(" ", "_") + ".onnx")
        reason = _ort_quantize(kind, files["model"], feeds, path)
        out[label] = path if reason is None else f"n/a: {reason}"
    return out


def _session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def quality(name: str, sessions: dict, eval_data) -> dict[str, dict]:
    """Each output's metric against the float output, all from the sessions that are timed."""
    from onnxspfq.evaluate import compare

    batches, labels, reference, output = eval_data
    outs = {k: np.concatenate([s.run([output], b)[0] for b in batches]) for k, s in sessions.items()}
    if name == DECODER:  # logits per position: one row per token
        outs = {k: v.reshape(-1, v.shape[-1]) for k, v in outs.items()}
    task = "embed" if name == "minilm" else "classify"
    res = {}
    for k, y in outs.items():
        a = compare(outs["float"], y, labels, task=task, k=10, output_name=output)
        res[k] = {"cosine": a.cosine, "top1_agreement": a.top1_agreement,
                  "top1_accuracy": a.top1_accuracy_compressed}
    return res


def timing(sessions: dict, feeds: dict[int, dict], rounds: int) -> dict[str, dict[int, float]]:
    """Median seconds per run of each session at each batch size, interleaved rounds after one warm-up each."""
    times = {k: {b: [] for b in feeds} for k in sessions}
    for k, s in sessions.items():
        for f in feeds.values():
            s.run(None, f)
    for _ in range(rounds):
        for k, s in sessions.items():
            for b, f in feeds.items():
                t = time.perf_counter()
                s.run(None, f)
                times[k][b].append(time.perf_counter() - t)
    return {k: {b: float(np.median(v)) for b, v in d.items()} for k, d in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["fmnist_cnn", "minilm", "efficientnet_lite0", DECODER],
                    choices=list(BATCH))
    ap.add_argument("--outputs", nargs="+", default=list(OUTPUTS[1:]), choices=OUTPUTS[1:],
                    help="the outputs to build and time besides float (default: all)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", default="docs/results_speed.json")
    ap.add_argument("--md", default="docs/RESULTS_speed.md")
    a = ap.parse_args()
    doc = {"command": "python tools/bench_speed.py " + " ".join(sys.argv[1:]), "started": time.strftime("%Y-%m-%d %H:%M"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "models": {}}
    lines = [f"`{doc['command']}` ({doc['started']}, {doc['machine']}); latency = median of {a.rounds} interleaved "
             "rounds, onnxruntime default session options; x float = float latency / this latency (> 1 is faster)", ""]
    for name in a.models:
        with tempfile.TemporaryDirectory() as tmp:
            files = _files(name, tmp)
            if not all(Path(p).exists() for p in files.values()):
                print(f"{name}: skipped (missing {files}; see models/README.md)", flush=True)
                continue
            built = build(name, tmp, files, tuple(a.outputs))
            sessions = {k: _session(p) for k, p in built.items() if not p.startswith("n/a")}
            eval_data = _eval(name, files)
            q = quality(name, sessions, eval_data)
            first = eval_data[0][0]
            if name == DECODER:  # one token (a decode step's shapes, no KV cache in this graph) and a prefill
                feeds = {b: {k: v[:, :b] for k, v in first.items()} for b in (1, BATCH[name])}
            else:
                feeds = {b: {k: v[:b] for k, v in first.items()} for b in (1, BATCH[name])}
            t = timing(sessions, feeds, a.rounds)
            sizes = {k: os.path.getsize(p) + sum(os.path.getsize(x) for x in Path(p).parent.glob(Path(p).name + ".data"))
                     for k, p in built.items() if not p.startswith("n/a")}
            del sessions
        doc["models"][name] = {"built": {k: (v if v.startswith("n/a") else "ok") for k, v in built.items()},
                               "quality": q, "latency_s": t, "bytes": sizes}
        metric = ("cosine" if name == "minilm" else "top1_accuracy" if name.startswith("fmnist") else
                  "top1_agreement")
        bs = BATCH[name]
        unit = "tokens" if name == DECODER else "batch"
        extra_head = {"efficientnet_lite0": "; top-1 on the labelled photos and the logits' cosine in brackets",
                      DECODER: "; logits cosine in brackets; 1 token and a 128-token prefill of one sequence"}
        extra_head.setdefault(name, "; the logits' cosine to float's in brackets" if name != "minilm" else "")
        lines += [f"**{name}** (quality: {metric.replace('_', ' ')} vs float{extra_head.get(name, '')})", "",
                  f"| output | MB | quality | {unit} 1 ms | x float | {unit} {bs} ms | x float |",
                  "|---|---|---|---|---|---|---|"]
        for k in OUTPUTS:
            if k not in built:
                continue
            if built[k].startswith("n/a"):
                lines.append(f"| {k} | | {built[k]} | | | | |")
                continue
            v = q[k][metric]
            extra = (f" ({q[k]['top1_accuracy']:.2f}; {q[k]['cosine']:.4f})" if name == "efficientnet_lite0" else
                     f" ({q[k]['cosine']:.4f})" if name != "minilm" else "")
            lines.append(f"| {k} | {sizes[k] / 1e6:.2f} | {v:.4f}{extra} | {1e3 * t[k][1]:.2f} | "
                         f"{t['float'][1] / t[k][1]:.2f} | {1e3 * t[k][bs]:.2f} | {t['float'][bs] / t[k][bs]:.2f} |")
        lines.append("")
        print("\n".join(lines[-len(built) - 4:]), flush=True)
        Path(a.json).write_text(json.dumps(doc, indent=1))
        Path(a.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
