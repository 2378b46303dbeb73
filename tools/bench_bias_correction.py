"""Does bias correction help the default? (issue 13: "evaluate bias correction of each layer's output mean",
ALGORITHM.md section 5; a script, not a test.)

Takes a compressed model from `onnxspfq compress` and applies empirical bias correction after the fact: for each
Conv / Gemm with a constant bias, in graph order, b += mean over the calibration rows of (float output - compressed
output) per output channel, each measured with the corrections before it applied (so it sees what the in-pass
correction b += mean_rows(X w - X~ q) would see, except that the later layers' path following was run without
it). Prints the top-1 agreement with float on --eval data before and after, one run.

    python tools/bench_bias_correction.py FLOAT.onnx COMPRESSED.onnx CALIB.npz EVAL.npz [--samples 64]
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import numpy_helper

from onnxspfq.evaluate import run


def layer_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in inits]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names)
    return m


def channel_means(model: onnx.ModelProto, batches, name: str) -> np.ndarray:
    y = run(with_outputs(model, [name]), batches, [name])[0]
    return y.reshape(y.shape[0], y.shape[1], -1).mean(axis=(0, 2), dtype=np.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("float_model")
    p.add_argument("compressed")
    p.add_argument("calib")
    p.add_argument("eval")
    p.add_argument("--samples", type=int, default=64, help="calibration samples the means are taken over")
    a = p.parse_args()
    fm, cm = onnx.load(a.float_model), onnx.load(a.compressed)
    x = np.load(a.calib)["input"][: a.samples]
    calib = [{"input": x[i:i + 16]} for i in range(0, len(x), 16)]
    ev = np.load(a.eval)["input"]
    evb = [{"input": ev[i:i + 50]} for i in range(0, len(ev), 50)]
    ref = np.argmax(run(a.float_model, evb, ["logits"])[0], 1)

    def agreement(model: onnx.ModelProto) -> float:
        return float(np.mean(np.argmax(run(model, evb, ["logits"])[0], 1) == ref))

    before = agreement(cm)
    f_nodes = {n.output[0]: n for n in layer_nodes(fm)}
    inits = {t.name: t for t in cm.graph.initializer}
    done = 0
    for n in layer_nodes(cm):
        out = n.output[0]
        if out not in f_nodes:
            continue
        delta = channel_means(fm, calib, out) - channel_means(cm, calib, out)
        t = inits[n.input[2]]
        t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) + delta).astype(np.float32), t.name))
        done += 1
    after = agreement(cm)
    print(f"bias-corrected {done} layers on {len(x)} calibration samples; top-1 agreement with float on "
          f"{len(ev)} eval samples: before {100 * before:.2f} %, after {100 * after:.2f} %")


if __name__ == "__main__":
    main()
