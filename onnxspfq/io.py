"""Opening models without their weights, and the one onnxruntime session setting.

`open_model` reads an .onnx file's graph into memory but not its large initializers: their bytes stay where they
are (inside the .onnx file itself, or in its external data files) and `Model.array` reads one tensor when it is
needed. Why not onnx.load / onnx-ir / onnx-graphsurgeon: all three parse the whole file into one protobuf first
(a 1.9 GB inline model costs its file bytes plus the parsed copy, and protobuf refuses messages over 2 GiB), so
the file is scanned at the protobuf wire level instead (wire.py) and each large main-graph initializer is recorded as
an external reference (file, offset, length) to the bytes already on disk. Every model, inline or external, is
then handled the same way: a small header proto plus tensors read per name.

Writing is save.py's job.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto, helper, numpy_helper

from onnxspfq.errors import OnnxspfqError
from onnxspfq.wire import LAZY_MIN_ELEMENTS, _Inline, _scan_model

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
            providers: list[str] | None = None, initializers: dict[str, np.ndarray] | None = None
            ) -> ort.InferenceSession:
    """An onnxruntime session (the one place sessions are made), its load errors as one line: an op it has no
    kernel for, a type it cannot run, a graph it rejects.

    initializers: the arrays of a graph's data-less initializers (graph.sub_model's `constants`), handed over
    without serialising them. onnxruntime optimises a constant weight (Conv's NCHWc layout, pre-packed MatMul B)
    and not a weight fed as an input: EfficientNet-Lite0's forward pass took 2.8x as long with its Conv weights
    as inputs (tools/bench_pipeline.py, docs/RESULTS.md section 17). The session keeps the arrays alive (onnxruntime
    reads them in place)."""
    options = options or session_options()
    values = None
    if initializers:
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in initializers.values()]
        options.add_external_initializers(list(initializers), values)
    try:
        sess = ort.InferenceSession(src, sess_options=options, providers=providers or ["CPUExecutionProvider"])
        sess.onnxspfq_initializers = values  # onnxruntime holds pointers into these buffers
        return sess
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


