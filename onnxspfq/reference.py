"""The reference forms of path following (ALGORITHM.md Section 2, direct on X and X~, and Section 3, the Gram form):
slow, obviously correct, and the oracle the tests hold the production kernels (kernels.py, blocked) to. Same
conventions as kernels.py (its module docstring): rows independent, xi passed in, (Q, V) returned, N:M groups.
Not used by the pipeline.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from onnxspfq.jit import CACHE

from onnxspfq.kernels import _choose, _dot, _f64, _group_arrays

# ----------------------------------------------------------------------------------------------------------------
# Direct form (Section 2): the slow reference, operating on X and X~ explicitly. O(N1 * N0 * m).
# ----------------------------------------------------------------------------------------------------------------

@njit(cache=CACHE)
def _direct_merged(W, XT, XtT, xi, C, T, P, bs, gstart, grp, nkeep):
    N1, N0 = W.shape
    m = XT.shape[1]
    d = np.empty(N0)
    g = np.empty(N0)
    for t in range(N0):
        d[t] = _dot(XtT[t], XtT[t])
        g[t] = _dot(XtT[t], XT[t])
    Q = np.zeros((N1, N0))
    V = np.zeros((N1, N0))
    u = np.empty(m)
    drop = np.zeros(N0, dtype=np.bool_)
    sc = np.empty(grp.shape[1])
    for n in range(N1):
        u[:] = 0.0
        drop[:] = False
        for t in range(N0):
            gs = gstart[t]
            if gs >= 0:
                for k in range(grp.shape[1]):
                    j = grp[gs, k]
                    sc[k] = 0.0 if d[j] == 0.0 else abs((W[n, j] * g[j] + _dot(XtT[j], u) / C) / d[j])
                _choose(sc, grp[gs], nkeep, drop, 0)
            x = XT[t]
            xt = XtT[t]
            w = W[n, t]
            if d[t] == 0.0:
                for i in range(m):
                    u[i] += w * x[i]
                continue
            v = (w * g[t] + _dot(xt, u) / C) / d[t]
            q = 0.0 if drop[t] else T(v, xi[n, t], P[n, t // bs])
            Q[n, t] = q
            V[n, t] = v
            for i in range(m):
                u[i] += w * x[i] - q * xt[i]
    return Q, V


@njit(cache=CACHE)
def _direct_align(W, XT, XtT, passes):
    N1, N0 = W.shape
    m = XT.shape[1]
    d = np.empty(N0)
    g = np.empty(N0)
    for t in range(N0):
        d[t] = _dot(XtT[t], XtT[t])
        g[t] = _dot(XtT[t], XT[t])
    Wt = np.zeros((N1, N0))
    u = np.empty(m)
    for n in range(N1):
        u[:] = 0.0
        for t in range(N0):  # pass 0: the merged loop with T = identity, C = 1
            x = XT[t]
            xt = XtT[t]
            w = W[n, t]
            v = 0.0
            if d[t] != 0.0:
                v = (w * g[t] + _dot(xt, u)) / d[t]
            Wt[n, t] = v
            for i in range(m):
                u[i] += w * x[i] - v * xt[i]
        for _ in range(passes - 1):  # Gauss-Seidel sweeps on min ||X w - X~ w~||, u = X w - X~ w~
            for t in range(N0):
                if d[t] == 0.0:
                    continue
                xt = XtT[t]
                delta = _dot(xt, u) / d[t]
                Wt[n, t] += delta
                for i in range(m):
                    u[i] -= delta * xt[i]
    return Wt


@njit(cache=CACHE)
def _direct_phase2(Wt, XtT, xi, C, T, P, bs, gstart, grp, nkeep):
    N1, N0 = Wt.shape
    m = XtT.shape[1]
    d = np.empty(N0)
    for t in range(N0):
        d[t] = _dot(XtT[t], XtT[t])
    Q = np.zeros((N1, N0))
    V = np.zeros((N1, N0))
    u = np.empty(m)
    drop = np.zeros(N0, dtype=np.bool_)
    sc = np.empty(grp.shape[1])
    for n in range(N1):
        u[:] = 0.0
        drop[:] = False
        for t in range(N0):
            gs = gstart[t]
            if gs >= 0:
                for k in range(grp.shape[1]):
                    j = grp[gs, k]
                    sc[k] = 0.0 if d[j] == 0.0 else abs(Wt[n, j] + _dot(XtT[j], u) / (C * d[j]))
                _choose(sc, grp[gs], nkeep, drop, 0)
            if d[t] == 0.0:
                continue
            xt = XtT[t]
            v = Wt[n, t] + _dot(xt, u) / (C * d[t])
            q = 0.0 if drop[t] else T(v, xi[n, t], P[n, t // bs])
            Q[n, t] = q
            V[n, t] = v
            e = Wt[n, t] - q
            for i in range(m):
                u[i] += e * xt[i]
    return Q, V


def _cols(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(X, dtype=np.float64).T)


def direct_merged(W: np.ndarray, X: np.ndarray, Xt: np.ndarray, xi: np.ndarray, C: float, T, P: np.ndarray,
                  bs: int, groups: np.ndarray | None = None, nkeep: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference merged SPFQ / GPFQ loop on explicit X, X~ (m x N0): returns (Q, V). groups/nkeep: N:M pruning."""
    gstart, grp = _group_arrays(groups, np.shape(W)[1])
    return _direct_merged(_f64(W), _cols(X), _cols(Xt), _f64(xi), float(C), T, _f64(P), int(bs), gstart, grp,
                          int(nkeep))


def direct_align(W: np.ndarray, X: np.ndarray, Xt: np.ndarray, passes: int) -> np.ndarray:
    """Reference phase I on explicit X, X~: pass 0 (merged loop, T = identity) then passes-1 Gauss-Seidel sweeps."""
    return _direct_align(_f64(W), _cols(X), _cols(Xt), int(passes))


def direct_phase2(Wt: np.ndarray, Xt: np.ndarray, xi: np.ndarray, C: float, T, P: np.ndarray,
                  bs: int, groups: np.ndarray | None = None, nkeep: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference phase II (quantize aligned weights W~ with X~ only): returns (Q, V). groups/nkeep: N:M pruning."""
    gstart, grp = _group_arrays(groups, np.shape(Wt)[1])
    return _direct_phase2(_f64(Wt), _cols(Xt), _f64(xi), float(C), T, _f64(P), int(bs), gstart, grp, int(nkeep))


# ----------------------------------------------------------------------------------------------------------------
# Gram form (Section 3), literal transcription, one row per prange iteration. O(N1 * N0^2), memory O(N0^2).
# ----------------------------------------------------------------------------------------------------------------

@njit(parallel=True, cache=CACHE)
def _gram_merged(W, G, H, xi, C, T, P, bs, gstart, grp, nkeep):
    N1, N0 = W.shape
    Q = np.zeros((N1, N0))
    V = np.zeros((N1, N0))
    for n in prange(N1):
        drop = np.zeros(N0, dtype=np.bool_)
        sc = np.empty(grp.shape[1])
        for t in range(N0):
            gs = gstart[t]
            if gs >= 0:
                for k in range(grp.shape[1]):
                    j = grp[gs, k]
                    dj = H[j, j]
                    if dj == 0.0:
                        sc[k] = 0.0
                        continue
                    acc = 0.0
                    for i in range(t):
                        acc += W[n, i] * G[j, i] - Q[n, i] * H[j, i]
                    sc[k] = abs(W[n, j] * G[j, j] / dj + acc / (C * dj))
                _choose(sc, grp[gs], nkeep, drop, 0)
            dt = H[t, t]
            if dt == 0.0:
                continue
            acc = 0.0
            for j in range(t):
                acc += W[n, j] * G[t, j] - Q[n, j] * H[t, j]
            v = W[n, t] * G[t, t] / dt + acc / (C * dt)
            q = 0.0 if drop[t] else T(v, xi[n, t], P[n, t // bs])
            Q[n, t] = q
            V[n, t] = v
    return Q, V


@njit(parallel=True, cache=CACHE)
def _gram_align(W, G, H, passes):
    N1, N0 = W.shape
    Wt = np.zeros((N1, N0))
    for n in prange(N1):
        for t in range(N0):  # pass 0
            dt = H[t, t]
            if dt == 0.0:
                continue
            acc = 0.0
            for j in range(t + 1):
                acc += W[n, j] * G[t, j]
            for j in range(t):
                acc -= Wt[n, j] * H[t, j]
            Wt[n, t] = acc / dt
        if passes > 1:
            gw = np.empty(N0)
            for t in range(N0):
                acc = 0.0
                for j in range(N0):
                    acc += W[n, j] * G[t, j]
                gw[t] = acc
            for _ in range(passes - 1):  # Gauss-Seidel: w~_t = (G[t] w - sum_{j != t} H[t, j] w~_j) / H[t, t]
                for t in range(N0):
                    dt = H[t, t]
                    if dt == 0.0:
                        continue
                    acc = gw[t]
                    for j in range(N0):
                        if j != t:
                            acc -= H[t, j] * Wt[n, j]
                    Wt[n, t] = acc / dt
    return Wt


@njit(parallel=True, cache=CACHE)
def _gram_phase2(Wt, H, xi, C, T, P, bs, gstart, grp, nkeep):
    N1, N0 = Wt.shape
    Q = np.zeros((N1, N0))
    V = np.zeros((N1, N0))
    for n in prange(N1):
        e = np.zeros(N0)
        drop = np.zeros(N0, dtype=np.bool_)
        sc = np.empty(grp.shape[1])
        for t in range(N0):
            gs = gstart[t]
            if gs >= 0:
                for k in range(grp.shape[1]):
                    j = grp[gs, k]
                    dj = H[j, j]
                    if dj == 0.0:
                        sc[k] = 0.0
                        continue
                    acc = 0.0
                    for i in range(t):
                        acc += e[i] * H[j, i]
                    sc[k] = abs(Wt[n, j] + acc / (C * dj))
                _choose(sc, grp[gs], nkeep, drop, 0)
            dt = H[t, t]
            if dt == 0.0:
                continue
            acc = 0.0
            for j in range(t):
                acc += e[j] * H[t, j]
            v = Wt[n, t] + acc / (C * dt)
            q = 0.0 if drop[t] else T(v, xi[n, t], P[n, t // bs])
            Q[n, t] = q
            V[n, t] = v
            e[t] = Wt[n, t] - q
    return Q, V


def gram_merged(W: np.ndarray, G: np.ndarray, H: np.ndarray, xi: np.ndarray, C: float, T, P: np.ndarray,
                bs: int, groups: np.ndarray | None = None, nkeep: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Merged form from the Grams: v_t = w_t G_tt/d_t + (W[:, :t] G[t, :t] - Q[:, :t] H[:t, t]) / (C d_t)."""
    gstart, grp = _group_arrays(groups, np.shape(W)[1])
    return _gram_merged(_f64(W), _f64(G), _f64(H), _f64(xi), float(C), T, _f64(P), int(bs), gstart, grp, int(nkeep))


def gram_align(W: np.ndarray, G: np.ndarray, H: np.ndarray, passes: int) -> np.ndarray:
    """Phase I from the Grams: pass 0 then passes-1 Gauss-Seidel sweeps on H w~ = G w; returns W~."""
    return _gram_align(_f64(W), _f64(G), _f64(H), int(passes))


def gram_phase2(Wt: np.ndarray, H: np.ndarray, xi: np.ndarray, C: float, T, P: np.ndarray,
                bs: int, groups: np.ndarray | None = None, nkeep: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Phase II from the Grams: v_t = w~_t + (E[:, :t] H[:t, t]) / (C d_t), E = W~ - Q."""
    gstart, grp = _group_arrays(groups, np.shape(Wt)[1])
    return _gram_phase2(_f64(Wt), _f64(H), _f64(xi), float(C), T, _f64(P), int(bs), gstart, grp, int(nkeep))


# ----------------------------------------------------------------------------------------------------------------
# im2col (gram.im2col gathers channel-major with kernels.gather_planes): rows-major, one fancy index per offset
# ----------------------------------------------------------------------------------------------------------------
def im2col_reference(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
                     dilations: tuple[int, ...], rows: np.ndarray | None = None) -> np.ndarray:
    """gram.im2col's contract, computed the plain way: (m, C * prod(kernel)), row r = output position rows[r]."""
    from onnxspfq.gram import conv_output_shape

    x = np.asarray(x)
    nd = len(kernel)
    n, c = x.shape[:2]
    out = conv_output_shape(tuple(x.shape[2:]), kernel, strides, pads, dilations)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    rows = np.arange(n * int(np.prod(out))) if rows is None else np.asarray(rows, dtype=np.int64)
    coords = np.unravel_index(rows, (n,) + out)
    kcount = int(np.prod(kernel))
    cols = np.empty((len(rows), c, kcount), dtype=x.dtype)
    for kk, offs in enumerate(np.ndindex(*kernel)):
        idx = tuple(coords[1 + i] * strides[i] + offs[i] * dilations[i] for i in range(nd))
        cols[:, :, kk] = np.moveaxis(xp, 1, -1)[(coords[0],) + idx]
    return cols.reshape(len(rows), c * kcount)
