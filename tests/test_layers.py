"""layers.py: each op's weight layout and input rows against onnxruntime (here ConvTranspose, the op added with
layers.py; MatMul / Gemm / Conv are held to onnxruntime by test_capture.py and test_graph.py)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxspfq.api import compress
from onnxspfq.evaluate import evaluate
from onnxspfq.graph import find_layers

from builders import conv_transpose


def _ort(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


CASES = [  # kernel, strides, pads, output_padding, dilations
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), None),
    ((3, 3), (1, 1), (0, 0, 0, 0), (0, 0), None),
    ((2, 2), (2, 2), (0, 0, 0, 0), (0, 0), None),
    ((4, 3), (3, 2), (2, 0, 1, 1), (2, 1), None),
    ((3, 3), (2, 2), (3, 2, 2, 3), (0, 1), None),  # pads beyond d * (k - 1): the stretched input is cropped
    ((3, 3), (2, 1), (1, 1, 1, 1), (1, 0), (2, 2)),
    ((5,), (2,), (1, 2), (1,), None),
]


@pytest.mark.parametrize("kernel, strides, pads, output_padding, dilations", CASES)
def test_conv_transpose_rows_times_matrix_is_the_node(kernel, strides, pads, output_padding, dilations):
    m = conv_transpose(kernel=kernel, strides=strides, pads=pads, output_padding=output_padding, dilations=dilations,
                       bias=False)
    (layer,), _ = find_layers(m)
    assert layer.op == "ConvTranspose" and (layer.n1, layer.n0) == (6, 4 * int(np.prod(kernel)))
    x = np.random.default_rng(1).standard_normal((2, 4) + (5, 7)[:len(kernel)]).astype(np.float32)
    y = _ort(m, x)  # [N, M, *out]
    W = layer.matrix()
    X = layer.rows(x)
    assert layer.row_count(x.shape) == X.shape[0]  # what the per-layer patch cap counts (capture._patch_picks)
    out = (X.astype(np.float64) @ W.T).reshape((2,) + y.shape[2:] + (6,))
    np.testing.assert_allclose(np.moveaxis(out, -1, 1), y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layer.tensor(W), layer.W0)  # tensor() inverts matrix() exactly


@pytest.mark.parametrize("fmt, extra", [("qdq", {}), ("sparse", {"sparsity": 0.5})])
def test_conv_transpose_compresses_end_to_end(tmp_path, fmt, extra):
    from onnxspfq.config import CompressConfig, QuantConfig

    m = conv_transpose(head=True)
    path = tmp_path / "up.onnx"
    onnx.save(m, str(path))
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((8, 4, 6, 6)).astype(np.float32)}]
    quant = QuantConfig(bits=8 if fmt == "qdq" else None, **extra)
    res = compress(str(path), calib, output=str(tmp_path / "q.onnx"), progress=False,
                   config=CompressConfig(quant=quant, format=fmt))
    assert [r.op for r in res.report.layers] == ["ConvTranspose", "Conv"]
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    held_out = [{"x": rng.standard_normal((8, 4, 6, 6)).astype(np.float32)}]
    ag = evaluate(str(path), str(tmp_path / "q.onnx"), held_out)
    assert ag.cosine > (0.999 if fmt == "qdq" else 0.8), ag
    if fmt == "qdq":
        q = onnx.load(str(tmp_path / "q.onnx"))
        dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "Wt"]
        assert len(dq) == 1 and onnx.helper.get_attribute_value(dq[0].attribute[0]) == 1  # per output channel


def test_grouped_conv_transpose_is_left_alone_with_the_reason():
    m = conv_transpose()
    m.graph.node[0].attribute.append(onnx.helper.make_attribute("group", 2))
    layers, skipped = find_layers(m)
    assert not layers and "grouped ConvTranspose" in skipped[0]["reason"]


def test_grouped_conv_takes_two_four(tmp_path):
    """N:M groups of a grouped Conv span one group's columns (n0 is per group; n0 // groups raised before)."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxspfq.config import CompressConfig, QuantConfig
    from onnxspfq.emit_sparse import check_nm

    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "W")  # 8 channels, 2 groups
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], group=2, pads=[1, 1, 1, 1], name="gconv")],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 6, 6])], [W])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    calib = [{"x": rng.standard_normal((4, 8, 6, 6)).astype(np.float32)}]
    res = compress(str(path), calib, output=str(tmp_path / "q.onnx"), progress=False,
                   config=CompressConfig(quant=QuantConfig(bits=None, nm=(2, 4)), format="float"))
    assert res.report.layers[0].nm == "2:4" and res.report.layers[0].groups == 2
    w = onnx.numpy_helper.to_array(onnx.load(str(tmp_path / "q.onnx")).graph.initializer[0])
    assert check_nm(w, "Conv", False, 2, 4)[0]
