"""Output agreement between a float model and its compressed version, on the same inputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort

from onnxspfq.io import session_options


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    """A CPU onnxruntime session with fp32 math pinned (see FORMATS.md), from a proto or a path."""
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src, sess_options=session_options(), providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | str, batches: Iterable[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """All outputs of `model` on all batches, concatenated along the batch axis (one array per output)."""
    sess = session(model)
    per_batch = [sess.run(None, feeds) for feeds in batches]
    return [np.concatenate([b[i] for b in per_batch], axis=0) for i in range(len(per_batch[0]))]


@dataclass
class Agreement:
    """How far the compressed model's first output is from the float model's."""

    cosine: float
    rel_error: float
    top1_agreement: float | None
    top1_accuracy_float: float | None = None
    top1_accuracy_compressed: float | None = None
    top5_accuracy_float: float | None = None
    top5_accuracy_compressed: float | None = None
    samples: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def compare(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> Agreement:
    """Cosine similarity and relative L2 error over the whole output; top-1 agreement / top-k accuracy for
    classifier-shaped outputs (rows x classes)."""
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    out = np.asarray(out, dtype=np.float64).reshape(len(out), -1)
    r, o = ref.ravel(), out.ravel()
    denom = np.linalg.norm(r) * np.linalg.norm(o)
    cosine = float(r @ o / denom) if denom > 0 else float(np.array_equal(r, o))
    rel = float(np.linalg.norm(r - o) / max(np.linalg.norm(r), 1e-30))
    agree = None
    if ref.shape[1] > 1:
        agree = float(np.mean(ref.argmax(1) == out.argmax(1)))
    res = Agreement(cosine=cosine, rel_error=rel, top1_agreement=agree, samples=len(ref))
    if labels is not None and ref.shape[1] > 1:
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        res.top1_accuracy_float = _topk_accuracy(ref, labels, 1)
        res.top1_accuracy_compressed = _topk_accuracy(out, labels, 1)
        if ref.shape[1] >= 5:
            res.top5_accuracy_float = _topk_accuracy(ref, labels, 5)
            res.top5_accuracy_compressed = _topk_accuracy(out, labels, 5)
    return res


def evaluate(float_model: onnx.ModelProto | str, compressed_model: onnx.ModelProto | str,
             batches: list[dict[str, np.ndarray]], labels: np.ndarray | None = None) -> Agreement:
    """Run both models on the same batches and compare their first outputs."""
    ref = run(float_model, batches)[0]
    out = run(compressed_model, batches)[0]
    return compare(ref, out, labels)


def evaluate_files(float_path: str, compressed_path: str, data: str, labels: str | None = None,
                   samples: int | None = None, batch_size: int = 64) -> Agreement:
    """`onnxspfq evaluate`: both models on the inputs in `data`; labels from `labels` (.npy) or data's 'labels'."""
    from onnxspfq.calib import load_calibration
    from onnxspfq.errors import OnnxspfqError
    from onnxspfq.graph import load_model

    float_model = load_model(float_path)
    load_model(compressed_path)  # clear errors for a bad second file too
    source: object = data
    y = None
    if str(data).endswith(".npz"):
        try:
            with np.load(data) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise OnnxspfqError(f"cannot read data file {data}: {err}") from None
        y = arrays.pop("labels", None)
        source = arrays
    if labels is not None:
        try:
            y = np.load(labels)
        except (OSError, ValueError) as err:
            raise OnnxspfqError(f"cannot read labels file {labels}: {err}; pass an .npy of integer class ids") from None
    batches = load_calibration(source, float_model, samples=samples, batch_size=batch_size)
    n = sum(len(next(iter(b.values()))) for b in batches)
    if y is not None:
        if len(y) < n:
            raise OnnxspfqError(f"{len(y)} labels for {n} samples: give one label per sample")
        y = y[:n]
    return evaluate(float_path, compressed_path, batches, labels=y)
