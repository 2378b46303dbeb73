"""Mixed precision under a storage budget (--avg-bits): the knapsack, the probe, the end-to-end run."""
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


@pytest.mark.parametrize("seed", range(4))
def test_allocate_is_the_exact_knapsack_optimum(seed):
    """The DP's assignment equals brute force over all 3^L assignments: stored bits per weight within the budget,
    smallest summed effect (effects random but decreasing in bits, shapes of mixed sizes)."""
    rng = np.random.default_rng(seed)
    layers = [_L(f"l{i}", (int(rng.integers(1, 40)) * 8, int(rng.integers(1, 30)) * 4)) for i in range(6)]
    effect = {l.name: dict(zip(mixed.CHOICES, np.sort(rng.random(3) * 10.0 ** rng.integers(-6, 0)))) for l in layers}
    n = np.array([np.prod(l.shape) for l in layers], dtype=float)
    for avg in (2.0, 2.7, 3.0, 4.0, 5.5, 8.0):
        got = mixed.allocate(layers, effect, avg)
        assert mixed.stored_bits(got) <= avg + 1e-12
        best = min(sum(effect[l.name][b] for l, b in zip(layers, bits))
                   for bits in itertools.product(mixed.CHOICES, repeat=len(layers))
                   if np.dot(n, [mixed.STORED_BITS[b] for b in bits]) <= avg * n.sum() + 1e-9)
        assert sum(effect[a.layer][a.bits] for a in got) == pytest.approx(best, rel=1e-12)
    assert {a.bits for a in mixed.allocate(layers, effect, 8.0)} == {8}
    assert {a.bits for a in mixed.allocate(layers, effect, 2.0)} == {2}


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
    on that layer, reports each layer's bits and why, the stored codes hold the budget, and the model runs."""
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
    assert sum(mixed.STORED_BITS[bits[k]] * n[k] for k in n) <= 5 * sum(n.values())
    x = rng.standard_normal((4, 128)).astype(np.float32)
    assert np.all(np.isfinite(ort.InferenceSession(str(out)).run(None, {"x": x})[0]))
