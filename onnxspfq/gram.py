"""Gram statistics of a layer's inputs: H = X~^T X~, G = X~^T X, F = X^T X, accumulated batch by batch (or, in the
weight form, H with only W G^T and w^T F w: Grams)."""
from __future__ import annotations

import copy

import numpy as np

from onnxspfq.kernels import gather_planes


GROUP_CHUNK_VALUES = 1 << 20  # values per operand of one batched group product (8 MB float64)
# the Gram products of float32 rows run in float32 BLAS (half the time of float64, and no float64 copy of the
# rows), each product then added into the float64 sums; rows of another type (float64, float16) in float64
PRODUCT_DTYPE = np.float32


def _product_dtype(X: np.ndarray, Xt: np.ndarray) -> type:
    """The type the products of X and X~ run in: PRODUCT_DTYPE when both are in it, else float64."""
    return PRODUCT_DTYPE if np.asarray(X).dtype == np.asarray(Xt).dtype == PRODUCT_DTYPE else np.float64


class Grams:
    """Second-order statistics of one weight matrix's inputs (one Conv group, or the whole MatMul input).

    X (m x N0) is the layer input in the float model, X~ the same in the partially compressed model.
    H[t, j] = <X~_t, X~_j>, G[t, j] = <X~_t, X_j>, F[t, j] = <X_t, X_j>, all float64; m counts rows seen.

    Weight form (`weight` given: the (N1, N0) rows of the one weight these Grams serve): G and F are not built;
    only what a method reads of them when it does not run the plain path's kernels is, WG = W G^T = Y^T X~ and
    wFw = ||X w_n||^2 = column norms of Y, from the layer's float output Y = X W^T. That costs 2 m N0 N1 where G
    and F cost 1.5 m N0^2 (the capture picks it where cheaper: FFN down projections, a CNN's 1 x 1 projections,
    depthwise groups). G and F are then None.
    """

    def __init__(self, n0: int, weight: np.ndarray | None = None) -> None:
        self.n0, self.m = n0, 0
        # what the methods derive from H alone (prepared.prepare, methods._optq_core), kept for every layer these
        # Grams serve: Q, K and V of an attention block (gate and up of a gated MLP) read one Grams (capture.py)
        self.memo: dict = {}
        self.H = np.zeros((n0, n0))
        self.same = True  # every row added had X~ = X
        if weight is None:
            self.G, self.F = np.zeros((n0, n0)), np.zeros((n0, n0))
            self.WG = self.wFw = self._Wt = self._print = None
            return
        W = np.asarray(weight, dtype=np.float64)
        if W.ndim != 2 or W.shape[1] != n0:
            raise ValueError(f"weight must be (N1, {n0}), got {W.shape}")
        self.G = self.F = None
        self._Wt = np.ascontiguousarray(W.T)
        self._print = _fingerprint(W)
        self.WG, self.wFw = np.zeros(W.shape), np.zeros(W.shape[0])

    @property
    def weighted(self) -> bool:
        """Whether these Grams are in the weight form (see the class docstring)."""
        return self.G is None

    def add(self, X: np.ndarray, Xt: np.ndarray) -> None:
        """Fold one batch of rows (X from the float model, Xt = X~ from the compressed one) into the Grams."""
        same = Xt is X  # X~ = X: H = G = F, one product (the capture passes the same array)
        dt = _product_dtype(X, Xt)
        X = np.asarray(X, dtype=dt)
        Xt = X if same else np.asarray(Xt, dtype=dt)
        if X.shape != Xt.shape or X.ndim != 2 or X.shape[1] != self.n0:
            raise ValueError(f"expected two (m, {self.n0}) arrays, got {X.shape} and {Xt.shape}")
        with np.errstate(all="ignore"):  # an overflowing model's Inf inputs: prepared.prepare names the problem
            H = Xt.T @ Xt
            if self.weighted:
                Y = X @ self._Wt.astype(X.dtype, copy=False)
                self._fold(H, X.shape[0], same, Y.T @ Xt, np.einsum("ij,ij->j", Y, Y, dtype=np.float64))
            else:
                self._fold(H, X.shape[0], same, H if same else Xt.T @ X, H if same else X.T @ X)

    def _fold(self, H: np.ndarray, m: int, same: bool, *parts: np.ndarray) -> None:
        """Add one product's H and its other parts: (G, F), or in the weight form (W G^T, w^T F w)."""
        self.H += H
        self.memo.clear()
        for acc, part in zip((self.WG, self.wFw) if self.weighted else (self.G, self.F), parts):
            np.add(acc, part, out=acc)
        self.m += m
        self.same &= same

    def w_F_w(self, W: np.ndarray) -> np.ndarray:
        """||X w_n||^2 per row of W (float64 (N1,)); in the weight form W must be the rows the Grams were built for."""
        if not self.weighted:
            return np.einsum("ij,ij->i", W @ self.F, W)
        self._check(W)
        return self.wFw

    def W_Gt(self, W: np.ndarray) -> np.ndarray:
        """W G^T (N1, N0): row n is (G w_n)^T; in the weight form W must be the rows the Grams were built for."""
        if not self.weighted:
            return W @ self.G.T
        self._check(W)
        return self.WG

    def rows(self, part: slice, offset: int = 0) -> "Grams":
        """These Grams for the weight rows `part` (numbered from `offset`: a Conv group's first row) when a method
        runs a chunk of the rows; the same object outside the weight form."""
        lo, hi = part.start - offset, part.stop - offset
        if not self.weighted or (lo, hi) == (0, self.wFw.size):
            return self
        g = copy.copy(self)
        g.WG, g.wFw, g._print, g._Wt = self.WG[lo:hi], self.wFw[lo:hi], self._print[lo:hi], None
        return g

    def _check(self, W: np.ndarray) -> None:
        # a relative tolerance, not equality: the same rows summed from another memory layout may round differently
        if W.shape != self.WG.shape or not np.allclose(_fingerprint(W), self._print, rtol=1e-9, atol=0.0):
            raise ValueError(f"these Grams were built for another weight (weight form, {self.WG.shape}): pass the "
                             f"rows they were built for ({W.shape} given)")

    @staticmethod
    def stack(grams: list["Grams"]) -> "Grams":
        """One Grams for many one-row problems (a depthwise Conv's groups, weight form, one output row each): row n
        with its own H (N1, N0, N0), W G^T and w^T F w, so a method runs all of them in one call. Why: one call per
        group pays a method's fixed Python and numpy overhead per group (EfficientNet-Lite0 has 8,960; RESULTS.md
        section 18)."""
        if not all(g.weighted and g.wFw.size == 1 and g.n0 == grams[0].n0 and g.m == grams[0].m for g in grams):
            raise ValueError("Grams.stack takes weight-form Grams of one row each, of one N0 and row count")
        g = copy.copy(grams[0])
        g.H = np.stack([x.H for x in grams])
        g.WG = np.concatenate([x.WG for x in grams])
        g.wFw = np.concatenate([x.wFw for x in grams])
        g._print = np.concatenate([x._print for x in grams])
        g._Wt = None
        g.same = all(x.same for x in grams)
        g.memo = {}
        return g

    @staticmethod
    def add_groups(grams: list["Grams"], X: np.ndarray, Xt: np.ndarray) -> None:
        """Fold rows into the Grams of each group: group g's columns are [g * n0, (g + 1) * n0) of X and Xt (a
        grouped Conv). Groups go through batched products, a few at a time (GROUP_CHUNK_VALUES per operand, cast
        to float64 contiguous per group): a depthwise Conv is C groups of n0 = 9 or 25, and one add per group
        (8,960 in EfficientNet-Lite0, each casting a strided column slice) was a third of the run; one batched
        product over all groups at once cast the whole (m, C * 25) patch matrix to float64 per batch (4x slower
        than chunks on m = 4096, C = 1152). Same bits as one (n0, m) @ (m, n0) product per group."""
        if len(grams) == 1:
            grams[0].add(X, Xt)
            return
        g, n0 = len(grams), grams[0].n0
        weighted = grams[0].weighted
        same = Xt is X
        m = X.shape[0]
        step = max(1, GROUP_CHUNK_VALUES // max(m * n0, 1))
        dt = _product_dtype(X, Xt)
        # (groups, n0, m) operands: im2col's rows come channel-major (its columns contiguous), where they are a
        # free reshape; row-major rows are transposed per chunk
        cm = X.flags.f_contiguous and (same or Xt.flags.f_contiguous)
        X3 = X.T.reshape(g, n0, m) if cm else X.reshape(m, g, n0).transpose(1, 2, 0)
        Xt3 = X3 if same else (Xt.T.reshape(g, n0, m) if cm else Xt.reshape(m, g, n0).transpose(1, 2, 0))
        with np.errstate(all="ignore"):
            for lo in range(0, g, step):
                hi = min(g, lo + step)
                a = np.ascontiguousarray(X3[lo:hi], dtype=dt)  # (groups, n0, m)
                b = a if same else np.ascontiguousarray(Xt3[lo:hi], dtype=dt)
                H = b @ b.transpose(0, 2, 1)
                if weighted:  # Y per group: (groups, m, n1) from each group's own (n0, n1) weight rows
                    Y = a.transpose(0, 2, 1) @ np.stack([gr._Wt for gr in grams[lo:hi]]).astype(dt, copy=False)
                    WG = Y.transpose(0, 2, 1) @ b.transpose(0, 2, 1)
                    wFw = np.einsum("gij,gij->gj", Y, Y, dtype=np.float64)
                    for i in range(hi - lo):
                        grams[lo + i]._fold(H[i], m, same, WG[i], wFw[i])
                    continue
                G = H if same else b @ a.transpose(0, 2, 1)
                F = H if same else a @ a.transpose(0, 2, 1)
                for i in range(hi - lo):
                    grams[lo + i]._fold(H[i], m, same, G[i], F[i])

    @classmethod
    def identity(cls, n0: int) -> "Grams":
        """X = X~ = I: the Grams of no data, under which every error is the weight-space error ||w - q||^2 (what
        data-free rtn chooses its steps by)."""
        g = cls(n0)
        g.H[np.diag_indices(n0)] = g.G[np.diag_indices(n0)] = g.F[np.diag_indices(n0)] = 1.0
        g.m = n0
        return g

    @classmethod
    def from_data(cls, X: np.ndarray, Xt: np.ndarray | None = None, weight: np.ndarray | None = None) -> "Grams":
        """Grams of one in-memory pair (X~ = X when Xt is None), in the weight form when `weight` is given."""
        g = cls(X.shape[1], weight)
        g.add(X, X if Xt is None else Xt)
        return g


def _fingerprint(W: np.ndarray) -> np.ndarray:
    """Per-row sums of squares: what the weight form checks a method's rows against."""
    W = np.asarray(W, dtype=np.float64)
    return np.einsum("ij,ij->i", W, W)


# ------------------------------------------------------------------------------------------------ im2col (Conv)
def conv_output_shape(spatial: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...],
                      pads: tuple[int, ...], dilations: tuple[int, ...]) -> tuple[int, ...]:
    """Output spatial size of a Conv (ONNX pads: all begins, then all ends)."""
    nd = len(kernel)
    return tuple((spatial[i] + pads[i] + pads[i + nd] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                 for i in range(nd))


def patch_count(x_shape: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...],
                pads: tuple[int, ...], dilations: tuple[int, ...]) -> int:
    """Number of im2col rows (batch x output positions) of a Conv input of shape (N, C, *spatial)."""
    return int(x_shape[0]) * int(np.prod(conv_output_shape(tuple(x_shape[2:]), kernel, strides, pads, dilations)))


def im2col(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
           dilations: tuple[int, ...], rows: np.ndarray | None = None) -> np.ndarray:
    """im2col of a Conv input x (N, C, *spatial) for 1-D / 2-D / 3-D Conv: (m, C * prod(kernel)).

    Row r is one output position (batch-major, then output positions in C order); its columns are the flattened
    (c, *kernel offsets) in the same channel-major order as `W.reshape(M, -1)`, so for a grouped Conv the
    columns of group g are the contiguous block [g * C/groups * prod(kernel), (g + 1) * ...), matching that
    group's `W_g.reshape(M/groups, -1)`, and `im2col(x) @ W.reshape(M, -1).T` is the Conv output without bias.
    `rows` (sorted indices into range(patch_count)) keeps only those patches (subsampling without building all).
    """
    x = np.asarray(x)
    nd = len(kernel)
    n, c = x.shape[:2]
    out = conv_output_shape(tuple(x.shape[2:]), kernel, strides, pads, dilations)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]) if any(pads) else x
    xp = np.ascontiguousarray(xp)
    es = [s // xp.itemsize for s in xp.strides]  # element strides: (C * plane, plane, *spatial)
    if rows is None:
        rows = np.arange(n * int(np.prod(out)))
    coords = np.unravel_index(np.asarray(rows, dtype=np.int64), (n,) + out)
    base = coords[0] * es[0] + sum(coords[1 + i] * (strides[i] * es[2 + i]) for i in range(nd))
    koff = np.array([sum(o * dilations[i] * es[2 + i] for i, o in enumerate(offs)) for offs in np.ndindex(*kernel)],
                    dtype=np.int64)
    pos = koff[:, None] + base[None, :]  # (kernel offsets, rows): flat index of channel 0's value
    # gathered channel-major, (C, offsets, rows), each write contiguous and each read walking one channel plane;
    # returned as its transposed view. Gathering rows-major (rows, C, offsets), as reference.im2col_reference does,
    # wrote with a stride of the kernel size; with this gather and the group layout of add_groups EfficientNet-Lite0's
    # whole run went from 120.7 s to 64.9 s (tools/bench_pipeline.py, docs/RESULTS.md section 12).
    cols = np.empty((c, len(koff), len(rows)), dtype=x.dtype)
    u = np.dtype(f"u{x.itemsize}")  # a copy: gathered as unsigned ints of the same width (Numba has no float16)
    gather_planes(xp.reshape(-1).view(u), es[1], pos, cols.view(u))
    return cols.reshape(c * len(koff), len(rows)).T
