"""Output agreement between a float model and its compressed version, on the same inputs.

Two kinds of output are understood (`task`):
- classify: rows x classes logits; top-1 agreement with the float model and, with labels, top-1 / top-5 accuracy.
- embed: one embedding per sample (any trailing shape, flattened); mean per-sample cosine similarity and retrieval
  agreement: for each sample its k nearest neighbours (cosine, itself excluded) among the evaluated samples under
  the float embeddings vs under the compressed ones (mean overlap@k), whether the nearest neighbour is the same
  (top-1 neighbour agreement), and the mean rank, under the compressed embeddings, of the float nearest neighbour
  (1.0 = always ranked first).
"auto" picks embed when the output's name says so ("embed", "hidden", "pool") or every float row has unit L2 norm,
and classify otherwise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort

from onnxspfq.errors import OnnxspfqError
from onnxspfq.io import session as io_session

TASKS = ("auto", "classify", "embed")
EMBED_NAME_HINTS = ("embed", "hidden", "pool")
# Output values kept per model for the agreement check (256 MB float32): a decoder LLM's logits over a whole
# calibration set would be gigabytes.
EVAL_MAX_VALUES = 1 << 26
# Output values per onnxruntime call in the agreement check (64 MB float32): Qwen2 0.6b's 16 calibration sequences
# in one call were 16 x 128 x 151936 logits, 1.2 GB per model, past the cap above before it could stop the run
EVAL_RUN_VALUES = 1 << 24
_CHUNK = 1024  # rows of the similarity matrix held at once in the neighbour metrics


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    """A CPU onnxruntime session with fp32 math pinned (see FORMATS.md), from a proto or a path (a path lets
    onnxruntime read external data itself; nothing is serialised)."""
    return io_session(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model))


def _output_names(sess: ort.InferenceSession) -> list[str]:
    return [o.name for o in sess.get_outputs()]


def run(model: onnx.ModelProto | str, batches: Iterable[dict[str, np.ndarray]],
        outputs: list[str] | None = None) -> list[np.ndarray]:
    """Outputs of `model` (all, or those named in `outputs`) on all batches, concatenated along the batch axis
    (for batches of different shapes: one row per position of the last axis)."""
    per_call, _ = _run(model, batches, outputs)
    return [_concat([c[i] for c in per_call]) for i in range(len(per_call[0]))]


def _run(model: onnx.ModelProto | str, batches: Iterable[dict[str, np.ndarray]], outputs: list[str] | None = None,
         max_values: float = float("inf"), split: bool = True) -> tuple[list[list[np.ndarray]], list[dict[str, np.ndarray]]]:
    """The outputs of each onnxruntime call, stopping once they reach `max_values` values, and the feeds of each
    call. A batch is split along axis 0 (where every input's axis 0 is the same symbolic dim, i.e. the batch) into
    calls of about EVAL_RUN_VALUES output values, so that the cap holds inside a batch too; split=False: one call
    per batch."""
    sess = session(model)
    if outputs is not None:
        names = _output_names(sess)
        missing = [o for o in outputs if o not in names]
        if missing:
            raise OnnxspfqError(f"the model has no output named {', '.join(missing)}; its outputs are "
                                f"{', '.join(names)}: pass one of those")
    axis0 = {i.shape[0] for i in sess.get_inputs() if i.shape}
    dynamic = len(axis0) == 1 and not isinstance(next(iter(axis0)), int)  # e.g. an RNN's X [seq, ...] is not split
    per_batch, ran, values, per_row = [], [], 0, None
    for feeds in batches:
        n = _rows(feeds) if dynamic and split else 0
        lo = 0
        while values < max_values and (lo == 0 or lo < n):
            # the first call of a run is one row when the batch can be split: its size sizes the rest
            step = n if n <= 1 else 1 if per_row is None else max(1, int(EVAL_RUN_VALUES // max(per_row, 1)))
            hi = min(n, lo + step)
            part = feeds if (lo, hi) in ((0, n), (0, 0)) else {k: v[lo:hi] for k, v in feeds.items()}
            per_batch.append(sess.run(outputs, part))
            ran.append(part)
            got = sum(int(np.size(o)) for o in per_batch[-1])
            per_row = got / max(hi - lo, 1)
            values += got
            lo = max(hi, 1)
        if values >= max_values:
            break
    del sess
    return per_batch, ran


def _rows(feeds: dict[str, np.ndarray]) -> int:
    """Rows along axis 0 shared by every input, 0 where they do not share one (then a batch is not split)."""
    lens = {len(v) if np.ndim(v) else -1 for v in feeds.values()}
    return lens.pop() if len(lens) == 1 and -1 not in lens else 0


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    """Batches along axis 0; batches of different sequence lengths (e.g. unpadded text) as rows of the last axis."""
    if len({a.shape[1:] for a in arrays}) == 1:
        return np.concatenate(arrays, axis=0)
    return np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays], axis=0)


@dataclass
class Agreement:
    """How far the compressed model's output is from the float model's (see the module docstring)."""

    cosine: float
    rel_error: float
    top1_agreement: float | None
    top1_accuracy_float: float | None = None
    top1_accuracy_compressed: float | None = None
    top5_accuracy_float: float | None = None
    top5_accuracy_compressed: float | None = None
    samples: int = 0
    task: str = "classify"
    output: str | None = None
    sample_cosine: float | None = None  # mean over samples of cos(float row, compressed row)
    sample_cosine_min: float | None = None
    neighbours_k: int | None = None
    overlap_at_k: float | None = None
    nn1_agreement: float | None = None
    nn1_rank_mean: float | None = None
    padding_left_out: str | None = None  # the input whose zeros marked the padding positions not compared

    def as_dict(self) -> dict:
        return asdict(self)


def _topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def _unit_rows(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n > 0, n, 1.0)


def sample_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity of two (N, D) arrays (1 where both rows are zero, 0 where only one is)."""
    nr, no = np.linalg.norm(ref, axis=1), np.linalg.norm(out, axis=1)
    dot = np.einsum("ij,ij->i", ref, out)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where((nr > 0) & (no > 0), dot / (nr * no), np.where((nr == 0) & (no == 0), 1.0, 0.0))
    return np.clip(cos, -1.0, 1.0)


def neighbour_agreement(ref: np.ndarray, out: np.ndarray, k: int = 10) -> tuple[int, float, float, float]:
    """Retrieval agreement of two embedding sets (N, D) over the same N samples.

    For each sample i: its k nearest other samples by cosine under `ref` and under `out`. Returns (k used,
    mean |overlap| / k, fraction of samples whose nearest neighbour is the same, mean rank under `out` of the
    nearest neighbour under `ref`, 1-based). k is capped at N - 1; N must be >= 2.
    """
    n = len(ref)
    if n < 2:
        raise OnnxspfqError(f"neighbour metrics need at least 2 samples, got {n}: evaluate on more samples")
    if k < 1:
        raise OnnxspfqError(f"k must be >= 1, got {k}")
    k = min(k, n - 1)
    R, Q = _unit_rows(ref), _unit_rows(out)
    overlap = np.empty(n)
    same1 = np.empty(n, dtype=bool)
    rank1 = np.empty(n)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        idx = np.arange(lo, hi)
        Sr, Sq = R[lo:hi] @ R.T, Q[lo:hi] @ Q.T
        Sr[idx - lo, idx] = -np.inf
        Sq[idx - lo, idx] = -np.inf
        top_r = _topk(Sr, k)
        top_q = _topk(Sq, k)
        overlap[lo:hi] = (top_r[:, :, None] == top_q[:, None, :]).any(-1).sum(-1) / k
        nn_r = top_r[:, 0]
        same1[lo:hi] = nn_r == top_q[:, 0]
        target = Sq[np.arange(hi - lo), nn_r]
        rank1[lo:hi] = 1 + np.sum(Sq > target[:, None], axis=1)
    return k, float(overlap.mean()), float(same1.mean()), float(rank1.mean())


def _topk(S: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest values, largest first (ties: lower index first)."""
    part = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < S.shape[1] else np.tile(np.arange(S.shape[1]), (len(S), 1))
    vals = np.take_along_axis(S, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


def resolve_task(task: str, ref: np.ndarray, output_name: str | None = None, labels: np.ndarray | None = None) -> str:
    """The task for `auto`: embed when the output name hints at an embedding or every float row has unit norm."""
    if task not in TASKS:
        raise OnnxspfqError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if task != "auto":
        return task
    if labels is not None:
        return "classify"
    name = (output_name or "").lower()
    if any(h in name for h in EMBED_NAME_HINTS):
        return "embed"
    flat = np.asarray(ref).reshape(len(ref), -1)
    if flat.shape[1] <= 1 or len(flat) == 0:
        return "classify"
    # row norms accumulated in float64 without a float64 copy of the output (Qwen2 0.6b's logits: 622 MB)
    sq = np.concatenate([np.einsum("ij,ij->i", flat[i:i + _CHUNK], flat[i:i + _CHUNK], dtype=np.float64)
                         for i in range(0, len(flat), _CHUNK)])
    return "embed" if np.allclose(np.sqrt(sq), 1.0, atol=1e-3) else "classify"


def compare(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None, task: str = "classify",
            k: int = 10, output_name: str | None = None, keep: np.ndarray | None = None) -> Agreement:
    """Cosine similarity and relative L2 error over the whole output, mean per-sample cosine, plus
    - classify: top-1 agreement and, with labels, top-1 / top-5 accuracy (rows x classes outputs);
    - embed: neighbour retrieval agreement (see neighbour_agreement), no top-1 agreement.
    `task` may be "auto" (see resolve_task). keep: (batch, sequence) positions that count when a classify output
    is compared per position (a decoder's logits: padding positions left out)."""
    task = resolve_task(task, ref, output_name, labels)
    if ref.shape != out.shape:
        raise OnnxspfqError(f"the two models' outputs have different shapes {ref.shape} and {out.shape}: "
                            "compare a model with its own compressed version")
    if task == "classify" and ref.ndim == 3 and labels is None:
        # [batch, sequence, classes] (a decoder's logits): one row per position, as next-token agreement is read
        ref, out = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
        if keep is not None and keep.size == len(ref):
            ref, out = ref[keep.reshape(-1)], out[keep.reshape(-1)]
    # float64 figures for outputs up to 4M values; beyond, float32 (BLAS accumulates pairwise): MiniLM's
    # [256, 64, 384] hidden states in float64 plus their unit rows were 200 MB, a third of the run's peak
    dtype = np.float64 if ref.size <= 1 << 22 else np.float32
    ref = np.asarray(ref, dtype=dtype).reshape(len(ref), -1)
    out = np.asarray(out, dtype=dtype).reshape(len(out), -1)
    r, o = ref.ravel(), out.ravel()
    denom = np.linalg.norm(r) * np.linalg.norm(o)
    cosine = float(r @ o / denom) if denom > 0 else float(np.array_equal(r, o))
    rel = float(np.linalg.norm(r - o) / max(np.linalg.norm(r), 1e-30))
    cos_rows = sample_cosines(ref, out)
    res = Agreement(cosine=cosine, rel_error=rel, top1_agreement=None, samples=len(ref), task=task,
                    output=output_name, sample_cosine=float(cos_rows.mean()), sample_cosine_min=float(cos_rows.min()))
    if task == "embed":
        if len(ref) >= 2:
            res.neighbours_k, res.overlap_at_k, res.nn1_agreement, res.nn1_rank_mean = neighbour_agreement(ref, out, k)
        return res
    if ref.shape[1] > 1:
        res.top1_agreement = float(np.mean(ref.argmax(1) == out.argmax(1)))
    if labels is not None and ref.shape[1] > 1:
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        if len(labels) != len(ref):
            raise OnnxspfqError(f"{len(labels)} labels for {len(ref)} samples: give one label per sample")
        res.top1_accuracy_float = _topk_accuracy(ref, labels, 1)
        res.top1_accuracy_compressed = _topk_accuracy(out, labels, 1)
        if ref.shape[1] >= 5:
            res.top5_accuracy_float = _topk_accuracy(ref, labels, 5)
            res.top5_accuracy_compressed = _topk_accuracy(out, labels, 5)
    return res


def _first_output(model: onnx.ModelProto | str) -> str:
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return m.graph.output[0].name


def _mask_padding(refs: list[np.ndarray], outs: list[np.ndarray], feeds: list[dict[str, np.ndarray]],
                  token_mask: str | None) -> list[np.ndarray | None]:
    """Zero both models' outputs at padding positions (token_mask's zeros) where an output is (batch, sequence,
    ...) over the mask's shape, in place of the lists' arrays; returns each call's kept positions (None: all).
    A padding position's output is whatever the model computes for a token nothing reads (MiniLM-L6's
    last_hidden_state there moves most under compression) and is not part of the result a user uses."""
    keeps: list[np.ndarray | None] = []
    for i, f in enumerate(feeds):
        mask = None if token_mask is None else f.get(token_mask)
        if mask is None or refs[i].ndim < 3 or tuple(refs[i].shape[:2]) != tuple(np.shape(mask)):
            keeps.append(None)
            continue
        keep = np.asarray(mask) != 0
        m = keep.reshape(keep.shape + (1,) * (refs[i].ndim - 2))
        refs[i], outs[i] = np.where(m, refs[i], 0).astype(refs[i].dtype), np.where(m, outs[i], 0).astype(outs[i].dtype)
        keeps.append(keep)
    return keeps


def evaluate(float_model: onnx.ModelProto | str, compressed_model: onnx.ModelProto | str,
             batches: list[dict[str, np.ndarray]], labels: np.ndarray | None = None, output: str | None = None,
             task: str = "auto", k: int = 10, token_mask: str | None = None,
             reference: tuple[list[np.ndarray], list[dict[str, np.ndarray]]] | None = None) -> Agreement:
    """Run both models on the same batches and compare output `output` (default: the float model's first);
    token_mask: the feed whose zeros mark padding tokens, left out of the comparison (_mask_padding); reference:
    (the float model's output of each call, the feeds of each call), computed already (compress's capture,
    Capture.reference_outputs): only the compressed model runs, on those feeds."""
    if task not in TASKS:
        raise OnnxspfqError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    name = output or _first_output(float_model)
    if reference is not None:
        refs, ran = reference
        outs = [c[0] for c in _run(compressed_model, ran, [name], split=False)[0]]
    else:
        # one model at a time (a large model and its compressed copy never share memory), outputs capped: the
        # compressed model runs on exactly the batches the float model's capped outputs cover
        per_call, ran = _run(float_model, batches, [name], max_values=EVAL_MAX_VALUES)
        refs = [c[0] for c in per_call]
        outs = [c[0] for c in _run(compressed_model, ran, [name])[0]]
    keeps = _mask_padding(refs, outs, ran, token_mask)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)[:sum(len(r) for r in refs)]
    if len({r.shape[1:] for r in refs}) == 1:
        keep = None if any(kp is None for kp in keeps) else np.concatenate(keeps)
        res = compare(np.concatenate(refs), np.concatenate(outs), labels, task=task, k=k, output_name=name,
                      keep=keep)
    else:
        res = _per_shape(refs, outs, labels, task, k, name, keeps)
    if any(kp is not None for kp in keeps):
        res.padding_left_out = token_mask
    return res


def _per_shape(refs: list[np.ndarray], outs: list[np.ndarray], labels: np.ndarray | None, task: str, k: int,
               name: str, keeps: list[np.ndarray | None] | None = None) -> Agreement:
    """Agreement over calls whose outputs differ in shape (e.g. [batch, seq] outputs of unpadded text): the calls
    of one shape compared together, the figures then pooled. Cosine and relative error are exact over all values;
    the rest are means weighted by samples (neighbour metrics: over shapes with at least 2 samples)."""
    task = resolve_task(task, refs[0], name, labels)
    shapes = list(dict.fromkeys(r.shape[1:] for r in refs))
    parts = []
    starts = np.cumsum([0] + [len(r) for r in refs])
    for shape in shapes:
        idx = [i for i, r in enumerate(refs) if r.shape[1:] == shape]
        lab = None if labels is None else np.concatenate([labels[starts[i]:starts[i + 1]] for i in idx])
        kept = None if keeps is None or any(keeps[i] is None for i in idx) else np.concatenate([keeps[i] for i in idx])
        parts.append(compare(np.concatenate([refs[i] for i in idx]), np.concatenate([outs[i] for i in idx]), lab,
                             task=task, k=k, output_name=name, keep=kept))
    dot = sum(float(np.dot(r.ravel().astype(np.float64), o.ravel().astype(np.float64))) for r, o in zip(refs, outs))
    rr = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in refs)
    oo = sum(float(np.sum(np.square(o, dtype=np.float64))) for o in outs)
    dd = sum(float(np.sum(np.square(r.astype(np.float64) - o))) for r, o in zip(refs, outs))
    n = np.array([p.samples for p in parts], dtype=np.float64)

    def pooled(field: str):
        vals = [(getattr(p, field), w) for p, w in zip(parts, n) if getattr(p, field) is not None]
        if not vals:
            return None
        return float(sum(v * w for v, w in vals) / sum(w for _, w in vals))

    res = Agreement(cosine=dot / np.sqrt(rr * oo) if rr * oo > 0 else float(dd == 0),
                    rel_error=float(np.sqrt(dd / rr)) if rr > 0 else (float("inf") if dd > 0 else 0.0),
                    top1_agreement=pooled("top1_agreement"), samples=int(n.sum()), task=task, output=name,
                    sample_cosine=pooled("sample_cosine"),
                    sample_cosine_min=min(p.sample_cosine_min for p in parts))
    for f in ("top1_accuracy_float", "top1_accuracy_compressed", "top5_accuracy_float", "top5_accuracy_compressed",
              "overlap_at_k", "nn1_agreement", "nn1_rank_mean"):
        setattr(res, f, pooled(f))
    res.neighbours_k = max((p.neighbours_k for p in parts if p.neighbours_k), default=None)
    return res


def held_out_source(data, model: onnx.ModelProto) -> tuple[object, np.ndarray | None]:
    """(inputs to read, labels) of held-out data: an .npz may hold keys besides the model inputs (labels, stored
    reference outputs), which are set aside; any other source is read as calibration data is."""
    from onnxspfq.calib import model_inputs

    if not str(data).endswith(".npz"):
        return data, None
    try:
        with np.load(data) as z:
            arrays = {k_: z[k_] for k_ in z.files}
    except (OSError, ValueError) as err:
        raise OnnxspfqError(f"cannot read data file {data}: {err}") from None
    y = arrays.pop("labels", None)
    inputs = {s.name for s in model_inputs(model)}
    if inputs <= set(arrays):  # else load_calibration names the missing input
        arrays = {k_: v for k_, v in arrays.items() if k_ in inputs}
    return arrays, y


def evaluate_files(float_path: str, compressed_path: str, data: str, labels: str | None = None,
                   samples: int | None = None, batch_size: int = 64, output: str | None = None,
                   task: str = "auto", k: int = 10, image_preprocess=None,
                   batch_axes: dict[str, int] | None = None, json_path: str | None = None) -> Agreement:
    """`onnxspfq evaluate`: both models on the inputs in `data`; labels from `labels` (.npy) or data's 'labels'.

    An .npz may hold keys besides the model inputs (e.g. stored reference outputs): those are ignored.
    `json_path`: where the caller will write the figures; checked here, before any work, against every input.
    """
    from onnxspfq import output_files
    from onnxspfq.calib import load_calibration, source_files, token_mask_input
    from onnxspfq.graph import load_model

    if task not in TASKS:
        raise OnnxspfqError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    float_model = load_model(float_path)
    compressed = load_model(compressed_path)  # clear errors for a bad second file too
    output_files.check({"--json": json_path}, float_model.files() + compressed.files() + source_files(data)
                       + ([labels] if labels else []))
    source, y = held_out_source(data, float_model.proto)
    if labels is not None:
        try:
            y = np.load(labels)
        except (OSError, ValueError) as err:
            raise OnnxspfqError(f"cannot read labels file {labels}: {err}; pass an .npy of integer class ids") from None
    batches = load_calibration(source, float_model.proto, samples=samples, batch_size=batch_size,
                               image_preprocess=image_preprocess, batch_axes=batch_axes)
    n = sum(len(next(iter(b.values()))) for b in batches)
    if y is not None:
        if len(y) < n:
            raise OnnxspfqError(f"{len(y)} labels for {n} samples: give one label per sample")
        y = y[:n]
    names = [o.name for o in float_model.proto.graph.output]
    if output is not None and output not in names:
        raise OnnxspfqError(f"{float_path} has no output named {output!r}; its outputs are {', '.join(names)}")
    if y is not None and task == "embed":
        y = None  # labels mean nothing to embedding metrics
    mask = token_mask_input("auto", float_model.proto, batches)  # an attention_mask input: padding left out
    return evaluate(float_path, compressed_path, batches, labels=y, output=output, task=task, k=k, token_mask=mask)
