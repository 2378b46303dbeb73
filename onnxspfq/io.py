"""Writing models safely and opening onnxruntime sessions with faithful settings.

`save_model_atomic` never leaves a half-written model behind: it writes to a temporary file in the target
directory and renames it into place (os.replace is atomic on one file system). Models too big for one protobuf
(> 2 GiB) are written with their large tensors in a data file beside the model.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from onnx import TensorProto

from onnxspfq.errors import OnnxspfqError

# Above this the model is saved with external data (protobuf refuses to serialise 2 GiB; keep a margin).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors at least this big go to the data file (onnx's own default).
_TENSOR_SIZE_THRESHOLD = 1024


def session_options() -> ort.SessionOptions:
    """onnxruntime options for evaluation: no spinning threads, fp32 math for weight-only QDQ MatMuls.

    Without `qdq_matmulnbits_accuracy_level=0` onnxruntime rewrites DQ -> MatMul into MatMulNBits with
    int8-quantized activations (about 5e-3 relative deviation), so outputs would not match a fake-quant reference.
    """
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return so


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Initializers of a graph and of all its subgraphs (If / Loop / Scan bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graph_tensors(g)


def _external_length(t: TensorProto) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return 0


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Size of the model's serialised protobuf plus its already-external tensor data, in bytes.

    Exact below 2 GiB (protobuf's ByteSize, which encodes the message: about 3 s per GB). protobuf cannot
    size a bigger message, so there it returns the sum of the tensors' raw payloads, a slight underestimate.
    """
    tensors = list(_graph_tensors(model.graph))
    external = sum(_external_length(t) for t in tensors if _is_external(t))
    payload = sum(len(t.raw_data) for t in tensors)  # one tensor's bytes copied at a time
    if payload < 2**31:
        try:
            return model.ByteSize() + external
        except (EncodeError, ValueError):  # the graph's other parts pushed it over 2 GiB
            pass
    return payload + external


def _check_target(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OnnxspfqError(f"output directory {directory} does not exist: create it or choose another path")
    if os.path.isdir(path):
        raise OnnxspfqError(f"output path {path} is a directory: give a file name such as {path}/model.onnx")
    return directory


def _write_bytes_atomic(data: bytes, path: str, directory: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_external(model: onnx.ModelProto, path: str, directory: str) -> None:
    """Write `path` plus `path.data` through a temporary directory, then move data first, model last.

    The tensors' raw bytes are moved out of the proto only for serialisation and restored afterwards, so the
    caller's model is left as it was.
    """
    location = os.path.basename(path) + ".data"
    tmpdir = tempfile.mkdtemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    # (tensor, offset and length in the data file, original data_location or None when unset)
    moved: list[tuple[TensorProto, int, int, int | None]] = []
    data_tmp = os.path.join(tmpdir, location)
    model_tmp = os.path.join(tmpdir, os.path.basename(path))
    try:
        try:
            with open(data_tmp, "wb") as f:
                for t in _graph_tensors(model.graph):
                    raw = t.raw_data if t.HasField("raw_data") else b""
                    if len(raw) >= _TENSOR_SIZE_THRESHOLD:
                        offset = f.tell()
                        f.write(raw)
                        length = len(raw)
                        del raw
                        moved.append((t, offset, length, t.data_location if t.HasField("data_location") else None))
                        t.ClearField("raw_data")
                        t.data_location = TensorProto.EXTERNAL
                        del t.external_data[:]
                        for key, value in (("location", location), ("offset", offset), ("length", length)):
                            entry = t.external_data.add()
                            entry.key, entry.value = key, str(value)
                f.flush()
                os.fsync(f.fileno())
            _write_bytes_atomic(model.SerializeToString(), model_tmp, tmpdir)
        finally:  # put the bytes back into the caller's proto, whatever happened
            if moved:
                with open(data_tmp, "rb") as f:
                    for t, offset, length, location_before in moved:
                        f.seek(offset)
                        del t.external_data[:]
                        if location_before is None:
                            t.ClearField("data_location")
                        else:
                            t.data_location = location_before
                        t.raw_data = f.read(length)
        os.replace(data_tmp, os.path.join(directory, location))
        os.replace(model_tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def save_model_atomic(
    model: onnx.ModelProto, path: str | os.PathLike, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> None:
    """Save `model` to `path` so that `path` is either the complete new model or untouched.

    Models whose serialised size exceeds `external_data_threshold` bytes are written with tensors of 1 KiB
    or more in `<path>.data` beside the model (the model file references it by that relative name).
    """
    path = os.fspath(path)
    directory = _check_target(path)
    for t in _graph_tensors(model.graph):
        if _is_external(t) and not t.HasField("raw_data"):
            raise OnnxspfqError(
                f"tensor {t.name!r} still lives in an external file: load the model with its external data "
                "(onnx.load(path, load_external_data=True)) before saving"
            )
    if model_size_bytes(model) > external_data_threshold:
        _save_external(model, path, directory)
    else:
        _write_bytes_atomic(model.SerializeToString(), path, directory)
