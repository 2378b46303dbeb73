"""evaluate.py: classifier and embedding metrics on the real Fashion-MNIST models, plus the CLI flags."""
import json

import numpy as np
import pytest

from onnxspfq import CompressConfig, QuantConfig, compress
from onnxspfq.cli import main
from onnxspfq.errors import OnnxspfqError
from onnxspfq.evaluate import compare, evaluate, evaluate_files, neighbour_agreement, resolve_task


@pytest.fixture(scope="module")
def test_batches(fmnist_test):
    x, labels = fmnist_test
    x, labels = x[:2000], labels[:2000]
    return [{"input": x[i:i + 500]} for i in range(0, len(x), 500)], labels


@pytest.fixture(scope="module")
def cnn_2bit(fmnist_cnn, fmnist_calib_small):
    return compress(str(fmnist_cnn), str(fmnist_calib_small), progress=False,
                    config=CompressConfig(method="rtn", quant=QuantConfig(bits=2))).model


def test_classify_identical_models_agree_exactly(fmnist_mlp, test_batches):
    batches, labels = test_batches
    a = evaluate(str(fmnist_mlp), str(fmnist_mlp), batches, labels, task="classify")
    assert a.task == "classify" and a.output == "logits" and a.samples == 2000
    assert a.top1_agreement == 1.0 and a.rel_error == 0.0 and a.sample_cosine == pytest.approx(1.0)
    assert a.top1_accuracy_float == a.top1_accuracy_compressed
    assert 0.85 < a.top1_accuracy_float < 0.95  # the MLP's measured 10k accuracy is 89.89 %
    assert a.top5_accuracy_float >= a.top1_accuracy_float
    assert a.overlap_at_k is None  # no neighbour metrics for a classifier


def test_classify_compressed_mlp(fmnist_mlp, fmnist_calib_small, test_batches):
    batches, labels = test_batches
    q = compress(str(fmnist_mlp), str(fmnist_calib_small), progress=False,
                 config=CompressConfig(method="rtn", quant=QuantConfig(bits=2))).model
    a = evaluate(str(fmnist_mlp), q, batches, labels)  # auto: labels present -> classify
    assert a.task == "classify"
    assert a.top1_agreement < 1.0 and a.rel_error > 0.0
    # top-1 accuracy recomputed by hand from the compressed model's logits
    from onnxspfq.evaluate import run
    logits = run(q, batches)[0]
    assert a.top1_accuracy_compressed == pytest.approx(np.mean(logits.argmax(1) == labels))


def test_embed_identical_is_one_and_2bit_is_lower(fmnist_cnn, cnn_2bit, test_batches):
    """The CNN's logits treated as embeddings: identical models give 1.0 everywhere, a 2-bit model less."""
    batches, _ = test_batches
    same = evaluate(str(fmnist_cnn), str(fmnist_cnn), batches, task="embed")
    assert same.task == "embed" and same.top1_agreement is None
    assert same.neighbours_k == 10
    assert same.overlap_at_k == 1.0 and same.nn1_agreement == 1.0 and same.nn1_rank_mean == 1.0
    assert same.sample_cosine == pytest.approx(1.0)
    q = evaluate(str(fmnist_cnn), cnn_2bit, batches, task="embed")
    assert q.sample_cosine < 0.999
    assert 0.0 < q.overlap_at_k < 0.9
    assert q.nn1_agreement < 1.0 and q.nn1_rank_mean > 1.0


def test_neighbour_agreement_by_hand():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 8))
    k, ov, nn1, rank = neighbour_agreement(ref, 3.0 * ref, k=5)  # cosine is scale-invariant
    assert (k, ov, nn1, rank) == (5, 1.0, 1.0, 1.0)
    out = rng.standard_normal((40, 8))  # unrelated embeddings: overlap near chance (5 / 39)
    k, ov, nn1, rank = neighbour_agreement(ref, out, k=5)
    assert ov < 0.4 and rank > 2.0
    # brute-force overlap@5 for the unrelated case
    def knn(a):
        u = a / np.linalg.norm(a, axis=1, keepdims=True)
        s = u @ u.T
        np.fill_diagonal(s, -np.inf)
        return [set(np.argsort(-row)[:5]) for row in s]
    want = np.mean([len(x & y) / 5 for x, y in zip(knn(ref), knn(out))])
    assert ov == pytest.approx(want)
    assert neighbour_agreement(ref[:3], out[:3], k=10)[0] == 2  # k capped at N - 1
    with pytest.raises(OnnxspfqError):
        neighbour_agreement(ref[:1], out[:1])


def test_auto_task_rules():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((20, 10))
    unit = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    assert resolve_task("auto", logits, "logits") == "classify"
    assert resolve_task("auto", unit, "out") == "embed"
    assert resolve_task("auto", logits, "sentence_embedding") == "embed"
    assert resolve_task("auto", unit, "out", labels=np.zeros(20)) == "classify"
    with pytest.raises(OnnxspfqError, match="unknown task"):
        compare(logits, logits, task="regress")
    with pytest.raises(OnnxspfqError, match="different shapes"):
        compare(logits, logits[:, :5], task="classify")


def test_unknown_output_name(fmnist_mlp, test_batches):
    batches, _ = test_batches
    with pytest.raises(OnnxspfqError, match="no output named"):
        evaluate(str(fmnist_mlp), str(fmnist_mlp), batches[:1], output="nope")


def test_cli_embed_flags(tmp_path, fmnist_cnn, cnn_2bit, fmnist_test, capsys):
    import onnx
    x, labels = fmnist_test
    data = tmp_path / "d.npz"
    np.savez(data, input=x[:300], labels=labels[:300], reference=np.zeros(3))  # extra keys are ignored
    q = tmp_path / "q.onnx"
    onnx.save(cnn_2bit, str(q))
    out = tmp_path / "e.json"
    assert main(["evaluate", str(fmnist_cnn), str(q), "--data", str(data), "--task", "embed", "--output", "logits",
                 "--k", "5", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["task"] == "embed" and figures["neighbours_k"] == 5 and figures["samples"] == 300
    assert 0.0 < figures["overlap_at_k"] < 1.0 and figures["top1_accuracy_float"] is None
    assert "overlap_at_k" in capsys.readouterr().out
    assert main(["evaluate", str(fmnist_cnn), str(q), "--data", str(data), "--output", "nope"]) == 2
    assert "no output named 'nope'" in capsys.readouterr().err
    cls = evaluate_files(str(fmnist_cnn), str(q), str(data))  # auto + labels -> classify with accuracy
    assert cls.task == "classify" and cls.top1_accuracy_compressed is not None


def _masked_pair(tmp_path):
    """Two (batch, sequence, 8) -> (batch, sequence, 4) MatMul models with an attention_mask input (added to the
    output, so onnxruntime keeps it), differing in their weight: float and a perturbed copy."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    paths = []
    for name, weight in (("float", w), ("noisy", w + 0.05 * rng.standard_normal(w.shape).astype(np.float32))):
        nodes = [h.make_node("MatMul", ["x", "w"], ["xw"]), h.make_node("Cast", ["attention_mask"], ["m"], to=TP.FLOAT),
                 h.make_node("Unsqueeze", ["m", "axes"], ["m3"]), h.make_node("Add", ["xw", "m3"], ["y"])]
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, ["b", "s", 8]),
                                      h.make_tensor_value_info("attention_mask", TP.INT64, ["b", "s"])],
                         [h.make_tensor_value_info("y", TP.FLOAT, ["b", "s", 4])],
                         [nh.from_array(weight, "w"), nh.from_array(np.array([-1]), "axes")])
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
        m.ir_version = 8
        paths.append(str(tmp_path / f"{name}.onnx"))
        onnx.save(m, paths[-1])
    return paths


def test_padding_positions_are_left_out_of_the_agreement(tmp_path):
    """With a token mask, the cosine is the one over the real tokens only (padding positions hold inputs no one
    reads, here large ones that would dominate), and the report names the mask; without, padding counts."""
    import onnxruntime as ort

    float_path, noisy_path = _masked_pair(tmp_path)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 6, 8)).astype(np.float32)
    mask = np.ones((4, 6), np.int64)
    mask[:, 4:] = 0
    x[:, 4:] *= 100.0  # padding garbage
    batches = [{"x": x, "attention_mask": mask}]
    a = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, batches[0])[0]
         for p in (float_path, noisy_path)]
    real = mask.astype(bool)
    r, o = a[0][real].ravel().astype(np.float64), a[1][real].ravel().astype(np.float64)
    want = r @ o / (np.linalg.norm(r) * np.linalg.norm(o))
    masked = evaluate(float_path, noisy_path, batches, task="classify", token_mask="attention_mask")
    plain = evaluate(float_path, noisy_path, batches, task="classify")
    assert masked.cosine == pytest.approx(want, abs=1e-9)
    assert masked.padding_left_out == "attention_mask" and plain.padding_left_out is None
    r, o = a[0].ravel().astype(np.float64), a[1].ravel().astype(np.float64)
    assert plain.cosine == pytest.approx(r @ o / (np.linalg.norm(r) * np.linalg.norm(o)), abs=1e-9)
    assert abs(plain.cosine - masked.cosine) > 1e-4
    # per-position top-1 agreement counts the 16 real positions only
    agree = np.mean(a[0][real].argmax(-1) == a[1][real].argmax(-1))
    assert masked.top1_agreement == pytest.approx(agree)
