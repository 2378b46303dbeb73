"""Mixed precision under a storage budget (--avg-bits): each layer's measured effect on the model output at each
bit width it may get, and the assignment that meets the budget with the smallest summed effect.

Sensitivity of a layer at b bits: the relative squared error ||y - y_float||^2 / ||y_float||^2 of the model output
on the first SAMPLES calibration samples when only that layer's weight is compressed, by the configured method at
b bits on its float inputs (X~ = X, Grams from the other calibration samples: split()), every other weight in
float. It is the layer's
effect on what the user compares, not its own reconstruction error: a layer whose weights hold a few outliers, or
that feeds a sensitive op, shows it there. The effects are taken as additive (first order). Round-to-nearest as
the probe was tried first and dropped: it ranks a layer by an error that the path following then corrects (on the
Fashion-MNIST MLP it made the 784-input layer the most sensitive one at 2 bits).

Allocation: the multiple-choice knapsack "smallest summed effect with stored bits <= budget", solved exactly by
dynamic programming over the budget (in exact units, or BUDGET_STEPS steps with costs rounded up). A
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

# The bit widths a layer may get. What each stores per weight is emit_nbits.STORED_BITS (QDQ stores the same): 3-bit
# codes are held in INT4 like 4-bit ones, so under a storage budget 4 bits is never worse than 3, and 3 is not offered.
CHOICES = (8, 4, 2)
SAMPLES = 32  # calibration samples the probe runs on: one forward pass per (layer, bits) over these
BUDGET_STEPS = 1 << 16  # the knapsack's largest number of budget steps (its resolution when costs are not exact)


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


def allocate(layers: list[Layer], effect: dict[str, dict[int, float]], avg_bits: float) -> list[Assignment]:
    """Bits per layer with stored bits per weight <= avg_bits at the smallest summed effect (module docstring)."""
    n = np.array([int(np.prod(l.shape)) for l in layers], dtype=np.float64)
    # each layer's effect made non-increasing in bits (a probe can measure a lower error at fewer bits by chance)
    eff = np.array([[min(effect[l.name][c] for c in CHOICES if c <= b) for b in CHOICES] for l in layers])
    # every cost n * stored bits is a multiple of 2 gcd(n): exact in that unit, unless the budget would then need more
    # than BUDGET_STEPS steps; then in units of 1 / BUDGET_STEPS of the budget, costs rounded UP (the budget holds)
    unit = 2.0 * np.gcd.reduce(n.astype(np.int64))
    if avg_bits * n.sum() / unit > BUDGET_STEPS:
        unit = avg_bits * n.sum() / BUDGET_STEPS
    cost = np.ceil(n[:, None] * np.array([STORED_BITS[b] for b in CHOICES])[None, :] / unit - 1e-9).astype(np.int64)
    cap = int(np.floor(avg_bits * n.sum() / unit + 1e-9))
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    pick = np.zeros((len(layers), cap + 1), dtype=np.int8)
    for k in range(len(layers)):
        new = np.full(cap + 1, np.inf)
        for i in range(len(CHOICES)):
            c = cost[k, i]
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[: cap + 1 - c] + eff[k, i]
            won = cand < new
            new[won], pick[k, won] = cand[won], i
        best = new
    if not np.isfinite(best).any():  # the rounded costs of even the fewest bits exceed the budget
        chosen = [len(CHOICES) - 1] * len(layers)
    else:
        j, chosen = int(np.argmin(best)), []
        for k in reversed(range(len(layers))):
            i = int(pick[k, j])
            chosen.append(i)
            j -= int(cost[k, i])
        chosen.reverse()
    return [Assignment(l.name, int(n[k]), CHOICES[chosen[k]], effect[l.name]) for k, l in enumerate(layers)]


def stored_bits(assignments: list[Assignment]) -> float:
    """Stored bits per weight of an assignment (what the budget counts)."""
    total = sum(a.weights for a in assignments)
    return sum(STORED_BITS[a.bits] * a.weights for a in assignments) / max(total, 1)
