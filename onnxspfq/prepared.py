"""A layer as the methods see it, and what they return: W and the Grams prepared once (float64, symmetrised,
act-order applied), the exact reconstruction error computed from the Grams, the integer codes of a result, and
LayerResult. Shared by the algorithm forms (methods.py) and the search around them (search.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from onnxspfq.config import levels
from onnxspfq.errors import OnnxspfqError
from onnxspfq.gram import Grams


@dataclass
class LayerResult:
    """What a method reports for one weight matrix.

    codes: int8 (N1, N0) integer codes ({-K..K}, or {-1, +1} for 1-bit); pruned weights are code 0. None when
        pruning only (bits None: Q is float).
    scale: float64 (N1, nblocks) step per row and block (nblocks = 1 unless granularity == "block"); for 1-bit a.
        None when pruning only.
    block_size: columns per scale block (N0 when not blocked). Q == codes * repeat(scale, block_size, 1)[:, :N0].
    rel_error: (N1,) ||X w - X~ q||^2 / ||X w||^2 from the Grams (0 where both are 0, inf where only X w is 0).
    sq_error: (N1,) ||X w - X~ q||^2.
    clip_fraction: fraction of (neuron, t) steps with a live input column where |v| exceeded the alphabet's
        range K * step (there T clips and is no longer unbiased); 0 when pruning only (no range).
    c_alpha: the step multiplier used (None: no grid, or rtn's 1-bit a = mean|w|); when it was chosen per output
        channel (c_alpha None, channel / block granularity, no pruning), the mean of c_alpha_row.
    c_alpha_row: (N1,) the multiplier each channel kept when chosen per channel, else None.
    form_row: (N1,) the name of the path-following form each channel kept when the method ran several, else None.
    method, bits, C: what ran (C: mean over channels when auto_C chose it per channel).
    sparsity: achieved fraction of exact zeros in Q (all N1 * N0 entries).
    threshold: (N1,) pruning threshold lambda_n used (unstructured pruning in spfq / gpfq / gptq), else None.
    """

    codes: np.ndarray | None
    scale: np.ndarray | None
    block_size: int
    rel_error: np.ndarray
    sq_error: np.ndarray
    clip_fraction: float
    c_alpha: float | None
    method: str
    bits: int | None
    C: float
    sparsity: float = 0.0
    threshold: np.ndarray | None = None
    c_alpha_row: np.ndarray | None = None
    form_row: np.ndarray | None = None


@dataclass
class Prepared:
    W: np.ndarray
    H: np.ndarray
    G: np.ndarray | None  # None when the Grams are in their weight form (only the plain path's kernels read G)
    d: np.ndarray
    same: bool  # X~ == X (G == H)
    wFw: np.ndarray  # ||X w_n||^2 per row and W G^T: the Q-independent parts of the exact error
    WG: np.ndarray
    perm: np.ndarray | None = None  # act-order: column t of this layer is column perm[t] of the caller's W
    memo: dict = field(default_factory=dict)  # what is derived from H alone, shared with other layers (Grams.memo)

    def error(self, Q: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(||X w_n - X~ q_n||^2, relative error) for Q = the rows `rows` (all when None) of the result."""
        r = slice(None) if rows is None else rows
        return _error_terms(self.wFw[r], np.einsum("ij,ij->i", self.WG[r], Q), Q, self.H if self.H.ndim == 2
                            else self.H[r])

    def cross(self) -> np.ndarray:
        """G itself, for the plain path's kernels (the capture builds it for the layers whose method runs them)."""
        if self.G is None:
            raise OnnxspfqError("internal error: this method runs the plain path, which reads G, but the Grams hold "
                                "only W G^T (weight form); please report this")
        return self.G


# Core: (rows, T, xi, P, bs, C, groups, nkeep) -> (Q, V) on W[rows]; built once per call (shared preparation).
Core = Callable[..., tuple[np.ndarray, np.ndarray]]


def prepare(W: np.ndarray, stats: Grams, act_order: bool = False) -> Prepared:
    """W and the Grams as the methods use them: float64, H symmetrised, G = H when X~ = X, act-order applied."""
    W = np.asarray(W)
    if W.ndim != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise OnnxspfqError(f"weight must be a non-empty 2-D (N1, N0) matrix, got shape {W.shape}: reshape it first")
    if W.shape[1] != stats.n0:
        raise OnnxspfqError(f"weight has {W.shape[1]} input columns but the Grams have N0 = {stats.n0}: "
                            "pass W with rows = output neurons (W = B.T for MatMul)")
    W = np.ascontiguousarray(W, dtype=np.float64)
    if not np.all(np.isfinite(W)):
        raise OnnxspfqError("weight contains NaN or Inf: fix the model's initializer before compressing")
    memo = stats.memo.setdefault(("prepared", act_order), {})
    if "H" not in memo:
        memo["H"] = _prepared_h(stats, act_order)
    H, G, same, perm = memo["H"]
    wFw = stats.w_F_w(W) if G is None else np.einsum("ij,ij->i", W @ (0.5 * (stats.F + stats.F.T)), W)
    WG = stats.W_Gt(W) if G is None else None
    if perm is not None and perm.ndim == 2:  # one H per row (Grams.stack): each row in its own act-order
        W, WG = np.take_along_axis(W, perm, 1), np.take_along_axis(WG, perm, 1)
    elif perm is not None:
        W = np.ascontiguousarray(W[:, perm])
        WG = None if WG is None else np.ascontiguousarray(WG[:, perm])
    if WG is None:
        WG = W @ G.T
    return Prepared(W, H, G, np.diagonal(H, axis1=-2, axis2=-1).copy(), same, wFw, WG, perm, memo)


def _prepared_h(stats: Grams, act_order: bool) -> tuple:
    """(H symmetrised and in act-order, G likewise (H itself when X~ = X; None in the weight form), X~ = X, the
    act-order permutation or None): what prepare derives from the Grams alone."""
    H = np.asarray(stats.H, dtype=np.float64)
    G = None if stats.weighted else np.asarray(stats.G, dtype=np.float64)
    if not (np.all(np.isfinite(H)) and (np.all(np.isfinite(G)) if G is not None else
                                        np.all(np.isfinite(stats.WG)))):
        raise OnnxspfqError("its inputs hold NaN or Inf on the calibration data: the model overflows (or divides by "
                            "zero) before this layer, as the calibration data itself is finite; feed data in the "
                            "range the model expects (e.g. normalised as at training)")
    H = np.ascontiguousarray(0.5 * (H + np.swapaxes(H, -1, -2)))
    if G is None:  # as G == H below: a group whose inputs are all zero counts as X~ = X (nothing to align)
        same = stats.same or not H.any()
    else:
        same = stats.G is stats.H or bool(np.abs(G - H).max() <= 1e-12 * np.abs(H).max())
        G = H if same else np.ascontiguousarray(G)
    perm = None
    if act_order and H.ndim == 3:
        perm = np.argsort(-np.diagonal(H, axis1=1, axis2=2), axis=1, kind="stable")
        n = np.arange(H.shape[0])[:, None]
        H = np.ascontiguousarray(H[n[:, :, None], perm[:, :, None], perm[:, None, :]])
    elif act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        H = np.ascontiguousarray(H[np.ix_(perm, perm)])
        G = None if G is None else (H if same else np.ascontiguousarray(G[np.ix_(perm, perm)]))
    return H, G, same, perm


def unpermute(A: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """A (N1, N0) in act-order back to the caller's column order (perm: one order, or one per row)."""
    if perm is None:
        return A
    inv = np.argsort(perm, axis=-1)
    return np.ascontiguousarray(np.take_along_axis(A, inv, 1) if perm.ndim == 2 else A[:, inv])


def quad(Q: np.ndarray, H: np.ndarray) -> np.ndarray:
    """q_n^T H q_n per row: one H (N0, N0) for all rows, or one per row (N1, N0, N0: Grams.stack)."""
    if H.ndim == 3:
        return np.einsum("ij,ij->i", np.matmul(H, Q[:, :, None])[:, :, 0], Q)
    return np.einsum("ij,ij->i", Q @ H, Q)


def layer_error(W: np.ndarray, Q: np.ndarray, stats: Grams) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-neuron (||Xw - X~q||^2, relative error) from the Grams: w^T F w - 2 q^T G w + q^T H q."""
    W = np.asarray(W, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    return _error_terms(stats.w_F_w(W), np.einsum("ij,ij->i", stats.W_Gt(W), Q), Q, stats.H)


def _error_terms(wFw, qGw, Q, H):
    qHq = quad(Q, H)
    sq = np.maximum(wFw - 2.0 * qGw + qHq, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(wFw > 0, sq / np.where(wFw > 0, wFw, 1.0), np.where(sq > 0, np.inf, 0.0))
    return sq, rel


def codes_of(Q: np.ndarray, scale: np.ndarray, bs: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and the de-quantized matrix rebuilt from them (bit-identical to T's values)."""
    rep = np.repeat(scale, bs, axis=1)[:, : Q.shape[1]]
    if bits == 1:
        codes = np.where(Q < 0, -1, 1).astype(np.int8)
    else:
        K = levels(bits)
        safe = np.where(rep > 0, rep, 1.0)
        codes = np.clip(np.where(rep > 0, np.rint(Q / safe), 0.0), -K, K).astype(np.int8)
    return codes, codes * rep


