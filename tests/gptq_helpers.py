"""The textbook GPTQ set-up shared by the kernel tests: an obviously-correct upper factor of the damped H^-1."""
import numpy as np


def gptq_factor(X: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(U, live): U upper triangular with U^T U = (H + damp * mean(diag H) I)^-1 for H = X^T X, dead inputs
    (never active) given a unit diagonal; live marks the active input columns."""
    H = X.T @ X
    live = np.diag(H) > 0
    Hd = H.copy()
    Hd[~live, ~live] = 1.0
    Hd += damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    return np.linalg.cholesky(np.linalg.inv(Hd)).T, live
