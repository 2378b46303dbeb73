"""Gram statistics of a layer's inputs: H = X~^T X~, G = X~^T X, F = X^T X, accumulated batch by batch."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Grams:
    """Second-order statistics of one weight matrix's inputs (one Conv group, or the whole MatMul input).

    X (m x N0) is the layer input in the float model, X~ the same in the partially compressed model.
    H[t, j] = <X~_t, X~_j>, G[t, j] = <X~_t, X_j>, F[t, j] = <X_t, X_j>, all float64; m counts rows seen.
    """

    n0: int
    H: np.ndarray = field(init=False)
    G: np.ndarray = field(init=False)
    F: np.ndarray = field(init=False)
    m: int = 0

    def __post_init__(self) -> None:
        self.H = np.zeros((self.n0, self.n0))
        self.G = np.zeros((self.n0, self.n0))
        self.F = np.zeros((self.n0, self.n0))

    def add(self, X: np.ndarray, Xt: np.ndarray) -> None:
        """Fold one batch of rows (X from the float model, Xt = X~ from the compressed one) into the Grams."""
        X = np.asarray(X, dtype=np.float64)
        Xt = np.asarray(Xt, dtype=np.float64)
        if X.shape != Xt.shape or X.ndim != 2 or X.shape[1] != self.n0:
            raise ValueError(f"expected two (m, {self.n0}) arrays, got {X.shape} and {Xt.shape}")
        self.H += Xt.T @ Xt
        self.G += Xt.T @ X
        self.F += X.T @ X
        self.m += X.shape[0]

    @classmethod
    def from_data(cls, X: np.ndarray, Xt: np.ndarray | None = None) -> "Grams":
        """Grams of one in-memory pair (X~ = X when Xt is None)."""
        g = cls(X.shape[1])
        g.add(X, X if Xt is None else Xt)
        return g
