"""Step 2 (repo root): pull the emitted 2:4 integer codes and scales out of the model into .gpu/w24.npz (small enough to carry)."""
import numpy as np, onnx
from onnx import numpy_helper
m = onnx.load(".gpu/minilm_4bit_2of4.onnx")
init = {t.name: t for t in m.graph.initializer}
out = {}
for n in m.graph.node:
    if n.op_type == "DequantizeLinear" and n.input[0] in init:
        codes = numpy_helper.to_array(init[n.input[0]]).astype(np.int8)   # MatMul W[K, N]
        scale = numpy_helper.to_array(init[n.input[1]]).astype(np.float32)
        if codes.ndim == 2:
            key = n.output[0].replace("/", "_")
            out[key + "__codes"] = codes; out[key + "__scale"] = scale
import os; print(len(out) // 2, "weights"); os.remove(".gpu/minilm_4bit_2of4.onnx")
np.savez_compressed(".gpu/w24.npz", **out)
