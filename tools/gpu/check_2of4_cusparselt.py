"""Step 3, on a GPU machine with torch + cuSPARSELt (repo root, .gpu carried): on an H100: do the 2:4 weights onnxspfq emitted (MiniLM, 4-bit + 2:4, MatMul W[K,N], pattern along K) run
through cuSPARSELt (torch semi-structured sparsity) with the same results as dense, and how fast?
And: what does cuSPARSELt do with a weight whose 2:4 pattern lies along the WRONG axis (N)?"""
import json, os, time
import numpy as np, torch
from torch.sparse import to_sparse_semi_structured, SparseSemiStructuredTensor
dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name())
z = np.load(".gpu/w24.npz")
names = sorted({k.split("__")[0] for k in z.files})
res = {"layers": []}
torch.manual_seed(0)
for name in names:
    W = z[name + "__codes"].astype(np.float32) * z[name + "__scale"][None, :]   # [K, N], y = x @ W
    Wt = torch.tensor(W.T.copy(), dtype=torch.float16, device=dev)             # linear weight [N, K]: 2:4 along K
    x = torch.randn(4096, W.shape[0], dtype=torch.float16, device=dev)
    dense = torch.nn.functional.linear(x, Wt)
    ok_pattern = bool(((Wt.view(Wt.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
    try:
        Ws = to_sparse_semi_structured(Wt)
        sp = torch.nn.functional.linear(x, Ws)
        err = float((sp - dense).abs().max() / dense.abs().max())
        status = "ok"
    except Exception as e:
        err, status = None, f"{type(e).__name__}: {str(e)[:120]}"
    res["layers"].append({"name": name[-60:], "N_K": list(Wt.shape), "pattern_along_K": ok_pattern, "status": status, "max_rel_diff": err})
print(json.dumps(res["layers"][:4], indent=1)); print("all ok:", all(l["status"] == "ok" and l["max_rel_diff"] < 1e-2 for l in res["layers"]), "max diff", max(l["max_rel_diff"] or 0 for l in res["layers"]))
# wrong axis: transpose the pattern so it lies along N; cuSPARSELt compresses assuming groups along K
W = z[names[4] + "__codes"].astype(np.float32) * z[names[4] + "__scale"][None, :]   # intermediate [384, 1536]
Wwrong = torch.tensor(W, dtype=torch.float16, device=dev)  # as a linear weight [N=384, K=1536]: the 2:4 groups now run along N
x = torch.randn(4096, Wwrong.shape[1], dtype=torch.float16, device=dev)
d = torch.nn.functional.linear(x, Wwrong)
try:
    s = torch.nn.functional.linear(x, to_sparse_semi_structured(Wwrong))
    res["wrong_axis"] = {"accepted": True, "max_rel_diff": float((s - d).abs().max() / d.abs().max())}
except Exception as e:
    res["wrong_axis"] = {"accepted": False, "error": f"{type(e).__name__}: {str(e)[:160]}"}
print("wrong axis:", res["wrong_axis"])
# speed: dense vs 2:4 at the model's shapes and at a larger one built by tiling a real layer
def bench(f, n=50):
    for _ in range(5): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n
W = torch.tensor(z[names[4] + "__codes"].astype(np.float32).T.copy() * 0.01, dtype=torch.float16, device=dev)  # [1536, 384]
for tokens, tile in [(4096, 1), (16384, 8)]:
    Wt = W.repeat(tile, tile)  # tiling keeps 2:4 along K
    x = torch.randn(tokens, Wt.shape[1], dtype=torch.float16, device=dev)
    Ws = to_sparse_semi_structured(Wt)
    td = bench(lambda: torch.nn.functional.linear(x, Wt)); ts = bench(lambda: torch.nn.functional.linear(x, Ws))
    res.setdefault("speed", []).append({"tokens": tokens, "N_K": list(Wt.shape), "dense_ms": td * 1e3, "sparse_ms": ts * 1e3, "speedup": td / ts})
print("speed:", res["speed"])
os.makedirs(os.environ.get("OUT", "/tmp/out"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp/out"), "gpu_2of4.json"), "w"), indent=1)
