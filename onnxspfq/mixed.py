"""Mixed precision under a budget (--avg-bits, --stored-bits): each layer's measured effect on the model output at
each bit width it may get, and the assignment that meets the budget with the smallest summed effect.

Sensitivity of a layer at b bits: the relative squared error ||y - y_float||^2 / ||y_float||^2 of the model output
on the first SAMPLES calibration samples when only that layer's weight is compressed, by the configured method at
b bits on its float inputs (X~ = X, Grams from the other calibration samples: split()), every other weight in
float. It is the layer's effect on what the user compares, not its own reconstruction error: a layer whose
weights hold a few outliers, or that feeds a sensitive op, shows it there. The effects are taken as additive
(first order). Round-to-nearest as the probe was tried first and dropped: it ranks a layer by an error that the
path following then corrects (on the Fashion-MNIST MLP it made the 784-input layer the most sensitive one at 2
bits).

The budget: at most B bits per weight on average as --bits counts them (code bits: a 3-bit layer counts 3), in a
file no larger than a uniform --bits ceil(B) model's (stored bits <= STORED_BITS of ceil(B)), or within
--stored-bits S stored bits. 3-bit codes are held in INT4, as neither ONNX nor MatMulNBits has a 3-bit type, so a
layer at 3 bits saves code bits, not bytes; with S <= B the file bound alone binds and 3 bits is never chosen over
4. A budget in stored bits alone was the first design: the choice was then 8 / 4 / 2, and MiniLM-L6 at --avg-bits 3
(0.9359 cosine) lost to uniform 3 bits (0.9578, RESULTS.md section 11) in a file only 2.5 % smaller. Under the code
budget, uniform floor(B) bits is always an assignment within it (at integer B: the uniform B-bit model).

Allocation: the multiple-choice knapsack "smallest summed effect with code bits <= budget", solved exactly by
dynamic programming over the budget (in exact units, or BUDGET_STEPS steps with costs rounded up). The default file
bound binds only for B in (3, 4) (below, every assignment within the code budget stores at most 4 bits; above, at
most 8). Where both bind: the better of a price per stored bit added to each effect (the smallest price that
meets the bound, by bisection: Lagrangian relaxation, optimal among the assignments storing no more than its
answer, but it can miss by far: the comment in allocate) and the DP over both budgets (exact where the costs'
units fit its steps, else rounded up so that both bounds hold). A
greedy descent by effect per saved bit was tried first and overshot: on the Fashion-MNIST MLP at --avg-bits 4 it
gave the three layers 2 / 4 / 8 bits (2.3 stored bits per weight, far under the budget) where the optimum under the
same effects is 4 / 4 / 4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from onnxspfq.emit_nbits import STORED_BITS
from onnxspfq.io import Model, session
from onnxspfq.graph import weightless
from onnxspfq.layers import Layer

# The bit widths a layer may get (what each stores per weight: emit_nbits.STORED_BITS; QDQ stores the same)
CHOICES = (8, 4, 3, 2)
SAMPLES = 32  # calibration samples the probe runs on: one forward pass per (layer, bits) over these
BUDGET_STEPS = 1 << 16  # the knapsack's largest number of budget steps (its resolution when costs are not exact)
PRICE_STEPS = 60  # bisection steps for the price per stored bit (module docstring)
CELLS_2D = 1 << 24  # the two-budget knapsack's picks held (layers x code steps x stored steps, int8)


@dataclass
class Assignment:
    """One layer's bits and the measured effects behind them."""

    layer: str
    weights: int
    bits: int
    effect: dict[int, float]  # bits -> relative output error with only this layer at those bits

    def why(self) -> str:
        shown = " / ".join(f"{b}b {self.effect[b]:.1e}" for b in CHOICES)
        return f"--avg-bits: output error with this layer alone rounded at {shown} -> {self.bits} bits"


def split(batches: list[dict[str, np.ndarray]]) -> tuple[list[dict], list[dict]]:
    """(measure, fit): the first batches holding min(SAMPLES, half of all) samples, on which the effects are
    measured, and the rest, from which each probe's Grams come. Disjoint, because a probe fitted on the samples
    it is measured on hides its error (path following at 2 bits on 32 samples fits them almost exactly); one
    batch serves both."""
    sizes = [len(next(iter(b.values()))) for b in batches]
    want, n, k = min(SAMPLES, sum(sizes) / 2), 0, 0
    while k < len(batches) - 1 and n < want:
        n += sizes[k]
        k += 1
    k = max(k, 1)
    return batches[:k], (batches[k:] or batches[:k])


def measure(view: Model, layers: list[Layer], batches: list[dict[str, np.ndarray]], output: str,
            probe: Callable[[Layer, int], np.ndarray]) -> dict[str, dict[int, float]]:
    """{layer name: {bits: relative output error}} with one layer at a time replaced by probe(layer, bits) (a W0-
    layout array), on `batches` (split()'s first part). One session of the whole model, weights fed."""
    wl, fed = weightless(view, {l.weight for l in layers})
    sess = session(wl.SerializeToString())
    weights = {name: np.asarray(view.array(name)) for name in fed}
    runs = batches

    def outputs(feed_w: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [sess.run([output], {**b, **feed_w})[0].astype(np.float64) for b in runs]

    ref = outputs(weights)
    norm = sum(float(np.sum(r * r)) for r in ref) or 1.0
    effect: dict[str, dict[int, float]] = {}
    for layer in layers:
        effect[layer.name] = {}
        for bits in CHOICES:
            w = probe(layer, bits).astype(weights[layer.weight].dtype, copy=False)
            out = outputs({**weights, layer.weight: w})
            effect[layer.name][bits] = sum(float(np.sum((o - r) ** 2)) for o, r in zip(out, ref)) / norm
    return effect


def file_bound(avg_bits: float) -> float:
    """Stored bits per weight of a uniform --bits ceil(avg_bits) model: the file bound of the budget."""
    return float(STORED_BITS.get(int(np.ceil(avg_bits - 1e-9)), 8))


def allocate(layers: list[Layer], effect: dict[str, dict[int, float]], avg_bits: float,
             stored_bits: float | None = None) -> list[Assignment]:
    """Bits per layer with code bits per weight <= avg_bits and stored bits per weight <= stored_bits (None:
    file_bound(avg_bits)), at the smallest summed effect (module docstring)."""
    n = np.array([int(np.prod(l.shape)) for l in layers], dtype=np.float64)
    # each layer's effect made non-increasing in bits (a probe can measure a lower error at fewer bits by chance)
    eff = np.array([[min(effect[l.name][c] for c in CHOICES if c <= b) for b in CHOICES] for l in layers])
    code = n[:, None] * np.array(CHOICES, dtype=np.float64)[None, :]
    stored = n[:, None] * np.array([STORED_BITS[b] for b in CHOICES], dtype=np.float64)[None, :]
    bound = (file_bound(avg_bits) if stored_bits is None else stored_bits) * n.sum()

    def stores(chosen: list[int]) -> float:
        return float(stored[np.arange(len(layers)), chosen].sum())

    def summed(chosen: list[int]) -> float:
        return float(eff[np.arange(len(layers)), chosen].sum())

    def one(value: np.ndarray, cost: np.ndarray, budget: float) -> list[int]:  # nothing fits: the fewest bits
        return _knapsack(value, [(cost, budget)], BUDGET_STEPS) or [len(CHOICES) - 1] * len(layers)

    if bound <= avg_bits * n.sum():  # code bits <= stored bits: the file bound is the only one that binds
        chosen = one(eff, stored, bound)
    else:
        chosen = one(eff, code, avg_bits * n.sum())
    if stores(chosen) > bound + 1e-9:
        # a price per stored bit on top of each effect; at `hi` one stored bit outweighs every effect, so that
        # answer stores least (within any bound: at most the all-2-bit file)
        lo, hi = 0.0, 2.0 * (eff.max(axis=1).sum() + 1e-300) / (2.0 * n.min())
        best = one(eff + hi * stored, code, avg_bits * n.sum())
        for _ in range(PRICE_STEPS):
            price = 0.5 * (lo + hi)
            pick = one(eff + price * stored, code, avg_bits * n.sum())
            if stores(pick) > bound + 1e-9:
                lo = price
                continue
            hi = price
            if summed(pick) < summed(best):
                best = pick
        # both budgets in one DP: the price alone can miss the optimum by far (on the Fashion-MNIST MLP at
        # --avg-bits 3.5 it gave 2 / 4 / 8 bits, summed effect 4.2e-3, where 3 / 4 / 4, 9.1e-4, holds both bounds:
        # the report's per-layer effects; tests/test_mixed.py)
        both = _knapsack(eff, [(code, avg_bits * n.sum()), (stored, bound)],
                         max(16, int(np.sqrt(CELLS_2D / max(len(layers), 1)))))
        if both is not None and summed(both) < summed(best):
            best = both
        chosen = best
    return [Assignment(l.name, int(n[k]), CHOICES[chosen[k]], effect[l.name]) for k, l in enumerate(layers)]


def _units(cost: np.ndarray, budget: float, steps: int) -> tuple[np.ndarray, int]:
    """Costs in steps and the budget's step count: exact in the costs' gcd unit when that needs at most `steps`
    steps, else in units of budget / steps with costs rounded UP (the budget then holds)."""
    unit = float(np.gcd.reduce(np.rint(cost).astype(np.int64).ravel()))
    if budget / unit > steps:
        unit = budget / steps
    return np.ceil(cost / unit - 1e-9).astype(np.int64), int(np.floor(budget / unit + 1e-9))


def _knapsack(value: np.ndarray, bounds: list[tuple[np.ndarray, float]], steps: int) -> list[int] | None:
    """The choice per row of `value` (layers x CHOICES) with each summed cost within its budget (`bounds`: (cost
    per layer and choice, budget) pairs) at the smallest summed value, by dynamic programming over the budgets, at
    most `steps` steps each (_units: exact where the costs' units fit, else rounded up so that every budget holds
    and a little of it may go unused). None: nothing fits."""
    units = [_units(cost, budget, steps) for cost, budget in bounds]
    size = tuple(cap + 1 for _, cap in units)
    best = np.full(size, np.inf)
    best[(0,) * len(size)] = 0.0
    pick = np.zeros((len(value),) + size, dtype=np.int8)
    for k in range(len(value)):
        new = np.full(size, np.inf)
        for i in range(value.shape[1]):
            shift = [int(s[k, i]) for s, _ in units]
            if any(a >= m for a, m in zip(shift, size)):
                continue
            cand = np.full(size, np.inf)
            cand[tuple(slice(a, None) for a in shift)] = best[tuple(slice(0, m - a) for a, m in zip(shift, size))] \
                + value[k, i]
            won = cand < new
            new[won], pick[k][won] = cand[won], i
        best = new
    if not np.isfinite(best).any():
        return None
    at, chosen = list(np.unravel_index(int(np.argmin(best)), size)), []
    for k in reversed(range(len(value))):
        i = int(pick[(k, *at)])
        chosen.append(i)
        at = [j - int(s[k, i]) for j, (s, _) in zip(at, units)]
    chosen.reverse()
    return chosen


def stored_bits(assignments: list[Assignment]) -> float:
    """Stored bits per weight of an assignment (what the budget counts)."""
    total = sum(a.weights for a in assignments)
    return sum(STORED_BITS[a.bits] * a.weights for a in assignments) / max(total, 1)


def code_bits(assignments: list[Assignment]) -> float:
    """Code bits per weight of an assignment (what --avg-bits counts)."""
    total = sum(a.weights for a in assignments)
    return sum(a.bits * a.weights for a in assignments) / max(total, 1)
