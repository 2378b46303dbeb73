"""emit.py, the one emitter interface: every format takes the same items and returns the model, each layer's
bytes in it and what it left; emit() writes what a format leaves as QDQ."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxspfq.config import QuantConfig
from onnxspfq.emit import FORMATS, Item, emit
from onnxspfq.gram import Grams
from onnxspfq.graph import find_layers, load_model
from onnxspfq.fold import fold_weight_chains
from onnxspfq.methods import rtn


def _items(path, bits=4):
    model = fold_weight_chains(load_model(str(path)))
    layers, _ = find_layers(model)
    items = []
    for layer in layers:
        W = layer.matrix()
        Q, info = rtn(W, Grams.identity(layer.n0), QuantConfig(bits=bits), np.random.default_rng(0))
        items.append(Item(layer, info, bits))
    return model, items


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_accounts_for_every_layer(fmnist_cnn, fmt):
    model, items = _items(fmnist_cnn)
    out = emit(fmt, model, items)
    assert set(out.nbytes) == {i.layer.name for i in items} and not out.left
    assert all(b > 0 for b in out.nbytes.values())
    onnx.checker.check_model(out.model)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    y = ort.InferenceSession(out.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert np.isfinite(y[0]).all()
    dense = sum(int(np.prod(i.layer.shape)) * 4 for i in items)
    if fmt in ("qdq", "nbits"):  # 4-bit codes + scales: well under a quarter of float32
        assert sum(out.nbytes.values()) < dense / 4


def test_nbits_leaves_convolutions_for_qdq(fmnist_cnn):
    model, items = _items(fmnist_cnn)
    from onnxspfq.emit import nbits

    part = nbits(model.proto, items, model)
    assert {i.layer.op for i in part.left} == {"Conv"} and all(i.layer.op != "Conv" for i in items
                                                                if i.layer.name in part.nbytes)
    ops = {n.op_type for n in emit("nbits", model, items).model.graph.node}
    assert {"MatMulNBits", "DequantizeLinear"} <= ops
