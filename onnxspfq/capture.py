"""Stream each layer's inputs X (float model) and X~ (partially compressed model) into Gram statistics.

How (FORMATS.md, "Collecting layer inputs"): the model is cut once into segments, one per layer in layer order;
segment k holds the nodes first needed to compute layer k's input. Each segment is an in-memory
sub-model (graph.sub_model) of a shape-inferred, weight-less copy of the model; the layer weights (and every
initializer of >= 1024 elements) are handed to the segment's session as constants without serialising the model
(io.session's `initializers`): one session per segment and set of weights, shared by the float and the
compressed run until a weight of that segment is replaced (onnxruntime runs a Conv fed its weight as an input
without its optimised layout). Two frontiers of computed tensors (float, compressed) are carried
forward segment by segment; a tensor is dropped as soon as no later segment or layer read needs it, so each node
runs once per batch per frontier (never a re-run of the whole prefix). Compressed tensors that no replaced weight
can have changed are shared with the float frontier instead of being recomputed.

Memory: frontier arrays are kept per batch in RAM up to `memory_limit_mb` (both frontiers together); above that,
new arrays are written to .npy files in a temporary folder and read back through np.memmap. The folder is removed
by close() (or when the Capture is garbage collected).
"""
from __future__ import annotations

import hashlib
import weakref
from collections import Counter
from itertools import accumulate
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxspfq.graph import needed_nodes, node_reads, sub_model, weightless
from onnxspfq.layers import MATMUL_OPS, Layer
from onnxspfq.spill import Budget, Held, cleanup
from onnxspfq.io import Model, as_model, session, session_options
from onnxspfq.gram import Grams
from onnxspfq.activations import ActScales, calibrate_many

# Activations held in RAM (both frontiers together); beyond this they are spilled to a temporary folder, so memory
# does not grow with the calibration set (Fashion-MNIST CNN, 8192 samples: 2 GB of frontier arrays at batch 16).
# 8, not 16: with the float32 Gram products the CNN's 256-sample peak fell 8 MB and its 8192-sample peak sat 2.4 MB
# under bench_memory's 1.1x flatness limit; at 8 it is 8.1 MB under (RESULTS.md section 27). The real models spill
# gigabytes either way, and the README example did not slow (farm-bench wall A/B 0.99)
MEMORY_LIMIT_MB = 8
FLUSH_VALUES = 1 << 20  # rows are folded into the Grams once this many input values are pending (8 MB float64)


@dataclass(frozen=True)
class Digest:
    """Stands for a weight array the caller no longer holds (see Capture.release): shape, dtype and a hash."""

    shape: tuple[int, ...]
    dtype: str
    blake2b: bytes

    @staticmethod
    def of(arr: np.ndarray) -> "Digest":
        a = np.ascontiguousarray(arr)
        return Digest(tuple(a.shape), a.dtype.str, hashlib.blake2b(a.data, digest_size=16).digest())


@dataclass
class _Segment:
    nodes: list[int]
    inputs: list[str]       # frontier tensors read
    weights: list[str]      # fed initializers read
    outputs: list[str]      # tensors later segments / layer reads need


@dataclass
class _Frontier:
    pos: int = 0                                                # segments run so far
    store: dict[tuple[int, str], Held] = field(default_factory=dict)
    tainted: set[str] = field(default_factory=set)              # tensors a replaced weight may have changed
    used: dict[str, np.ndarray | None] = field(default_factory=dict)  # weight fed per name (None = original)


# ------------------------------------------------------------------------------------------------------- Capture
class Capture:
    """Per-layer Grams from the float model and the partially compressed model (see the module docstring).

    model: the (folded) model the layers were found in; layers: in the order grams() will be called;
    batches: calibration feeds; max_patches: Conv im2col rows kept per layer over all batches (a seeded uniform
    subset, the same rows in X and X~, seeded by (seed, layer index); _patch_picks); None keeps all. group_patches:
    the same for grouped (depthwise) Convs, whose groups have N0 = C / groups * kernel inputs each (the smaller cap
    applies). token_mask: a feed name whose (batch, sequence) zeros mark padding tokens: MatMul rows of a (batch,
    sequence, N0) input at those positions are left out of the Grams (calib.token_mask_input); None keeps every
    row. act: activation quantization (W8A8): each of act.tensors is fake-quantized in the compressed model
    (activations.py), where downstream nodes read it too. full_grams: the layers (by name) whose method reads G
    itself (the plain path's kernels); the others may get their Grams in the weight form (_weight_form); None: all.
    reference: a model output the float frontier goes on to compute after the last layer (reference_outputs), so
    that the final agreement check need not run the float model again (MiniLM-L6: 17 % of a run was that check).
    """

    def __init__(self, model: Model | onnx.ModelProto, layers: list[Layer], batches: list[dict[str, np.ndarray]],
                 max_patches: int | None = 4096, seed: int = 0, progress: bool = False,
                 memory_limit_mb: int = MEMORY_LIMIT_MB, spill_dir: str | None = None,
                 providers: list[str] | None = None, token_mask: str | None = None,
                 act: ActScales | None = None, group_patches: int | None = None,
                 full_grams: set[str] | None = None, reference: str | None = None) -> None:
        if not batches:
            raise ValueError("Capture needs at least one calibration batch")
        self.layers = list(layers)
        self._index = {layer.name: i for i, layer in enumerate(self.layers)}
        self.batches = batches
        self.max_patches = max_patches
        self.group_patches = group_patches
        self.seed = seed
        self.token_mask = token_mask
        self.act = act
        self.full_grams = full_grams
        self._readers = Counter(layer.input for layer in self.layers)
        self.progress = progress
        self.providers = providers or ["CPUExecutionProvider"]
        self._model = as_model(model)
        self._inits = {t.name: t for t in self._model.graph.initializer}
        wl, self._fed = weightless(self._model, fed={layer.weight for layer in self.layers})
        wl.graph.ClearField("quantization_annotation")
        if len(wl.graph.sparse_initializer):
            raise ValueError("models with sparse initializers are not supported by Capture; densify them first")
        self._wl = wl
        self._value_infos = {v.name: v for v in list(wl.graph.value_info) + list(wl.graph.input) + list(wl.graph.output)}
        self._graph_inputs = [i.name for i in wl.graph.input if i.name not in self._inits]
        cuts, self._segment_of = _cuts(wl, [layer.input for layer in self.layers], act.tensors if act else set())
        self._reference = reference if reference in {o.name for o in wl.graph.output} else None
        # the float frontier's plan has one more segment, up to the reference; the compressed frontier keeps and
        # releases by the plan without it, so it never holds what only that segment reads
        self._plan, self._last_use, self._weight_last_use = _plan(
            wl, cuts + [self._reference] * bool(self._reference), self._fed, self._graph_inputs)
        self._comp_last_use = self._last_use
        if self._reference:
            _, self._comp_last_use, self._weight_last_use = _plan(wl, cuts, self._fed, self._graph_inputs)
        self._budget = Budget(int(memory_limit_mb) * 2 ** 20, spill_dir)
        self._finalizer = weakref.finalize(self, cleanup, self._budget)
        self._sessions: dict[tuple, ort.InferenceSession] = {}  # (segment, weights used): _session
        self._orig: dict[str, np.ndarray] = {}
        self._digests: dict[int, tuple[weakref.ref, Digest]] = {}
        self._float = self._fresh()
        self._comp = self._fresh(compressed=True)
        self._last: tuple = (None, [], [])  # the last Grams built, their key and frontier arrays (_layer_grams)

    # -- public -------------------------------------------------------------------------------------------------
    def grams(self, layer: Layer, weights: dict[str, np.ndarray]) -> list[Grams]:
        """One Grams per group (group_rows order) of `layer`'s input: X from the float model, X~ from the model
        whose initializers named in `weights` hold the given float arrays (arrays must not be mutated later)."""
        if layer.name not in self._index:
            raise ValueError(f"layer {layer.name!r} is not one of this Capture's layers")
        k = self._index[layer.name]
        last = self._segment_of[k]  # the segment computing this layer's input
        for name, arr in weights.items():
            if name not in self._fed:
                raise ValueError(f"weight {name!r} is not a layer weight of this Capture's model")
            if not isinstance(arr, Digest) and tuple(np.shape(arr)) != tuple(self._inits[name].dims):
                raise ValueError(f"weight {name!r}: shape {np.shape(arr)} differs from {tuple(self._inits[name].dims)}")
        if self._float.pos > last + 1:
            self._float = self._fresh()
        if self._comp.pos > last + 1 or not self._consistent(weights):
            self._comp = self._fresh(compressed=True)
        start = min(self._float.pos, self._comp.pos)
        steps = range(start, last + 1)
        if self.progress and len(steps) > 1:
            from tqdm import tqdm
            steps = tqdm(steps, desc=f"capture {layer.name}", leave=False)
        for s in steps:
            if self._float.pos == s:
                self._advance(self._float, s, {}, None)
            if self._comp.pos == s:
                self._advance(self._comp, s, weights, self._float if self._float.pos == s + 1 else None)
        self._housekeeping()
        return self._layer_grams(k, layer)

    def reference_outputs(self, max_values: int, call_values: int
                          ) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]] | None:
        """(the float model's `reference` output per batch, the feeds it is for), from the float frontier: only the
        nodes after the last layer input run, on the batches in order until max_values values. None without a
        reference, where the shapes do not tell the output's size before it runs, or where one batch's output is
        over call_values values (a decoder's logits): the caller then runs the float model itself, in row slices.
        Not sliced here: the frontier was computed on whole batches, and a node that mixes rows along axis 0 (a
        time-major GRU) makes a slice of it differ from what the model computes on the slice of the feeds."""
        if self._reference is None:
            return None
        sizes = [self._reference_size(feed) for feed in self.batches]
        if None in sizes or max(sizes, default=0) > call_values:
            return None
        n = next((k + 1 for k, total in enumerate(accumulate(sizes)) if total >= max_values), len(sizes))
        last = len(self._plan) - 1
        for s in range(self._float.pos, last):
            self._advance(self._float, s, {}, None)
        seg = self._plan[last]
        if not seg.nodes:  # the reference is a tensor an earlier segment computed
            return [np.array(self._float.store[(b, self._reference)].get()) for b in range(n)], self.batches[:n]
        for w in seg.weights:
            self._float.used[w] = None
        sess = self._session(last, self._float, {})
        return ([sess.run([self._reference], {t: self._float.store[(b, t)].get() for t in seg.inputs})[0]
                 for b in range(n)], self.batches[:n])

    def _reference_size(self, feed: dict[str, np.ndarray]) -> int | None:
        """Values of the reference output on `feed`, from its declared shape with the symbolic dims the graph
        inputs share bound to the feed's sizes; None where a dim stays unknown."""
        bound: dict[str, int] = {}
        for name in self._graph_inputs:
            if name in feed and name in self._value_infos:
                dims = self._value_infos[name].type.tensor_type.shape.dim
                bound.update({d.dim_param: n for d, n in zip(dims, np.shape(feed[name])) if d.dim_param})
        t = self._value_infos[self._reference].type.tensor_type
        if not t.HasField("shape"):
            return None
        size = 1
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                size *= d.dim_value
            elif d.dim_param in bound:
                size *= bound[d.dim_param]
            else:
                return None
        return size

    def close(self) -> None:
        """Free sessions and arrays and remove the spill folder."""
        self._sessions.clear()
        self._last = (None, [], [])
        self._float = _Frontier()
        self._comp = _Frontier()
        self._finalizer()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- frontiers ------------------------------------------------------------------------------------------------
    def _fresh(self, compressed: bool = False) -> _Frontier:
        f = _Frontier()
        for b, feed in enumerate(self.batches):
            for name in self._graph_inputs:
                if name in feed:
                    f.store[(b, name)] = Held(np.asarray(feed[name]), None)
        if compressed and self.act is not None:
            self._quantize(f, [n for n in self._graph_inputs if n in self.act.tensors],
                           lambda b, t: np.asarray(self.batches[b][t]))
        return f

    def _quantize(self, fr: _Frontier, names: list[str], float_value) -> None:
        """Fake-quantize the compressed frontier's tensors `names` (activation quantization), each at the scale
        calibrated on its float values; they then count as changed for every later segment."""
        nb = len(self.batches)
        if any(t in self.act.groups and t not in self.act.scales for t in names):
            self._group_scales()
        for t in names:
            self.act.scale(t, [self._real_tokens(b, float_value(b, t)) for b in range(nb)])
            for b in range(nb):
                fr.store[(b, t)] = Held(self.act.fake_quant(t, fr.store[(b, t)].get()), self._budget)
            fr.tainted.add(t)

    def _group_scales(self) -> None:
        """Every Concat group's scale (ActScales.groups), from its Concat outputs' float values: those lie ahead of
        the frontier when the first member is quantized, so one session of the float model's nodes up to them runs
        over the calibration batches (twice for the percentile), holding one batch at a time."""
        outs = sorted(set(o for group in self.act.groups.values() for o in group))
        g = self._wl.graph
        nodes = needed_nodes(g, outs, set())
        reads = {t for i in nodes for t in node_reads(g.node[i])}
        weights = [w for w in sorted(self._fed) if w in reads]
        inputs = [t for t in self._graph_inputs if t in reads]
        sub = sub_model(self._wl, nodes, inputs, outs, self._value_infos, constants=weights)
        sess = session(sub.SerializeToString(), session_options(), self.providers,
                       initializers={w: self._weight_feed(w, {}) for w in weights})
        unsigned = [o in self.act.unsigned for o in outs]
        own = calibrate_many(lambda: ([self._real_tokens(b, v) for v in sess.run(outs, {t: feed[t] for t in inputs})]
                                      for b, feed in enumerate(self.batches)), self.act.config, unsigned)
        self.act.set_groups(dict(zip(outs, own)))

    def _real_tokens(self, b: int, x: np.ndarray) -> np.ndarray:
        """x without its padding positions (token_mask's zeros) where x is (batch, sequence, ...) over the mask's
        shape: the activation scales come from the tokens the model's result reads (MiniLM-L6 W8A8 calibrated on
        padded batches: cosine 0.9379 with the padding's values in the percentile, RESULTS.md section 15)."""
        mask = self.batches[b].get(self.token_mask) if self.token_mask else None
        if mask is None or x.ndim < 3 or tuple(x.shape[:2]) != tuple(np.shape(mask)):
            return x
        return x[np.asarray(mask) != 0]

    def release(self, weights: dict[str, np.ndarray | Digest]) -> dict[str, np.ndarray | Digest]:
        """`weights` with each array whose last reader has run in the compressed model replaced by its Digest, so
        the caller can drop the array (memory: one layer's weights at a time, not the whole compressed model).
        Pass the returned dict on to grams(); a Digest stands for the array it was made from.
        With Loop body layers nothing is released: compressing one changes a weight the loop read, and the
        compressed model is then run again from its start, needing every earlier weight."""
        if any(layer.stacked for layer in self.layers):
            return weights
        done = self._comp.pos
        return {name: (self._digest(a) if isinstance(a, np.ndarray) and name in self._comp.used
                       and self._weight_last_use.get(name, -1) < done else a) for name, a in weights.items()}

    def _digest(self, arr: np.ndarray | Digest) -> Digest:
        if isinstance(arr, Digest):
            return arr
        hit = self._digests.get(id(arr))
        if hit is not None and hit[0]() is arr:
            return hit[1]
        d = Digest.of(arr)
        try:
            self._digests[id(arr)] = (weakref.ref(arr), d)
        except TypeError:  # not weak-referenceable (a view of a buffer): no cache
            pass
        return d

    def _consistent(self, weights: dict[str, np.ndarray | Digest]) -> bool:
        for name, old in self._comp.used.items():
            new = weights.get(name)
            if (old is None) != (new is None):
                return False
            if new is not None and self._digest(new) != old:
                return False
        return True

    def _advance(self, fr: _Frontier, s: int, weights: dict[str, np.ndarray], float_fr: _Frontier | None) -> None:
        seg = self._plan[s]
        last_use = self._comp_last_use if fr is self._comp else self._last_use
        for key in [key for key in fr.store if last_use.get(key[1], -1) < s]:
            del fr.store[key]
        fr.pos = s + 1
        if not seg.nodes:
            return
        outputs = [t for t in seg.outputs if t in last_use]
        replaced = [w for w in seg.weights if w in weights]
        for w in seg.weights:
            fr.used[w] = None if weights.get(w) is None else self._digest(weights[w])
        dirty = bool(replaced) or any(t in fr.tainted for t in seg.inputs)
        nb = len(self.batches)
        quantized = ([t for t in outputs if t in self.act.tensors]
                     if self.act is not None and fr is self._comp else [])
        if (float_fr is not None and not dirty
                and all((b, t) in float_fr.store for b in range(nb) for t in outputs)):
            for b in range(nb):
                for t in outputs:
                    fr.store[(b, t)] = float_fr.store[(b, t)]
        else:
            sess = self._session(s, fr, weights)
            for b in range(nb):
                feeds = {t: fr.store[(b, t)].get() for t in seg.inputs}
                for t, arr in zip(outputs, sess.run(outputs, feeds)):
                    fr.store[(b, t)] = Held(arr, self._budget)
            if dirty:
                fr.tainted.update(outputs)
        self._quantize(fr, quantized, lambda b, t: self._float.store[(b, t)].get())

    def _weight_feed(self, name: str, weights: dict[str, np.ndarray]) -> np.ndarray:
        t = self._inits[name]
        if isinstance(weights.get(name), Digest):
            raise ValueError(f"weight {name!r} was released (Capture.release) but is needed again: pass the array")
        if name in weights:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            return np.ascontiguousarray(weights[name], dtype=dtype)
        if name not in self._orig:
            self._orig[name] = self._model.array(t)
        return self._orig[name]

    def _session(self, s: int, fr: _Frontier, weights: dict[str, np.ndarray]) -> ort.InferenceSession:
        """Segment s's session holding the weights fr uses (fr.used) as constants, so one session per segment
        serves both frontiers until a weight of it is replaced."""
        seg = self._plan[s]
        key = (s, tuple(fr.used[w] for w in seg.weights))
        if key in self._sessions:
            return self._sessions[key]
        infos = self._value_infos
        for t in seg.inputs:  # tensors shape inference could not type: declare them from the actual arrays
            if t not in infos:
                a = fr.store[(0, t)].get()
                infos[t] = onnx.helper.make_tensor_value_info(
                    t, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim)
        sub = sub_model(self._wl, seg.nodes, seg.inputs, seg.outputs, infos, constants=seg.weights)
        sess = session(sub.SerializeToString(), session_options(), self.providers,
                       initializers={w: self._weight_feed(w, weights) for w in seg.weights})
        self._sessions[key] = sess
        return sess

    def _housekeeping(self) -> None:
        done = min(self._float.pos, self._comp.pos)
        for key in [key for key in self._sessions if key[0] < done]:
            del self._sessions[key]
        for w in [w for w in self._orig if self._weight_last_use.get(w, -1) < done]:
            del self._orig[w]

    # -- statistics -----------------------------------------------------------------------------------------------
    def _layer_grams(self, k: int, layer: Layer) -> list[Grams]:
        held = [(self._float.store[(b, layer.input)], self._comp.store[(b, layer.input)])
                for b in range(len(self.batches))]
        # one Gram build per distinct input: Q, K and V of an attention block read the same tensor, unchanged by
        # each other's compression (MiniLM-L6: 12 of its 36 builds were repeats). Conv rows are subsampled per
        # layer, so only MatMul / Gemm rows are shared; the frontier arrays themselves are the key.
        key = (layer.input, layer.op, layer.trans_a, layer.n0) if layer.op in MATMUL_OPS else None
        last_key, last_held, last_grams = self._last
        if key is not None and key == last_key and all(a is c and b is d for (a, b), (c, d) in zip(held, last_held)):
            return last_grams
        out = self._build_grams(k, layer, held)
        self._last = (key, held, out) if key is not None else (None, [], [])
        return out

    def _weight_form(self, layer: Layer) -> bool:
        """Whether the layer's Grams are built in the weight form (gram.Grams: W G^T and w^T F w from the layer's
        own float output instead of G and F): its method does not read G, no other layer reads its input (Grams
        shared by several weights), and a group's N1 is at most N0 / 2, where its output costs 2 m N0 N1 against
        1.5 m N0^2 for G and F (FFN down projections, 1 x 1 projections, depthwise groups)."""
        if self.full_grams is None or layer.name in self.full_grams or layer.stacked:
            return False
        per_group = layer.n1 // layer.groups
        return self._readers[layer.input] == 1 and 2 * per_group <= layer.n0

    def _build_grams(self, k: int, layer: Layer, held: list[tuple[Held, Held]]) -> list[Grams]:
        W = layer.matrix(dtype=np.float32) if self._weight_form(layer) else None
        out = [Grams(layer.n0, None if W is None else W[r]) for r in layer.group_rows()]
        del W
        pending: list[tuple[np.ndarray, np.ndarray]] = []

        def flush() -> None:
            # one product per FLUSH_VALUES pending values: adding many small batches (e.g. one sentence each)
            # into the N0 x N0 Grams would cost three full-matrix updates per batch
            if pending:
                X = np.concatenate([p[0] for p in pending]) if len(pending) > 1 else pending[0][0]
                same = all(xt is x for x, xt in pending)  # X~ = X (no compressed weight before): one product
                Xt = X if same else (np.concatenate([p[1] for p in pending]) if len(pending) > 1 else pending[0][1])
                Grams.add_groups(out, X, Xt)
                pending.clear()

        for b, ((hf, hc), pick) in enumerate(zip(held, self._patch_picks(k, layer, held))):
            if pick is not None and pick.size == 0:
                continue
            x = hf.get()
            rows = self._rows(b, layer, x, pick)
            # the same array (a graph input both frontiers hold, or a tensor no replaced weight changed): X~ = X
            pending.append((rows, rows if hc is hf or hc.get() is x else self._rows(b, layer, hc.get(), pick)))
            if sum(p[0].size for p in pending) >= FLUSH_VALUES:
                flush()
        flush()
        return out

    def _patch_picks(self, k: int, layer: Layer, held: list[tuple[Held, Held]]) -> list[np.ndarray | None]:
        """Per batch, the convolution patches kept (None: all): at most max_patches per LAYER, a seeded uniform
        subset of all its patches over every batch, the same rows in X and X~. Patches are numbered sample-major
        across the batches, so the subset does not depend on the batch size (a per-batch cap fed the CLI's batch
        16 3.3x the rows of batch 50 for the same data)."""
        none = [None] * len(held)
        cap = self.max_patches
        if layer.groups > 1 and self.group_patches is not None:
            cap = self.group_patches if cap is None else min(cap, self.group_patches)
        if cap is None or layer.op in MATMUL_OPS:
            return none
        totals = np.array([layer.row_count(hf.get().shape) for hf, _ in held], dtype=np.int64)
        if totals.sum() <= cap:
            return none
        keep = np.sort(np.random.default_rng([self.seed, k]).choice(int(totals.sum()), cap, replace=False))
        starts = np.concatenate([[0], np.cumsum(totals)])
        cut = np.searchsorted(keep, starts)
        return [keep[cut[b]:cut[b + 1]] - starts[b] for b in range(len(held))]

    def _rows(self, b: int, layer: Layer, x: np.ndarray, pick: np.ndarray | None) -> np.ndarray:
        """The layer's input rows for one batch (layers.py): only the `pick`ed convolution patches (_patch_picks);
        MatMul rows of padding tokens are dropped (token_mask)."""
        rows = layer.rows(x, lambda total: pick)
        mask = self.batches[b].get(self.token_mask) if self.token_mask and layer.op == "MatMul" else None
        if mask is None or layer.stacked or x.ndim != 3 or tuple(x.shape[:2]) != tuple(np.shape(mask)):
            return rows
        return rows[np.asarray(mask).reshape(-1) != 0]


# ------------------------------------------------------------------------------------------------------- planning
def _cuts(wl: onnx.ModelProto, inputs: list[str], quantized: set[str]) -> tuple[list[str], list[int]]:
    """The tensors the model is cut at, in order, and the cut of each layer input (inputs: in layer order).
    Every quantized tensor (W8A8) is a cut, so that the compressed frontier holds it and can fake-quantize it
    before any node reads it: before a layer's input come the quantized tensors it depends on that no earlier cut
    holds, in graph order (a quantized tensor no layer input depends on is not cut: nothing after it is captured)."""
    if not quantized:
        return list(inputs), list(range(len(inputs)))
    g = wl.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    reads = [node_reads(n) for n in g.node]
    cuts, segment_of, seen = [], [], set()
    for t in inputs:
        found, stack = [], [t]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in quantized and name != t:
                found.append(name)
            if name in producer:
                stack.extend(reads[producer[name]])
        cuts += sorted(found, key=lambda n: producer.get(n, -1))
        segment_of.append(len(cuts))
        cuts.append(t)
    return cuts, segment_of


def _plan(wl: onnx.ModelProto, targets: list[str], fed: set[str], graph_inputs: list[str]
          ) -> tuple[list[_Segment], dict[str, int], dict[str, int]]:
    """Segments (one per target, in order), each tensor's last use (segment index that reads it), and each fed
    weight's last use. Every node is assigned to the first segment that needs it."""
    g = wl.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    reads = [node_reads(n) for n in g.node]
    assigned: dict[int, int] = {}
    node_lists: list[list[int]] = []
    for k, target in enumerate(targets):
        nodes, stack = [], [target]
        while stack:
            idx = producer.get(stack.pop())
            if idx is None or idx in assigned:
                continue
            assigned[idx] = k
            nodes.append(idx)
            stack.extend(reads[idx])
        node_lists.append(sorted(nodes))
    last_use: dict[str, int] = {}
    weight_last: dict[str, int] = {}
    seg_inputs: list[list[str]] = []
    seg_weights: list[list[str]] = []
    for k, nodes in enumerate(node_lists):
        inside = {o for i in nodes for o in g.node[i].output}
        ins, ws = [], []
        for i in nodes:
            for t in reads[i]:
                if t in inside:
                    continue
                if t in fed:
                    if t not in ws:
                        ws.append(t)
                    weight_last[t] = max(weight_last.get(t, -1), k)
                elif (t in producer or t in graph_inputs) and t not in ins:
                    ins.append(t)
                    last_use[t] = max(last_use.get(t, -1), k)
        seg_inputs.append(ins)
        seg_weights.append(ws)
    for k, target in enumerate(targets):
        last_use[target] = max(last_use.get(target, -1), k)
    segments = []
    for k, nodes in enumerate(node_lists):
        produced = [o for i in nodes for o in g.node[i].output if o]
        outs = [t for t in produced if t in last_use]
        segments.append(_Segment(nodes, seg_inputs[k], seg_weights[k], outs))
    return segments, last_use, weight_last
