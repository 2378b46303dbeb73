"""Mixed precision under a budget (--avg-bits, --stored-bits): the knapsack, the probe, the end-to-end run."""
from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import mlp
from onnxspfq import mixed
from onnxspfq.cli import main


class _L:  # what allocate reads of a layer: its name and weight shape
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


def _brute(layers, effect, code_cap, stored_cap):
    """min summed effect over all 4^L assignments with code bits <= code_cap and stored bits <= stored_cap (totals)."""
    n = np.array([np.prod(l.shape) for l in layers], dtype=float)
    return min((sum(effect[l.name][b] for l, b in zip(layers, bits)) for bits in
                itertools.product(mixed.CHOICES, repeat=len(layers))
                if np.dot(n, bits) <= code_cap + 1e-9
                and np.dot(n, [mixed.STORED_BITS[b] for b in bits]) <= stored_cap + 1e-9), default=None)


@pytest.mark.parametrize("seed", range(4))
def test_allocate_is_the_knapsack_optimum(seed):
    """Against brute force over all 4^L assignments (effects random but decreasing in bits, shapes of mixed sizes
    whose costs the DPs hold in exact units): the answer holds both bounds (code bits <= B, stored bits <= the file
    bound) and is the exact optimum, also where both bind."""
    rng = np.random.default_rng(seed)
    layers = [_L(f"l{i}", (int(rng.integers(1, 8)) * 16, int(rng.integers(1, 8)) * 16)) for i in range(6)]
    effect = {l.name: dict(zip(mixed.CHOICES, np.sort(rng.random(4)) * 10.0 ** rng.integers(-6, 0)))
              for l in layers}
    n = np.array([np.prod(l.shape) for l in layers], dtype=float)
    for avg, bound in ((2.0, None), (2.7, None), (3.0, None), (3.0, 3.0), (3.5, None), (3.7, None), (4.0, None),
                       (3.3, 3.6), (3.3, 3.4), (3.5, 3.6), (3.8, 3.9), (5.5, None), (5.5, 4.5), (8.0, None)):
        got = mixed.allocate(layers, effect, avg, bound)
        stored_cap = (mixed.file_bound(avg) if bound is None else bound) * n.sum()
        assert mixed.code_bits(got) <= avg + 1e-12 and mixed.stored_bits(got) * n.sum() <= stored_cap + 1e-9
        summed = sum(effect[a.layer][a.bits] for a in got)
        assert summed == pytest.approx(_brute(layers, effect, avg * n.sum(), stored_cap), rel=1e-12), (avg, bound)
    assert {a.bits for a in mixed.allocate(layers, effect, 8.0)} == {8}
    assert {a.bits for a in mixed.allocate(layers, effect, 2.0)} == {2}
    assert 3 not in {a.bits for a in mixed.allocate(layers, effect, 3.0, 3.0)}  # 4 stores the same as 3


def test_both_bounds_binding_where_a_price_alone_misses():
    """The Fashion-MNIST MLP's measured effects at --avg-bits 3.5 (its report): a price per stored bit alone gave
    2 / 4 / 8 bits (summed effect 4.2e-3); the two-bound knapsack gives the optimum 3 / 4 / 4 (9.1e-4)."""
    layers = [_L("a", (256, 784)), _L("b", (128, 256)), _L("c", (10, 128))]
    effect = {"a": {8: 4.7e-7, 4: 1.3e-4, 3: 6.7e-4, 2: 4.1e-3}, "b": {8: 3.6e-7, 4: 1.0e-4, 3: 5.0e-4, 2: 1.8e-3},
              "c": {8: 6.9e-7, 4: 1.4e-4, 3: 6.4e-4, 2: 3.5e-3}}
    got = mixed.allocate(layers, effect, 3.5)
    assert [a.bits for a in got] == [3, 4, 4] and mixed.stored_bits(got) <= 4.0 and mixed.code_bits(got) <= 3.5


def test_three_bits_is_chosen_and_the_file_bound_holds():
    """Equal layers whose effect halves with each bit: at --avg-bits 3 every layer gets 3 bits (the uniform 3-bit
    model, stored in INT4, is the best within the budget); at 3.5 half get 4; with --stored-bits 3 the same budget
    takes 4 and 2 bits, 3 stored bits per weight; with both bounds binding (3.5 code, 3.6 stored: 3 / 3 / 4 / 4
    stores 4) the priced answer is the optimum 4 / 4 / 4 / 2."""
    layers = [_L(f"l{i}", (16, 16)) for i in range(4)]
    effect = {l.name: {8: 1e-6, 4: 0.01, 3: 0.02, 2: 0.05} for l in layers}
    assert [a.bits for a in mixed.allocate(layers, effect, 3.0)] == [3] * 4
    assert sorted(a.bits for a in mixed.allocate(layers, effect, 3.5)) == [3, 3, 4, 4]
    got = mixed.allocate(layers, effect, 3.0, 3.0)
    assert sorted(a.bits for a in got) == [2, 2, 4, 4] and mixed.stored_bits(got) == 3.0
    assert sorted(a.bits for a in mixed.allocate(layers, effect, 3.5, 3.6)) == [2, 4, 4, 4]
    assert mixed.file_bound(3.0) == mixed.file_bound(2.5) == mixed.file_bound(4.0) == 4.0
    assert mixed.file_bound(2.0) == 2.0 and mixed.file_bound(4.5) == 8.0


def test_split_keeps_the_measured_samples_out_of_the_fit():
    batches = [{"x": np.zeros((16, 3))} for _ in range(6)]
    measured, fit = mixed.split(batches)
    assert sum(len(b["x"]) for b in measured) == mixed.SAMPLES and len(measured) + len(fit) == 6
    measured, fit = mixed.split(batches[:2])  # a small set: half and half
    assert len(measured) == 1 and len(fit) == 1
    measured, fit = mixed.split(batches[:1])  # one batch serves both
    assert measured == fit == batches[:1]


def test_an_outlier_layer_gets_the_bits(tmp_path):
    """A 4-layer MLP whose second layer (1024 weights of 10752) has one input row at 22 sigma, an outlier feature
    (issue 13's OCR recognizer): with room for a few more bits than 4 per weight (--avg-bits 5) the run spends them
    on that layer, reports each layer's bits and why, the codes hold the budget, and the model runs."""
    import onnxruntime as ort

    model = mlp([128, 64, 16, 64, 8], seed=3)
    W1 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    W1[5, :] = 22.0 * W1.std() * np.sign(W1[5, :])
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(W1, "W1"))
    onnx.save(model, str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((512, 128)).astype(np.float32))
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["compress", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "-o", str(out),
                 "--report", str(rep), "-q", "--avg-bits", "5"]) == 0
    layers = json.loads(rep.read_text())["layers"]
    bits = {l["name"]: l["bits"] for l in layers}
    assert bits["mm1"] == 8 and bits["mm0"] == 4, bits
    assert all("--avg-bits" in l["note"] and l["note"].endswith(f"-> {l['bits']} bits") for l in layers)
    effect = {l["name"]: float(l["note"].split(" 4b ")[1].split()[0]) for l in layers}
    assert effect["mm1"] > 3 * max(effect["mm2"], effect["mm3"])  # measured: the outlier layer is the sensitive one
    n = {l["name"]: np.prod(l["shape"]) for l in layers}
    assert sum(bits[k] * n[k] for k in n) <= 5 * sum(n.values())  # code bits; the file bound at 5 is int8's 8
    x = rng.standard_normal((4, 128)).astype(np.float32)
    assert np.all(np.isfinite(ort.InferenceSession(str(out)).run(None, {"x": x})[0]))
