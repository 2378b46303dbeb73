"""Per-layer quantization methods, all with ONE signature: (W, stats, config, rng) -> (Q, LayerResult).

W (N1, N0): row n = output neuron n. stats: onnxspfq.gram.Grams. config: onnxspfq.config.QuantConfig.
rng: np.random.Generator (all randomness of a call is drawn from it up front, one uniform per (neuron, t),
so the same seed and inputs give bit-identical Q on any number of threads).

- spfq: stochastic path following (config.operator, C, order, perfect_alignment honored).
- gpfq: deterministic path following (nearest T, C = 1, merged form); ignores operator / C / order.
- gptq: OPTQ with damping config.damp and blocked lazy updates (nearest T). When X~ != X it quantizes the
        least-squares aligned weights W~ = (H + eps I)^-1 G w, since ||Xw - X~q||^2 = ||Xw - X~w~||^2 + ||X~(w~-q)||^2.
- rtn:  round to nearest on the same grid (data-free; the Grams are used only for the error report).

Step sizes: operators.step_sizes (delta = c_alpha * max|w| / K per channel / layer / block; 1-bit: a = c_alpha *
max|w|). With config.c_alpha = None each method tries a small candidate set (CANDIDATES) and keeps the one with
the smallest exact Gram reconstruction error ||XW^T - X~Q^T||^2 summed over at most SEARCH_ROWS evenly spaced
rows, running the method itself (same xi rows) on that subset; then it runs the full layer once with the winner
(layers with N1 <= SEARCH_ROWS are searched on all rows and the winning run is kept, no rerun).
Zero-norm input columns (d[t] = 0) get q = 0 in the data-aware methods; for 1-bit, where 0 is not a code, they get
code +1 (the value of such a weight does not change the layer output on the calibration data).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from onnxspfq import kernels
from onnxspfq.config import QuantConfig
from onnxspfq.errors import OnnxspfqError
from onnxspfq.gram import Grams
from onnxspfq.operators import grid_params, levels, select_operator, step_sizes

SEARCH_ROWS = 64
CANDIDATES = {
    8: (1.0, 0.9, 0.8),
    4: (1.0, 0.9, 0.8, 0.7, 0.6),
    3: (1.0, 0.85, 0.7, 0.6, 0.5),
    2: (0.8, 0.65, 0.5, 0.4, 0.3),
}
CANDIDATES_BINARY_STOCHASTIC = (1.0, 1.25, 1.5, 2.0)  # unbiasedness of (b) needs a >= max|v|, so c >= 1
CANDIDATES_BINARY_NEAREST = (0.3, 0.45, 0.6, 0.8, 1.0)


@dataclass
class LayerResult:
    """What a method reports for one weight matrix.

    codes: int8 (N1, N0) integer codes ({-K..K}, or {-1, +1} for 1-bit).
    scale: float64 (N1, nblocks) step per row and block (nblocks = 1 unless granularity == "block"); for 1-bit a.
    block_size: columns per scale block (N0 when not blocked). Q == codes * repeat(scale, block_size, 1)[:, :N0].
    rel_error: (N1,) ||X w - X~ q||^2 / ||X w||^2 from the Grams (0 where both are 0, inf where only X w is 0).
    sq_error: (N1,) ||X w - X~ q||^2.
    clip_fraction: fraction of (neuron, t) steps with a live input column where |v| exceeded the alphabet's
        range K * step (there T clips and is no longer unbiased).
    c_alpha: the step multiplier used.  method, bits, C: what ran.
    """

    codes: np.ndarray
    scale: np.ndarray
    block_size: int
    rel_error: np.ndarray
    sq_error: np.ndarray
    clip_fraction: float
    c_alpha: float
    method: str
    bits: int
    C: float


@dataclass
class _Layer:
    W: np.ndarray
    H: np.ndarray
    G: np.ndarray
    F: np.ndarray
    d: np.ndarray
    same: bool  # X~ == X (G == H)


# Core: (rows, T, xi, P, bs) -> (Q, V) on W[rows]; built once per call so expensive preparation is shared.
Core = Callable[[np.ndarray, Callable, np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def _prepare(W: np.ndarray, stats: Grams) -> _Layer:
    W = np.asarray(W)
    if W.ndim != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise OnnxspfqError(f"weight must be a non-empty 2-D (N1, N0) matrix, got shape {W.shape}: reshape it first")
    if W.shape[1] != stats.n0:
        raise OnnxspfqError(f"weight has {W.shape[1]} input columns but the Grams have N0 = {stats.n0}: "
                            "pass W with rows = output neurons (W = B.T for MatMul)")
    W = np.ascontiguousarray(W, dtype=np.float64)
    if not np.all(np.isfinite(W)):
        raise OnnxspfqError("weight contains NaN or Inf: fix the model's initializer before compressing")
    H, G, F = (np.asarray(a, dtype=np.float64) for a in (stats.H, stats.G, stats.F))
    if not (np.all(np.isfinite(H)) and np.all(np.isfinite(G))):
        raise OnnxspfqError("Gram statistics contain NaN or Inf: check the calibration data for NaN/Inf")
    H = np.ascontiguousarray(0.5 * (H + H.T))
    scale = np.abs(H).max()
    same = stats.G is stats.H or bool(np.abs(G - H).max() <= 1e-12 * scale)
    G = H if same else np.ascontiguousarray(G)
    return _Layer(W, H, G, np.ascontiguousarray(0.5 * (F + F.T)), np.diag(H).copy(), same)


def layer_error(W: np.ndarray, Q: np.ndarray, stats: Grams) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-neuron (||Xw - X~q||^2, relative error) from the Grams: w^T F w - 2 q^T G w + q^T H q."""
    W = np.asarray(W, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    return _error(W, Q, stats.H, stats.G, stats.F)


def _error(W, Q, H, G, F):
    wFw = np.einsum("ij,ij->i", W @ F, W)
    qGw = np.einsum("ij,ij->i", W @ G.T, Q)
    qHq = np.einsum("ij,ij->i", Q @ H, Q)
    sq = np.maximum(wFw - 2.0 * qGw + qHq, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(wFw > 0, sq / np.where(wFw > 0, wFw, 1.0), np.where(sq > 0, np.inf, 0.0))
    return sq, rel


def _perfect_align(L: _Layer, damp: float) -> np.ndarray:
    """W~ solving (H + eps I) w~ = G w for every row; eps = damp * mean(diag H) (1e-8 relative if damp = 0)."""
    mean_d = float(L.d.mean())
    if mean_d == 0.0:
        return np.zeros_like(L.W)
    eps = (damp if damp > 0 else 1e-8) * mean_d
    A = L.H + eps * np.eye(L.H.shape[0])
    return np.ascontiguousarray(np.linalg.solve(A, L.G @ L.W.T).T)


def _codes(Q: np.ndarray, scale: np.ndarray, bs: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and the de-quantized matrix rebuilt from them (bit-identical to T's values)."""
    rep = np.repeat(scale, bs, axis=1)[:, : Q.shape[1]]
    if bits == 1:
        codes = np.where(Q < 0, -1, 1).astype(np.int8)
    else:
        K = levels(bits)
        safe = np.where(rep > 0, rep, 1.0)
        codes = np.clip(np.where(rep > 0, np.rint(Q / safe), 0.0), -K, K).astype(np.int8)
    return codes, codes * rep


def _clip_fraction(V: np.ndarray, P: np.ndarray, bs: int, live: np.ndarray) -> float:
    lim = np.repeat(P[..., 0] * P[..., 1], bs, axis=1)[:, : V.shape[1]]
    cols = np.flatnonzero(live)
    if cols.size == 0:
        return 0.0
    return float(np.mean(np.abs(V[:, cols]) > lim[:, cols]))


def _candidates(config: QuantConfig, stochastic: bool) -> tuple[float, ...]:
    if config.c_alpha is not None:
        return (float(config.c_alpha),)
    if config.bits == 1:
        return CANDIDATES_BINARY_STOCHASTIC if stochastic else CANDIDATES_BINARY_NEAREST
    return CANDIDATES[config.bits]


def _run(name: str, L: _Layer, config: QuantConfig, rng: np.random.Generator, T, stochastic: bool, core: Core,
         C: float) -> tuple[np.ndarray, LayerResult]:
    """Shared driver: draw xi, pick c_alpha, run the core, build codes / scales / errors."""
    N1, N0 = L.W.shape
    xi = rng.random((N1, N0)) if stochastic else np.zeros((N1, N0))
    cands = _candidates(config, stochastic)
    grids = [step_sizes(L.W, config.bits, c, config.granularity, config.block_size) for c in cands]
    everything = np.arange(N1)
    best = None
    if len(cands) > 1:
        rows = everything if N1 <= SEARCH_ROWS else np.unique(np.linspace(0, N1 - 1, SEARCH_ROWS).round().astype(int))
        for c, (scale, bs) in zip(cands, grids):
            P = grid_params(scale, config.bits)
            Qs, Vs = core(rows, T, np.ascontiguousarray(xi[rows]), np.ascontiguousarray(P[rows]), bs)
            err = float(_error(L.W[rows], Qs, L.H, L.G, L.F)[0].sum())
            if best is None or err < best[0]:
                best = (err, c, scale, bs, P, (Qs, Vs) if rows.size == N1 else None)
        _, c_alpha, scale, bs, P, done = best
    else:
        c_alpha, (scale, bs) = cands[0], grids[0]
        P, done = grid_params(scale, config.bits), None
    Qk, V = done if done is not None else core(everything, T, xi, P, bs)
    codes, Q = _codes(Qk, scale, bs, config.bits)
    sq, rel = _error(L.W, Q, L.H, L.G, L.F)
    info = LayerResult(codes=codes, scale=np.ascontiguousarray(scale, dtype=np.float64), block_size=int(bs),
                       rel_error=rel, sq_error=sq, clip_fraction=_clip_fraction(V, P, bs, L.d > 0),
                       c_alpha=float(c_alpha), method=name, bits=config.bits, C=float(C))
    return Q, info


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise OnnxspfqError(f"rng must be a numpy Generator, got {type(rng).__name__}: pass np.random.default_rng(seed)")


def spfq(W: np.ndarray, stats: Grams, config: QuantConfig, rng: np.random.Generator) -> tuple[np.ndarray, LayerResult]:
    """SPFQ: merged form (order 1), two-phase with `order` alignment passes, or perfect alignment; blocked kernels."""
    _check_rng(rng)
    L = _prepare(W, stats)
    C = float(config.C)
    if L.same:
        Wt = L.W  # X~ = X: every alignment returns w itself (exact LS solution), so phase II on W
    elif config.perfect_alignment:
        Wt = _perfect_align(L, config.damp)
    elif config.order > 1:
        Wt = kernels.blocked_align(L.W, L.G, L.H, config.order)
    else:
        Wt = None

    def core(rows, T, xi, P, bs):
        if Wt is None:
            return kernels.blocked_merged(L.W[rows], L.G, L.H, xi, C, T, P, bs)
        return kernels.blocked_phase2(Wt[rows], L.H, xi, C, T, P, bs)

    T = select_operator(config.bits, config.operator)
    return _run("spfq", L, config, rng, T, config.operator == "stochastic", core, C)


def gpfq(W: np.ndarray, stats: Grams, config: QuantConfig, rng: np.random.Generator) -> tuple[np.ndarray, LayerResult]:
    """GPFQ: deterministic path following (nearest T, C = 1, merged form)."""
    _check_rng(rng)
    L = _prepare(W, stats)

    def core(rows, T, xi, P, bs):
        if L.same:
            return kernels.blocked_phase2(L.W[rows], L.H, xi, 1.0, T, P, bs)
        return kernels.blocked_merged(L.W[rows], L.G, L.H, xi, 1.0, T, P, bs)

    T = select_operator(config.bits, "nearest")
    return _run("gpfq", L, config, rng, T, False, core, 1.0)


def gptq(W: np.ndarray, stats: Grams, config: QuantConfig, rng: np.random.Generator) -> tuple[np.ndarray, LayerResult]:
    """GPTQ / OPTQ: nearest rounding with H^-1 error feedback; H damped by config.damp * mean(diag H)."""
    _check_rng(rng)
    L = _prepare(W, stats)
    live = L.d > 0
    target = L.W if L.same else _perfect_align(L, config.damp)
    target = np.where(live[None, :], target, 0.0)
    Hd = L.H.copy()
    dead = np.flatnonzero(~live)
    Hd[dead, dead] = 1.0
    mean_d = float(L.d[live].mean()) if live.any() else 1.0
    Hd[np.diag_indices_from(Hd)] += config.damp * mean_d
    try:
        Lc = np.linalg.cholesky(Hd)
        Li = np.linalg.inv(Lc)
        U = np.ascontiguousarray(np.linalg.cholesky(Li.T @ Li).T)  # upper factor of H^-1
    except np.linalg.LinAlgError:
        raise OnnxspfqError(f"GPTQ: the damped Hessian is not positive definite with damp = {config.damp}: "
                            "raise damp (e.g. 0.01 or 0.1)") from None

    def core(rows, T, xi, P, bs):
        return kernels.gptq_blocked(target[rows], U, live, xi, T, P, bs)

    T = select_operator(config.bits, "nearest")
    return _run("gptq", L, config, rng, T, False, core, 1.0)


def rtn(W: np.ndarray, stats: Grams, config: QuantConfig, rng: np.random.Generator) -> tuple[np.ndarray, LayerResult]:
    """Round to nearest on the same grid (data-free baseline; the Grams only feed c_alpha choice and error)."""
    _check_rng(rng)
    L = _prepare(W, stats)

    def core(rows, T, xi, P, bs):
        Wr = L.W[rows]
        step = np.repeat(P[..., 0], bs, axis=1)[:, : Wr.shape[1]]
        if config.bits == 1:
            Q = np.where(step > 0, np.where(Wr >= 0, 1.0, -1.0) * step, 0.0)
        else:
            K = levels(config.bits)
            safe = np.where(step > 0, step, 1.0)
            Q = np.where(step > 0, np.clip(np.rint(Wr / safe), -K, K), 0.0) * step
        return Q, Wr

    return _run("rtn", L, config, rng, None, False, core, 1.0)  # numpy rounding, no operator call


METHODS = {"spfq": spfq, "gpfq": gpfq, "gptq": gptq, "rtn": rtn}
