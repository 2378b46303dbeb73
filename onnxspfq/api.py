"""The one entry point: compress(model, calibration, config) -> CompressionResult."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxspfq import output_files
from onnxspfq.calib import load_calibration, source_files, token_mask_input
from onnxspfq.images import ImagePreprocess
from onnxspfq.branches import taken_view, view_layers
from onnxspfq.capture import Capture
from onnxspfq import activations
from onnxspfq import embeddings
from onnxspfq.activations import ActScales
from onnxspfq import mixed
from onnxspfq import targets
from onnxspfq.config import CompressConfig
from onnxspfq.emit import Item, emit
from onnxspfq import emit_qdq
from onnxspfq.emit_sparse import check_nm
from onnxspfq.errors import OnnxspfqError
from onnxspfq.evaluate import EVAL_MAX_VALUES, EVAL_RUN_VALUES, evaluate, held_out_source
from onnxspfq.gram import Grams
from onnxspfq.graph import check_runnable, load_model, upstream, weightless
from onnxspfq.fold import fold_weight_chains
from onnxspfq.layers import MATMUL_OPS, Layer
from onnxspfq.io import Model, model_file_bytes, session
from onnxspfq.save import save_model
from onnxspfq.methods import METHODS
from onnxspfq.report import LayerReport, Report, file_sha256, poor_result


class CompressionResult:
    """The compressed model and its report. `model` is the written output loaded with its data on first access
    (or, when no output path was given, the proto held in memory)."""

    def __init__(self, report: Report, output: str | None = None, model: onnx.ModelProto | None = None) -> None:
        self.report, self.output, self._model = report, output, model

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = onnx.load(self.output)
        return self._model


def _quantize_layer(layer: Layer, W: np.ndarray, grams: list, config: CompressConfig, rng: np.random.Generator):
    """Run the configured method on each group of the layer; stitch the groups' rows back together.
    Returns (Q, info, note, quant): note says what was adapted for this layer, quant is the config it ran with."""
    quant, notes = config.quant, []
    if layer.op in ("Conv", "ConvTranspose") and quant.granularity == "block":
        quant = dataclasses.replace(quant, granularity="channel")  # DQ blocks cannot follow im2col columns
        notes.append(f"block granularity -> per channel ({layer.op})")
    groups, why = layer.nm_groups(*quant.nm) if quant.nm is not None else (None, "")
    if why:
        notes.append(why)
        if quant.bits is None and not quant.sparsity:  # N:M was the only thing to do: leave the layer alone
            return W, None, "; ".join(notes + ["left in float"]), quant
        quant = dataclasses.replace(quant, nm=None)
    method = METHODS[config.method]
    kwargs = {"nm_groups": groups} if groups is not None else {}
    if config.auto_C and config.method == "spfq":
        kwargs["auto_C"] = True
    if _one_row_groups(layer, grams, quant):  # a depthwise Conv: all its groups in one call (Grams.stack)
        Q, info = method(W, Grams.stack(grams), quant, rng, **kwargs)
        return Q.astype(np.float32), info, "; ".join(notes), quant
    Q = np.empty(W.shape, dtype=np.float32)  # what is emitted and fed on; the float64 result is cast per chunk
    parts = []
    for rows, stats in zip(layer.group_rows(), grams):
        for part in _row_chunks(rows, W.shape[1], quant):
            Q[part], info = method(W[part], stats.rows(part, rows.start), quant, rng, **kwargs)
            parts.append(info)
    info = parts[0] if len(parts) == 1 else _stack(parts)
    return Q, info, "; ".join(notes), quant


def _one_row_groups(layer: Layer, grams: list, quant) -> bool:
    """Whether the layer's groups can run as one call on stacked Grams: one output row per group, Grams in the
    weight form (so no kernel reads G), and every choice per row (no per-layer step, no pruning threshold fitted
    per call); the rows then give what one call per group gives (tests/test_methods.py)."""
    return (len(grams) > 1 and layer.n1 == len(grams) and all(g.weighted for g in grams)
            and quant.granularity == "channel" and not quant.sparsity and quant.nm is None)


# Rows per method call are capped at this many weights: output neurons are independent path-following (and GPTQ)
# problems given the Grams, and a method holds several float64 copies of its rows (GPTQ on a 0.6 B decoder's
# tied lm_head, 151936 x 1024, in one call was OOM-killed at 24 GB).
ROW_CHUNK_WEIGHTS = 1 << 24


def _row_chunks(rows: slice, n0: int, quant) -> list[slice]:
    """`rows` cut into chunks of at most ROW_CHUNK_WEIGHTS weights, where every choice the method makes is per
    row (not with per-layer granularity or unstructured pruning, whose search spans the whole layer; quant None:
    always, for figures computed row by row)."""
    per = max(1, ROW_CHUNK_WEIGHTS // max(n0, 1))
    if quant is not None and (quant.granularity == "layer" or quant.sparsity) or rows.stop - rows.start <= per:
        return [rows]
    return [slice(a, min(a + per, rows.stop)) for a in range(rows.start, rows.stop, per)]


def _stack(parts: list):
    """One LayerResult from results over consecutive rows (Conv groups, row chunks), rows concatenated."""
    n = np.array([p.rel_error.size for p in parts], dtype=np.float64)
    cat = lambda name: None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])
    mean = lambda name: float(np.dot(n, [getattr(p, name) for p in parts]) / n.sum())
    rows_c = cat("c_alpha_row")
    return dataclasses.replace(parts[0], codes=cat("codes"), scale=cat("scale"), rel_error=cat("rel_error"),
                               sq_error=cat("sq_error"), clip_fraction=mean("clip_fraction"),
                               sparsity=mean("sparsity"), c_alpha_row=rows_c, C=mean("C"), form_row=cat("form_row"),
                               c_alpha=parts[0].c_alpha if rows_c is None else float(rows_c.mean()))


def _path_shares(info, quant) -> str:
    """Which path following each output channel kept (spfq): one name, or each name with its share of channels."""
    if info.form_row is None:
        return quant.route if info.method == "spfq" else ""
    names, counts = np.unique(info.form_row, return_counts=True)
    return " ".join(f"{n} {100 * c / counts.sum():.0f}%" for n, c in zip(names, counts))


def _layer_rel_error(info, W: np.ndarray, grams: list, rows: list) -> float:
    """Layer relative error sum_n ||X w_n - X~ q_n||^2 / sum_n ||X w_n||^2 (neurons with no output count in the
    numerator only, so a dead neuron cannot turn the figure into nan)."""
    norms = sum(float(g.rows(c, r.start).w_F_w(np.asarray(W[c], np.float64)).sum())
                for r, g in zip(rows, grams) for c in _row_chunks(r, W.shape[1], None))
    err = float(np.sum(info.sq_error))
    return err / norms if norms > 0 else (0.0 if err == 0 else float("inf"))


class _DataFree:
    """The capture of a run without calibration data (rtn only): identity Grams per group, so rtn picks its steps
    by the weight-space error and reports it."""

    def grams(self, layer: Layer, weights: dict) -> list[Grams]:
        return [Grams.identity(layer.n0) for _ in layer.group_rows()]  # n0 is per group

    def release(self, weights: dict) -> dict:
        return {}

    def reference_outputs(self, max_values: int, call_values: int) -> None:
        return None

    def close(self) -> None:
        pass


@dataclass
class _Run:
    """What the checks before any work establish: the folded model, its layers, the calibration batches."""

    model: Model
    view: Model  # what the capture runs: `model` with the If branches the data takes inlined (branches.py)
    layers: list[Layer]
    skipped: list[dict]
    batches: list[dict[str, np.ndarray]]
    eval_batches: list[dict[str, np.ndarray]] | None = None  # held-out data for the final check (None: batches)
    token_mask: str | None = None  # the feed marking padding tokens (calib.token_mask_input), None: every row
    plan: targets.Plan | None = None  # each layer's quantization under --target (targets.plan)
    tables: list[embeddings.Table] = dataclasses.field(default_factory=list)  # --embeddings int8
    output: str | None = None  # the model output the agreement check compares (--output, default the first)

    def layer_config(self, config: CompressConfig, layer: Layer, bits: int | None = None) -> CompressConfig:
        """The run's settings for one layer: its target's plan, at `bits` when given (--avg-bits)."""
        quant = self.plan.layers[layer.name].quant
        if bits is not None:
            quant = dataclasses.replace(quant, bits=bits)
        return config if quant == config.quant else dataclasses.replace(config, quant=quant)

    def capture(self, config: CompressConfig, batches: list[dict[str, np.ndarray]] | None = None,
                progress: bool = False, act: ActScales | None = None, full_grams: set[str] | None = None) -> Capture:
        """The two-graph capture of this run's layers over `batches` (default: all calibration batches);
        full_grams: the layers whose method reads G itself (Capture; None: all)."""
        return Capture(self.view, self.layers, self.batches if batches is None else batches,
                       max_patches=config.max_patches, group_patches=config.group_patches, seed=config.seed,
                       progress=progress, token_mask=self.token_mask, act=act, full_grams=full_grams,
                       reference=self.output if batches is None and self.eval_batches is None else None)

    def act_scales(self, config: CompressConfig) -> tuple[ActScales, list[tuple[str, str]], dict[str, str], set[str]]:
        """W8A8's tensors: (their ActScales, the layers whose input stays float and why, layer -> the output tensor
        the target also quantizes, the residual Adds' skip tensors it quantizes that no layer reads). Float32
        tensors of the main graph only (an If branch's own tensors cannot take a main-graph QuantizeLinear)."""
        g = self.model.proto.graph
        main = {o for n in g.node for o in n.output} | {i.name for i in g.input}
        keep, left = set(), []
        for layer in self.layers:
            if layer.input not in main:
                left.append((layer.name, "input float: computed inside a subgraph"))
            elif layer.weight_dtype != np.float32:
                left.append((layer.name, f"input float: {np.dtype(layer.weight_dtype).name}, not float32"))
            else:
                keep.add(layer.input)
        quantized = [layer for layer in self.layers if layer.input in keep]
        outputs = targets.output_tensors(config, g, quantized)
        # an output no layer input depends on is not quantized: the capture never computes it, and its Q would
        # only add error to what the model returns
        needed = upstream(g, [layer.input for layer in self.layers])
        outputs = {name: t for name, t in outputs.items() if t in needed and t in main}
        skips = {t for t in targets.residual_inputs(config, g, quantized) if t in needed and t in main} - keep
        tensors = keep | set(outputs.values()) | skips
        unsigned, shared = activations.layout(g, tensors, config.activations.dtype)
        groups = targets.concat_groups(config, g, tensors)
        for t, outs in groups.items():  # a group is unsigned only if all of it is
            if not all(m in unsigned for m, o in groups.items() if o == outs):
                unsigned.discard(t)
        # a member takes the group's scale, not its source's: it gets a Q / DQ pair of its own (activations.emit)
        shared = {t: s for t, s in shared.items() if t not in groups}
        return ActScales(config.activations, tensors, unsigned, shared, groups=groups), left, outputs, skips


def compress(model_path: str, calib=None, output: str | None = None, config: CompressConfig | None = None,
             report_path: str | None = None, progress: bool = True,
             image_preprocess: ImagePreprocess | None = None, compare_output: str | None = None,
             batch_axes: dict[str, int] | None = None, eval_data=None) -> CompressionResult:
    """Compress every MatMul / Gemm / Conv / ConvTranspose with a constant weight of `model_path`, layer by layer
    in topological order, from calibration data `calib` (a path or an onnxruntime CalibrationDataReader; None only
    for rtn, which then rounds without data and the output agreement is not measured).

    Writes the compressed model to `output` (atomically) and the JSON report to `report_path` when given, both or
    neither. `image_preprocess` says how images become input tensors (see images.ImagePreprocess);
    `compare_output` names the model output the agreement check compares (default: the first); `batch_axes`
    gives inputs' sample axes where the model's symbolic dims do not (see calib.model_inputs); `eval_data` (read
    like `calib`) is what the final agreement check runs on, default the calibration data (which a method fits, so
    it overstates: on Qwen2 0.6b the stochastic spfq reached cosine 0.998 there and 0.691 on held-out tokens).
    Memory: the model's weights are read one layer at a time and each compressed float weight is dropped once
    the capture has run its last reader; what stays is the emitted integer codes.
    """
    config = (config or CompressConfig()).resolved()
    t_start = time.perf_counter()
    run = _open(str(model_path), calib, output, report_path, config, compare_output, image_preprocess, batch_axes,
                eval_data)
    bits = None if config.avg_bits is None else _mixed_bits(run, config, compare_output)
    act = None
    if config.activations is not None:
        act, float_inputs, outputs, skips = run.act_scales(config)
        if outputs:
            run.plan.changed += (f"; {len(outputs)} Conv / Gemm outputs quantized too (onnxruntime runs "
                                 "DQ -> op -> Q as QLinearConv / QGemm)")
        if skips:
            run.plan.changed += (f"; the skip input of {len(skips)} residual Add(s) quantized too (TensorRT fuses "
                                 "Conv -> Add into one INT8 kernel when the skip is int8)")
        if act.groups:
            run.plan.changed += (f"; {len(set(act.groups.values()))} Concat group(s) of {len(act.groups)} tensors "
                                 "on one scale each (TensorRT merges a Concat's inputs and output into one tensor)")
    done, layer_reports, floats, reference = _compress_layers(run, config, progress, calib is None, bits, act)
    compressed = _emit_checked(run.model, done, floats, layer_reports, config, run.plan)
    if config.opset is not None:
        compressed = emit_qdq.raise_opset(compressed, config.opset)
        if emit_qdq.default_opset(compressed) != config.opset:
            raise OnnxspfqError(f"internal check failed: the output is at opset {emit_qdq.default_opset(compressed)}, "
                                f"not --opset {config.opset}; please report this")
    if act is not None:
        activations.emit(compressed, act.scales, config.activations.dtype, act.unsigned, act.shared)
        if config.target != "tensorrt":  # TensorRT's documented form omits them (zero point 0)
            emit_qdq.explicit_zero_points(compressed)
        why = dict(float_inputs)
        inputs = {layer.name: layer.input for layer in run.layers}

        def said(t: str) -> str:
            return f"{'uint8' if t in act.unsigned else 'int8'}, scale {act.scales[t]:.4g}"

        for r in layer_reports:
            t, o = inputs[r.name], outputs.get(r.name)
            r.note = "; ".join(filter(None, [r.note, f"input {said(t)}" if t in act.scales
                                             else why.get(r.name, "input float"),
                                             o in act.scales and f"output {said(o)}"]))
    tables = ""
    if run.tables:
        compressed, was, now = embeddings.emit(compressed, run.model, run.tables)
        tables = (f"embeddings: {len(run.tables)} table(s) int8 with a scale per row ({was / 1e6:.1f} -> "
                  f"{now / 1e6:.1f} MB; --embeddings float keeps them)")
    del floats, done
    before, after = emit_qdq.default_opset(run.model.proto), emit_qdq.default_opset(compressed)
    report = Report(model=str(model_path), output=output, config=dict(config.effective(), token_mask=run.token_mask or
                    "none"), layers=layer_reports, opset=(f"opset {before}" if before == after else
                    f"opset raised {before} -> {after}" + ("" if config.opset else " (what the stored weights "
                                                             "need; --opset pins it)")),
                    skipped=run.skipped, size_before=model_file_bytes(str(model_path)), target=run.plan.changed,
                    embeddings=tables)
    # written into staging folders beside the targets (a scratch folder without -o), checked and evaluated from
    # the file, then moved in place together with the report: both or neither
    scratch = tempfile.mkdtemp(prefix="onnxspfq-") if output is None else None
    target = output if output is not None else os.path.join(scratch, "compressed.onnx")
    try:
        with output_files.Staging([t for t in (report_path, target) if t is not None]) as staging:
            try:
                report.size_after = save_model(compressed, staging.path(target), source=run.model)
            except OSError as err:
                raise output_files.write_error(err, target) from None
            del compressed
            _check_and_measure(report, run, str(model_path), staging.path(target), config, reference)
            report.time_s = time.perf_counter() - t_start
            if report_path is not None:
                try:
                    report.to_json(staging.path(report_path))
                except OSError as err:
                    raise output_files.write_error(err, report_path) from None
            staging.commit()
        result_model = onnx.load(target) if output is None else None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return CompressionResult(report=report, output=output, model=result_model)


def _open(model_path: str, calib, output: str | None, report_path: str | None, config: CompressConfig,
          compare_output: str | None, image_preprocess, batch_axes, eval_data=None) -> _Run:
    """Every check that can be made before any work (inputs, outputs, names, runnable graph), then the layers and
    the calibration batches."""
    if calib is None and config.avg_bits is not None:
        raise OnnxspfqError("--avg-bits measures each layer's effect on the model output: pass --calib")
    if calib is None and config.method != "rtn":
        raise OnnxspfqError(f"--method {config.method} learns from data: pass --calib (a .npz keyed by the model's "
                            "input names, a .npy, or a folder of arrays or images), or use --method rtn, which needs none")
    original = load_model(model_path)
    check_runnable(original.proto)
    output_files.check({"-o": output, "--report": report_path},
                       original.files() + source_files(calib) + source_files(eval_data))
    names = [o.name for o in original.proto.graph.output]
    if compare_output is not None and compare_output not in names:
        raise OnnxspfqError(f"--output {compare_output!r} is not an output of {model_path} (its outputs are "
                            f"{', '.join(names)}); the file to write is given by -o")
    model = fold_weight_chains(original)
    view, inner = taken_view(model, None)  # every layer, If branches included, before the data decides
    layers, skipped, inner = view_layers(view, config.skip, inner)
    if not layers:
        raise OnnxspfqError(f"{model_path} has no compressible layer (MatMul / Gemm / Conv with a constant weight): nothing to do")
    # onnxruntime must run the whole graph at its types (a bfloat16 MatMul has no CPU kernel) before any layer is
    # compressed, not fail at the first segment that holds such a node: a weight-less session is cheap
    session(weightless(model)[0].SerializeToString())
    batches = [] if calib is None else load_calibration(
        calib, model.proto, samples=config.samples, batch_size=config.batch_size, image_preprocess=image_preprocess,
        batch_axes=batch_axes)
    held_out = None if eval_data is None else load_calibration(  # read as `onnxspfq evaluate --data` reads it
        held_out_source(eval_data, model.proto)[0], model.proto, batch_size=config.batch_size,
        image_preprocess=image_preprocess, batch_axes=batch_axes)
    if batches and view is not model:  # the layers of the If branches the calibration data takes
        view, inner = taken_view(model, batches)
        layers, skipped, inner = view_layers(view, config.skip, inner, strict=False)
        if not layers:
            raise OnnxspfqError(f"{model_path}: no compressible layer runs on the calibration data (the Ifs take "
                                "branches without layers): nothing to do")
    plan = targets.plan(config, layers)
    left = plan.floats()
    skipped += [{"name": layer.name, "op": layer.op, "reason": left[layer.name]} for layer in layers if layer.name in left]
    layers = [layer for layer in layers if layer.name not in left]
    if not layers:
        raise OnnxspfqError(f"--target {config.target} leaves every layer of {model_path} in float ({next(iter(left.values()))}): "
                            "nothing to do; see onnxspfq inspect for the layers, and the README's --target rules")
    _check_opset(config, model.proto, layers, plan)
    token_mask = token_mask_input(config.token_mask, model.proto, batches)
    tables = embeddings.find(model.proto) if config.embeddings == "int8" else []
    embeddings.check(model, tables)
    return _Run(model, view, layers, skipped + inner, batches, held_out, token_mask, plan, tables,
                compare_output or names[0])


def _check_opset(config: CompressConfig, proto: onnx.ModelProto, layers: list[Layer], plan: targets.Plan) -> None:
    """--opset: refused before any work when the model is above it or the stored weights need more."""
    if config.opset is None:
        return
    current = emit_qdq.default_opset(proto)
    if current > config.opset:
        raise OnnxspfqError(f"the model is at opset {current}, above --opset {config.opset}: the tool never lowers "
                            f"an opset; use --opset {current} or higher")
    q = config.quant
    layer_plans = [plan.layers[layer.name] for layer in layers]
    bits = set(mixed.CHOICES) if config.avg_bits is not None else {p.stored_bits or p.quant.bits for p in layer_plans}
    qdq_weights = config.format == "qdq" or (config.format == "nbits" and (
        any(layer.op not in MATMUL_OPS for layer in layers) or bits & {3}))  # what nbits leaves to QDQ
    if q.bits is None or not qdq_weights:
        return
    need, why = emit_qdq.required_opset(bits, any(p.quant.granularity == "block" for p in layer_plans))
    if need > config.opset:
        raise OnnxspfqError(f"--opset {config.opset} cannot hold this output: {why}, which DequantizeLinear reads "
                            f"from opset {need}; use --opset {need} or higher, or fewer bits' formats (8 bits: opset 13)")


def _mixed_bits(run: _Run, config: CompressConfig, compare_output: str | None) -> dict[str, mixed.Assignment]:
    """--avg-bits: each layer's bits from its measured effect on the output (mixed.py), by layer name."""
    output = compare_output or run.model.proto.graph.output[0].name
    measured, fit = mixed.split(run.batches)
    capture = run.capture(config, fit)
    held: dict[str, list[Grams]] = {}

    def probe(layer: Layer, bits: int) -> np.ndarray:  # the method at `bits` on this layer alone (X~ = X)
        if layer.name not in held:  # the layers come in order: one layer's Grams held at a time
            held.clear()
            held[layer.name] = capture.grams(layer, {})
        W = layer.matrix(dtype=np.float32)
        return layer.tensor(_quantize_layer(layer, W, held[layer.name], run.layer_config(config, layer, bits),
                                            np.random.default_rng(0))[0])

    try:
        effect = mixed.measure(run.view, run.layers, measured, output, probe)
    finally:
        capture.close()
    return {a.layer: a for a in mixed.allocate(run.layers, effect, config.avg_bits, config.stored_bits)}


def _compress_layers(run: _Run, config: CompressConfig, progress: bool, data_free: bool,
                     bits: dict[str, mixed.Assignment] | None = None, act: ActScales | None = None):
    """The pass: each layer's Grams from the capture, the method on them, the compressed weight fed forward.
    bits: each layer's bits (--avg-bits), else config.quant.bits for all.
    Returns ([(layer, result, nm)], [LayerReport], {weight: float values} for the formats that store floats)."""
    keep_floats = config.format == "sparse" or config.quant.bits is None  # these formats store float weights
    configs = {layer.name: run.layer_config(config, layer, None if bits is None else bits[layer.name].bits)
               for layer in run.layers}
    full = {name for name, c in configs.items() if c.reads_cross_gram}
    capture = _DataFree() if data_free else run.capture(config, progress=progress, act=act, full_grams=full)
    weights: dict = {}
    floats: dict[str, np.ndarray] = {}
    done, layer_reports = [], []
    bar = tqdm(run.layers, desc="compressing layers", unit="layer", disable=not progress)
    try:
        for index, layer in enumerate(bar):
            bar.set_postfix_str(layer.name[-30:])
            t0 = time.perf_counter()
            grams = capture.grams(layer, weights)
            weights = capture.release(weights)
            rng = np.random.default_rng([config.seed, index])
            # float32 as stored (each method call casts its rows to float64): a 151936 x 1024 lm_head in float64
            # was 1.2 GB, plus a float64 Q of the same size
            W = layer.matrix(dtype=np.float32)
            lconfig = configs[layer.name]
            try:
                Q, info, note, quant = _quantize_layer(layer, W, grams, lconfig, rng)
            except OnnxspfqError as err:
                raise OnnxspfqError(f"layer {layer.name}: {err}") from None
            if index + 1 == len(run.layers) or run.layers[index + 1].input != layer.input:
                for g in grams:  # no later layer reads these Grams: free what the methods kept on them (memo)
                    g.memo.clear()
            if info is None:  # nothing applies to this layer (e.g. N:M only, on a layer N:M cannot cover)
                run.skipped.append({"name": layer.name, "op": layer.op, "reason": note})
                continue
            weights[layer.weight] = layer.tensor(Q).astype(np.float32, copy=False)
            if keep_floats:
                floats[layer.weight] = weights[layer.weight]
            done.append((layer, info, quant.nm))
            layer_reports.append(LayerReport(
                name=layer.name, op=layer.op, shape=list(layer.shape), bits=quant.bits,
                method=config.method, rel_error=_layer_rel_error(info, W, grams, layer.group_rows()),
                clip_fraction=float(info.clip_fraction), c_alpha=getattr(info, "c_alpha", None),
                C=getattr(info, "C", None), time_s=time.perf_counter() - t0, groups=layer.groups,
                sparsity=float(np.mean(Q == 0)), path=_path_shares(info, quant),
                note="; ".join(filter(None, [note, bits and bits[layer.name].why()]))))
            del W, Q, grams
        reference = capture.reference_outputs(EVAL_MAX_VALUES, EVAL_RUN_VALUES)
    finally:
        capture.close()
    return done, layer_reports, floats, reference


def _emit_checked(model: Model, done: list, floats: dict, layer_reports: list[LayerReport],
                  config: CompressConfig, plan: targets.Plan) -> onnx.ModelProto:
    """The output graph (emit.py; codes stored in the type the target's plan says), each layer's bits per weight
    in it, and the N:M pattern verified on the emitted weights along the axis TensorRT uses."""
    emitted = emit(config.format, model, [Item(layer, info if info.codes is not None else None,
                                               plan.layers[layer.name].stored_bits or info.bits,
                                               floats.get(layer.weight)) for layer, info, _ in done],
                   accuracy_level=config.accuracy_level or 0)
    for r, (layer, info, nm) in zip(layer_reports, done):
        r.bits_per_weight = 8 * emitted.nbytes[layer.name] / int(np.prod(layer.shape))
        if nm is not None:
            values = floats[layer.weight] if info.codes is None else layer.tensor(info.codes)
            ok, why = check_nm(values, layer.op, layer.trans_b, *nm)
            if not ok:
                raise OnnxspfqError(f"internal check failed: layer {layer.name} does not hold the {nm[0]}:{nm[1]} "
                                    f"pattern ({why}); please report this")
            r.nm = f"{nm[0]}:{nm[1]}"
    return emitted.model


def _check_and_measure(report: Report, run: _Run, model_path: str, written: str, config: CompressConfig,
                       reference: tuple[list[np.ndarray], list[dict]] | None) -> None:
    """The written model through onnx.checker (by path), its output agreement with the float model (a warning when
    poor, or when there is no data to measure on) and the sha256 of input and output, into the report.
    reference: the float model's outputs and the feeds they are for, where the capture computed them."""
    try:
        onnx.checker.check_model(written, full_check=config.format != "sparse")
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise OnnxspfqError(f"internal check failed: the emitted model fails the ONNX checker ({e}); "
                            "please report this") from None
    batches = run.eval_batches if run.eval_batches is not None else run.batches
    if batches:
        report.agreement = evaluate(model_path, written, batches, output=run.output, token_mask=run.token_mask,
                                    reference=reference)
        report.agreement_data = "held out (--eval-data)" if run.eval_batches is not None else "calibration"
        if (warning := poor_result(report)) is not None:
            report.warnings.append(warning)
    else:
        report.warnings.append("no calibration data: the output agreement with the float model was not "
                               "measured; pass --calib to measure it")
    report.input_sha256, report.output_sha256 = file_sha256(model_path), file_sha256(written)
