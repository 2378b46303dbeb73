"""Calibration activations held between capture steps: in RAM up to a budget shared by the float and the compressed
frontier, beyond it spilled to .npy files in a temporary folder (read back memory-mapped). Why: the activations of
a whole calibration set at a wide layer are gigabytes, and the capture must stay flat in the calibration size.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np


class Budget:
    """RAM accounting shared by both frontiers; spills to a lazily created temporary folder."""

    def __init__(self, limit_bytes: int, spill_dir: str | None) -> None:
        self.limit = limit_bytes
        self.used = 0
        self.parent = spill_dir
        self.dir: str | None = None
        self.count = 0

    def new_path(self) -> str:
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="onnxspfq-capture-", dir=self.parent)
        self.count += 1
        return os.path.join(self.dir, f"t{self.count}.npy")


class Held:
    """One frontier array, in RAM or spilled to disk; shared between frontiers by reference, freed with it."""

    def __init__(self, arr: np.ndarray, budget: Budget | None) -> None:
        self.path: str | None = None
        self.ram = 0
        self.budget = budget
        self.arr: np.ndarray | None = arr
        if budget is None:  # a calibration batch array: owned by the caller, not counted
            return
        if budget.used + arr.nbytes > budget.limit:
            self.path = budget.new_path()
            np.save(self.path, arr)
            self.arr = None
        else:
            self.ram = arr.nbytes
            budget.used += arr.nbytes

    def get(self) -> np.ndarray:
        return self.arr if self.arr is not None else np.load(self.path, mmap_mode="r")

    def __del__(self) -> None:
        if self.budget is not None:
            self.budget.used -= self.ram
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def cleanup(budget: Budget) -> None:
    if budget.dir is not None:
        shutil.rmtree(budget.dir, ignore_errors=True)
        budget.dir = None
