"""Opening models without their weights, writing them tensor by tensor, and the one onnxruntime session setting.

`open_model` reads an .onnx file's graph into memory but not its large initializers: their bytes stay where they
are (inside the .onnx file itself, or in its external data files) and `Model.array` reads one tensor when it is
needed. Why not onnx.load / onnx-ir / onnx-graphsurgeon: all three parse the whole file into one protobuf first
(a 1.9 GB inline model costs its file bytes plus the parsed copy, and protobuf refuses messages over 2 GiB), so
the file is scanned at the protobuf wire level instead (wire.py) and each large main-graph initializer is recorded as
an external reference (file, offset, length) to the bytes already on disk. Every model, inline or external, is
then handled the same way: a small header proto plus tensors read per name.

`save_model` writes a header proto plus its tensors' bytes (copied from their source files, computed, or held in
memory) to a temporary file or folder beside the target and renames it into place: the target is either the
complete new model or untouched. The output keeps its tensors inline when it fits in one protobuf and the input
had no external data (bytes then equal `SerializeToString` of the loaded model), else it writes them to
`<name>.data` beside the model, one tensor at a time.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto, helper, numpy_helper

from onnxspfq.errors import OnnxspfqError
from onnxspfq.wire import (LAZY_MIN_ELEMENTS, TENSOR_SIZE_THRESHOLD, _Inline, _scan_model, _split, _tag, _varint,
                           _without)

# Outputs above this are written with external data (protobuf refuses to serialise 2 GiB; keep a margin).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_COPY_CHUNK = 1 << 26  # bytes copied per read when a tensor moves from one file to another
DERIVED = "onnxspfq-derived"  # external_data location of a tensor computed on read (a folded weight chain)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The one set of onnxruntime options (capture, evaluation): no spinning threads, fp32 weight-only QDQ math.

    Without `qdq_matmulnbits_accuracy_level=0` onnxruntime rewrites DQ -> MatMul into MatMulNBits with
    int8-quantized activations (about 5e-3 relative deviation), so outputs would not match a fake-quant reference.
    Spinning off: the capture keeps one session per segment alive, and spinning pools would fight for the cores.
    """
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def session(src: bytes | str, options: ort.SessionOptions | None = None,
            providers: list[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session (the one place sessions are made), its load errors as one line: an op it has no
    kernel for, a type it cannot run, a graph it rejects."""
    try:
        return ort.InferenceSession(src, sess_options=options or session_options(),
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own pybind classes (Fail, InvalidGraph, NotImplemented ...)
        text = " ".join(str(err).split())
        text = text.split("] ", 1)[-1] if text.startswith("[ONNXRuntimeError]") else text
        text = re.sub(r"^:? ?\d+ : [A-Z_]+ : ", "", text)  # ": 9 : NOT_IMPLEMENTED : " status prefixes
        fix = ("onnxruntime's CPU provider has no kernel for that op at that type (bfloat16 MatMul, for example): "
               "convert the model to float32 or float16" if "Could not find an implementation" in text else
               "the pass needs a model onnxruntime runs: check the ops and types it uses")
        raise OnnxspfqError(f"onnxruntime cannot run this model: {text[:300]}; {fix}") from None


# ------------------------------------------------------------------------------------------------------ Model
def graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Initializers of a graph and of all its subgraphs (If / Loop / Scan bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graph_tensors(g)


def _subgraph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from graph_tensors(sub)


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def tensor_nbytes(t: TensorProto) -> int | None:
    """Bytes of a tensor's raw payload from its dims and type (None for strings)."""
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    storage = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4}.get(t.data_type)
    if bits is None and hasattr(TensorProto, "INT2") and t.data_type in (TensorProto.INT2, TensorProto.UINT2):
        bits = 2
    if bits is not None:
        return -(-n * bits // 8)
    return n * storage.itemsize


@dataclass
class Model:
    """An ONNX model whose graph is in memory and whose large initializers are read one at a time.

    proto: the graph; each large main-graph initializer is an external reference (location relative to
    `base_dir`) to bytes on disk: in the .onnx file itself (names in `inline`) or in its external data files.
    derived: initializers computed on read (folded weight chains: name -> function returning the array).
    external: whether the file on disk used external data (the output then does too).
    """

    proto: onnx.ModelProto
    base_dir: str = ""
    path: str | None = None
    inline: dict[str, _Inline] = field(default_factory=dict)
    derived: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)
    external: bool = False

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def initializer(self, name: str) -> TensorProto:
        for t in self.proto.graph.initializer:
            if t.name == name:
                return t
        raise KeyError(name)

    def array(self, t: TensorProto | str) -> np.ndarray:
        """One initializer's value (read from disk when it is an external reference)."""
        if isinstance(t, str):
            t = self.initializer(t)
        if t.name in self.derived:
            return self.derived[t.name]()
        if not is_external(t):
            return numpy_helper.to_array(t)
        path, offset, length = self.locate(t)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        if dtype.kind in "biuf" and dtype.itemsize * int(np.prod(t.dims, dtype=np.int64)) == length:
            with open(path, "rb") as f:  # straight into the array: no bytes copy of a large tensor
                f.seek(offset)
                arr = np.fromfile(f, dtype=dtype.newbyteorder("<"), count=length // max(dtype.itemsize, 1))
            return arr.astype(dtype, copy=False).reshape(tuple(t.dims))
        tmp = TensorProto()
        tmp.CopyFrom(t)
        tmp.ClearField("external_data")
        tmp.ClearField("data_location")
        with open(path, "rb") as f:
            f.seek(offset)
            tmp.raw_data = f.read(length)
        return numpy_helper.to_array(tmp)

    def locate(self, t: TensorProto) -> tuple[str, int, int]:
        """(file, offset, length) of an external tensor's bytes."""
        info = _external_info(t)
        path = os.path.join(self.base_dir, info["location"])
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else os.path.getsize(path) - offset
        return path, offset, length

    def raw_chunks(self, t: TensorProto) -> Iterator[bytes]:
        """A tensor's raw payload in chunks (for writing it elsewhere without holding it whole)."""
        if t.name in self.derived:
            yield numpy_helper.from_array(np.asarray(self.derived[t.name]()), t.name).raw_data
            return
        if not is_external(t):  # in the header: raw bytes, or typed fields (float_data ...) encoded as raw
            yield t.raw_data if t.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
            return
        path, offset, length = self.locate(t)
        with open(path, "rb") as f:
            f.seek(offset)
            while length > 0:
                chunk = f.read(min(length, _COPY_CHUNK))
                if not chunk:
                    raise OnnxspfqError(f"external data file {path} ended early while reading tensor {t.name!r}: "
                                        "restore the complete data file")
                length -= len(chunk)
                yield chunk

    def files(self) -> list[str]:
        """The model file and every external data file its main graph references (what a run reads)."""
        locs = {_external_info(t).get("location") for t in graph_tensors(self.proto.graph)
                if is_external(t) and t.name not in self.inline and t.name not in self.derived}
        own = [self.path] if self.path else []
        return own + sorted(os.path.join(self.base_dir, f) for f in locs if f)

    def weight_bytes(self) -> int:
        """Bytes of all initializers' payloads (what the memory targets are stated against)."""
        return sum(tensor_nbytes(t) or 0 for t in graph_tensors(self.proto.graph))


def as_model(model: Model | onnx.ModelProto) -> Model:
    """A Model for an in-memory proto (its data inline or derived), or the Model itself."""
    return model if isinstance(model, Model) else Model(proto=model)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def open_model(path: str | os.PathLike) -> Model:
    """Open and check an ONNX model without reading its large weights (external data resolved relative to the
    model's folder; every reference checked against its file's size now, before any long work)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise OnnxspfqError(f"model file not found: {p!r} is not a file; pass the path of an .onnx model")
    try:
        header, inline = _scan_model(p)
        proto = onnx.ModelProto.FromString(header)
    except (DecodeError, ValueError, OSError, UnicodeDecodeError) as e:
        raise OnnxspfqError(f"{p!r} is not a readable ONNX model (truncated or not ONNX: {_one_line(e)}); "
                            "re-export or re-download it") from None
    if proto.ir_version == 0 or not proto.HasField("graph") or (len(proto.graph.node) == 0
                                                                and len(proto.graph.output) == 0):
        raise OnnxspfqError(f"{p!r} is not an ONNX model (no graph or IR version found); "
                            "pass an .onnx file exported by a framework")
    base_dir = os.path.dirname(os.path.abspath(p))
    model = Model(proto=proto, base_dir=base_dir, path=p, inline=inline)
    model.external = _check_external(model) > 0
    _load_small_external(model)
    try:  # by path: the checker then resolves external data against the model's folder and never needs 2 GiB
        onnx.checker.check_model(p)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        raise OnnxspfqError(f"{p!r} fails the ONNX checker: {_one_line(e)}; fix or re-export the model") from None
    return model


def _check_external(model: Model) -> int:
    """Check every external reference of the file (not those made by the scan); returns how many there are."""
    count = 0
    real_base = os.path.realpath(model.base_dir)
    for t in graph_tensors(model.proto.graph):
        if not is_external(t) or t.name in model.inline:
            continue
        count += 1
        info = _external_info(t)
        loc = info.get("location", "")
        where = f"tensor {t.name!r} of {model.path!r}"
        if not loc or os.path.isabs(loc) or not os.path.realpath(os.path.join(real_base, loc)).startswith(
                real_base + os.sep):
            raise OnnxspfqError(f"{where} names external data {loc!r} outside the model's folder: keep the data "
                                "file(s) beside the model under relative names")
        file = os.path.join(model.base_dir, loc)
        if not os.path.isfile(file):
            raise OnnxspfqError(f"external data file {file!r} of {where} is missing: keep the data file(s) next to "
                                "the model under the names the model records")
        size = os.path.getsize(file)
        try:
            file, offset, length = model.locate(t)
        except ValueError:
            raise OnnxspfqError(f"{where} has a malformed external data offset/length: re-export the model") from None
        expected = tensor_nbytes(t)
        if offset < 0 or offset + length > size:
            raise OnnxspfqError(f"external data file {file!r} is truncated: {where} needs bytes {offset}.."
                                f"{offset + length} but the file has {size}; restore the complete data file")
        if expected is not None and length != expected:
            raise OnnxspfqError(f"{where} records {length} bytes of external data in {file!r} but its shape and type "
                                f"need {expected}: the data file does not belong to this model; re-export it")
    return count


def _load_small_external(model: Model) -> None:
    """Read small external initializers into the header (sub-models and converters need their values)."""
    for t in graph_tensors(model.proto.graph):
        if is_external(t) and t.name not in model.inline:
            n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
            if n < LAZY_MIN_ELEMENTS:
                _materialize(model, t)


def _materialize(model: Model, t: TensorProto) -> None:
    raw = b"".join(model.raw_chunks(t))
    t.ClearField("external_data")
    t.ClearField("data_location")
    t.raw_data = raw


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Serialised size of an in-memory model plus its already-external tensor data, in bytes (past 2 GiB, where
    protobuf cannot size a message, the sum of the tensors' payloads, a slight underestimate)."""
    tensors = list(graph_tensors(model.graph))
    external = sum(int(_external_info(t).get("length", 0)) for t in tensors if is_external(t))
    payload = sum(len(t.raw_data) for t in tensors)
    if payload < 2**31:
        try:
            return model.ByteSize() + external
        except (EncodeError, ValueError):  # the graph's other parts pushed it over 2 GiB
            pass
    return payload + external


def model_file_bytes(path: str) -> int:
    """Size on disk of a model file plus every external data file it references."""
    header = onnx.load(path, load_external_data=False)
    files = {_external_info(t).get("location") for t in graph_tensors(header.graph) if is_external(t)}
    base = os.path.dirname(os.path.abspath(path))
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(base, f)) for f in files if f)


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
