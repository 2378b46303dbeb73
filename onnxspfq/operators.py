"""Operators T and their alphabets / step sizes (ALGORITHM.md Section 4).

Every operator is a Numba-jitted plain function with ONE signature

    T(v: float, xi: float, p: float64[:]) -> float

- v:  the value to quantize (the path-following target v_t of one neuron),
- xi: a uniform draw in [0, 1) for this (neuron, t), drawn up front by the caller (ignored by deterministic T),
- p:  the parameter row for this (neuron, block of t). Layout (shared by all operators so clipping can be
      measured without knowing T):  p[0] = step (delta for grids, a for 1-bit),  p[1] = K (largest code,
      1 for 1-bit),  p[2] = pruning threshold lambda (pruning operators only; rows built by prune_params).
      Prune-only rows have p[0] = inf (no grid, so no clipping is ever counted) and p[1] = 1.

T returns the quantized VALUE, computed as `code * p[0]` with an integer-valued float `code`, so that
`rint(value / step)` recovers the code exactly and `code * step` reproduces the value bit for bit.
The kernels take any such function as an argument (Numba compiles one specialization per operator).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from onnxspfq.jit import CACHE

from onnxspfq.config import levels
from onnxspfq.errors import OnnxspfqError

NPARAMS = 2  # width of the parameter rows built by grid_params
NPARAMS_PRUNE = 3  # width of the parameter rows built by prune_params (adds lambda)


@njit(cache=CACHE)
def _clip(k: float, kmax: float) -> float:
    """An integer code clipped to {-K..K}."""
    return min(max(k, -kmax), kmax)


@njit(cache=CACHE)
def stochastic_round(v: float, xi: float, p: np.ndarray) -> float:
    """(a) Unbiased stochastic rounding onto p[0] * {-K..K}: round up with probability frac(v / delta); clip."""
    d = p[0]
    if d <= 0.0:
        return 0.0
    x = v / d
    f = np.floor(x)
    return _clip(f + 1.0 if xi < x - f else f, p[1]) * d


@njit(cache=CACHE)
def nearest_round(v: float, xi: float, p: np.ndarray) -> float:
    """Deterministic nearest point of p[0] * {-K..K} (ties to even, like np.rint); the GPFQ / RTN baseline."""
    d = p[0]
    if d <= 0.0:
        return 0.0
    return _clip(np.rint(v / d), p[1]) * d


@njit(cache=CACHE)
def stochastic_binary(v: float, xi: float, p: np.ndarray) -> float:
    """(b) 1-bit onto {-a, +a}: +a with probability (1 + v/a) / 2 (unbiased for |v| <= a; clipped outside)."""
    a = p[0]
    if a <= 0.0:
        return 0.0
    if v >= a:
        return 1.0 * a
    if v <= -a:
        return -1.0 * a
    if xi < 0.5 * (1.0 + v / a):
        return 1.0 * a
    return -1.0 * a


@njit(cache=CACHE)
def nearest_binary(v: float, xi: float, p: np.ndarray) -> float:
    """Deterministic 1-bit baseline: sign(v) * a (v = 0 maps to +a)."""
    a = p[0]
    if a <= 0.0:
        return 0.0
    return 1.0 * a if v >= 0.0 else -1.0 * a


@njit(cache=CACHE)
def identity(v: float, xi: float, p: np.ndarray) -> float:
    """T = identity: turns the merged path-following loop into phase I (data alignment) pass 0."""
    return v


@njit(cache=CACHE)
def stochastic_prune(v: float, xi: float, p: np.ndarray) -> float:
    """(c) Unbiased stochastic pruning with threshold lambda = p[2]: v if |v| >= lambda, else sign(v) * lambda with
    probability |v| / lambda, else 0. |T(v) - v| <= lambda. Values stay float (no grid)."""
    lam = p[2]
    a = abs(v)
    if a >= lam:
        return v
    if xi < a / lam:
        return lam if v > 0.0 else -lam
    return 0.0


@njit(cache=CACHE)
def nearest_prune(v: float, xi: float, p: np.ndarray) -> float:
    """Deterministic pruning baseline: hard threshold (the keep/drop rule of magnitude pruning): v if |v| >= p[2]."""
    if abs(v) >= p[2]:
        return v
    return 0.0


@njit(cache=CACHE)
def stochastic_prune_round(v: float, xi: float, p: np.ndarray) -> float:
    """(d) Joint quantization + pruning, unbiased, values on the grid delta * {-K..K} (delta = p[0], lambda = p[2]).

    Composition of (c) and (a) with the kept-small value placed ON the grid: for |v| >= lambda, stochastic rounding
    (a); for |v| < lambda, sign(v) * a with probability |v| / a, else 0, where a = ceil(lambda / delta) * delta
    is the first grid level >= lambda (capped at K * delta). So E[T(v)] = v inside the range, the result is always
    an integer code times delta (zeros are code 0), and lambda is continuous (any sparsity can be targeted; for
    lambda <= delta it is plain stochastic rounding). |T(v) - v| <= max(a, delta).
    """
    d = p[0]
    if d <= 0.0:
        return 0.0
    a = abs(v)
    lam = p[2]
    if a >= lam:
        return stochastic_round(v, xi, p)
    kl = np.ceil(lam / d)
    if kl > p[1]:
        kl = p[1]
    if kl < 1.0:
        kl = 1.0
    if a >= kl * d:  # only when lambda lies beyond the range: clip like (a)
        return stochastic_round(v, xi, p)
    if xi < a / (kl * d):
        return kl * d if v > 0.0 else -kl * d
    return 0.0 * d


@njit(cache=CACHE)
def nearest_prune_round(v: float, xi: float, p: np.ndarray) -> float:
    """Deterministic joint baseline: hard threshold at lambda = p[2], then nearest rounding onto the grid."""
    if abs(v) < p[2]:
        return 0.0
    return nearest_round(v, xi, p)


def select_operator(bits: int | None, operator: str, prune: bool = False):
    """The jitted T for a bit width (None = no grid), an operator name ("stochastic" or "nearest"), and whether a
    pruning threshold lambda (p[2]) applies. bits None without pruning is the identity (N:M prune-only keeps
    the surviving weights in float)."""
    if operator not in ("stochastic", "nearest"):
        raise OnnxspfqError(f"unknown operator {operator!r}: use 'stochastic' or 'nearest'")
    if bits is None:
        if not prune:
            return identity
        return stochastic_prune if operator == "stochastic" else nearest_prune
    if prune:
        if bits == 1:
            raise OnnxspfqError("1-bit codes {-a,+a} have no zero: use bits >= 2 (ternary) with pruning")
        return stochastic_prune_round if operator == "stochastic" else nearest_prune_round
    if bits == 1:
        return stochastic_binary if operator == "stochastic" else nearest_binary
    return stochastic_round if operator == "stochastic" else nearest_round


def step_sizes(W: np.ndarray, bits: int, c_alpha: float, granularity: str, block_size: int) -> tuple[np.ndarray, int]:
    """Per-row step sizes (N1, nblocks) and the block length along N0.

    delta = c_alpha * max|w| / K over the weights the step covers (one row: "channel"; the whole layer:
    "layer"; `block_size` consecutive columns of one row: "block"). For 1-bit the step IS the magnitude a:
    a = c_alpha * max|w| (K = 1). Returns (scale, bs) with nblocks = ceil(N0 / bs); bs = N0 unless blocked.
    """
    if not c_alpha > 0:
        raise OnnxspfqError(f"c_alpha must be > 0, got {c_alpha}: pass a positive number")
    K = levels(bits)
    A = np.abs(np.asarray(W, dtype=np.float64))
    n1, n0 = A.shape
    if granularity == "channel":
        mx, bs = A.max(axis=1, keepdims=True), n0
    elif granularity == "layer":
        mx, bs = np.full((n1, 1), A.max()), n0
    elif granularity == "block":
        bs = int(block_size)
        if bs < 1:
            raise OnnxspfqError(f"block_size must be >= 1, got {block_size}")
        nb = -(-n0 // bs)
        pad = np.zeros((n1, nb * bs))
        pad[:, :n0] = A
        mx = pad.reshape(n1, nb, bs).max(axis=2)
    else:
        raise OnnxspfqError(f"unknown granularity {granularity!r}: use channel, layer or block")
    if n0 == 0:
        mx = np.zeros((n1, 1))
    return c_alpha * mx / K, max(bs, 1)


def grid_params(scale: np.ndarray, bits: int) -> np.ndarray:
    """Parameter rows P (N1, nblocks, NPARAMS) for the kernels: P[..., 0] = step, P[..., 1] = K."""
    P = np.empty(scale.shape + (NPARAMS,))
    P[..., 0] = scale
    P[..., 1] = levels(bits)
    return np.ascontiguousarray(P)


def prune_params(scale: np.ndarray | None, bits: int | None, lam: np.ndarray, shape: tuple[int, int] | None = None
                 ) -> np.ndarray:
    """Parameter rows P (N1, nblocks, 3) for the pruning operators: P[..., 0] = step, P[..., 1] = K, P[..., 2] =
    lambda (one threshold per row, broadcast over blocks). Prune only (scale None): step = inf, K = 1, so the
    clip fraction of a prune-only run is 0 (nothing clips); `shape` = (N1, nblocks) is then required."""
    lam = np.asarray(lam, dtype=np.float64).reshape(-1, 1)
    if scale is None:
        P = np.empty(tuple(shape) + (NPARAMS_PRUNE,))
        P[..., 0] = np.inf
        P[..., 1] = 1.0
    else:
        P = np.empty(scale.shape + (NPARAMS_PRUNE,))
        P[..., 0] = scale
        P[..., 1] = levels(bits)
    P[..., 2] = lam
    return np.ascontiguousarray(P)


def nm_groups_for(n0: int, m: int, stride: int = 1) -> np.ndarray:
    """N:M groups along the reduction axis as an (n_groups, m) int64 array of column indices (rows ascending).

    stride 1 (MatMul / Gemm): groups of m consecutive columns. stride s = kh * kw (Conv, columns flattened
    channel-major as (c, i, j)): the group {(c0 + k, i, j): k < m} for c0 = 0, m, 2m, ... and each kernel offset
    (i, j), i.e. columns c0 * s + ij + k * s: m consecutive CHANNELS at a fixed tap, which is the layout of
    TensorRT's 2:4 sparsity. Groups are listed by their first column.
    """
    n0, m, stride = int(n0), int(m), int(stride)
    if m < 1 or stride < 1:
        raise OnnxspfqError(f"N:M group size M = {m} and stride = {stride} must be >= 1")
    if n0 % (m * stride) != 0:
        what = f"reduction size {n0}" if stride == 1 else f"channel count {n0 // stride if n0 % stride == 0 else n0 / stride}"
        raise OnnxspfqError(f"N:M pruning needs the {what} to be a multiple of M = {m}: use another M or skip this layer")
    c = n0 // stride
    c0 = np.arange(0, c, m)
    taps = np.arange(stride)
    k = np.arange(m)
    g = (c0[:, None, None] + k[None, None, :]) * stride + taps[None, :, None]  # (c/m, stride, m)
    return np.ascontiguousarray(g.reshape(-1, m), dtype=np.int64)
