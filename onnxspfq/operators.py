"""Operators T and their alphabets / step sizes (ALGORITHM.md Section 4).

Every operator is a Numba-jitted plain function with ONE signature

    T(v: float, xi: float, p: float64[:]) -> float

- v:  the value to quantize (the path-following target v_t of one neuron),
- xi: a uniform draw in [0, 1) for this (neuron, t), drawn up front by the caller (ignored by deterministic T),
- p:  the parameter row for this (neuron, block of t). Layout (shared by all operators so clipping can be
      measured without knowing T):  p[0] = step (delta for grids, a for 1-bit),  p[1] = K (largest code,
      1 for 1-bit).  Later operators may read further entries (e.g. p[2] = pruning threshold lambda).

T returns the quantized VALUE, computed as `code * p[0]` with an integer-valued float `code`, so that
`rint(value / step)` recovers the code exactly and `code * step` reproduces the value bit for bit.
The kernels take any such function as an argument (Numba compiles one specialization per operator).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from onnxspfq.errors import OnnxspfqError

NPARAMS = 2  # width of the parameter rows built by grid_params


@njit(cache=False)
def stochastic_round(v: float, xi: float, p: np.ndarray) -> float:
    """(a) Unbiased stochastic rounding onto p[0] * {-K..K}: round up with probability frac(v / delta); clip."""
    d = p[0]
    if d <= 0.0:
        return 0.0
    x = v / d
    f = np.floor(x)
    k = f + 1.0 if xi < x - f else f
    kmax = p[1]
    if k > kmax:
        k = kmax
    elif k < -kmax:
        k = -kmax
    return k * d


@njit(cache=False)
def nearest_round(v: float, xi: float, p: np.ndarray) -> float:
    """Deterministic nearest point of p[0] * {-K..K} (ties to even, like np.rint); the GPFQ / RTN baseline."""
    d = p[0]
    if d <= 0.0:
        return 0.0
    k = np.rint(v / d)
    kmax = p[1]
    if k > kmax:
        k = kmax
    elif k < -kmax:
        k = -kmax
    return k * d


@njit(cache=False)
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


@njit(cache=False)
def nearest_binary(v: float, xi: float, p: np.ndarray) -> float:
    """Deterministic 1-bit baseline: sign(v) * a (v = 0 maps to +a)."""
    a = p[0]
    if a <= 0.0:
        return 0.0
    return 1.0 * a if v >= 0.0 else -1.0 * a


@njit(cache=False)
def identity(v: float, xi: float, p: np.ndarray) -> float:
    """T = identity: turns the merged path-following loop into phase I (data alignment) pass 0."""
    return v


def select_operator(bits: int, operator: str):
    """The jitted T for a bit width and an operator name ("stochastic" or "nearest")."""
    if operator not in ("stochastic", "nearest"):
        raise OnnxspfqError(f"unknown operator {operator!r}: use 'stochastic' or 'nearest'")
    if bits == 1:
        return stochastic_binary if operator == "stochastic" else nearest_binary
    return stochastic_round if operator == "stochastic" else nearest_round


def levels(bits: int) -> int:
    """K, the largest integer code: 2^(b-1) - 1 for b >= 2, 1 for binary."""
    if bits not in (8, 4, 3, 2, 1):
        raise OnnxspfqError(f"unsupported bits value {bits!r}: use one of 8, 4, 3, 2, 1")
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


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
