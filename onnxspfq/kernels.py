"""Production path-following kernels (ALGORITHM.md Section 3): the blocked Gram form and blocked GPTQ. The slow
reference forms they are tested against (Section 2 direct, Section 3 unblocked) are reference.py.

All kernels quantize the rows of W (row n = output neuron n) independently, so rows are split into tasks that a
pool of threads runs (_over_rows), and the result does not depend on the number of threads. Randomness is NOT drawn here: the caller
passes `xi` (N1, N0) uniform draws, one per (neuron, t), and the operator `T(v, xi, p)` (see operators.py)
with its parameter rows `P` (N1, nblocks, nparams); column t of row n uses `P[n, t // bs]`.

Every quantizing kernel returns `(Q, V)`: Q the quantized values, V the targets v_t fed to T (so callers can
measure clipping and tests can compare forms on v). Columns with ||X~_t|| = 0 (d[t] = 0) get q = 0, v = 0.

H = X~^T X~ must be symmetric (as every Gram is); G[t, j] = <X~_t, X_j> is not.

N:M pruning inside the path following (every quantizing kernel takes `groups` (n_groups, M) int column indices
and `nkeep` = N; groups must be disjoint, columns in no group are unconstrained). Definition, identical in all
forms: when the loop reaches a group's FIRST column tau (smallest index), every member j gets the score
    s_j = v_j(tau) = the target T would see if column j were processed now, with the error state u_{tau-1}:
    merged:  (w_j <X~_j, X_j> + <X~_j, u_{tau-1}> / C) / ||X~_j||^2,   phase II:  w~_j + <X~_j, u_{tau-1}> / (C ||X~_j||^2)
(s_j = 0 for a dead column). The N members with the largest |s_j| are kept (ties: the lower column index), the
others get q = 0 when they are reached (their v is still computed and reported), and the columns processed in
between and after correct the error as usual. GPTQ uses the same rule with SparseGPT's score |w_j| / U[j, j] on
the error-updated weights. The blocked kernels place their block boundaries so no group straddles a boundary.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The blocked kernels alternate OpenBLAS GEMMs and Numba parallel loops. With libgomp's default active waiting,
# idle OpenMP workers spin between parallel regions and starve the BLAS threads (measured 4x slower blocked
# kernels on 2 cores). Passive waiting fixes it; setdefault keeps any value the user set. It only takes effect
# if no OpenMP runtime was started in this process before this module is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from numba import get_num_threads, njit, prange  # noqa: E402

from onnxspfq.jit import CACHE  # noqa: E402

DEFAULT_BLOCK = 256  # columns per cross-block GEMM update (GPTQ)
DEFAULT_PF_BLOCK = 128  # columns per block of the path-following engine (128 vs 256: within noise, 128 a bit faster)
DEFAULT_INNER = 32  # columns per sequential Numba sweep inside a block


@njit(cache=CACHE, inline="always")
def _dot(a, b):
    # plain loop: numba's np.dot needs scipy's BLAS, which is not a dependency
    acc = 0.0
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


def _group_arrays(groups, n0: int) -> tuple[np.ndarray, np.ndarray]:
    """(gstart, grp): gstart[t] = index of the group whose first column is t, else -1; grp rows sorted ascending."""
    gstart = np.full(n0, -1, dtype=np.int64)
    if groups is None:
        return gstart, np.zeros((0, 1), dtype=np.int64)
    grp = np.sort(np.asarray(groups, dtype=np.int64).reshape(len(groups), -1), axis=1)
    if grp.size and (grp.min() < 0 or grp.max() >= n0 or np.unique(grp).size != grp.size):
        raise ValueError("N:M groups must be disjoint column indices in [0, N0)")
    gstart[grp[:, 0]] = np.arange(grp.shape[0])
    return gstart, np.ascontiguousarray(grp)


def _next_cut(n0: int, grp: np.ndarray) -> np.ndarray:
    """nxt[t] = smallest t' >= t (t' <= n0) such that no group has columns on both sides of t'."""
    forbid = np.zeros(n0 + 2, dtype=np.int64)
    if grp.shape[0]:
        np.add.at(forbid, grp[:, 0] + 1, 1)
        np.add.at(forbid, grp[:, -1] + 1, -1)
    bad = np.cumsum(forbid)[: n0 + 1] > 0  # bad[t]: a cut before column t splits a group
    nxt = np.empty(n0 + 1, dtype=np.int64)
    nxt[n0] = n0
    for t in range(n0 - 1, -1, -1):
        nxt[t] = nxt[t + 1] if bad[t] else t
    return nxt


@njit(cache=CACHE)
def _choose(sc, row, nkeep, drop, off):
    """Mark drop[row[k] - off] for all but the nkeep largest sc[k] (ties: lower k); sc is overwritten."""
    M = row.shape[0]
    for k in range(M):
        drop[row[k] - off] = True
    for _ in range(min(nkeep, M)):
        best = -1
        bv = -1.0
        for k in range(M):
            if sc[k] > bv:
                bv = sc[k]
                best = k
        drop[row[best] - off] = False
        sc[best] = -2.0


# ----------------------------------------------------------------------------------------------------------------
# Blocked ("lazy") Gram form: sequential work inside a block of columns, cross-block corrections as GEMMs.
# One engine serves phase II, the merged form and the alignment sweeps:
#   v[:, t] = A0[:, t] + (R[:, t] + sum_{b0 <= j < t} (E[:, j] H[j, t] + W[:, j] G[t, j])) / s[t],   Q[:, t] = T(v),
#   E[:, t] = B[:, t] - Q[:, t]   (the W G term only in the merged form; B = 0 there, so E = -Q).
# Left-looking: before block [b0, b1) ONE GEMM gathers everything the earlier blocks owe it,
#   R[:, b0:b1] = E[:, :b0] @ H[:b0, b0:b1]  (+ W[:, :b0] @ G[b0:b1, :b0].T, merged),
# written straight into a reused (rows, nb) buffer (no (N1, N0) temporaries, no strided += over the trailing
# columns). Inside the block a Numba sweep runs each row sequentially and applies every finished column's
# correction to the rest of the block as a contiguous axpy (SIMD along the block, H's block rows stay in cache).
# Rows are independent, so the rows are split into one chunk per thread and each thread runs the WHOLE blocked
# loop (its GEMMs with a single-threaded BLAS, its sweeps) on its own rows: no barrier between GEMM and sweep,
# and no idle BLAS / OpenMP workers spinning against the sweep (alternating a threaded GEMM with a Numba
# parallel loop measured ~1.5-2x slower on 2 cores). Every row's arithmetic is the same for any chunking.
# ----------------------------------------------------------------------------------------------------------------

@njit(nogil=True, cache=CACHE)
def _sweep_block(A0, B, hasB, Rb, H, merged, Wm, Gm, s, xi, T, P, bs, b0, b1, Q, V, Z, gstart, grp, nkeep):
    # Rows here are one chunk's rows. Rb[n, k]: correction numerator of column b0 + k from all E columns < b0
    # (and, merged, from ALL W columns < b0 + k, the in-block ones included: W is known up front), updated in
    # place by the E terms as row n advances, so at column t Rb[n, t - b0] holds exactly <X~_t, u_{t-1}>.
    # N:M: groups never straddle [b0, b1) (see _next_cut), so the score of member j at tau is A0 + Rb[n, j]/s[j],
    # minus (merged) the W G terms of the columns tau <= i < j not reached yet.
    N1 = A0.shape[0]
    nb = b1 - b0
    hasg = grp.shape[0] > 0
    pcol = np.empty(nb, dtype=np.int64)  # t // bs, hoisted out of the row loop (integer division is slow)
    for i in range(nb):
        pcol[i] = (b0 + i) // bs
    drop = np.zeros(nb, dtype=np.bool_)
    sc = np.empty(grp.shape[1])
    for n in range(N1):
        r = Rb[n]
        if hasg:
            drop[:] = False
        for i in range(nb):
            t = b0 + i
            if hasg:
                gs = gstart[t]
                if gs >= 0:
                    for k in range(grp.shape[1]):
                        j = grp[gs, k]
                        if s[j] == 0.0:
                            sc[k] = 0.0
                            continue
                        rj = r[j - b0]
                        if merged:
                            for i2 in range(t, j):
                                rj -= Wm[n, i2] * Gm[j, i2]
                        sc[k] = abs(A0[n, j] + rj / s[j])
                    _choose(sc, grp[gs], nkeep, drop, b0)
            st = s[t]
            if st == 0.0:  # dead column: H[t, :] = 0, so nothing to propagate
                Q[n, t] = 0.0
                V[n, t] = 0.0
                Z[n, t] = 0.0
                continue
            v = A0[n, t] + r[i] / st
            q = 0.0 if (hasg and drop[i]) else T(v, xi[n, t], P[n, pcol[i]])
            Q[n, t] = q
            V[n, t] = v
            e = (B[n, t] - q) if hasB else -q
            Z[n, t] = e
            # axpy along the row of H over sliced views (0-based loop indices: no wraparound checks, so LLVM
            # vectorizes it; indexing h[b0 + k] directly measured 3-4x slower, scalar code)
            rr = r[i + 1:]
            h = H[t, t + 1:b1]
            for k in range(rr.shape[0]):
                rr[k] += e * h[k]


def _bounds(N0: int, block: int, nxt: np.ndarray) -> list[tuple[int, int]]:
    out = []
    b0 = 0
    while b0 < N0:
        b1 = int(nxt[min(b0 + block, N0)])
        out.append((b0, b1))
        b0 = b1
    return out


@functools.lru_cache(maxsize=1)
def _blas_local_threads():
    """OpenBLAS's openblas_set_num_threads_local (thread count for the CALLING thread only) from numpy's bundled
    OpenBLAS, or None when it cannot be found (then chunks still run correctly, only BLAS may oversubscribe)."""
    import ctypes
    import glob

    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*.so*"))):
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


# Rows per task of the row scheduler. Tasks are pulled by whichever pool thread is free, and their boundaries do not
# depend on the thread count, so neither do the bytes. (Against one fixed chunk per thread this measured no change
# beside one competing busy process, where the OS shares the cores evenly; it guards against a straggler thread.)
TASK_ROWS = 128


def _tasks(N1: int) -> list[tuple[int, int]]:
    return [(r, min(r + TASK_ROWS, N1)) for r in range(0, N1, TASK_ROWS)]


_POOL: list = [None, 0]  # the one worker pool and its size (rebuilt when numba's thread count changes)


def _pool() -> ThreadPoolExecutor:
    n = get_num_threads()
    if _POOL[0] is None or _POOL[1] != n:
        if _POOL[0] is not None:
            _POOL[0].shutdown(wait=False)
        _POOL[0] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="onnxspfq-rows")
        _POOL[1] = n
    return _POOL[0]


def _over_rows(work, N1: int) -> None:
    """work(r0, r1) over the row tasks of N1 rows: in this thread (BLAS keeps its own threads) when there is one
    task or one thread, else on the pool with one BLAS thread each (the pool is the parallelism).

    openblas_set_num_threads_local acts process-wide in numpy's OpenBLAS (measured: a pool thread setting 1 made
    the main thread's GEMMs single-threaded, 0.16 s instead of 0.085 s at 2048^2), and two workers each saving and
    restoring it raced, leaving every later BLAS call of the run on one thread. So it is set and restored here,
    once per call, by the calling thread."""
    tasks = _tasks(N1)
    if len(tasks) == 1 or get_num_threads() == 1:
        for r0, r1 in tasks:
            work(r0, r1)
        return
    setter = _blas_local_threads()
    old = setter(1) if setter is not None else None
    try:
        for f in [_pool().submit(work, r0, r1) for r0, r1 in tasks]:
            f.result()
    finally:
        if setter is not None:
            setter(old)


@njit(parallel=True, cache=CACHE)
def _tril_cast(G, out):
    """out[t, j] = G[t, j] for j < t, else 0 (out may be float32): one parallel pass, no temporaries."""
    N = G.shape[0]
    for t in prange(N):
        for j in range(t):
            out[t, j] = G[t, j]
        for j in range(t, N):
            out[t, j] = 0.0


@njit(parallel=True, cache=CACHE)
def gather_planes(flat, plane, pos, out):
    """out[c, k, r] = flat[c * plane + pos[k, r]]: gram.im2col's gather, channels in parallel, without the
    (channels, offsets, rows) index array np.take would need (the largest share of a cProfile of an
    EfficientNet-Lite0 run with np.take)."""
    C, K, R = out.shape
    for c in prange(C):
        off = c * plane
        for k in range(K):
            for r in range(R):
                out[c, k, r] = flat[off + pos[k, r]]


@njit(parallel=True, cache=CACHE)
def _scale_cols(W, ratio):
    """W * ratio[None, :] in one parallel pass."""
    out = np.empty_like(W)
    for i in prange(W.shape[0]):
        for j in range(W.shape[1]):
            out[i, j] = W[i, j] * ratio[j]
    return out


# Below this many elements the one-pass helpers run in numpy, same values: a parallel Numba launch costs ~70 us,
# and EfficientNet-Lite0's depthwise Convs make 44,555 kernel calls on 1 x 9 problems (6.5 s of launches).
SMALL = 1 << 14


def _tril_of(G: np.ndarray, gd: np.dtype) -> np.ndarray:
    if G.size < SMALL:
        return np.tril(G, -1).astype(gd)
    out = np.empty(G.shape, dtype=gd)
    _tril_cast(G, out)
    return out


def _cols_scaled(W: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    return W * ratio[None, :] if W.size < SMALL else _scale_cols(W, ratio)


def _blocked(A0, B, H, s, xi, T, P, bs, block, gemm_dtype, W=None, G=None, R0=None, groups=None, nkeep=0):
    """Run the engine over all blocks (see the section comment). B None: E = -Q. W, G given: merged form.
    R0 (N1, N0), optional: an extra correction added to every column (alignment sweeps).
    With N:M groups, block ends move forward to the next column where no group is split."""
    N1, N0 = A0.shape
    gd = np.dtype(gemm_dtype)
    gstart, grp = _group_arrays(groups, N0)
    e = _Engine(A0=A0, B=B, H=H, s=s, xi=xi, T=T, P=P, bs=bs, W=W, G=G, R0=R0, gstart=gstart, grp=grp,
                nkeep=int(nkeep), gd=gd, bounds=_bounds(N0, max(1, int(block)), _next_cut(N0, grp)))
    e.Q, e.V, e.Z = np.empty((N1, N0)), np.empty((N1, N0)), np.empty((N1, N0), dtype=gd)  # Z: E in the GEMM dtype
    e.Hg = H.astype(np.float32) if gd == np.float32 else H
    # Gl = strictly lower part of G: the whole W G term (in-block part included) is the GEMM W @ Gl.T, which
    # BLAS reads transposed in place (an explicit transposed copy cost ~10% of the merged kernel)
    if G is not None:
        e.Gl = _tril_of(G, gd)
    _over_rows(e.rows, N1)
    return e.Q, e.V


@dataclass
class _Engine:
    """One blocked path-following call: its operands and outputs; rows(r0, r1) runs rows r0..r1 over all blocks."""

    A0: np.ndarray
    B: np.ndarray | None
    H: np.ndarray
    s: np.ndarray
    xi: np.ndarray
    T: object
    P: np.ndarray
    bs: int
    W: np.ndarray | None
    G: np.ndarray | None
    R0: np.ndarray | None
    gstart: np.ndarray
    grp: np.ndarray
    nkeep: int
    gd: np.dtype
    bounds: list
    Q: np.ndarray = None
    V: np.ndarray = None
    Z: np.ndarray = None
    Hg: np.ndarray = None
    Gl: np.ndarray = None

    def rows(self, r0: int, r1: int) -> None:
        merged, f32, B, dummy = self.G is not None, self.gd == np.float32, self.B, np.zeros((1, 1))
        Qc, Vc, Zc = self.Q[r0:r1], self.V[r0:r1], self.Z[r0:r1]
        Qc.fill(0.0)  # first touch by the thread that writes these rows (page faults off the sweep)
        Vc.fill(0.0)
        Zc.fill(0.0)
        nr = r1 - r0
        A0c, xic, Pc = self.A0[r0:r1], self.xi[r0:r1], self.P[r0:r1]
        Bc = B[r0:r1] if B is not None else dummy
        Wc = self.W[r0:r1] if merged else dummy
        Wgc = (Wc.astype(np.float32) if f32 else Wc) if merged else None
        maxnb = max((b1 - b0 for b0, b1 in self.bounds), default=1)
        rbuf = np.empty(nr * maxnb)
        tbuf = np.empty(nr * maxnb, dtype=self.gd) if (merged or f32) else None
        cbuf = np.empty(nr * maxnb, dtype=self.gd) if f32 else None
        for b0, b1 in self.bounds:
            nb = b1 - b0
            Rb = rbuf[: nr * nb].reshape(nr, nb)
            out = cbuf[: nr * nb].reshape(nr, nb) if f32 else Rb
            if b0 == 0:
                out.fill(0.0)
            else:
                np.matmul(Zc[:, :b0], self.Hg[:b0, b0:b1], out=out)
            if merged:
                Tb = tbuf[: nr * nb].reshape(nr, nb)
                np.matmul(Wgc[:, :b1], self.Gl[b0:b1, :b1].T, out=Tb)
                out += Tb
            if f32:
                Rb[...] = out
            if self.R0 is not None:
                Rb += self.R0[r0:r1, b0:b1]
            _sweep_block(A0c, Bc, B is not None, Rb, self.H, merged, Wc, self.G if merged else dummy, self.s, xic,
                         self.T, Pc, self.bs, b0, b1, Qc, Vc, Zc, self.gstart, self.grp, self.nkeep)


def _scaled_diag(H: np.ndarray, C: float) -> np.ndarray:
    return np.ascontiguousarray(C * np.diag(H))


def blocked_phase2(Wt: np.ndarray, H: np.ndarray, xi: np.ndarray, C: float, T, P: np.ndarray, bs: int,
                   block: int = DEFAULT_PF_BLOCK, gemm_dtype=np.float64, inner: int = DEFAULT_INNER,
                   groups: np.ndarray | None = None, nkeep: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Phase II, blocked: equal to gram_phase2 up to summation order; cross-block updates run as GEMM.

    gemm_dtype=np.float32 runs the cross-block GEMMs in float32 (faster; corrections then carry ~1e-7 relative
    error, so rare rounding decisions may differ from the float64 forms: not the exact default).
    `inner` is accepted for compatibility and ignored (the in-block work is one Numba sweep per block).
    """
    Wt, H = _f64(Wt), _f64(H)
    return _blocked(Wt, Wt, H, _scaled_diag(H, C), _f64(xi), T, _f64(P), int(bs), int(block), gemm_dtype,
                    groups=groups, nkeep=nkeep)


def blocked_merged(W: np.ndarray, G: np.ndarray, H: np.ndarray, xi: np.ndarray, C: float, T, P: np.ndarray,
                   bs: int, block: int = DEFAULT_PF_BLOCK, gemm_dtype=np.float64, inner: int = DEFAULT_INNER,
                   groups: np.ndarray | None = None, nkeep: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Merged form, blocked (X~ != X): twice the GEMM work of phase II (the W G part and the Q H part).
    gemm_dtype and inner: as in blocked_phase2."""
    W, G, H = _f64(W), _f64(G), _f64(H)
    d = np.diag(H)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d != 0, np.diag(G) / np.where(d != 0, d, 1.0), 0.0)
    A0 = _cols_scaled(W, np.ascontiguousarray(ratio))
    return _blocked(A0, None, H, _scaled_diag(H, C), _f64(xi), T, _f64(P), int(bs), int(block), gemm_dtype,
                    W=W, G=G, groups=groups, nkeep=nkeep)


def blocked_align(W: np.ndarray, G: np.ndarray, H: np.ndarray, passes: int, block: int = DEFAULT_PF_BLOCK,
                  gemm_dtype=np.float64, inner: int = DEFAULT_INNER) -> np.ndarray:
    """Phase I, blocked: pass 0 = blocked merged form with T = identity, C = 1; then Gauss-Seidel sweeps."""
    from onnxspfq.operators import identity

    W, G, H = _f64(W), _f64(G), _f64(H)
    N1, N0 = W.shape
    xi = np.zeros((N1, N0))
    P = np.zeros((N1, 1, 1))
    Wt, _ = blocked_merged(W, G, H, xi, 1.0, identity, P, max(N0, 1), block, gemm_dtype, inner)
    if passes > 1:
        gw = W @ G.T  # gw[n, t] = G[t, :] . w_n
        s = _scaled_diag(H, 1.0)
        zeros = np.zeros_like(W)
        upper = np.triu(H, 1).T
        for _ in range(passes - 1):
            R = gw - Wt @ upper  # sum_{j > t} H[t, j] w~_j (old values)
            Wt, _ = _blocked(zeros, None, H, s, xi, identity, P, max(N0, 1), int(block), gemm_dtype, R0=R)
    return Wt


# ----------------------------------------------------------------------------------------------------------------
# GPTQ / OPTQ (Frantar et al.): nearest (or any T) with H^-1 error feedback, lazy blocked updates.
# ----------------------------------------------------------------------------------------------------------------

@njit(nogil=True, cache=CACHE)
def _gptq_block(W, U, live, xi, T, P, bs, b0, b1, Q, V, Err, gstart, grp, nkeep):
    # the rows of one row task (kernels run rows independently; the pool runs the tasks)
    N1 = W.shape[0]
    nb = b1 - b0
    for n in range(N1):
        drop = np.zeros(nb, dtype=np.bool_)
        sc = np.empty(grp.shape[1])
        for i in range(nb):
            t = b0 + i
            gs = gstart[t]
            if gs >= 0:  # SparseGPT's N:M score on the error-updated weights: |w_j| / U[j, j]
                for k in range(grp.shape[1]):
                    j = grp[gs, k]
                    sc[k] = abs(W[n, j]) / U[j, j] if live[j] else 0.0
                _choose(sc, grp[gs], nkeep, drop, b0)
            w = W[n, t]
            q = T(w, xi[n, t], P[n, t // bs]) if (live[t] and not drop[i]) else 0.0
            Q[n, t] = q
            V[n, t] = w
            e = (w - q) / U[t, t]
            Err[n, t] = e
            for k in range(i + 1, nb):
                W[n, b0 + k] -= e * U[t, b0 + k]


def gptq_blocked(W: np.ndarray, U: np.ndarray, live: np.ndarray, xi: np.ndarray, T, P: np.ndarray, bs: int,
                 block: int = DEFAULT_BLOCK, inner: int = DEFAULT_INNER, groups: np.ndarray | None = None,
                 nkeep: int = 0, gemm_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ with U = upper Cholesky factor of (damped H)^-1; `live` marks columns with d > 0 (others q = 0).

    Two-level blocking: sequential Numba sweeps over `inner` columns, small
    GEMMs inside a `block`, one large GEMM per block for the remaining columns. gemm_dtype=np.float32 runs that
    large GEMM (most of the flops) in float32, as GPTQ's reference code runs all of it: the later columns' targets
    then carry ~1e-7 relative error, so a rare rounding decision differs from the float64 form.
    """
    W = np.array(W, dtype=np.float64, copy=True)
    U = _f64(U)
    f32 = np.dtype(gemm_dtype) == np.float32
    Ug = U.astype(np.float32) if f32 else U
    N1, N0 = W.shape
    inner = max(1, min(int(inner), int(block)))
    Q, V, Err = _touched((N1, N0)), _touched((N1, N0)), _touched((N1, N0))
    live = np.ascontiguousarray(live, dtype=np.bool_)
    xi, P = _f64(xi), _f64(P)
    gstart, grp = _group_arrays(groups, N0)
    nxt = _next_cut(N0, grp)

    def rows(r0: int, r1: int) -> None:
        Wr, Qr, Vr, Er, xr, Pr = W[r0:r1], Q[r0:r1], V[r0:r1], Err[r0:r1], xi[r0:r1], P[r0:r1]
        b0 = 0
        while b0 < N0:
            b1 = int(nxt[min(b0 + block, N0)])
            s0 = b0
            while s0 < b1:
                s1 = min(int(nxt[min(s0 + inner, N0)]), b1)
                _gptq_block(Wr, U, live, xr, T, Pr, int(bs), s0, s1, Qr, Vr, Er, gstart, grp, int(nkeep))
                if s1 < b1:
                    Wr[:, s1:b1] -= Er[:, s0:s1] @ U[s0:s1, s1:b1]
                s0 = s1
            if b1 < N0:
                Wr[:, b1:] -= (Er[:, b0:b1].astype(np.float32) if f32 else Er[:, b0:b1]) @ Ug[b0:b1, b1:]
            b0 = b1

    _over_rows(rows, N1)
    return Q, V


def gptq_rows(W: np.ndarray, U: np.ndarray, live: np.ndarray, xi: np.ndarray, T, P: np.ndarray,
              bs: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ with one factor per row: row n runs with U[n] (N1, N0, N0) and live[n] (N1, N0), one sequential sweep
    over its columns (Grams.stack: a depthwise Conv's one-row groups, N0 = 9 or 25, so no blocking). Row n equals
    gptq_blocked on that row alone with U[n] (tests/test_kernels.py)."""
    W = np.array(W, dtype=np.float64, copy=True)
    U, live = _f64(U), np.ascontiguousarray(live, dtype=np.bool_)
    N1, N0 = W.shape
    Q, V, Err = np.zeros((N1, N0)), np.zeros((N1, N0)), np.zeros((N1, N0))
    xi, P = _f64(xi), _f64(P)
    gstart, grp = _group_arrays(None, N0)
    for n in range(N1):
        r = slice(n, n + 1)
        _gptq_block(W[r], U[n], live[n], xi[r], T, P[r], int(bs), 0, N0, Q[r], V[r], Err[r], gstart, grp, 0)
    return Q, V


def _touched(shape, dtype=np.float64) -> np.ndarray:
    """A zero array whose pages are already mapped. Lazily mapped pages (np.empty / np.zeros of large arrays)
    made every column-slice sweep pay page faults inside the parallel loop (measured ~10x slower sweeps)."""
    a = np.empty(shape, dtype=dtype)
    a.fill(0.0)
    return a


def _f64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)
