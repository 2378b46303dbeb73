"""Writing models tensor by tensor.

`save_model` writes a header proto plus its tensors' bytes (copied from their source files, computed, or held in
memory) to a temporary file or folder beside the target and renames it into place: the target is either the
complete new model or untouched. The output keeps its tensors inline when it fits in one protobuf and the input
had no external data (bytes then equal `SerializeToString` of the loaded model), else it writes them to
`<name>.data` beside the model, one tensor at a time.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxspfq.errors import OnnxspfqError
from onnxspfq.io import EXTERNAL_DATA_THRESHOLD, Model, _subgraph_tensors, graph_tensors, is_external, tensor_nbytes
from onnxspfq.wire import TENSOR_SIZE_THRESHOLD, _split, _tag, _varint, _without


# ------------------------------------------------------------------------------------------------------ saving
def _check_target(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OnnxspfqError(f"output directory {directory} does not exist: create it or choose another path")
    if os.path.isdir(path):
        raise OnnxspfqError(f"output path {path} is a directory: give a file name such as {path}/model.onnx")
    return directory


def _public(path: str) -> None:
    """Give a written file the mode a plain open() would (mkstemp makes it 0600, unreadable to a service user)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH) & ~umask)


class _Writer:
    """Streams a model to a file: header parts in field order, tensor payloads copied from their sources."""

    def __init__(self, f, source: Model) -> None:
        self.f, self.source = f, source

    def tensor_pieces(self, t: TensorProto) -> tuple[int, list]:
        """(serialised size, pieces) of one initializer written inline; pieces are bytes or a tensor to stream."""
        if not self._lazy(t):
            data = t.SerializeToString()
            return len(data), [data]
        clean = TensorProto()
        clean.CopyFrom(t)
        clean.ClearField("external_data")
        clean.ClearField("data_location")
        where = self.source.inline.get(t.name)
        if where is not None and where.had_location:
            clean.data_location = where.location_value
        if t.name in self.source.derived:  # a folded chain: exactly what numpy_helper.from_array writes
            data = numpy_helper.from_array(np.asarray(self.source.derived[t.name]()), t.name).SerializeToString()
            return len(data), [data]
        head, tail = _split(clean.SerializeToString(), 9)
        _, _, n = self.source.locate(t)
        lead = head + _tag(9, 2) + _varint(n)
        return len(lead) + n + len(tail), [lead, t, tail]

    def _lazy(self, t: TensorProto) -> bool:
        return t.name in self.source.derived or (is_external(t) and not t.HasField("raw_data"))

    def write_inline(self, proto: onnx.ModelProto) -> None:
        graph = proto.graph
        shell, g_shell = _without(proto, "graph"), _without(graph, "initializer")
        g_head, g_tail = _split(g_shell.SerializeToString(), 5)
        tensors = []
        g_size = len(g_head) + len(g_tail)
        for t in graph.initializer:
            size, pieces = self.tensor_pieces(t)
            lead = _tag(5, 2) + _varint(size)
            tensors.append([lead] + pieces)
            g_size += len(lead) + size
        m_head, m_tail = _split(shell.SerializeToString(), 7)
        self.f.write(m_head)
        if proto.HasField("graph"):
            self.f.write(_tag(7, 2) + _varint(g_size) + g_head)
            for pieces in tensors:
                for piece in pieces:
                    if isinstance(piece, TensorProto):
                        for chunk in self.source.raw_chunks(piece):
                            self.f.write(chunk)
                    else:
                        self.f.write(piece)
            self.f.write(g_tail)
        self.f.write(m_tail)

    def write_external(self, proto: onnx.ModelProto, data_f, location: str) -> onnx.ModelProto:
        """Move every tensor of >= 1 KiB into `data_f`; returns the header that references it (the in-memory
        tensors are not copied: the header gets data-less copies)."""
        out, graph = _without(proto, "graph"), _without(proto.graph, "initializer")
        for t in proto.graph.initializer:
            graph.initializer.append(self._moved(t, data_f, location))
        for t in _subgraph_tensors(graph):  # If / Loop bodies: their tensors were copied with the nodes
            t.CopyFrom(self._moved(t, data_f, location))
        out.graph.CopyFrom(graph)
        return out

    def _moved(self, t: TensorProto, data_f, location: str) -> TensorProto:
        lazy = self._lazy(t)
        if not lazy and len(t.raw_data) < TENSOR_SIZE_THRESHOLD:
            return t
        offset = data_f.tell()
        for chunk in (self.source.raw_chunks(t) if lazy else [t.raw_data]):
            data_f.write(chunk)
        length = data_f.tell() - offset
        h = _without(t, "raw_data")
        h.ClearField("external_data")
        h.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = h.external_data.add()
            entry.key, entry.value = key, value
        return h


def _payload_bytes(proto: onnx.ModelProto, source: Model) -> int:
    total = 0
    for t in graph_tensors(proto.graph):
        if t.name in source.derived or (is_external(t) and not t.HasField("raw_data")):
            total += tensor_nbytes(t) or 0
        else:
            total += len(t.raw_data)
    return total


def save_model(proto: onnx.ModelProto, path: str | os.PathLike, source: Model | None = None,
               external: bool | None = None) -> int:
    """Write `proto` (whose lazy tensors `source` resolves) to `path` atomically; returns the bytes written.

    external: None writes external data (`<name>.data` beside the model, tensors of >= 1 KiB) when the source
    had external data or the payload passes EXTERNAL_DATA_THRESHOLD, else one inline file; True / False force it.
    """
    path = os.fspath(path)
    directory = _check_target(path)
    source = source or Model(proto=proto)
    if external is None:
        external = source.external or _payload_bytes(proto, source) > EXTERNAL_DATA_THRESHOLD
    writer = _Writer(None, source)
    tmpdir = tempfile.mkdtemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    model_tmp = os.path.join(tmpdir, os.path.basename(path))
    try:
        if external:
            location = os.path.basename(path) + ".data"
            data_tmp = os.path.join(tmpdir, location)
            with open(data_tmp, "wb") as data_f:
                header = writer.write_external(proto, data_f, location)
                data_f.flush()
                os.fsync(data_f.fileno())
            with open(model_tmp, "wb") as f:
                f.write(header.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
            _public(data_tmp)
            _public(model_tmp)
            written = os.path.getsize(data_tmp) + os.path.getsize(model_tmp)
            os.replace(data_tmp, os.path.join(directory, location))
        else:
            with open(model_tmp, "wb") as f:
                writer.f = f
                writer.write_inline(proto)
                f.flush()
                os.fsync(f.fileno())
            _public(model_tmp)
            written = os.path.getsize(model_tmp)
        os.replace(model_tmp, path)
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike,
                      external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """Save an in-memory `model` so that `path` is either the complete new model or untouched (external data
    when its payload passes `external_data_threshold` bytes)."""
    for t in graph_tensors(model.graph):
        if is_external(t) and not t.HasField("raw_data"):
            raise OnnxspfqError(
                f"tensor {t.name!r} still lives in an external file: save it with io.save_model and its source "
                "Model, or load the model with its external data first")
    save_model(model, path, external=_payload_bytes(model, Model(proto=model)) > external_data_threshold)
