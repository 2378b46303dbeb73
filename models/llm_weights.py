"""Random weights and token ids for the decoder-LLM test models, regenerated WITHOUT torch (numpy + onnx only).

The Qwen2 test models (``models/qwen2.py``, which needs torch) are exported with weights that follow a fixed numpy
rule keyed by each parameter's name, so the committed graph ``models/qwen2_tiny.onnx`` (its weights external) plus
the small spec ``models/qwen2_tiny.weights.json`` are enough to rebuild ``qwen2_tiny.onnx.data`` byte for byte:

    python models/llm_weights.py models/qwen2_tiny.onnx            # writes models/qwen2_tiny.onnx.data (~40 MB)
    python models/llm_weights.py --check models/qwen2_tiny.onnx    # only verify an existing data file
    python models/llm_weights.py --tokens calib.npz --vocab 8192 --n 16 --seq-len 128 --seed 1

The value rule uses only integer operations and IEEE float64 multiply/add (no libm, no numpy ``Generator``
distribution whose stream numpy does not promise to keep), so every platform and numpy version writes the same
bytes: for tensor ``name`` the PCG64 bit generator seeded with ``SeedSequence([seed, crc32(name)])`` yields 3 raw
64-bit words per value; the twelve 16-bit pieces are summed (Irwin-Hall, an approximately normal variable with
mean 12 * 65535 / 2 = 393210 and standard deviation ~65536, bounded at about +-6 sigma) and the value is
``float32(mean + (S - 393210) * (std / 65536))`` in float64 arithmetic. PCG64 raw output and SeedSequence are the
parts of numpy's random module whose streams are fixed.

Which parameter (and transform: the exporter stores each Linear weight transposed, [in, out]) every external
initializer holds, the data file's size and its sha256 are recorded at export time in ``<stem>.weights.json``; the
offsets come from the ONNX file itself. ``materialize`` writes the data file through a temporary file and a rename,
and refuses (removes it, raises) if its sha256 differs from the recorded one.

There is no tokenizer or text offline for these random-weight models, so calibration / evaluation inputs are seeded
uniform token ids (``token_batches``, ``token_arrays``, ``--tokens``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

FORMAT = "onnxspfq-llm-weights/1"
MODELS_DIR = Path(__file__).resolve().parent
TINY = MODELS_DIR / "qwen2_tiny.onnx"
SMALL_BYTES = 1024            # tensors of at least this many bytes live in the data file, smaller ones inline
_CENTER = 12 * 65535 // 2     # mean of the sum of twelve uniform 16-bit integers (393210)
_CHUNK = 1 << 20              # values generated per step (bounds the temporary raw-bit buffers to ~24 MB)


# ----------------------------------------------------------------------------------------------------------- values

def param_rule(name: str) -> tuple[float, float]:
    """(mean, std) of the random values of a Qwen2 parameter, by name.

    RMSNorm weights: 1 + 0.1 z (distinct per layer: identical constant tensors would be merged into one initializer
    by the exporter's optimiser, and a trained model's norms are not all ones either); everything else (embedding,
    projection weights, q/k/v biases): 0.02 z, the Hugging Face ``initializer_range``.
    """
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    return 0.0, 0.02


def _seed_sequence(name: str, seed: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))])


def _centered_sum_chunks(name: str, n: int, seed: int):
    """int32 chunks (in order, n values in all): the Irwin-Hall sums minus their mean (the integer part of the rule)."""
    bg = np.random.PCG64(_seed_sequence(name, seed))
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        # 3 words -> 12 uint16 pieces; the sum over all 12 does not depend on the machine's byte order
        p = bg.random_raw(3 * m).view(np.uint16).reshape(3 * m, 4).astype(np.int32)
        s = (p[:, 0] + p[:, 1] + p[:, 2] + p[:, 3]).reshape(m, 3)
        yield start, s[:, 0] + s[:, 1] + s[:, 2] - _CENTER


def param_values(name: str, shape: tuple[int, ...] | list[int], seed: int = 0,
                 mean: float | None = None, std: float | None = None) -> np.ndarray:
    """float32 array of `shape` for parameter `name` (the torch layout), following `param_rule` unless given."""
    if mean is None or std is None:
        rule_mean, rule_std = param_rule(name)
        mean = rule_mean if mean is None else mean
        std = rule_std if std is None else std
    n = int(np.prod(shape, dtype=np.int64))
    step = float(std) / 65536.0                     # exact: a division by a power of two
    out = np.empty(n, np.float32)
    for start, sums in _centered_sum_chunks(name, n, seed):
        v = sums.astype(np.float64) * step          # one IEEE rounding
        if mean:
            v += float(mean)                        # one more
        out[start:start + len(v)] = v               # float64 -> float32, round to nearest even
    return out.reshape(tuple(int(d) for d in shape))


def transformed(values: np.ndarray, transform: str) -> np.ndarray:
    """The array the ONNX initializer holds for a parameter: as is, or transposed (2-D)."""
    if transform == "none":
        return values
    if transform == "transpose":
        return np.ascontiguousarray(values.T)
    raise ValueError(f"unknown transform {transform!r}")


def tensor_bytes(entry: dict, seed: int) -> bytes:
    """Little-endian float32 bytes of one spec entry (what the data file holds at that initializer's offset)."""
    v = param_values(entry["param"], entry["param_shape"], seed, entry["mean"], entry["std"])
    return transformed(v, entry["transform"]).astype("<f4", copy=False).tobytes()


# ------------------------------------------------------------------------------------------------------ data file

def spec_path(model_path: str | os.PathLike) -> Path:
    """``<dir>/<stem>.weights.json`` beside ``<dir>/<stem>.onnx``."""
    p = Path(model_path)
    return p.with_name(p.name[:-5] + ".weights.json" if p.name.endswith(".onnx") else p.name + ".weights.json")


def load_spec(model_path: str | os.PathLike) -> dict:
    spec = json.loads(spec_path(model_path).read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{spec_path(model_path)}: not a {FORMAT} file")
    return spec


def _layout(model_path: Path, spec: dict) -> tuple[Path, list[tuple[int, int, dict]]]:
    """The data file path and [(offset, length, spec entry)] sorted by offset, from the ONNX file's records."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    by_name = {e["initializer"]: e for e in spec["tensors"]}
    rows, seen = [], set()
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") != spec["data_file"]:
            raise ValueError(f"{t.name}: external location {info.get('location')!r}, expected {spec['data_file']!r}")
        if t.name not in by_name:
            raise ValueError(f"{t.name}: external initializer not described in {spec_path(model_path).name}")
        entry = by_name[t.name]
        shape = list(entry["param_shape"]) if entry["transform"] == "none" else list(entry["param_shape"])[::-1]
        if list(t.dims) != shape or t.data_type != onnx.TensorProto.FLOAT:
            raise ValueError(f"{t.name}: dims {list(t.dims)} / type {t.data_type}, spec says float32 {shape}")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        if length != 4 * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{t.name}: length {length} does not match its shape {shape}")
        rows.append((offset, length, entry))
        seen.add(t.name)
    missing = set(by_name) - seen
    if missing:
        raise ValueError(f"spec names initializers the graph does not hold externally: {sorted(missing)[:5]}")
    rows.sort(key=lambda r: r[0])
    end = 0
    for offset, length, entry in rows:
        if offset < end:
            raise ValueError(f"{entry['initializer']}: overlaps the previous tensor")
        end = offset + length
    if end > spec["data_size"]:
        raise ValueError(f"tensors end at {end}, past the recorded data size {spec['data_size']}")
    return model_path.parent / spec["data_file"], rows


def _stream(rows, size: int, seed: int, write=None) -> str:
    """Generate the data file's bytes in offset order (zero padding between tensors); return their sha256."""
    h = hashlib.sha256()
    pos = 0
    for offset, length, entry in rows:
        if offset > pos:
            pad = bytes(offset - pos)
            h.update(pad)
            if write:
                write(pad)
        b = tensor_bytes(entry, seed)
        assert len(b) == length
        h.update(b)
        if write:
            write(b)
        pos = offset + length
    if size > pos:
        pad = bytes(size - pos)
        h.update(pad)
        if write:
            write(pad)
    return h.hexdigest()


def publish(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Give a mkstemp file (mode 0600) the usual umask permissions, then rename it onto `dst` (atomic)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dst)


def sha256_file(path: str | os.PathLike, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def regenerated_sha256(model_path: str | os.PathLike) -> str:
    """sha256 of the data file the rule produces for this graph, computed without writing anything."""
    model_path = Path(model_path)
    spec = load_spec(model_path)
    _, rows = _layout(model_path, spec)
    return _stream(rows, spec["data_size"], spec["seed"])


def is_materialized(model_path: str | os.PathLike) -> bool:
    """True when the data file beside the graph exists with the recorded size and sha256."""
    model_path = Path(model_path)
    spec = load_spec(model_path)
    data = model_path.parent / spec["data_file"]
    return data.is_file() and data.stat().st_size == spec["data_size"] and sha256_file(data) == spec["sha256"]


def materialize(model_path: str | os.PathLike) -> Path:
    """Write ``<model>.onnx.data`` beside the graph from the rule + spec (temp file + rename); return its path.

    Raises RuntimeError (and leaves no file) if the result's sha256 is not the one recorded at export time.
    """
    model_path = Path(model_path)
    spec = load_spec(model_path)
    data, rows = _layout(model_path, spec)
    fd, tmp = tempfile.mkstemp(prefix=f".{data.name}.", suffix=".tmp", dir=data.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            digest = _stream(rows, spec["data_size"], spec["seed"], f.write)
        if digest != spec["sha256"]:
            raise RuntimeError(f"{data}: regenerated sha256 {digest} != recorded {spec['sha256']}")
        publish(tmp, data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return data


def _copy_atomic(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        publish(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_tiny(dest_dir: str | os.PathLike | None = None) -> Path:
    """Path of a ready-to-run qwen2_tiny.onnx (graph + verified data file).

    If ``models/qwen2_tiny.onnx.data`` already exists and verifies, the committed graph is used in place. Otherwise
    the graph and its spec are copied into `dest_dir` (default: materialise in ``models/`` itself; the data file is
    git-ignored) and the data file is written there, unless a verified one is already there. Safe to call from
    several processes at once (every file appears by rename).
    """
    if is_materialized(TINY):
        return TINY
    if dest_dir is None:
        materialize(TINY)
        return TINY
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    model = dest / TINY.name
    for src, dst in ((TINY, model), (spec_path(TINY), spec_path(model))):
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            _copy_atomic(src, dst)
    if not is_materialized(model):
        materialize(model)
    return model


# ----------------------------------------------------------------------------------------------------- token ids

def token_arrays(vocab: int, n: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """{"input_ids": int64 [n, seq_len] uniform in [0, vocab), "attention_mask": int64 ones [n, seq_len]}.

    Ids are PCG64 raw words (SeedSequence(seed)) modulo `vocab`, row-major, so the first k rows do not depend on n.
    """
    raw = np.random.PCG64(np.random.SeedSequence(int(seed))).random_raw(n * seq_len)
    ids = (raw % np.uint64(vocab)).astype(np.int64).reshape(n, seq_len)
    return {"input_ids": ids, "attention_mask": np.ones((n, seq_len), np.int64)}


def token_batches(vocab: int, n: int, seq_len: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`n` feeds {"input_ids": int64 [1, seq_len], "attention_mask": int64 ones [1, seq_len]} (see token_arrays)."""
    a = token_arrays(vocab, n, seq_len, seed)
    return [{k: v[i:i + 1] for k, v in a.items()} for i in range(n)]


def write_tokens(path: str | os.PathLike, vocab: int, n: int, seq_len: int, seed: int) -> Path:
    """An .npz for ``--calib``: keys input_ids / attention_mask, int64 [n, seq_len] each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **token_arrays(vocab, n, seq_len, seed))
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate a random-weight LLM test model's data file, or write "
                                             "seeded token ids as an .npz for --calib.")
    ap.add_argument("model", nargs="?", type=Path, help="graph (.onnx) whose <name>.onnx.data is written")
    ap.add_argument("--check", action="store_true", help="only verify the existing data file (exit 1 if wrong)")
    ap.add_argument("--tokens", type=Path, help="write token ids to this .npz instead")
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: the model's, from its weights.json)")
    ap.add_argument("--n", type=int, default=16, help="samples (default 16)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default 128)")
    ap.add_argument("--seed", type=int, default=1, help="token seed (default 1)")
    args = ap.parse_args(argv)

    if args.tokens:
        vocab = args.vocab
        if vocab is None:
            if args.model is None:
                ap.error("--tokens needs --vocab or a model")
            vocab = load_spec(args.model)["config"]["vocab_size"]
        p = write_tokens(args.tokens, vocab, args.n, args.seq_len, args.seed)
        print(f"{p}: input_ids / attention_mask int64 [{args.n}, {args.seq_len}], vocab {vocab}, seed {args.seed}")
        return 0
    if args.model is None:
        ap.error("give a model path or --tokens")
    if args.check:
        ok = is_materialized(args.model)
        print(f"{args.model}: data file {'OK' if ok else 'missing or wrong'}")
        return 0 if ok else 1
    if is_materialized(args.model):
        print(f"{args.model}: data file already present and verified")
        return 0
    data = materialize(args.model)
    print(f"{data}: {data.stat().st_size:,} bytes, sha256 {load_spec(args.model)['sha256']} (verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
