"""The capture's reference: the WHOLE model run by onnxruntime over the calibration batches with some
initializers replaced, which the capture's per-segment runs are tested against (tests/test_capture.py). Not used
by the pipeline, so it lives with the tests."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxspfq.io import session, session_options


def run_model(model: onnx.ModelProto | str | os.PathLike, batches: list[dict[str, np.ndarray]],
              weights: dict[str, np.ndarray] | None = None, output_names: list[str] | None = None,
              providers: list[str] | None = None) -> list[list[np.ndarray]]:
    """Whole-model outputs per batch, with the initializers named in `weights` replaced (cast to their dtype).

    An in-memory model is copied with the new initializers. A model given by path (e.g. > 2 GB) gets them
    through SessionOptions.add_initializer at optimisation level EXTENDED: measured with onnxruntime 1.32, level
    ALL (NCHWc layout transform) silently ignores such overrides on Conv weights.
    """
    so = session_options()
    weights = weights or {}
    in_memory = isinstance(model, onnx.ModelProto)
    header = model if in_memory else onnx.load(str(model), load_external_data=False)
    inits = {t.name: t for t in header.graph.initializer}
    arrays = {}
    for name, arr in weights.items():
        if name not in inits:
            raise ValueError(f"weight {name!r} is not an initializer of the model")
        t = inits[name]
        a = np.ascontiguousarray(arr, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        if a.shape != tuple(t.dims):
            raise ValueError(f"weight {name!r}: shape {a.shape} differs from the model's {tuple(t.dims)}")
        arrays[name] = a
    keep = []
    if in_memory:
        src = (_replaced(model, arrays) if arrays else model).SerializeToString()
    else:
        src = str(model)
        if arrays:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        for name, a in arrays.items():
            ov = ort.OrtValue.ortvalue_from_numpy(a)
            keep.append((a, ov))
            so.add_initializer(name, ov)
    sess = session(src, so, providers)
    names = output_names or [o.name for o in sess.get_outputs()]
    return [sess.run(names, feed) for feed in batches]


def _replaced(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `arrays` hold those arrays."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.name in arrays:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    return m


