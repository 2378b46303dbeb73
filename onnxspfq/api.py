"""The one entry point: compress(model, calibration, config) -> CompressionResult."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxspfq.calib import ImagePreprocess, load_calibration
from onnxspfq.capture import Capture
from onnxspfq.config import CompressConfig
from onnxspfq.emit_qdq import emit
from onnxspfq.errors import OnnxspfqError
from onnxspfq.evaluate import evaluate
from onnxspfq.graph import Layer, find_layers, fold_weight_chains, load_model
from onnxspfq.io import model_size_bytes, save_model_atomic
from onnxspfq.methods import METHODS
from onnxspfq.report import LayerReport, Report


@dataclass
class CompressionResult:
    """The compressed model (a proto, also written to `output` when one was given) and its report."""

    model: onnx.ModelProto
    report: Report


def _check_output_path(model_path: str, output: str | None) -> None:
    if output is None:
        return
    if os.path.exists(output) and os.path.samefile(output, model_path):
        raise OnnxspfqError(f"output path {output} is the input model: choose another -o path (the input is never modified)")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise OnnxspfqError(f"output directory {out_dir} does not exist: create it or choose another -o path")


def _quantize_layer(layer: Layer, grams: list, config: CompressConfig, rng: np.random.Generator):
    """Run the configured method on each group of the layer; stitch the groups' rows back together."""
    quant = config.quant
    if layer.op == "Conv" and quant.granularity == "block":
        quant = dataclasses.replace(quant, granularity="channel")  # DQ blocks cannot follow im2col columns
    method = METHODS[config.method]
    W = layer.matrix()
    Q = np.empty_like(W)
    parts = []
    for rows, stats in zip(layer.group_rows(), grams):
        Q[rows], info = method(W[rows], stats, quant, rng)
        parts.append(info)
    if len(parts) == 1:
        return Q, parts[0]
    n = np.array([p.codes.shape[0] * p.codes.shape[1] for p in parts], dtype=np.float64)
    info = dataclasses.replace(
        parts[0],
        codes=np.concatenate([p.codes for p in parts]),
        scale=np.concatenate([p.scale for p in parts]),
        rel_error=np.concatenate([p.rel_error for p in parts]),
        clip_fraction=float(np.dot(n, [p.clip_fraction for p in parts]) / n.sum()),
    )
    return Q, info


def _weighted_rel_error(info, W: np.ndarray, grams: list, rows: list) -> float:
    """Layer relative error sum_n ||X w_n - X~ q_n||^2 / sum_n ||X w_n||^2 from per-neuron figures."""
    norms = np.concatenate([np.einsum("ij,jk,ik->i", W[r], g.F, W[r]) for r, g in zip(rows, grams)])
    total = norms.sum()
    return float(np.dot(info.rel_error, norms) / total) if total > 0 else 0.0


def compress(model_path: str, calib, output: str | None = None, config: CompressConfig | None = None,
             report_path: str | None = None, progress: bool = True,
             image_preprocess: ImagePreprocess | None = None) -> CompressionResult:
    """Compress every MatMul / Gemm / Conv with a constant weight of `model_path`, layer by layer in topological
    order, from calibration data `calib` (a path or an onnxruntime CalibrationDataReader).

    Writes the compressed model to `output` (atomically) and the JSON report to `report_path` when given.
    `image_preprocess` says how a folder of images becomes input tensors (see calib.ImagePreprocess).
    """
    config = config or CompressConfig()
    t_start = time.perf_counter()
    _check_output_path(str(model_path), output)
    original = load_model(str(model_path))
    model = fold_weight_chains(original)
    layers, skipped = find_layers(model, skip=config.skip)
    if not layers:
        raise OnnxspfqError(f"{model_path} has no compressible layer (MatMul / Gemm / Conv with a constant weight): nothing to do")
    batches = load_calibration(calib, model, samples=config.samples, batch_size=config.batch_size,
                               image_preprocess=image_preprocess)

    capture = Capture(model, layers, batches, max_patches=config.max_patches, seed=config.seed, progress=progress)
    weights: dict[str, np.ndarray] = {}
    items, layer_reports = [], []
    bar = tqdm(layers, desc="compressing layers", unit="layer", disable=not progress)
    for index, layer in enumerate(bar):
        bar.set_postfix_str(layer.name[-30:])
        t0 = time.perf_counter()
        grams = capture.grams(layer, weights)
        rng = np.random.default_rng([config.seed, index])
        Q, info = _quantize_layer(layer, grams, config, rng)
        weights[layer.weight] = layer.tensor(Q).astype(np.float32)
        items.append((layer, info, config.quant.bits))
        layer_reports.append(LayerReport(
            name=layer.name, op=layer.op, shape=list(layer.W0.shape), bits=config.quant.bits, method=config.method,
            rel_error=_weighted_rel_error(info, layer.matrix(), grams, layer.group_rows()),
            clip_fraction=float(info.clip_fraction), c_alpha=getattr(info, "c_alpha", None),
            time_s=time.perf_counter() - t0, groups=layer.groups))

    compressed = emit(model, items, fmt=config.format)
    onnx.checker.check_model(compressed, full_check=True)
    agreement = evaluate(original, compressed, batches)
    report = Report(model=str(model_path), output=output, config=dataclasses.asdict(config), layers=layer_reports,
                    skipped=skipped, size_before=model_size_bytes(original), size_after=model_size_bytes(compressed),
                    agreement=agreement)
    if output is not None:
        save_model_atomic(compressed, output)
    report.time_s = time.perf_counter() - t_start
    if report_path is not None:
        report.to_json(report_path)
    return CompressionResult(model=compressed, report=report)
