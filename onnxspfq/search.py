"""The per-layer search policy around a method's core (methods.py): which settings (C, c_alpha) run, the per-row
pick by exact Gram error, the pruning threshold fit, the best of several draws, dead input columns, the step re-fit,
and the codes and errors of the result. A method prepares its layer and core and calls `run`; one `Search` holds a
call's context so that each step below is a named method.

Pruning (config.sparsity > 0, data-aware methods): the operator gets a threshold lambda_n per row (operators.py:
(c) stochastic pruning when bits is None, (d) joint quantization + pruning otherwise; the deterministic
hard-threshold variants for operator "nearest", gpfq and gptq). lambda_n = kappa * base_n, where base_n solves
"expected zero fraction of row n = sparsity" from |w_n| by bisection (stochastic: mean(max(0, 1 - |w|/lambda)),
deterministic: mean(|w| < lambda); dead input columns count as zeros), and the one layer factor kappa is then
fitted by bracketing + geometric bisection on the MEASURED zero fraction of the actual path-following result (first
on the search rows, then on the full layer) until it is within SPARSITY_TOL of the target (or the closest reached).
N:M (config.nm): decided inside the path following (kernels.py, module docstring), groups from `nm_groups` or,
when None, consecutive groups along N0. Prune only (bits None): Q stays float, LayerResult.codes / scale are None.

Step sizes: operators.step_sizes (delta = c_alpha * max|w| / K per channel / layer / block; 1-bit: a = c_alpha *
max|w|). With config.c_alpha = None each method tries a small candidate set (CANDIDATES; 1-bit stochastic: c in
0.3..1, i.e. clipping allowed, which measured far better than the unbiased c >= 1) and keeps the one with the
smallest exact Gram reconstruction error ||X w_n - X~ q_n||^2:
- per output channel (channel / block granularity, no pruning): the candidates run on every row (same xi) and each
  row keeps its best; rows are independent runs of the path following, so this is exact, and it keeps the few
  outlier rows of transformer weights unclipped (a layer-wide pick clipped them: MiniLM 4-bit cosine 0.78 -> 0.97).
  Screening (config.n_screen, forms with a proxy: the OPTQ cores): each row first ranks every candidate by the OPTQ
  loss of plain rounding onto its grid, O(N0) per row, and runs the path following only with its best n_screen;
  the kernels then cost n_screen passes instead of one per candidate;
- per layer (layer granularity, or pruning, where one threshold factor is fitted per layer): the candidates run on
  at most SEARCH_ROWS evenly spaced rows, then the full layer runs once with the winner.
spfq(auto_C=True) searches C jointly with c_alpha the same way (C_CANDIDATES; 1-bit: C_CANDIDATES_BINARY plus
log N0). Stochastic operators then run config.n_draws - 1 further draws of xi (default: 8 draws in all at 1-2 bits
without pruning) and each row keeps its best draw.
Zero-norm input columns (d[t] = 0: never active on the calibration data) get q = 0 in the kernels (as ALGORITHM.md
says) and are then rounded to nearest by the methods when quantizing without pruning: their value does not change
the layer output on the calibration data, and zeroing them breaks inputs that fire on other data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from onnxspfq.config import QuantConfig, levels
from onnxspfq.operators import grid_params, prune_params, step_sizes
from onnxspfq.prepared import Core, LayerResult, Prepared, codes_of, quad, unpermute

SEARCH_ROWS = 64
CANDIDATES = {
    8: (1.0, 0.9, 0.8),
    4: (1.0, 0.9, 0.8, 0.7, 0.6),
    3: (1.0, 0.85, 0.7, 0.6, 0.5),
    2: (0.8, 0.65, 0.5, 0.4, 0.3),
}
CANDIDATES_BINARY_STOCHASTIC = (0.3, 0.4, 0.5, 0.6, 0.8, 1.0)  # c < 1 clips (biased), but measured far better
CANDIDATES_BINARY_NEAREST = (0.3, 0.45, 0.6, 0.8, 1.0)
C_CANDIDATES = (1.0, 1.5, 2.0)
C_CANDIDATES_BINARY = (1.0, 2.0, 4.0)  # plus log(N0): the theory's choice to keep v inside [-a, a]
SPARSITY_TOL = 0.0025  # kappa is refined until the achieved zero fraction is within this of the target


@dataclass(frozen=True)
class Form:
    """One path-following form a method can run on a row: its core, its operator T, whether T reads xi, and the
    C values it tries. A method with several forms lets every row keep the form with the smallest exact error."""
    name: str
    core: Core
    T: object
    stochastic: bool
    Cs: tuple[float, ...] = (1.0,)
    proxy: tuple[np.ndarray, np.ndarray] | None = None  # (target, column weights) for the screening (Search.screened)


@dataclass
class _Setting:
    C: float
    c_alpha: float | None
    scale: np.ndarray | None
    bs: int
    base: np.ndarray | None  # per-row base threshold (unstructured pruning)
    form: int = 0  # index into Search.forms


def _nearest_on_grid(W: np.ndarray, scale: np.ndarray, bs: int, bits: int) -> np.ndarray:
    """Round-to-nearest values of W on the grid (1-bit: sign, 0 -> +a)."""
    rep = np.repeat(scale, bs, axis=1)[:, : W.shape[1]]
    if bits == 1:
        return np.where(W < 0, -rep, rep)
    return np.clip(np.rint(W / np.where(rep > 0, rep, 1.0)), -levels(bits), levels(bits)) * rep


def _clip_fraction(V: np.ndarray, P: np.ndarray, bs: int, live: np.ndarray) -> float:
    lim = np.repeat(P[..., 0] * P[..., 1], bs, axis=1)[:, : V.shape[1]]
    mask = np.broadcast_to(live, V.shape)  # live: per column, or per row and column (Grams.stack)
    if not mask.any():
        return 0.0
    return float(np.mean(np.abs(V[mask]) > lim[mask]))


def _candidates(config: QuantConfig, stochastic: bool) -> tuple[float, ...]:
    if config.c_alpha is not None:
        return (float(config.c_alpha),)
    if config.bits == 1:
        return CANDIDATES_BINARY_STOCHASTIC if stochastic else CANDIDATES_BINARY_NEAREST
    return CANDIDATES[config.bits]


def c_candidates(bits: int | None, n0: int) -> tuple[float, ...]:
    """The C values spfq(auto_C=True) tries: {1, 2, 4, log N0} for 1-bit, {1, 1.5, 2} otherwise."""
    if bits == 1:
        return tuple(sorted(set(C_CANDIDATES_BINARY) | {round(max(1.0, math.log(max(n0, 2))), 3)}))
    return C_CANDIDATES


def base_threshold(W: np.ndarray, sparsity: float, stochastic: bool, live: np.ndarray | None = None) -> np.ndarray:
    """Per-row lambda_n whose EXPECTED zero fraction on |w_n| equals `sparsity` (bisection, vectorized over rows).

    stochastic (operator (c)): P(zero | v) = max(0, 1 - |v| / lambda); deterministic: [|v| < lambda]. Columns not
    `live` (dead inputs, always q = 0) count as zeros. The path following moves v away from w, so this is only the
    starting point that the measured fit then scales.
    """
    A = np.abs(np.asarray(W, dtype=np.float64))
    n1, n0 = A.shape
    live = np.ones(n0, dtype=bool) if live is None else np.asarray(live, dtype=bool)
    Al = A[:, live]
    ndead = n0 - Al.shape[1]
    lo = np.zeros(n1)
    hi = 2.0 * np.maximum(A.max(axis=1), A.mean(axis=1) / max(1.0 - sparsity, 1e-12)) + 1e-300
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        if stochastic:
            z = np.clip(1.0 - Al / mid[:, None], 0.0, 1.0).sum(axis=1)
        else:
            z = (Al < mid[:, None]).sum(axis=1)
        low = (z + ndead) / n0 < sparsity
        lo = np.where(low, mid, lo)
        hi = np.where(low, hi, mid)
    return hi


def _fit_kappa(run: Callable[[float], tuple], target: float, k0: float, factor: float, max_evals: int = 24):
    """Scale kappa so the measured zero fraction of run(kappa)[0] hits target: bracket, then geometric bisection.

    Returns (kappa, (Q, V)) of the evaluated kappa closest to the target (first one within SPARSITY_TOL)."""
    best = None
    lo = hi = None
    k = k0
    for _ in range(max_evals):
        res = run(k)
        z = float(np.mean(res[0] == 0.0))
        if best is None or abs(z - target) < best[0]:
            best = (abs(z - target), k, res)
        if abs(z - target) <= SPARSITY_TOL:
            break
        if z < target:
            lo = k
        else:
            hi = k
        if lo is None:
            k = hi / factor
        elif hi is None:
            k = lo * factor
        else:
            k = math.sqrt(lo * hi)
            if hi / lo < 1.0 + 1e-9:
                break
    return best[1], best[2]


def refit_scale(codes: np.ndarray, scale: np.ndarray, WG: np.ndarray, H: np.ndarray) -> np.ndarray:
    """ALGORITHM Section 6: for fixed integer codes k_n the step minimising ||X w_n - X~ k_n delta||^2 is
    delta_n = k_n^T G w_n / k_n^T H k_n (WG = W G^T: row n is (G w_n)^T). Rows where that is not a positive finite
    number keep their step."""
    K = codes.astype(np.float64)
    num = np.einsum("ij,ij->i", K, WG)
    den = quad(K, H)
    with np.errstate(divide="ignore", invalid="ignore"):
        best = num / den
    ok = np.isfinite(best) & (best > 0)
    out = scale.copy()
    out[ok, 0] = best[ok]
    return out




def run(name: str, L: Prepared, config: QuantConfig, rng: np.random.Generator, forms: list[Form],
        groups: np.ndarray | None, grid=None) -> tuple[np.ndarray, LayerResult]:
    """The whole search for one layer (see the module docstring) around the method's forms; returns (Q, LayerResult).

    grid: optional fixed (scale, bs) that replaces the c_alpha search (rtn's 1-bit mean|w|; c_alpha then None)."""
    return Search(name, L, config, rng, forms, groups, grid)()


class Search:
    """One call's context: the prepared layer, the forms, xi, the settings; each step of the search is a method."""

    def __init__(self, name: str, L: Prepared, config: QuantConfig, rng: np.random.Generator, forms: list[Form],
                 groups: np.ndarray | None, grid=None) -> None:
        self.name, self.L, self.config, self.rng, self.forms = name, L, config, rng, list(forms)
        self.stochastic = any(f.stochastic for f in self.forms)
        self.groups, self.grid = groups, grid
        self.N1, self.N0 = L.W.shape
        self.xi = rng.random((self.N1, self.N0)) if self.stochastic else np.zeros((self.N1, self.N0))
        self.quant = config.bits is not None
        self.prune = config.sparsity > 0 and name != "rtn"
        self.nkeep = config.nm[0] if config.nm else 0
        self.live = L.d > 0
        self.base = base_threshold(L.W, config.sparsity, self.stochastic, self.live) if self.prune else None
        self.everything = np.arange(self.N1)

    def __call__(self) -> tuple[np.ndarray, LayerResult]:
        settings = self.settings()
        if self.per_row(settings):
            Qk, V, st, C_row, c_row, f_row = self.pick_per_row(settings)
            kappa = 1.0
        else:
            Qk, V, st, kappa = self.pick_on_sample(settings)
            C_row, c_row, f_row = np.full(self.N1, st.C), None, np.full(self.N1, st.form)
        P = self.params(st, kappa)
        if self.stochastic and self.config.n_draws > 1 and not self.prune:
            Qk, V = self.best_of_draws(Qk, V, P, st, C_row, f_row)
        return self.finish(Qk, V, P, st, kappa, c_row, f_row)

    # ---------------------------------------------------------------------------------------------- the settings
    def settings(self) -> list[_Setting]:
        """Every (form, C, c_alpha) candidate with its steps (a fixed grid, or no grid when pruning only)."""
        config, out = self.config, []
        for f, form in enumerate(self.forms):
            for C in form.Cs:
                if self.grid is not None:
                    out.append(_Setting(float(C), None, self.grid[0], int(self.grid[1]), self.base, f))
                elif self.quant:
                    for c in _candidates(config, form.stochastic):
                        scale, bs = step_sizes(self.L.W, config.bits, c, config.granularity, config.block_size)
                        out.append(_Setting(float(C), float(c), scale, int(bs), self.base, f))
                else:
                    out.append(_Setting(float(C), None, None, self.N0, self.base, f))
        return out

    def params(self, st: _Setting, kappa: float) -> np.ndarray:
        """The operator's per-row parameters P for a setting (and the pruning threshold factor kappa)."""
        if self.prune:
            return prune_params(st.scale, self.config.bits, kappa * st.base, (self.N1, 1))
        if self.quant:
            return grid_params(st.scale, self.config.bits)
        return prune_params(None, None, np.zeros(self.N1), (self.N1, 1))  # N:M prune only: identity T, no range

    def run(self, rows: np.ndarray, P: np.ndarray, bs: int, C: float, form: int, draw: np.ndarray | None = None):
        """A form's core on `rows` with the given parameters and draw of xi (this call's xi by default)."""
        draw = self.xi if draw is None else draw
        f = self.forms[form]
        return f.core(rows, f.T, np.ascontiguousarray(draw[rows]), np.ascontiguousarray(P[rows]), bs, C,
                      self.groups, self.nkeep)

    def evaluate(self, st: _Setting, kappa: float, rows: np.ndarray):
        return self.run(rows, self.params(st, kappa), st.bs, st.C, st.form)

    # -------------------------------------------------------------------------------------------------- the pick
    def per_row(self, settings: list[_Setting]) -> bool:
        """Whether each row picks its own setting (rows are independent runs when every choice is per row)."""
        c = self.config
        return (self.quant and not self.prune and self.grid is None and c.granularity != "layer"
                and len(settings) > 1)

    def screened(self, settings: list[_Setting]) -> np.ndarray | None:
        """(settings, N1) mask of the candidates each row runs: the config.n_screen best by the form's proxy, the
        OPTQ loss sum_t (w~_t - round(w~_t))^2 / U_tt^2 of rounding the target onto the candidate's grid with the
        error feedback left out (O(N0) per row, where a path following run is O(N0^2)); None: every candidate."""
        k = self.config.n_screen
        if not k or k >= len(settings) or any(self.forms[st.form].proxy is None for st in settings):
            return None
        loss = np.empty((len(settings), self.N1))
        for i, st in enumerate(settings):
            target, weight = self.forms[st.form].proxy
            sq = (target - _nearest_on_grid(target, st.scale, st.bs, self.config.bits)) ** 2
            loss[i] = sq @ weight if weight.ndim == 1 else np.einsum("ij,ij->i", sq, weight)  # per row: Grams.stack
        keep = np.zeros(loss.shape, dtype=bool)
        np.put_along_axis(keep, np.argsort(loss, axis=0, kind="stable")[:k], True, axis=0)
        return keep

    def pick_per_row(self, settings: list[_Setting]):
        """The screened candidates (all by default at 1-2 bits) on every row; each neuron keeps the one with the
        smallest exact error (a layer-wide pick on sampled rows clipped the few outlier rows of transformer weights;
        docs/RESULTS.md section 3). A running best, not every candidate's Q and V side by side: those were 2.2 GB on
        16M weights."""
        keep = self.screened(settings)
        Qk, V = np.zeros((self.N1, self.N0)), np.zeros((self.N1, self.N0))
        best, pick = np.full(self.N1, np.inf), np.full(self.N1, -1, dtype=np.int64)
        for i, st in enumerate(settings):
            rows = self.everything if keep is None else np.flatnonzero(keep[i])
            if rows.size == 0:
                continue
            Qs, Vs = self.evaluate(st, 1.0, rows)
            err = self.L.error(Qs, rows)[0]
            # strictly smaller: ties keep the earlier candidate, as argmin over the stacked errors did
            won = (err < best[rows]) | (pick[rows] < 0)
            at = rows[won]
            Qk[at], V[at], best[at], pick[at] = Qs[won], Vs[won], err[won], i
            del Qs, Vs
        C_row = np.array([st.C for st in settings])[pick]
        c_row = np.array([st.c_alpha for st in settings])[pick]
        f_row = np.array([st.form for st in settings])[pick]
        st = _Setting(float(np.mean(C_row)), float(np.mean(c_row)),
                      np.stack([st.scale for st in settings])[pick, self.everything], settings[0].bs, None)
        return Qk, V, st, C_row, c_row, f_row

    def pick_on_sample(self, settings: list[_Setting]):
        """One setting for the whole layer, chosen on at most SEARCH_ROWS evenly spaced rows (fitting the pruning
        threshold factor per setting), then the full layer with the winner."""
        N1, config = self.N1, self.config
        sub = (self.everything if N1 <= SEARCH_ROWS else
               np.unique(np.linspace(0, N1 - 1, SEARCH_ROWS).round().astype(int)))
        done = None
        if len(settings) > 1 or (self.prune and sub.size < N1):
            best = None  # (err, setting, kappa, result on sub)
            for st in settings:
                if self.prune:
                    kappa, res = _fit_kappa(lambda k: self.evaluate(st, k, sub), config.sparsity, 1.0, 1.5)
                else:
                    kappa, res = 1.0, self.evaluate(st, 1.0, sub)
                err = float(self.L.error(res[0], sub)[0].sum()) if len(settings) > 1 else 0.0
                # a setting that cannot reach the target sparsity (e.g. a small step caps the joint threshold at the
                # grid's range) must not win just because it prunes less: first the sparsity miss, then the error
                miss = (max(0.0, abs(float(np.mean(res[0] == 0.0)) - config.sparsity) - 2 * SPARSITY_TOL)
                        if self.prune else 0.0)
                if best is None or (miss, err) < best[0]:
                    best = ((miss, err), st, kappa, res)
            _, st, kappa, res = best
            done = res if sub.size == N1 else None
        else:
            st, kappa = settings[0], 1.0
        if done is not None:
            Qk, V = done
        elif self.prune:
            kappa, (Qk, V) = _fit_kappa(lambda k: self.evaluate(st, k, self.everything), config.sparsity, kappa, 1.05)
        else:
            Qk, V = self.evaluate(st, kappa, self.everything)
        return Qk, V, st, kappa

    def best_of_draws(self, Qk, V, P: np.ndarray, st: _Setting, C_row: np.ndarray, f_row: np.ndarray):
        """config.n_draws - 1 further independent draws of xi for the rows whose form is stochastic; each neuron keeps
        its best (own setting and form kept)."""
        Qk, V = np.array(Qk), np.array(V)
        sq = self.L.error(Qk)[0]
        runs = [(f, C) for f in np.unique(f_row) if self.forms[f].stochastic
                for C in np.unique(C_row[f_row == f])]
        for _ in range(self.config.n_draws - 1):
            draw = self.rng.random((self.N1, self.N0))
            for f, C in runs:
                rows = np.flatnonzero((C_row == C) & (f_row == f))
                Qd, Vd = self.run(rows, P, st.bs, float(C), int(f), draw)
                sqd = self.L.error(Qd, rows)[0]
                won = sqd < sq[rows]
                Qk[rows[won]], V[rows[won]], sq[rows[won]] = Qd[won], Vd[won], sqd[won]
        return Qk, V

    # ------------------------------------------------------------------------------------------------ the result
    def finish(self, Qk, V, P: np.ndarray, st: _Setting, kappa: float, c_row,
               f_row: np.ndarray) -> tuple[np.ndarray, LayerResult]:
        """Dead columns rounded, integer codes, the optional step re-fit, exact errors, the caller's column order."""
        L, config, live = self.L, self.config, self.live
        if self.quant:
            if not config.sparsity and not config.nm and not live.all():  # (rtn magnitude-prunes with prune False)
                # Input columns never active on the calibration data do not constrain q; rounding w to nearest there
                # (instead of the kernels' q = 0) costs nothing on that data and keeps the weight for inputs that do
                # fire later: zeroing them cost EfficientNet-Lite0 most of its accuracy (docs/RESULTS.md).
                Qk = np.where(live, Qk, _nearest_on_grid(L.W, st.scale, st.bs, config.bits))
            codes, Q = codes_of(Qk, st.scale, st.bs, config.bits)
            scale = np.ascontiguousarray(st.scale, dtype=np.float64)
            if config.refit_scale and scale.shape[1] == 1 and self.name != "rtn":  # rtn stays the data-free baseline
                scale = refit_scale(codes, scale, L.WG, L.H)
                Q = codes * scale
        else:
            codes, Q, scale = None, np.ascontiguousarray(Qk), None
        sq, rel = L.error(Q)
        # back to the caller's column order (errors and per-row figures do not depend on it)
        Q, codes = unpermute(Q, L.perm), None if codes is None else unpermute(codes, L.perm)
        info = LayerResult(codes=codes, scale=scale, block_size=int(st.bs), rel_error=rel, sq_error=sq,
                           clip_fraction=_clip_fraction(V, P, st.bs, live), c_alpha=st.c_alpha, method=self.name,
                           bits=config.bits, C=float(st.C), sparsity=float(np.mean(Q == 0.0)),
                           threshold=(kappa * st.base) if self.prune else None, c_alpha_row=c_row,
                           form_row=(np.array([self.forms[f].name for f in f_row]) if len(self.forms) > 1 else None))
        return Q, info
