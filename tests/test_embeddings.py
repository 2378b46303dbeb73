"""embeddings.py (--embeddings int8): the row quantization, which Gathers are tables, the rewritten graph computing
exactly the de-quantized rows in onnxruntime, and the default on the real MiniLM-L6."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxspfq.embeddings import MIN_ELEMENTS, dequantize, emit, find, quantize
from onnxspfq.io import Model

RNG = np.random.default_rng(11)
MINILM = Path.home() / ".cache" / "onnxspfq" / "models" / "minilm"


def test_row_quantization_is_nearest_within_half_a_step():
    w = RNG.standard_normal((300, 64)).astype(np.float32) * RNG.uniform(0.01, 10, (300, 1)).astype(np.float32)
    w[7] = 0.0
    codes, scale = quantize(w)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (300,)
    assert scale[7] == 1.0 and not codes[7].any()
    assert np.all(np.abs(codes[np.arange(300) != 7]).max(axis=1) == 127)  # each row's largest entry on the grid's end
    err = np.abs(dequantize(codes, scale) - w)
    assert np.all(err <= scale[:, None] / 2 * (1 + 1e-6))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(np.full((2, 2), np.inf, np.float32))


def _model(rows: int = 1000, dim: int = 96, tied: bool = False, axis: int = 0) -> onnx.ModelProto:
    table = RNG.standard_normal((rows, dim)).astype(np.float32)
    nodes = [h.make_node("Gather", ["table", "ids"], ["e"], axis=axis, name="embed"),
             h.make_node("Add", ["e", "bias"], ["y"])]
    outputs = [h.make_tensor_value_info("y", TP.FLOAT, ["b", "s", dim])]
    if tied:  # an lm_head reading the same table
        nodes.append(h.make_node("MatMul", ["e", "table_t"], ["logits"]))
        nodes.append(h.make_node("Transpose", ["table"], ["table_t"]))
        nodes[-2], nodes[-1] = nodes[-1], nodes[-2]
        outputs.append(h.make_tensor_value_info("logits", TP.FLOAT, ["b", "s", rows]))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("ids", TP.INT64, ["b", "s"])], outputs,
                     [nh.from_array(table, "table"), nh.from_array(np.full(dim if axis == 0 else rows, 0.5, np.float32), "bias")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_find_takes_only_untied_2d_float_tables_along_axis_0():
    assert [t.table for t in find(_model())] == ["table"]
    assert find(_model(tied=True)) == []          # the lm_head owns a tied table
    assert find(_model(axis=1)) == []
    assert find(_model(rows=MIN_ELEMENTS // 96 - 1)) == []  # too small to be worth it


def test_a_shared_table_is_stored_once_for_every_gather(tmp_path):
    """An encoder-decoder's shared embedding: two Gathers read one table; one int8 copy serves both, exactly."""
    m = _model()
    m.graph.node.append(h.make_node("Gather", ["table", "ids2"], ["e2"], name="embed2"))
    m.graph.input.append(h.make_tensor_value_info("ids2", TP.INT64, ["n"]))
    m.graph.output.append(h.make_tensor_value_info("e2", TP.FLOAT, ["n", 96]))
    tables = find(m)
    assert len(tables) == 1 and len(tables[0].outputs) == 2
    table = nh.to_array(m.graph.initializer[0])
    q, _, after = emit(onnx.ModelProto.FromString(m.SerializeToString()), Model(proto=m), tables)
    onnx.checker.check_model(q)
    assert sum(t.data_type == TP.INT8 for t in q.graph.initializer) == 1 and after == table.size + 4 * len(table)
    ids, ids2 = RNG.integers(0, len(table), (2, 5)), RNG.integers(0, len(table), (7,))
    y, e2 = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids, "ids2": ids2})
    rows = dequantize(*quantize(table))
    np.testing.assert_array_equal(e2, rows[ids2])
    np.testing.assert_array_equal(y, rows[ids] + np.float32(0.5))


def test_a_table_with_nan_is_refused_before_any_work(tmp_path, capsys):
    from onnxspfq.cli import main

    m = _model()
    bad = nh.to_array(m.graph.initializer[0]).copy()
    bad[3, 4] = np.nan
    m.graph.initializer[0].CopyFrom(nh.from_array(bad, "table"))
    m.graph.initializer.append(nh.from_array(RNG.standard_normal((96, 8)).astype(np.float32), "w2"))
    m.graph.node.append(h.make_node("MatMul", ["y", "w2"], ["z"]))  # a layer to compress
    m.graph.output.append(h.make_tensor_value_info("z", TP.FLOAT, ["b", "s", 8]))
    path = tmp_path / "nan.onnx"
    onnx.save(m, str(path))
    assert main(["compress", str(path), "--method", "rtn", "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "embedding table 'table' holds NaN or Inf" in err and "--embeddings float" in err
    assert not (tmp_path / "out.onnx").exists()
    assert main(["compress", str(path), "--method", "rtn", "--embeddings", "float", "-o", str(tmp_path / "out.onnx")]) == 0


def test_emitted_gather_computes_the_dequantized_rows_exactly():
    m = _model()
    table = nh.to_array(m.graph.initializer[0])
    q, before, after = emit(onnx.ModelProto.FromString(m.SerializeToString()), Model(proto=m), find(m))
    onnx.checker.check_model(q)
    assert before == table.nbytes and after == table.size + 4 * table.shape[0]
    inits = {t.name: t for t in q.graph.initializer}
    gathers = [n for n in q.graph.node if n.op_type == "Gather"]
    assert {inits[n.input[0]].data_type for n in gathers} == {TP.INT8, TP.FLOAT}  # codes, row scales
    assert "table" not in inits and all(n.op_type != "DequantizeLinear" for n in q.graph.node)
    ids = RNG.integers(0, table.shape[0], (3, 17))
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    codes, scale = quantize(table)
    np.testing.assert_array_equal(got, dequantize(codes, scale)[ids] + np.float32(0.5))


@pytest.mark.skipif(not (MINILM / "minilm_l6_v2.onnx").exists(),
                    reason="MiniLM not built here: run models/minilm.py (see models/README.md)")
def test_minilm_tables_int8_by_default(tmp_path):
    """The default run stores MiniLM-L6's word and position tables as int8 (the 2 x 384 token types stay), the
    file shrinks by about their 3 / 4, and the sentence embedding moves by little against the same run with
    --embeddings float."""
    from onnxspfq.api import compress
    from onnxspfq.config import CompressConfig

    model = MINILM / "minilm_l6_v2.onnx"
    paths = {e: tmp_path / f"{e}.onnx" for e in ("int8", "float")}
    reports = {e: compress(str(model), None, str(p), CompressConfig(method="rtn", embeddings=None if e == "int8"
                                                                    else "float"), progress=False).report
               for e, p in paths.items()}
    assert reports["int8"].embeddings.startswith("embeddings: 2 table(s) int8") and reports["float"].embeddings == ""
    assert reports["float"].size_after - reports["int8"].size_after > 0.74 * 4 * (30522 + 512) * 384 * 0.99
    with np.load(MINILM / "minilm_eval.npz") as z:
        feeds = {k: z[k][:32] for k in ("input_ids", "attention_mask", "token_type_ids")}
    outs = {}
    for e, p in paths.items():
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        outs[e] = s.run(["sentence_embedding"], {i.name: feeds[i.name] for i in s.get_inputs()})[0]
    cos = np.sum(outs["int8"] * outs["float"], 1) / (np.linalg.norm(outs["int8"], axis=1) * np.linalg.norm(outs["float"], axis=1))
    assert cos.min() > 0.99


def test_inspect_lists_the_tables(tmp_path, capsys):
    from onnxspfq.cli import main

    m = _model()
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    assert main(["inspect", str(path)]) == 0
    assert "embedding table table 1000x96: int8 per row" in capsys.readouterr().out


def test_a_float16_table_gives_float16_rows_exactly():
    """A float16 table: rows computed in float32 (int8 code x float32 row scale), then cast to float16."""
    m = _model()
    table = nh.to_array(m.graph.initializer[0]).astype(np.float16)
    m.graph.initializer[0].CopyFrom(nh.from_array(table, "table"))
    m.graph.initializer[1].CopyFrom(nh.from_array(np.full(96, 0.5, np.float16), "bias"))
    m.graph.output[0].type.tensor_type.elem_type = TP.FLOAT16
    m.graph.output.append(h.make_tensor_value_info("e", TP.FLOAT16, ["b", "s", 96]))  # the rows themselves
    tables = find(m)
    assert [t.dtype for t in tables] == [TP.FLOAT16]
    q, before, _ = emit(onnx.ModelProto.FromString(m.SerializeToString()), Model(proto=m), tables)
    onnx.checker.check_model(q)
    assert before == table.nbytes
    ids = RNG.integers(0, len(table), (2, 9))
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(["e"], {"ids": ids})[0]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, dequantize(*quantize(table), np.float16)[ids])
