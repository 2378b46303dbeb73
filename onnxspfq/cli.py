"""`onnxspfq compress | evaluate | inspect`: argument parsing, progress and exit codes; the work is in api.py."""
from __future__ import annotations

import argparse
import json
import os
import sys

from onnxspfq.config import (ACCURACY_LEVELS, ACT_CALIBRATIONS, ACT_TYPES, ALIGN_RIDGE, BITS, EMBEDDINGS, FORMATS,
                             GRANULARITIES, METHODS, OPERATORS, PATHS, SCREEN, TARGETS, ActConfig, CompressConfig,
                             QuantConfig)
from onnxspfq import __version__
from onnxspfq.errors import OnnxspfqError


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (exit 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows argparse defaults, except the None / False of options whose help states the real default."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxspfq", description="Post-training compression of ONNX models with "
                                "stochastic path-following quantization (SPFQ).")
    p.add_argument("--version", action="version", version=f"onnxspfq {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _compress_options(sub.add_parser("compress", help="quantize the MatMul / Gemm / Conv weights of a model",
                                     formatter_class=_Help))
    _evaluate_options(sub.add_parser("evaluate", help="compare a compressed model with its float original on data"))
    sub.add_parser("inspect", help="list the inputs, outputs and layers compress would touch").add_argument("model")
    return p


def _compress_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("model", help="input .onnx model (never modified)")
    c.add_argument("--calib", default=None, help="calibration data: .npz (keys = input names, or 'images' of uint8 "
                   "pixels), .npy (single-input model), or a folder of .npy/.npz files or images; needed by every "
                   "method but rtn")
    c.add_argument("-o", "--out", dest="out", default=None, help="output .onnx path, written atomically "
                   "(default: MODEL.q.onnx beside the input)")
    c.add_argument("--bits", type=int, default=None, choices=BITS, help="stored bits per weight (2 = ternary, "
                   "1 = binary); default 4, or none (prune only) when --sparsity is given alone")
    c.add_argument("--avg-bits", type=float, default=None, metavar="B", help="mixed precision: each layer gets 8, 4, "
                   "3 or 2 bits by its measured effect on the model output, at most B bits per weight on average in "
                   "a file no larger than --bits ceil(B) gives (e.g. 4 or 3; the report says what each layer got and "
                   "why); instead of --bits")
    c.add_argument("--stored-bits", type=float, default=None, metavar="S", help="with --avg-bits: at most S "
                   "stored bits per weight (3-bit codes store 4), for a file smaller than --bits ceil(B) gives; "
                   "e.g. --avg-bits 3 --stored-bits 3 (then 3 bits is never chosen over 4)")
    c.add_argument("--sparsity", type=_sparsity, default=None, metavar="S|N:M", help="prune: a fraction of zero "
                   "weights per layer (e.g. 0.5, stochastic pruning), or N:M (e.g. 2:4) along the reduction axis "
                   "as TensorRT wants; with --bits, quantization and pruning run in one pass")
    c.add_argument("--auto-C", action="store_true", help="SPFQ: choose C (with c_alpha, per channel or per layer) "
                   "by the exact reconstruction error")
    c.add_argument("--method", default=CompressConfig.method, choices=METHODS)
    # None below = the option was not given: the setting keeps QuantConfig's default (declared there, once)
    c.add_argument("--C", type=float, default=None, dest="C", help="SPFQ damping C >= 1 (1 = SPFQ; large = plain "
                   f"stochastic rounding) [{QuantConfig.C}]")
    c.add_argument("--c-alpha", type=float, default=None, help="step = c_alpha * max|w| / K (default: chosen per "
                   "output channel, or per layer with --granularity layer or pruning, by the exact reconstruction error)")
    c.add_argument("--operator", default=None, choices=OPERATORS, help="the operator T (spfq): stochastic is the "
                   "SPFQ paper's unbiased rounding [nearest: it measured better on every model]")
    c.add_argument("--path", default=None, choices=PATHS, help="spfq's path following: plain (the papers' merged / "
                   "two-phase form), projected (each input column's error spread over the later columns through "
                   "H^-1, OPTQ's update), best (both; each output channel keeps the smaller exact error) "
                   "[projected at 3-8 bits, best at 1-2 bits, plain when pruning: measured best, README]")
    c.add_argument("--granularity", default=None, choices=GRANULARITIES, help="one step per output channel, "
                   "per layer, or per block along the reduction axis (MatMul/Gemm only) "
                   f"[{QuantConfig.granularity}]")
    c.add_argument("--block-size", type=int, default=None, help=f"block size for --granularity block [{QuantConfig.block_size}]")
    c.add_argument("--order", type=int, default=None, help=f"alignment order r (1 = merged form) [{QuantConfig.order}]")
    c.add_argument("--perfect-alignment", action="store_true", help="least-squares phase-I alignment")
    c.add_argument("--refit-scale", action="store_true", help="after path following, re-fit each channel's step "
                   "to the exact least-squares optimum for its codes (helps at 1-2 bits; not for rtn)")
    c.add_argument("--draws", type=int, default=None, help="stochastic T: keep per channel the best of this many "
                   "draws by the exact reconstruction error (default 8 at 1-2 bits without pruning, else 1)")
    c.add_argument("--screen", type=int, default=None, help="candidate steps each channel runs the path following "
                   f"with, the best by plain rounding's OPTQ loss; 0 = every candidate [{SCREEN} at 3-8 bits, 0 at 1-2]")
    c.add_argument("--align-ridge", type=float, default=None, help="spfq's projected path quantizes the weights "
                   "aligned to the compressed model's inputs, ridge-regularised toward W: 0 = perfect alignment, inf = W "
                   f"itself (OPTQ) [{ALIGN_RIDGE}; inf with --activations int8]")
    c.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None, help="path following / "
                   "GPTQ over the input columns in decreasing order of their energy (largest inputs first; not with "
                   "N:M or block granularity) [on for spfq's projected path where allowed, off for the baselines]")
    c.add_argument("--damp", type=float, default=None, help=f"GPTQ Hessian damping [{QuantConfig.damp}]")
    c.add_argument("--seed", type=int, default=CompressConfig.seed, help="randomness seed: the same seed and input "
                   "give the same bytes")
    c.add_argument("--samples", type=int, default=None, help="use at most this many calibration samples")
    c.add_argument("--batch-size", type=int, default=CompressConfig.batch_size,
                   help="calibration batch size for onnxruntime")
    c.add_argument("--max-patches", type=int, default=CompressConfig.max_patches,
                   help="Conv: at most this many im2col patches per layer over all calibration batches (a seeded "
                   "uniform subset)")
    c.add_argument("--group-patches", type=int, default=CompressConfig.group_patches,
                   help="the same for grouped / depthwise Convs (the smaller cap applies)")
    c.add_argument("--activations", default="none", choices=("none", "int8"), help="int8: W8A8, each compressed "
                   "layer's input quantized too (symmetric per tensor, calibrated on the calibration data; path "
                   "following then corrects the activation error as well); weights at 8 bits [none: weights only]")
    c.add_argument("--act-calibration", default=None, choices=ACT_CALIBRATIONS, help="how an activation's scale is "
                   f"set: minmax (max|x|) or percentile (of |x|) [{ActConfig.calibration}]")
    c.add_argument("--act-percentile", type=float, default=None, help=f"percentile of |x| mapped to 127 "
                   f"[{ActConfig.percentile}]")
    c.add_argument("--act-type", default=None, choices=ACT_TYPES, help="storage of the activation codes: uint8 "
                   "with zero point 128 (onnxruntime CPU's fast kernels) or int8 with zero point 0 (TensorRT), the "
                   "same values [int8 with --target tensorrt, else uint8]")
    c.add_argument("--target", default=CompressConfig.target, choices=TARGETS, help="the runtime the output is for: "
                   "its rules adapt the run or refuse it, in one line (ort-cpu: MatMul / Gemm weights as MatMulNBits, "
                   "Conv as QDQ; tensorrt: INT4 only block-wise weight-only MatMul / Gemm (other layers float), INT8 "
                   "only with --activations int8, no INT2, no com.microsoft ops; README)")
    c.add_argument("--accuracy-level", type=int, default=None, choices=ACCURACY_LEVELS, help="MatMulNBits' compute "
                   "type (--format nbits): 0 / 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (fastest on CPU) [4 with "
                   "--target ort-cpu, else 0]")
    c.add_argument("--opset", type=int, default=None, help="the output's default-domain opset (never below the "
                   "model's; refused when the stored weights need more: 4 / 3 bits and block scales 21, 2 / 1 bits 25, "
                   "8 bits 13) [the model's own, raised only as far as needed]")
    c.add_argument("--embeddings", default=None, choices=EMBEDDINGS, help="embedding tables (a Gather on a "
                   "constant table): int8 codes with a scale per row, or float [int8 when the weights are quantized, "
                   "outside --target tensorrt]")
    c.add_argument("--token-mask", default=CompressConfig.token_mask, metavar="INPUT", help="the (batch, sequence) "
                   "model input whose zeros mark padding tokens, left out of the MatMul statistics; none: keep every "
                   "row [auto: attention_mask where the model has it]")
    c.add_argument("--skip", action="append", default=[], metavar="LAYER[,LAYER...]", help="node names to leave in "
                   "float (repeat the option or separate names by commas)")
    c.add_argument("--format", default=None, choices=FORMATS, help="qdq: DequantizeLinear on packed integers "
                   "[default with --bits]; nbits: com.microsoft MatMulNBits for MatMul/Gemm weights (QDQ for the "
                   "rest) [default with --target ort-cpu]; sparse: float weights as sparse initializers where "
                   "smaller [default when pruning only]; float: de-quantized float weights (for inspection) [default "
                   "when pruning only for --target tensorrt]")
    c.add_argument("--report", default=None, help="write the JSON report here")
    c.add_argument("--eval-data", default=None, help="held-out inputs (read like --calib) for the final agreement "
                   "check (default: the calibration data, which the methods fit, so it overstates agreement)")
    c.add_argument("--output", default=None, metavar="NAME", help="the model output the final agreement check "
                   "compares (default: the first); the file to write is -o")
    _batch_axis_option(c)
    _image_options(c)
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars or table")


def _evaluate_options(e: argparse.ArgumentParser) -> None:
    e.add_argument("float_model")
    e.add_argument("compressed_model")
    e.add_argument("--data", required=True, help="inputs as for --calib; an .npz may also hold a 'labels' array")
    e.add_argument("--labels", default=None, help=".npy of integer class labels (default: the data .npz's 'labels')")
    e.add_argument("--samples", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--output", default=None, metavar="NAME", help="which model output to compare (default: the first)")
    e.add_argument("--task", default="auto", choices=("auto", "classify", "embed"), help="classify: top-1/top-5 and "
                   "top-1 agreement; embed: per-sample cosine and k-nearest-neighbour retrieval agreement; auto: embed "
                   "when the output name says embed/hidden/pool or its rows have unit norm, else classify")
    e.add_argument("--k", type=int, default=10, help="embed: neighbours compared per sample (overlap@k)")
    e.add_argument("--json", default=None, help="write the figures here as JSON")
    _batch_axis_option(e)
    _image_options(e)


def _image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="images: resize to H W "
                   "(default: the model input's static size)")
    p.add_argument("--image-mean", type=float, nargs="+", default=[0.0], help="images: per-channel mean subtracted "
                   "after scaling pixels by 1/255 (ImageNet: 0.485 0.456 0.406)")
    p.add_argument("--image-std", type=float, nargs="+", default=[1.0], help="images: per-channel std divided by "
                   "(ImageNet: 0.229 0.224 0.225)")
    p.add_argument("--image-layout", default="NCHW", choices=("NCHW", "NHWC"), help="images: input layout")


def _batch_axis_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-axis", action="append", default=[], metavar="INPUT=AXIS", help="the sample axis of an "
                   "input whose symbolic dims do not say it (e.g. an RNN state [2, batch, 128]: h0=1); default: the "
                   "axis with a symbolic 'batch'-like dim, else 0")


def _image(a: argparse.Namespace):
    from onnxspfq.images import ImagePreprocess

    return ImagePreprocess(size=tuple(a.image_size) if a.image_size else None, mean=tuple(a.image_mean),
                           std=tuple(a.image_std), layout=a.image_layout)


def _axes(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, axis = item.rpartition("=")
        try:
            out[name] = int(axis)
        except ValueError:
            name = ""
        if not sep or not name:
            raise OnnxspfqError(f"--batch-axis {item!r}: write INPUT=AXIS, e.g. --batch-axis h0=1")
    return out


def _sparsity(text: str) -> float | tuple[int, int]:
    """--sparsity: a fraction in [0, 1) or an N:M pattern."""
    try:
        if ":" in text:
            n, m = (int(x) for x in text.split(":"))
            return (n, m)
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction (e.g. 0.5) nor N:M (e.g. 2:4)") from None


def default_output(model: str) -> str:
    """MODEL.q.onnx beside the input (like other tools' model.quant.onnx)."""
    root, ext = os.path.splitext(model)
    return root + ".q" + (ext or ".onnx")


def _compress(a: argparse.Namespace) -> None:
    from onnxspfq.api import compress

    sparsity, nm = (0.0, a.sparsity) if isinstance(a.sparsity, tuple) else (a.sparsity or 0.0, None)
    if a.avg_bits is not None and a.bits is not None:
        raise OnnxspfqError("give --bits (every layer) or --avg-bits (bits per layer under a budget), not both")
    act = None if a.activations == "none" else ActConfig(
        **{k: v for k, v in (("calibration", a.act_calibration), ("percentile", a.act_percentile),
                             ("dtype", a.act_type)) if v is not None})
    if act is None and any(v is not None for v in (a.act_calibration, a.act_percentile, a.act_type)):
        raise OnnxspfqError("--act-calibration / --act-percentile / --act-type set how activations are quantized: "
                            "add --activations int8, or drop them")
    bits = a.bits if a.bits is not None or a.sparsity is not None else (8 if act is not None else 4)
    given = {"c_alpha": a.c_alpha, "C": a.C, "operator": a.operator, "path": a.path, "align_ridge": a.align_ridge,
             "granularity": a.granularity,
             "block_size": a.block_size, "order": a.order, "damp": a.damp, "draws": a.draws,
             "screen": a.screen,
             "perfect_alignment": a.perfect_alignment or None, "refit_scale": a.refit_scale or None,
             "act_order": a.act_order}
    quant = QuantConfig(bits=bits, sparsity=sparsity, nm=nm, **{k: v for k, v in given.items() if v is not None})
    skip = tuple(name for item in a.skip for name in item.split(",") if name)
    config = CompressConfig(method=a.method, quant=quant, seed=a.seed, samples=a.samples, batch_size=a.batch_size,
                            max_patches=a.max_patches, group_patches=a.group_patches,
                            token_mask=a.token_mask, activations=act, opset=a.opset,
                            skip=skip, format=a.format, auto_C=a.auto_C, avg_bits=a.avg_bits, stored_bits=a.stored_bits,
                            target=a.target,
                            accuracy_level=a.accuracy_level, embeddings=a.embeddings)
    out = a.out if a.out is not None else default_output(a.model)
    result = compress(a.model, a.calib, output=out, config=config, report_path=a.report, progress=not a.quiet,
                      image_preprocess=_image(a), compare_output=a.output, batch_axes=_axes(a.batch_axis),
                      eval_data=a.eval_data)
    if not a.quiet:
        print(result.report.table())
    elif result.report.target:
        print(result.report.target)
    for w in result.report.warnings:
        print(f"onnxspfq: warning: {w}", file=sys.stderr)
    print(f"wrote {out}" + (f" and {a.report}" if a.report else ""))


def _evaluate(a: argparse.Namespace) -> None:
    from onnxspfq.evaluate import evaluate_files

    from onnxspfq import output_files

    agreement = evaluate_files(a.float_model, a.compressed_model, a.data, labels=a.labels, samples=a.samples,
                               batch_size=a.batch_size, output=a.output, task=a.task, k=a.k,
                               image_preprocess=_image(a), batch_axes=_axes(a.batch_axis), json_path=a.json)
    figures = agreement.as_dict()
    for k, v in figures.items():
        if v is not None:
            print(f"{k:<26} {v:.6f}" if isinstance(v, float) else f"{k:<26} {v}")
    if a.json:
        with output_files.Staging([a.json]) as staging:
            try:
                with open(staging.path(a.json), "w") as f:
                    json.dump(figures, f, indent=2)
            except OSError as err:
                raise output_files.write_error(err, a.json) from None
            staging.commit()


def _inspect(a: argparse.Namespace) -> None:
    from onnxspfq.branches import taken_view, view_layers
    from onnxspfq.graph import load_model, walk_nodes
    from onnxspfq.fold import fold_weight_chains
    from onnxspfq import embeddings

    model = load_model(a.model)
    proto = model.proto
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in proto.opset_import)
    data = sorted({os.path.basename(f) for f in model.files()} - {os.path.basename(a.model)})
    folded = fold_weight_chains(model)  # Constant-node weights (If branches hold them so) count as weights too
    print(f"model: {a.model}  IR {proto.ir_version}, opset {opsets}; {folded.weight_bytes() / 1e6:.3f} MB of weights"
          + (f", external data in {', '.join(data)}" if data else ", no external data"))
    for kind, values in (("input", _io_values(proto, proto.graph.input)), ("output", _io_values(proto, proto.graph.output))):
        for name, dtype, shape in values:
            print(f"{kind:<7} {name:<32} {dtype:<8} [{', '.join(shape)}]")
    where = {n.name: w for w, _, n in walk_nodes(folded.graph) if w}
    view, inner = taken_view(folded, None)  # every If branch's layers (which branch runs depends on the data)
    layers, skipped, inner = view_layers(view, [], inner)
    for layer in layers:
        w = where.get(layer.name, "")
        state = (f"compressible if the calibration data takes {w}" if w.startswith("If ") else
                 f"compressible (inside {w}, over its iterations)" if w else "compressible")
        print(f"{layer.name:<40} {layer.op:<6} {'x'.join(map(str, layer.shape)):<20} groups={layer.groups} {state}")
    for s in skipped + inner:
        print(f"{s['name']:<40} {s['op']:<6} left alone: {s['reason']}")
    print(f"{len(layers)} compressible layer(s), {len(skipped) + len(inner)} left alone")
    for tab in embeddings.find(folded.proto):
        print(f"embedding table {tab.table} {tab.shape[0]}x{tab.shape[1]}: int8 per row when the weights are "
              "quantized (--embeddings)")


def _io_values(proto, values) -> list[tuple[str, str, list[str]]]:
    """(name, element type, dims as text: numbers or symbolic names) of graph inputs / outputs (initializers that
    are also listed as inputs excluded)."""
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for v in values:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dtype = onnx_type_name(tt.elem_type) if v.type.HasField("tensor_type") else v.type.WhichOneof("value")
        dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out.append((v.name, dtype, dims))
    return out


def onnx_type_name(elem_type: int) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_string(elem_type).replace("TensorProto.", "").lower()


def threading_main() -> bool:
    """Signal handlers can only be set from the main thread (main() may run in a worker thread of a host program)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 2 bad input or an unwritable output, 1 internal error,
    130 interrupted). Errors are one line on stderr; ONNXSPFQ_DEBUG=1 shows the traceback of an internal one."""
    args = _parser().parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")  # stderr carries progress and one-line errors only; the report holds the figures
    import signal

    def _terminated(signum, frame):  # SIGTERM (a service manager, a timeout) unwinds like Ctrl-C: staging is removed
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminated) if threading_main() else None
    try:
        {"compress": _compress, "evaluate": _evaluate, "inspect": _inspect}[args.command](args)
    except OnnxspfqError as err:
        print(f"onnxspfq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxspfq: interrupted; no output written", file=sys.stderr)
        return 130
    except OSError as err:  # a file that vanished or could not be read mid-run
        where = f" {err.filename}" if err.filename else ""
        print(f"onnxspfq: error:{where} {err.strerror or err}; check the file and its folder", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the contract is one line, never a traceback
        if os.environ.get("ONNXSPFQ_DEBUG"):
            raise
        text = " ".join(str(err).split())[:300]
        print(f"onnxspfq: internal error: {type(err).__name__}: {text}; no output written. Please report this "
              "(rerun with ONNXSPFQ_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
