"""Kernel throughput vs a numpy float32 GEMM of the same flop count (a script, not a test).

For N0 = N1 in SIZES and m = 4 * N0 it times each kernel on random data and prints, per kernel: seconds,
GFLOP/s counted as N1 * N0^2 "flops" (one multiply-add per (neuron, t, j), the path-following work), and the
ratio t_gemm / t_kernel where t_gemm is (N1 x N0) @ (N0 x N0) in float32 measured in the same run (counted
with the same N1 * N0^2 convention, so the ratio is a plain time ratio). Best of REPEATS runs, after a warm-up
call that also compiles the Numba kernels; the reference GEMM is timed before AND after the kernels of a size
and the best of both is used, so a noisy (shared) machine cannot flatter the ratio.

Usage:  python tools/bench_kernels.py [--sizes 256 1024 2048] [--out docs/RESULTS_kernels.md]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from contextlib import redirect_stdout

import numba
import numpy as np

from onnxspfq import kernels as K
from onnxspfq import reference as R
from onnxspfq import operators as op

REPEATS = 5
DIRECT_MAX_N0 = 256  # the direct form is O(N1 N0 m) = O(4 N0^3) with m = 4 N0 and serial: only at small sizes
UNBLOCKED_MAX_N0 = 2048


def _best(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up (and Numba compile)
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(n: int) -> list[tuple[str, float | None, str]]:
    rng = np.random.default_rng(0)
    m = 4 * n
    X = rng.standard_normal((m, n))
    Xt = X + 0.1 * rng.standard_normal((m, n))
    W = rng.standard_normal((n, n))
    xi = rng.random((n, n))
    t0 = time.perf_counter()
    H, G = Xt.T @ Xt, Xt.T @ X
    t_gram = time.perf_counter() - t0
    scale, bs = op.step_sizes(W, 4, 1.0, "channel", 1)
    P = op.grid_params(scale, 4)
    T = op.stochastic_round
    A32, B32 = W.astype(np.float32), H.astype(np.float32)
    A64 = W.copy()
    # GPTQ factor (setup, not timed as kernel work)
    Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(n)
    Li = np.linalg.inv(np.linalg.cholesky(Hd))
    U = np.ascontiguousarray(np.linalg.cholesky(Li.T @ Li).T)
    live = np.ones(n, dtype=bool)
    rows: list[tuple[str, float | None, str]] = []
    t_gemm = _best(lambda: A32 @ B32)
    rows.append(("numpy GEMM float32 (reference)", t_gemm, ""))
    rows.append(("numpy GEMM float64", _best(lambda: A64 @ H), ""))
    rows.append(("blocked Gram phase II, f64 GEMM (SPFQ X~=X)", _best(lambda: K.blocked_phase2(W, H, xi, 1.0, T, P, bs)), ""))
    rows.append(("blocked Gram phase II, f32 GEMM", _best(lambda: K.blocked_phase2(W, H, xi, 1.0, T, P, bs, gemm_dtype=np.float32)), ""))
    rows.append(("blocked Gram merged, f64 GEMM (SPFQ X~!=X)", _best(lambda: K.blocked_merged(W, G, H, xi, 1.0, T, P, bs)), ""))
    rows.append(("blocked Gram merged, f32 GEMM", _best(lambda: K.blocked_merged(W, G, H, xi, 1.0, T, P, bs, gemm_dtype=np.float32)), ""))
    rows.append(("blocked phase I, order 2 (f64)", _best(lambda: K.blocked_align(W, G, H, 2)), "2 passes"))
    rows.append(("GPTQ blocked (f64)", _best(lambda: K.gptq_blocked(W, U, live, xi, op.nearest_round, P, bs)), ""))
    rows.append(("GPTQ blocked, f32 GEMM", _best(lambda: K.gptq_blocked(W, U, live, xi, op.nearest_round, P, bs,
                                                                        gemm_dtype=np.float32)), ""))
    if n <= UNBLOCKED_MAX_N0:
        r = 1 if n >= 1024 else REPEATS
        rows.append(("Gram phase II, unblocked (numba)", _best(lambda: R.gram_phase2(W, H, xi, 1.0, T, P, bs), r), ""))
        rows.append(("Gram merged, unblocked (numba)", _best(lambda: R.gram_merged(W, G, H, xi, 1.0, T, P, bs), r), ""))
    if n <= DIRECT_MAX_N0:
        rows.append(("direct merged (reference, serial, O(N1 N0 m))", _best(lambda: R.direct_merged(W, X, Xt, xi, 1.0, T, P, bs), 1), f"m={m}"))
    else:
        rows.append(("direct merged (reference)", None, f"skipped: O(N1 N0 m) serial, too slow at N0={n}"))
    rows.append(("Gram build H, G from X, X~ (not path following)", t_gram, f"m={m}, 2 GEMMs f64"))
    rows[0] = (rows[0][0], min(t_gemm, _best(lambda: A32 @ B32)), "best of timings before and after the kernels")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    args = ap.parse_args(argv)
    lines = ["# Kernel throughput (tools/bench_kernels.py)", "",
             f"Command: `python tools/bench_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"numba {numba.__version__} ({numba.get_num_threads()} threads), numpy {np.__version__}; "
             f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}, "
             f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}; "
             f"load average before: {os.getloadavg()[0]:.2f}", "",
             "GFLOP/s counts N1*N0^2 flops for every row; ratio = t(float32 GEMM (N1xN0)@(N0xN0)) / t(kernel).", ""]
    print("\n".join(lines), flush=True)
    table = ["| N0=N1 | kernel | time s | GFLOP/s | ratio to f32 GEMM | note |", "|---|---|---|---|---|---|"]
    print("\n".join(table), flush=True)
    for n in args.sizes:
        rows = bench(n)
        t_gemm = rows[0][1]
        for name, t, note in rows:
            if t is None:
                row = f"| {n} | {name} | - | - | - | {note} |"
            else:
                row = f"| {n} | {name} | {t:.4f} | {n ** 3 / t / 1e9:.2f} | {t_gemm / t:.3f} | {note} |"
            table.append(row)
            print(row, flush=True)
    lines += table
    lines += ["", f"Load average after: {os.getloadavg()[0]:.2f}", "", "BLAS (np.show_config):", "", "```"]
    buf = io.StringIO()
    with redirect_stdout(buf):
        np.show_config()
    blas = [ln for ln in buf.getvalue().splitlines() if "openblas configuration" in ln.lower() or '"name"' in ln]
    lines += [ln.strip() for ln in blas] + ["```"]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
