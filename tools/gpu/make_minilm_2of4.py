"""Step 1 of the GPU 2:4 check (run here, from the repo root): compress MiniLM (models/minilm.py cache) to 4-bit + 2:4."""
import os
import numpy as np, onnxspfq
from onnxspfq import CompressConfig, QuantConfig
d = os.path.expanduser("~/.cache/onnxspfq/models/minilm/")
z = np.load(d + "minilm_calib.npz")
keys = ("input_ids", "attention_mask", "token_type_ids")
calib = [{k: z[k][i:i+1, :int(z["attention_mask"][i].sum())] for k in keys} for i in range(64)]
res = onnxspfq.compress(d + "minilm_l6_v2.onnx", calib, output=".gpu/minilm_4bit_2of4.onnx", progress=False,
                        config=CompressConfig(quant=QuantConfig(bits=4, nm=(2, 4)), batch_size=1))
print(res.report.table()[-600:])
