"""The Numba compile cache: every jitted function of the package is compiled once per install and code version,
not in every process (compiling the kernels took 1-2 s of a 5 s README example here, 13-27 s per run under load).

Numba's own cache is keyed on the defining file and documents that changes in OTHER files a cached function
depends on are not detected (the kernels are passed the operators T of operators.py; reference.py calls helpers of
kernels.py). The cache folder here is keyed on the bytes of every jitted module plus the Numba / NumPy / Python
versions, so any change to any of them starts a fresh folder (tests/test_jit.py edits one operator, and one kernel
helper used from another file, and checks the next process computes with the edit). Import this module before defining jitted
functions (operators.py, kernels.py and reference.py do). ONNXSPFQ_CACHE moves the cache (default
~/.cache/onnxspfq); a folder that cannot be written falls back to the system temp folder.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import numba
import numpy as np
from numba.core import caching

JITTED = ("operators.py", "kernels.py", "reference.py", "jit.py")  # every module with @njit functions


def cache_key() -> str:
    """sha256 (first 16 hex) of the jitted modules' source and the versions their machine code depends on."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in JITTED:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    h.update(f"{numba.__version__} {np.__version__} {sys.version} {sys.platform}".encode())
    return h.hexdigest()[:16]


def _cache_dir() -> str:
    root = Path(os.environ.get("ONNXSPFQ_CACHE") or Path.home() / ".cache" / "onnxspfq")
    for base in (root, Path(tempfile.gettempdir()) / "onnxspfq-cache"):
        folder = base / "numba" / cache_key()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return str(folder)
        except OSError:
            continue
    return ""


def _best_effort(method):
    """A Numba cache read / write that cannot fail a run: the cache only saves time. Why: seen once here, every
    run failed with ReferenceError ("underlying object has vanished", raised while Numba pickled a cache index to
    add an entry) on a cache folder that the test suite (with its SIGTERM-mid-run test) and runs of a second
    checkout had written; clearing the folder cured it, and the state was not reproduced on purpose. A failed
    write leaves that overload uncached; a failed read compiles it."""
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - any cache failure falls back to compiling
            return None
    return guarded


if not getattr(caching.Cache.save_overload, "_onnxspfq", False):
    caching.Cache.save_overload = _best_effort(caching.Cache.save_overload)
    caching.Cache.load_overload = _best_effort(caching.Cache.load_overload)
    caching.Cache.save_overload._onnxspfq = caching.Cache.load_overload._onnxspfq = True

CACHE_DIR = _cache_dir()
if CACHE_DIR:
    numba.config.CACHE_DIR = CACHE_DIR
CACHE = bool(CACHE_DIR)  # the value every @njit(cache=...) of the package takes
