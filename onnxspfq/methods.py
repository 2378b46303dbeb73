"""Per-layer compression methods, all with ONE signature: (W, stats, config, rng, *, nm_groups=None) -> (Q, LayerResult).

W (N1, N0): row n = output neuron n. stats: onnxspfq.gram.Grams. config: onnxspfq.config.QuantConfig.
rng: np.random.Generator (all randomness of a call is drawn from it up front, one uniform per (neuron, t),
so the same seed and inputs give bit-identical Q on any number of threads).

- spfq: stochastic path following (config.operator, C, order, perfect_alignment honored; auto_C=True picks C).
- gpfq: deterministic path following (nearest T, C = 1, merged form); ignores operator / C / order.
- gptq: OPTQ with damping config.damp and blocked lazy updates (nearest T) on W itself, with H = X~^T X~ of the
        compressed model's inputs (as the reference GPTQ does in sequential mode).
- rtn:  round to nearest on the same grid (data-free; the Grams are used only for the c_alpha choice and error).
        1-bit with c_alpha None is the classical binary-weight baseline a_n = mean|w_n| (per channel / layer / block
        as the granularity says), not a searched multiple of max|w|. Pruning in rtn is MAGNITUDE pruning: per row
        the round(sparsity * N0) smallest |w| are zeroed, or, with N:M, the M - N smallest |w| of every group; the
        survivors are then rounded (bits set) or kept in float (bits None).

The search around each method (candidate steps, per-row pick, pruning threshold fit, best of draws, dead columns,
refit) is search.py; this module holds the algorithm forms.
"""
from __future__ import annotations

import math

import numpy as np

from onnxspfq import kernels
from onnxspfq.config import QuantConfig, levels
from onnxspfq.errors import OnnxspfqError
from onnxspfq.gram import Grams
from onnxspfq.operators import identity, nm_groups_for, select_operator
from onnxspfq.prepared import LayerResult, Prepared, prepare
from onnxspfq.search import Form, c_candidates, run

def _groups(config: QuantConfig, n0: int, nm_groups: np.ndarray | None) -> np.ndarray | None:
    """Validated N:M groups (n_groups, M) or None; consecutive groups when config.nm is set and none are given."""
    if config.nm is None:
        if nm_groups is not None:
            raise OnnxspfqError("nm_groups given but config.nm is None: set QuantConfig(nm=(N, M)) to prune N:M")
        return None
    n, m = config.nm
    if nm_groups is None:
        return nm_groups_for(n0, m)
    g = np.asarray(nm_groups)
    if g.ndim != 2 or g.shape[1] != m or not np.issubdtype(g.dtype, np.integer):
        raise OnnxspfqError(f"nm_groups must be an (n_groups, {m}) integer array of column indices, got "
                            f"{g.dtype} {g.shape}: build it with operators.nm_groups_for")
    if g.size and (g.min() < 0 or g.max() >= n0 or np.unique(g).size != g.size):
        raise OnnxspfqError(f"nm_groups must hold distinct column indices in [0, {n0}): build it with "
                            "operators.nm_groups_for")
    return np.ascontiguousarray(g, dtype=np.int64)


def _perfect_align(L: Prepared, damp: float) -> np.ndarray:
    """W~ solving (H + eps I) w~ = G w for every row; eps = damp * mean(diag H) (1e-8 relative if damp = 0)."""
    mean_d = float(L.d.mean())
    if mean_d == 0.0:
        return np.zeros_like(L.W)
    eps = (damp if damp > 0 else 1e-8) * mean_d
    A = L.H + eps * np.eye(L.H.shape[0])
    return np.ascontiguousarray(np.linalg.solve(A, L.WG.T).T)


def _ridge_align(L: Prepared, ridge: float) -> np.ndarray:
    """Phase I of the projected path: W~ = argmin ||X w - X~ v||^2 + ridge * mean(diag H) ||v - w||^2 per row, i.e.
    (H + eps I) w~ = G w + eps w. ridge 0 is perfect alignment (which fits the calibration set's X -> X~ map:
    GPTQ on it lost 2 points on the Fashion-MNIST CNN at 8 bits), ridge -> inf is W itself (OPTQ)."""
    if L.H.ndim == 3:  # one H per row (Grams.stack); a row whose inputs are all zero keeps w (nothing to align)
        eps = ridge * L.d.mean(axis=1)
        dead = eps <= 0
        A = L.H + np.where(dead, 1.0, eps)[:, None, None] * np.eye(L.H.shape[1])
        b = np.where(dead[:, None], L.W, L.WG + eps[:, None] * L.W)
        return np.ascontiguousarray(np.linalg.solve(A, b[:, :, None])[:, :, 0])
    eps = ridge * float(L.d.mean())
    A = L.H + eps * np.eye(L.H.shape[0])
    return np.ascontiguousarray(np.linalg.solve(A, L.WG.T + eps * L.W.T).T)


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise OnnxspfqError(f"rng must be a numpy Generator, got {type(rng).__name__}: pass np.random.default_rng(seed)")


def _operator(config: QuantConfig, name: str):
    return select_operator(config.bits, name, config.sparsity > 0)


def spfq(W: np.ndarray, stats: Grams, config: QuantConfig, rng: np.random.Generator, *,
         nm_groups: np.ndarray | None = None, auto_C: bool = False) -> tuple[np.ndarray, LayerResult]:
    """SPFQ: merged form (order 1), two-phase with `order` alignment passes, or perfect alignment; blocked kernels.

    Pruning / joint quantization + pruning / N:M per config (module docstring). auto_C: choose C per layer among
    c_candidates(bits, N0) by the exact Gram error on the search rows (jointly with c_alpha); LayerResult.C says
    which ran. Otherwise C = config.C.
    """
    _check_rng(rng)
    L = prepare(W, stats, config.ordered("spfq"))
    groups = _groups(config, L.W.shape[1], nm_groups)
    if L.same:
        Wt = L.W  # X~ = X: every alignment returns w itself (exact LS solution), so phase II on W
    elif config.perfect_alignment:
        Wt = _perfect_align(L, config.damp)
    elif config.order > 1:
        Wt = kernels.blocked_align(L.W, L.cross(), L.H, config.order)
    else:
        Wt = None

    def core(rows, T, xi, P, bs, C, groups, nkeep):
        if Wt is None:
            return kernels.blocked_merged(L.W[rows], L.cross(), L.H, xi, C, T, P, bs, groups=groups, nkeep=nkeep)
        return kernels.blocked_phase2(Wt[rows], L.H, xi, C, T, P, bs, groups=groups, nkeep=nkeep)

    T = _operator(config, config.T)
    stochastic = config.T == "stochastic" and T is not identity  # N:M prune only runs T = identity: no xi
    Cs = c_candidates(config.bits, L.W.shape[1]) if auto_C else (float(config.C),)
    forms = [] if config.route == "projected" else [Form("plain", core, T, stochastic, Cs)]
    if config.route != "plain":
        damp = max(config.damp, FEW_ROWS_DAMP) if stats.m < 2 * L.W.shape[1] else config.damp
        target = None if L.same or not math.isfinite(config.ridge) else _ridge_align(L, config.ridge)
        core, proxy = _optq_core(L, config, damp=damp, target=target)
        forms.append(Form("projected", core, T, stochastic, proxy=proxy))
    return run("spfq", L, config, rng, forms, groups)


def gpfq(W: np.ndarray, stats: Grams, config: QuantConfig, rng: np.random.Generator, *,
         nm_groups: np.ndarray | None = None) -> tuple[np.ndarray, LayerResult]:
    """GPFQ: deterministic path following (nearest T, C = 1, merged form); pruning = hard threshold (sparse GPFQ
    baseline) with the threshold fitted to the target sparsity; N:M decided inside the path following."""
    _check_rng(rng)
    L = prepare(W, stats, config.ordered("gpfq"))
    groups = _groups(config, L.W.shape[1], nm_groups)

    def core(rows, T, xi, P, bs, C, groups, nkeep):
        if L.same:
            return kernels.blocked_phase2(L.W[rows], L.H, xi, 1.0, T, P, bs, groups=groups, nkeep=nkeep)
        return kernels.blocked_merged(L.W[rows], L.cross(), L.H, xi, 1.0, T, P, bs, groups=groups, nkeep=nkeep)

    return run("gpfq", L, config, rng, [Form("gpfq", core, _operator(config, "nearest"), False)], groups)


def gptq(W: np.ndarray, stats: Grams, config: QuantConfig, rng: np.random.Generator, *,
         nm_groups: np.ndarray | None = None) -> tuple[np.ndarray, LayerResult]:
    """GPTQ / OPTQ: nearest rounding with H^-1 error feedback; H damped by config.damp * mean(diag H).
    Pruning: hard threshold on the error-updated weights (threshold fitted to the target); N:M: SparseGPT's
    |w| / U_jj score when a group is reached."""
    _check_rng(rng)
    L = prepare(W, stats, config.ordered("gptq"))
    groups = _groups(config, L.W.shape[1], nm_groups)
    core, proxy = _optq_core(L, config)
    return run("gptq", L, config, rng, [Form("gptq", core, _operator(config, "nearest"), False, proxy=proxy)], groups)


# spfq's projected path with fewer calibration rows than 2 N0: H is (near) singular, and OPTQ's projection moves
# weights along input directions the calibration data never showed; a larger damping keeps them. Measured with
# tools/bench_few_rows.py (docs/RESULTS.md section 11). The gptq baseline keeps config.damp as published.
FEW_ROWS_DAMP = 0.1

# the OPTQ sweep's large update GEMM (kernels.gptq_blocked) in float32, as GPTQ's reference code runs it: 0.58x of
# a float32 GEMM at N0 = 2048 vs 0.44x in float64 (tools/bench_kernels.py; docs/RESULTS.md section 20)
OPTQ_GEMM = np.float32
INV_BLOCK = 128  # inv_lower's base case


def inv_lower(L: np.ndarray) -> np.ndarray:
    """The inverse of a lower-triangular L (or a stack of them), by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0],
    [-C^-1 B A^-1, C^-1]], the off-diagonal block two GEMMs, small blocks by np.linalg.inv. About N0^3 / 3 flops in
    BLAS-3 where np.linalg.inv (LU, no scipy's trtri) takes 2 N0^3: the O(N0^3) setup of the projected path was
    most of MiniLM-L6's method phase (RESULTS.md section 18). Entries above the diagonal are exactly zero."""
    n = L.shape[-1]
    if n <= INV_BLOCK:
        return np.tril(np.linalg.inv(L))
    h = n // 2
    Ai, Ci = inv_lower(L[..., :h, :h]), inv_lower(L[..., h:, h:])
    out = np.zeros_like(L)
    out[..., :h, :h], out[..., h:, h:] = Ai, Ci
    out[..., h:, :h] = -(Ci @ L[..., h:, :h]) @ Ai
    return out


def _optq_core(L: Prepared, config: QuantConfig, damp: float | None = None, target: np.ndarray | None = None):
    """The OPTQ core: W with the error of each quantized column projected onto the later columns through the
    upper Cholesky factor of the damped H^-1 (path following with each X~_t projected off the later columns).
    damp: config.damp unless given. Returns the core and its screening proxy (search.Form.proxy): the target and
    1 / U_tt^2, OPTQ's loss of rounding column t (the loss is sum_t (w'_t - q_t)^2 / U_tt^2)."""
    damp = config.damp if damp is None else damp
    H, W, d = L.H, (L.W if target is None else target), L.d
    live = d > 0
    # Standard OPTQ: quantize W itself with the Hessian of the compressed model's inputs X~. Quantizing the
    # least-squares aligned W~ = (H + eps I)^-1 G w instead fits the calibration set's X -> X~ map and lost 2 points
    # of test accuracy on the Fashion-MNIST CNN even at 8 bits (89.7 % vs 91.7 %, docs/RESULTS_models.md).
    target = np.ascontiguousarray(np.where(live if live.ndim == 2 else live[None, :], W, 0.0))
    if ("U", damp) not in L.memo:  # once per Grams: Q, K and V share it (Grams.memo)
        L.memo["U", damp] = _upper_factor(H, d, live, damp)
    U = L.memo["U", damp]

    def core(rows, T, xi, P, bs, C, groups, nkeep):
        if U.ndim == 3:
            return kernels.gptq_rows(target[rows], U[rows], live[rows], xi, T, P, bs)
        return kernels.gptq_blocked(target[rows], U, live, xi, T, P, bs, groups=groups, nkeep=nkeep,
                                    gemm_dtype=OPTQ_GEMM)

    return core, (target, np.where(live, 1.0 / np.einsum("...ii->...i", U) ** 2, 0.0))


def _upper_factor(H: np.ndarray, d: np.ndarray, live: np.ndarray, damp: float) -> np.ndarray:
    """U, the upper Cholesky factor of the damped H^-1 (H^-1 = U^T U), dead columns (d = 0) set to 1 on H's
    diagonal; one H, or one per row (Grams.stack)."""
    Hd = H.copy()
    diag = np.einsum("...ii->...i", Hd)  # a writable view of the diagonal(s): one H, or one per row (Grams.stack)
    if live.ndim == 1:
        mean_d = float(d[live].mean()) if live.any() else 1.0
    else:  # per row; a row with no live column: 1
        n_live = live.sum(axis=1)
        mean_d = (np.where(live, d, 0.0).sum(axis=1) / np.maximum(n_live, 1))[:, None]
        mean_d[n_live == 0] = 1.0
    diag[~live] = 1.0
    diag += damp * mean_d
    try:
        # U, the upper factor of H^-1 = U^T U, from ONE Cholesky: with J the reversal, J H J = R R^T gives
        # H^-1 = (J R^-1 J)^T (J R^-1 J), and J R^-1 J is upper. The Cholesky of the explicit inverse that GPTQ's
        # reference code takes costs a GEMM and a second factorisation more (same U to 1e-15 relative); this
        # O(N0^3) setup outweighs the path following (O(N1 N0^2) per candidate) in layers with N0 > N1.
        U = np.ascontiguousarray(inv_lower(np.linalg.cholesky(Hd[..., ::-1, ::-1]))[..., ::-1, ::-1])
    except np.linalg.LinAlgError:
        raise OnnxspfqError(f"GPTQ: the damped Hessian is not positive definite with damp = {damp}: "
                            "raise damp (e.g. 0.01 or 0.1)") from None
    return U


def magnitude_mask(W: np.ndarray, sparsity: float = 0.0, groups: np.ndarray | None = None,
                   nkeep: int = 0) -> np.ndarray:
    """Boolean keep-mask of magnitude pruning: per row the round(sparsity * N0) smallest |w| dropped (ties: lower
    column first), or in every N:M group all but the nkeep largest |w| (ties: lower column kept)."""
    A = np.abs(np.asarray(W, dtype=np.float64))
    n1, n0 = A.shape
    keep = np.ones((n1, n0), dtype=bool)
    if groups is not None:
        g = np.sort(np.asarray(groups, dtype=np.int64), axis=1)
        order = np.argsort(-A[:, g], axis=2, kind="stable")  # (n1, n_groups, M), largest first
        drop = np.take_along_axis(np.broadcast_to(g, (n1,) + g.shape), order[..., nkeep:], axis=2)
        keep[np.arange(n1)[:, None, None], drop] = False
    elif sparsity > 0:
        k = int(round(sparsity * n0))
        order = np.argsort(A, axis=1, kind="stable")[:, :k]
        keep[np.arange(n1)[:, None], order] = False
    return keep


def _mean_abs_grid(W: np.ndarray, granularity: str, block_size: int) -> tuple[np.ndarray, int]:
    """Binary-weight scale a = mean|w| over what one step covers (row, layer or block): the L2-best a for sign codes."""
    A = np.abs(W)
    n1, n0 = A.shape
    if granularity == "channel":
        return A.mean(axis=1, keepdims=True), n0
    if granularity == "layer":
        return np.full((n1, 1), A.mean()), n0
    bs = int(block_size)
    nb = -(-n0 // bs)
    sums = np.zeros((n1, nb * bs))
    sums[:, :n0] = A
    counts = np.minimum(bs, n0 - np.arange(nb) * bs)
    return sums.reshape(n1, nb, bs).sum(axis=2) / counts, bs


def rtn(W: np.ndarray, stats: Grams, config: QuantConfig, rng: np.random.Generator, *,
        nm_groups: np.ndarray | None = None) -> tuple[np.ndarray, LayerResult]:
    """Round to nearest on the same grid (data-free baseline; the Grams only feed the c_alpha choice and error).
    Pruning: magnitude pruning (unstructured per row, or N:M) first, then rounding of the survivors (or float)."""
    _check_rng(rng)
    L = prepare(W, stats, config.ordered("rtn"))
    groups = _groups(config, L.W.shape[1], nm_groups)
    pruned = L.W
    if config.sparsity > 0 or groups is not None:
        pruned = np.where(magnitude_mask(L.W, config.sparsity, groups, config.nm[0] if config.nm else 0), L.W, 0.0)

    def core(rows, T, xi, P, bs, C, groups, nkeep):
        Wr = pruned[rows]
        if config.bits is None:
            return Wr.copy(), Wr
        step = np.repeat(P[..., 0], bs, axis=1)[:, : Wr.shape[1]]
        if config.bits == 1:
            Q = np.where(step > 0, np.where(Wr >= 0, 1.0, -1.0) * step, 0.0)
        else:
            K = levels(config.bits)
            safe = np.where(step > 0, step, 1.0)
            Q = np.where(step > 0, np.clip(np.rint(Wr / safe), -K, K), 0.0) * step
        return Q, Wr

    grid = None
    if config.bits == 1 and config.c_alpha is None:
        grid = _mean_abs_grid(L.W, config.granularity, config.block_size)
    return run("rtn", L, config, rng, [Form("rtn", core, None, False)], None, grid=grid)  # numpy rounding, no operator


METHODS = {"spfq": spfq, "gpfq": gpfq, "gptq": gptq, "rtn": rtn}
