"""The protobuf wire format of .onnx files, read and written without parsing a whole model (io.py's open_model
scans a file into a small header plus (file, offset, length) references to its large tensors; save_model splits
and joins serialised messages around tensor payloads). Why by hand: protobuf parses a message whole (2 GiB limit,
and the parsed copy of every weight), which is what lazy loading avoids.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from onnx import TensorProto

# Tensors with at least this many bytes go to the data file (onnx's own default).
TENSOR_SIZE_THRESHOLD = 1024
# Initializers with at least this many elements are read lazily (smaller ones, shape constants and small biases,
# stay in the header: sub-models and converters need their values).
LAZY_MIN_ELEMENTS = 1024
def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tag(field_number: int, wire_type: int) -> bytes:
    return _varint((field_number << 3) | wire_type)


class _Reader:
    """Sequential reads of a file's protobuf fields; skips length-delimited payloads without reading them."""

    def __init__(self, f, size: int) -> None:
        self.f, self.size = f, size

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            c = self.f.read(1)
            if not c:
                raise ValueError("truncated varint")
            value |= (c[0] & 0x7F) << shift
            if c[0] < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def fields(self, end: int) -> Iterator[tuple[int, int, int]]:
        """(field number, wire type, start of the field's tag) up to `end`; the reader stands at the payload."""
        while self.f.tell() < end:
            start = self.f.tell()
            key = self.varint()
            yield key >> 3, key & 7, start

    def skip(self, wire_type: int) -> int:
        """Skip one payload; returns the payload length for length-delimited fields."""
        if wire_type == 0:
            self.varint()
        elif wire_type == 1:
            self.f.seek(8, os.SEEK_CUR)
        elif wire_type == 5:
            self.f.seek(4, os.SEEK_CUR)
        elif wire_type == 2:
            n = self.varint()
            if self.f.tell() + n > self.size:
                raise ValueError("field runs past the end of the file")
            self.f.seek(n, os.SEEK_CUR)
            return n
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        return 0

    def copy(self, start: int) -> bytes:
        """The bytes from `start` to the current position."""
        end = self.f.tell()
        self.f.seek(start)
        return self.f.read(end - start)


@dataclass(frozen=True)
class _Inline:
    """Where an initializer's raw bytes sit inside the model file, and whether it set data_location explicitly."""

    offset: int
    length: int
    had_location: bool
    location_value: int = 0


def _scan_tensor(r: _Reader, end: int, location: str) -> tuple[bytes, str, _Inline | None]:
    """A TensorProto's bytes with a large raw_data payload replaced by an external reference to the file."""
    parts: list[bytes] = []
    name, raw, count, had_loc, loc_val, dims = "", None, 1, False, 0, []
    while r.f.tell() < end:
        start = r.f.tell()
        key = r.varint()
        number, wt = key >> 3, key & 7
        if number == 9 and wt == 2:  # raw_data
            n = r.varint()
            raw = (r.f.tell(), n)
            r.f.seek(n, os.SEEK_CUR)
            parts.append(b"")  # placeholder, decided below
            raw_index = len(parts) - 1
            raw_start = start
            continue
        if number == 8 and wt == 2:  # name
            n = r.varint()
            name = r.f.read(n).decode("utf-8", errors="replace")
            parts.append(r.copy(start))
            continue
        if number == 1:  # dims: packed or not
            if wt == 2:
                n = r.varint()
                blob = r.f.read(n)
                pos = 0
                while pos < len(blob):
                    v, pos = _read_varint(blob, pos)
                    dims.append(v)
            else:
                dims.append(r.varint())
            parts.append(r.copy(start))
            continue
        if number == 14 and wt == 0:
            loc_val = r.varint()
            had_loc = True
            parts.append(r.copy(start))
            continue
        r.skip(wt)
        parts.append(r.copy(start))
    for d in dims:
        count *= d
    if raw is None or count < LAZY_MIN_ELEMENTS or raw[1] < TENSOR_SIZE_THRESHOLD or (had_loc and loc_val != 0):
        if raw is not None:
            r.f.seek(raw_start)
            parts[raw_index] = r.f.read(raw[0] + raw[1] - raw_start)
            r.f.seek(end)
        return b"".join(parts), name, None
    parts = [p for i, p in enumerate(parts) if i != raw_index and not p.startswith(_tag(14, 0))]
    ext = b"".join(_tag(13, 2) + _varint(len(e)) + e for e in (
        _entry("location", location), _entry("offset", str(raw[0])), _entry("length", str(raw[1]))))
    body = b"".join(parts) + ext + _tag(14, 0) + _varint(TensorProto.EXTERNAL)
    return body, name, _Inline(raw[0], raw[1], had_loc, loc_val)


def _entry(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return _tag(1, 2) + _varint(len(k)) + k + _tag(2, 2) + _varint(len(v)) + v


def _scan_graph(r: _Reader, end: int, location: str, inline: dict[str, _Inline]) -> bytes:
    parts = []
    for number, wt, start in r.fields(end):
        if number == 5 and wt == 2:  # initializer
            n = r.varint()
            body, name, where = _scan_tensor(r, r.f.tell() + n, location)
            if where is not None:
                inline[name] = where
            parts.append(_tag(5, 2) + _varint(len(body)) + body)
        else:
            r.skip(wt)
            parts.append(r.copy(start))
    return b"".join(parts)


def _scan_model(path: str) -> tuple[bytes, dict[str, _Inline]]:
    """The model file's bytes without the raw payloads of its large main-graph initializers (each replaced by an
    external reference to its place in the file), and where those payloads are."""
    inline: dict[str, _Inline] = {}
    location = os.path.basename(path)
    size = os.path.getsize(path)
    parts = []
    with open(path, "rb", buffering=1 << 16) as f:
        r = _Reader(f, size)
        for number, wt, start in r.fields(size):
            if number == 7 and wt == 2:  # graph
                n = r.varint()
                body = _scan_graph(r, r.f.tell() + n, location, inline)
                parts.append(_tag(7, 2) + _varint(len(body)) + body)
            else:
                r.skip(wt)
                parts.append(r.copy(start))
    return b"".join(parts), inline



def _split(data: bytes, after: int) -> tuple[bytes, bytes]:
    """Split a serialised message before its first field numbered above `after` (fields are in number order)."""
    pos = 0
    while pos < len(data):
        key, p = _read_varint(data, pos)
        if key >> 3 > after:
            return data[:pos], data[pos:]
        wt = key & 7
        if wt == 0:
            _, p = _read_varint(data, p)
        elif wt == 1:
            p += 8
        elif wt == 5:
            p += 4
        elif wt == 2:
            n, p = _read_varint(data, p)
            p += n
        pos = p
    return data, b""


def _without(msg, skip: str):
    """A new message of msg's type holding every set field but `skip` (no copy of the skipped field's data)."""
    out = type(msg)()
    for fd, value in msg.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(out, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    return out


