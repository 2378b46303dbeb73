"""The process's BLAS thread count across a pooled kernel call (issue 12): times a 2048^2 float32 GEMM in the main
thread before and after three blocked-kernel calls (N0 = 1024) that run on the row pool, and prints the ratio (about 1.0 when
the call leaves the BLAS threads as it found them; about 2 on 2 cores when it leaves them at one, as the old
save-and-restore race in the pool workers did).

    python tools/bench_blas_threads.py
"""
from __future__ import annotations

import time

import numpy as np

from onnxspfq import kernels as K
from onnxspfq import operators as op


def gemm_seconds(A: np.ndarray, B: np.ndarray, repeats: int = 5) -> float:
    A @ B
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        A @ B
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    rng = np.random.default_rng(0)
    A, B = rng.random((2048, 2048), dtype=np.float32), rng.random((2048, 2048), dtype=np.float32)
    before = gemm_seconds(A, B)
    n = 1024
    W, X = rng.standard_normal((n, n)), rng.standard_normal((4 * n, n))
    scale, bs = op.step_sizes(W, 4, 1.0, "channel", 1)
    for _ in range(3):  # the old race left the count at one in some calls, not all
        K.blocked_phase2(W, X.T @ X, rng.random((n, n)), 1.0, op.stochastic_round, op.grid_params(scale, 4), bs)
    after = gemm_seconds(A, B)
    print(f"2048^2 float32 GEMM: {before:.4f} s before the pooled kernel calls, {after:.4f} s after: "
          f"ratio {after / before:.2f}")


if __name__ == "__main__":
    main()
