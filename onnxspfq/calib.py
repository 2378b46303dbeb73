"""Calibration data: read feeds from .npz / .npy / a folder / images / an onnxruntime CalibrationDataReader,
check them against the model's inputs, and cut them into batches.

Batch axis: per input, the axis holding the model's symbolic batch dim (the dim name the inputs share, e.g. "batch"
at axis 0 of x and axis 1 of an RNN state h0 [2, batch, 128]), else axis 0; `batch_axes` overrides it per input.
Inside this module every array is held with its batch axis first; batches get the model's layout back. All sources
are first turned into one stacked array per input (S samples), then checked and split into batches of
`batch_size` samples; when the model fixes the batch dim to B (e.g. 1), every batch has exactly B samples.
"""
from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxspfq.errors import OnnxspfqError
from onnxspfq.images import IMAGE_SUFFIXES, ImagePreprocess, images_or_arrays, read_images

ARRAY_SUFFIXES = (".npy", ".npz")


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype, shape (None for a dynamic dim), its sample axis (see the module
    docstring) and the shape with that axis first (`front`, how this module holds the arrays)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    batch_axis: int = 0

    @property
    def front(self) -> tuple[int | None, ...]:
        b = self.batch_axis
        return self.shape if b == 0 else (self.shape[b],) + self.shape[:b] + self.shape[b + 1:]


def model_inputs(model: onnx.ModelProto, batch_axes: Mapping[str, int] | None = None) -> list[InputSpec]:
    """The inputs a caller must feed (initializers that are also listed as inputs are excluded), each with its
    batch axis: `batch_axes[name]` where given, else where the shared symbolic batch dim sits, else 0."""
    inits = {t.name for t in model.graph.initializer}
    raw = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise OnnxspfqError(f"model input {vi.name} is not a tensor (a sequence or map): calibration feeds "
                                "tensors only")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        params = tuple(d.dim_param if d.HasField("dim_param") else None for d in tt.shape.dim)
        raw.append((vi.name, dtype, dims, params))
    batch_axes = dict(batch_axes or {})
    unknown = sorted(set(batch_axes) - {r[0] for r in raw})
    if unknown:
        raise OnnxspfqError(f"--batch-axis names {', '.join(unknown)}, which the model does not take as input; its "
                            f"inputs are {', '.join(r[0] for r in raw)}")
    name = _batch_dim_name([p for _, _, _, p in raw])
    specs = []
    for n, dtype, dims, params in raw:
        axis = batch_axes.get(n, params.index(name) if name is not None and name in params else 0)
        if dims and not 0 <= axis < len(dims):
            raise OnnxspfqError(f"--batch-axis {n}={axis}: input {n} has rank {len(dims)}, so the axis must be in "
                                f"0..{len(dims) - 1}")
        specs.append(InputSpec(n, dtype, dims, axis if dims else 0))
    return specs


BATCH_DIM_NAMES = re.compile(r"^(n|b|bs|batch|batch_?size|.*batch.*)$", re.IGNORECASE)


def _batch_dim_name(params: list[tuple[str | None, ...]]) -> str | None:
    """The symbolic name of the batch dim: one that reads as a batch ("batch", "batch_size", "N", ...), else one
    every input of rank > 0 shares, else the first input's axis-0 name. Exporters name the batch dim once and reuse
    it: ONNX's own GRU takes X [seq, batch, 16] and initial_h [1, batch, 8], where axis 0 is not the batch."""
    names = [n for p in params for n in p if n]
    named = next((n for n in names if BATCH_DIM_NAMES.match(n)), None)
    if named is not None:
        return named
    ranked = [set(p) for p in params if p]
    shared = next((n for n in names if all(n in r for r in ranked)), None) if ranked else None
    return shared or next((p[0] for p in params if p and p[0]), None)


def load_calibration(source: Any, model: onnx.ModelProto, samples: int | None = None, batch_size: int = 16,
                     image_preprocess: ImagePreprocess | dict | None = None,
                     batch_axes: Mapping[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """Batches of feeds {input name: array} for `model` from `source`.

    source: path to a .npz (keys = input names) or .npy (single-input models) file; a folder of .npy / .npz files
    (each one sample or a batch, read in sorted name order) or of images (needs Pillow; see ImagePreprocess);
    an onnxruntime CalibrationDataReader (get_next() -> dict or None); a dict of arrays; or a list of dicts.
    samples: keep at most this many samples (None: all). batch_axes: {input: axis} (see the module docstring).
    An .npz may also hold `images` (uint8 pixels, [N, H, W] or [N, H, W, C]) for a one-input image model: they
    go through `image_preprocess` as image files do.
    """
    if batch_size < 1:
        raise OnnxspfqError(f"batch_size must be >= 1, got {batch_size}")
    if samples is not None and samples < 1:
        raise OnnxspfqError(f"samples must be >= 1, got {samples}")
    specs = model_inputs(model, batch_axes)
    if not specs:
        raise OnnxspfqError("the model has no inputs to feed; calibration needs a model with at least one input")
    if isinstance(image_preprocess, dict):
        image_preprocess = ImagePreprocess(**image_preprocess)
    chunks = [_to_front(c, specs) for c in _read_source(source, specs, image_preprocess or ImagePreprocess())]
    front = [InputSpec(s.name, s.dtype, s.front) for s in specs]
    out: list[dict[str, np.ndarray]] = []
    for run in _runs_of_one_shape(chunks, front):  # e.g. token sequences of different lengths, unpadded
        left = None if samples is None else samples - sum(_count(b, front) for b in out)
        if left is not None and left <= 0:
            break
        out += _batches(_stack(run, front), front, left, batch_size)
    return [{s.name: np.moveaxis(b[s.name], 0, s.batch_axis) if s.batch_axis else b[s.name] for s in specs}
            for b in out]


def _to_front(chunk: dict, specs: list[InputSpec]) -> dict:
    """A chunk with each input's batch axis moved first (a single sample, one rank short, is left as it is)."""
    out = dict(chunk)
    for s in specs:
        if s.batch_axis and s.name in out and np.ndim(out[s.name]) == len(s.shape):
            out[s.name] = np.moveaxis(np.asarray(out[s.name]), s.batch_axis, 0)
    return out


def _runs_of_one_shape(chunks: list[dict], specs: list[InputSpec]) -> list[list[dict]]:
    """Consecutive chunks whose per-sample shapes agree and whose scalar (rank-0) inputs hold the same value: they
    can be batched together (a scalar has no sample axis, so chunks with silero's sr 8000 and 16000 cannot)."""
    def key(chunk: dict) -> tuple:
        def one(s: InputSpec):
            if s.name not in chunk:
                return ()
            if len(s.shape) == 0:
                a = np.asarray(chunk[s.name])
                return (a.dtype.str, a.shape, a.tobytes())
            return np.shape(chunk[s.name])[-(len(s.shape) - 1):] if len(s.shape) > 1 else ()
        return tuple(one(s) for s in specs)

    runs: list[list[dict]] = []
    for chunk in chunks:
        if runs and key(runs[-1][-1]) == key(chunk):
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs or [[]]


def _count(batch: dict[str, np.ndarray], specs: list[InputSpec]) -> int:
    return next((len(batch[s.name]) for s in specs if len(s.shape) > 0), 1)


def source_files(source: Any) -> list[str]:
    """The files a calibration source reads (a path, or the files of a folder); none for in-memory sources."""
    if not isinstance(source, (str, os.PathLike)):
        return []
    p = Path(source)
    return [str(f) for f in sorted(p.iterdir()) if f.is_file()] if p.is_dir() else [str(p)]


# ---------------------------------------------------------------------------------------------------- reading
def _read_source(source: Any, specs: list[InputSpec], pre: ImagePreprocess) -> list[dict[str, np.ndarray]]:
    """A list of chunks {name: array}; each array is one sample (rank R-1) or a stack of samples (rank R)."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return _read_folder(p, specs, pre)
        if not p.is_file():
            raise OnnxspfqError(f"calibration source {str(p)!r} does not exist; pass a .npz/.npy file or a folder")
        if p.suffix.lower() in ARRAY_SUFFIXES:
            return [_read_array_file(p, specs, pre)]
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return [read_images([p], specs, pre)]
        raise OnnxspfqError(f"unsupported calibration file {p.name!r}: use .npz, .npy, or a folder of arrays/images")
    if isinstance(source, Mapping):
        return [images_or_arrays(dict(source), specs, pre, "calibration data")]
    if hasattr(source, "get_next"):
        chunks = []
        while (feed := source.get_next()) is not None:
            if not isinstance(feed, Mapping):
                raise OnnxspfqError("CalibrationDataReader.get_next() must return a dict of arrays or None")
            chunks.append(dict(feed))
        return chunks
    if isinstance(source, Iterable):
        chunks = list(source)
        if not all(isinstance(c, Mapping) for c in chunks):
            raise OnnxspfqError("a calibration list must hold dicts {input name: array}")
        return [dict(c) for c in chunks]
    raise OnnxspfqError(f"unsupported calibration source of type {type(source).__name__}: pass a path, a dict of "
                        "arrays, a list of dicts, or an onnxruntime CalibrationDataReader")


def _read_array_file(p: Path, specs: list[InputSpec], pre: ImagePreprocess) -> dict[str, np.ndarray]:
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise OnnxspfqError(f"cannot read calibration file {p.name!r} ({' '.join(str(e).split())[:200]}); "
                            "save it with numpy.save / numpy.savez") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        try:
            with data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise OnnxspfqError(f"cannot read calibration file {p.name!r} ({' '.join(str(e).split())[:200]}); "
                                "the file is damaged or holds objects: save it again with numpy.savez") from None
        return images_or_arrays(arrays, specs, pre, p.name)
    if len(specs) != 1:
        raise OnnxspfqError(f"{p.name}: a .npy file only feeds single-input models, this model has inputs "
                            f"{', '.join(s.name for s in specs)}; use a .npz with one key per input")
    return {specs[0].name: data}


def _read_folder(p: Path, specs: list[InputSpec], pre: ImagePreprocess) -> list[dict[str, np.ndarray]]:
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    arrays = [f for f in files if f.suffix.lower() in ARRAY_SUFFIXES]
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if arrays and images:
        raise OnnxspfqError(f"calibration folder {str(p)!r} mixes array and image files; keep one kind per folder")
    if arrays:
        return [_read_array_file(f, specs, pre) for f in arrays]
    if images:
        return [read_images(images, specs, pre)]
    raise OnnxspfqError(f"calibration folder {str(p)!r} holds no .npy/.npz or image files; add calibration samples")


# ---------------------------------------------------------------------------------------------------- checking
def _stack(chunks: list[dict[str, np.ndarray]], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Check names, ranks, static dims, dtypes and values of every chunk; return one stacked array per input."""
    if not chunks:
        raise OnnxspfqError("the calibration source is empty; provide at least one sample")
    names = [s.name for s in specs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i, chunk in enumerate(chunks):
        where = f"calibration item {i}" if len(chunks) > 1 else "calibration data"
        missing = [n for n in names if n not in chunk]
        extra = [k for k in chunk if k not in names]
        if missing:
            raise OnnxspfqError(f"{where} lacks model input(s) {', '.join(missing)}; it has "
                                f"{', '.join(map(str, chunk)) or 'nothing'} (the keys must be the input names)")
        if extra:
            raise OnnxspfqError(f"{where} has key(s) {', '.join(map(str, extra))} that are not model inputs; "
                                f"the model's inputs are {', '.join(names)}")
        counts = set()
        for s in specs:
            a = _check_array(np.asarray(chunk[s.name]), s, where)
            parts[s.name].append(a)
            counts.add(a.shape[0] if a.ndim else None)
        if len(counts - {None}) > 1:
            raise OnnxspfqError(f"{where}: the inputs hold different sample counts {sorted(counts - {None})}; "
                                "give every input the same number of samples")
    out = {}
    for s in specs:
        arrs = parts[s.name]
        if len(s.shape) == 0:
            out[s.name] = arrs[0]
            continue
        try:
            out[s.name] = arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=0)
        except ValueError:
            raise OnnxspfqError(f"input {s.name}: calibration items have different shapes "
                                f"{sorted({a.shape[1:] for a in arrs})}; pad or resize them to one shape") from None
        if out[s.name].shape[0] == 0:
            raise OnnxspfqError(f"input {s.name}: the calibration data holds 0 samples; provide at least one")
    return out


def _check_array(a: np.ndarray, s: InputSpec, where: str) -> np.ndarray:
    """One chunk of one input: a sample (rank R-1, gets a batch axis) or a stack (rank R); dtype, dims, finiteness."""
    rank = len(s.shape)
    if a.dtype != s.dtype and (a.dtype == object or a.dtype.kind not in "biuf"):
        raise OnnxspfqError(f"{where}: input {s.name} has dtype {a.dtype}, expected {s.dtype}")
    if rank > 0 and a.ndim == rank - 1:
        a = a[None]
    if a.ndim != rank:
        raise OnnxspfqError(f"{where}: input {s.name} has shape {a.shape}, the model expects rank {rank} "
                            f"{_fmt(s.shape)} (or rank {rank - 1} for one sample)")
    for ax in range(1, rank):
        if s.shape[ax] is not None and a.shape[ax] != s.shape[ax]:
            raise OnnxspfqError(f"{where}: input {s.name} has shape {a.shape}, the model expects {_fmt(s.shape)} "
                                f"(axis {ax} must be {s.shape[ax]})")
    if a.dtype != s.dtype:
        safe_int = (a.dtype.kind in "biu" and s.dtype.kind in "biu" and np.can_cast(a.dtype, s.dtype, "safe"))
        # bfloat16 (an ml_dtypes type numpy files cannot hold): float data is rounded to it, as the model would
        to_bf16 = s.dtype.name == "bfloat16" and a.dtype.kind == "f"
        if not (safe_int or to_bf16):
            raise OnnxspfqError(f"{where}: input {s.name} has dtype {a.dtype}, the model expects {s.dtype}; "
                                f"convert it (e.g. array.astype(numpy.{s.dtype.name}))")
        a = a.astype(s.dtype)
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        bad = int(np.count_nonzero(~np.isfinite(a.astype(np.float32))))
        if bad:
            raise OnnxspfqError(f"{where}: input {s.name} holds {bad} NaN/Inf value(s); clean the calibration data")
    return a


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _batches(stacked: dict[str, np.ndarray], specs: list[InputSpec], samples: int | None,
             batch_size: int) -> list[dict[str, np.ndarray]]:
    batched = [s for s in specs if len(s.shape) > 0]
    total = min(stacked[s.name].shape[0] for s in batched) if batched else 1
    if samples is not None:
        total = min(total, samples)
    fixed = {s.shape[0] for s in batched if s.shape[0] is not None}
    if len(fixed) > 1:
        raise OnnxspfqError(f"the model fixes its inputs' batch dims to different sizes {sorted(fixed)}; "
                            "calibration cannot batch such a model")
    is_fixed = bool(fixed)
    step = fixed.pop() if fixed else batch_size
    if is_fixed and total % step:
        raise OnnxspfqError(f"the model's batch dim is fixed to {step} but the calibration holds {total} samples; "
                            f"provide a multiple of {step}")
    out = []
    for lo in range(0, total, step):
        hi = min(lo + step, total)
        out.append({s.name: (stacked[s.name][lo:hi] if len(s.shape) else stacked[s.name]) for s in specs})
    return out


AUTO_TOKEN_MASK = "attention_mask"  # the padding-mask input name of Hugging Face exports (BERT, GPT-2, Llama, ...)


def token_mask_input(setting: str, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> str | None:
    """The graph input whose zeros mark padding tokens, for CompressConfig.token_mask ("auto", "none" or a name):
    the name, or None when rows are not masked. A named input must be a 2-D (batch, sequence) model input with at
    least one nonzero value in the calibration data."""
    if setting == "none":
        return None
    specs = {s.name: s for s in model_inputs(model)}
    name = AUTO_TOKEN_MASK if setting == "auto" else setting
    if name not in specs:
        if setting == "auto":
            return None
        raise OnnxspfqError(f"--token-mask {name!r} is not an input of the model (its inputs are "
                            f"{', '.join(specs)}): name the (batch, sequence) padding mask, or --token-mask none")
    if len(specs[name].shape) != 2:
        if setting == "auto":
            return None
        raise OnnxspfqError(f"--token-mask {name!r} has rank {len(specs[name].shape)}, not a 2-D (batch, sequence) "
                            "padding mask: name that input, or --token-mask none")
    if batches and not any(np.any(np.asarray(b[name]) != 0) for b in batches if name in b):
        raise OnnxspfqError(f"the calibration data's {name!r} is zero everywhere: every token would be padding; "
                            "check the data, or --token-mask none")
    return name
