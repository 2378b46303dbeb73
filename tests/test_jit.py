"""jit.py: the Numba cache is reused across processes and follows every jitted module: edit one (an operator T
that kernels are passed, or a kernels.py helper that reference.py calls) and the next process computes with the
edit, from a fresh cache folder."""
import shutil
import subprocess
import sys
from pathlib import Path

import onnxspfq

PKG = Path(onnxspfq.__file__).resolve().parent

RUN = """
import numpy as np
from onnxspfq import jit, kernels, operators as op
rng = np.random.default_rng(0)
W, X = rng.standard_normal((8, 16)), rng.standard_normal((64, 16))
H = X.T @ X
scale, bs = op.step_sizes(W, 4, 1.0, "channel", 128)
xi = rng.random((8, 16))
Q, _ = kernels.blocked_phase2(W, H, xi, 1.0, op.nearest_round, op.grid_params(scale, 4), bs)
from onnxspfq import reference
Qr, _ = reference.direct_phase2(W, X, xi, 1.0, op.stochastic_round, op.grid_params(scale, 4), bs)
print(jit.CACHE_DIR, float(np.abs(Q).sum()), float(np.abs(Qr).sum()))
"""


def _run(root: Path, cache: Path) -> tuple[str, float, float]:
    env = {"PYTHONPATH": str(root), "ONNXSPFQ_CACHE": str(cache), "PATH": "/usr/bin:/bin", "HOME": str(cache)}
    out = subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True, env=env, cwd=root, check=True)
    folder, total, total_ref = out.stdout.split()
    return folder, float(total), float(total_ref)


def test_cache_is_reused_and_follows_every_jitted_module(tmp_path):
    root, cache = tmp_path / "src", tmp_path / "cache"
    shutil.copytree(PKG, root / "onnxspfq", ignore=shutil.ignore_patterns("__pycache__"))
    folder1, q1, r1 = _run(root, cache)
    assert Path(folder1).parent == cache / "numba" and any(Path(folder1).rglob("*.nbi"))  # compiled and cached
    assert _run(root, cache) == (folder1, q1, r1)  # the second process reads the same cache folder
    # edit only operators.py: nearest_round now returns 0 (the kernels are passed it as T)
    _edit(root / "onnxspfq" / "operators.py", "    return _clip(np.rint(v / d), p[1]) * d\n",
          "    return 0.0 * _clip(np.rint(v / d), p[1]) * d\n")
    folder2, q2, r2 = _run(root, cache)
    assert folder2 != folder1 and q1 > 0 and q2 == 0.0 and r2 == r1
    # edit only kernels.py's _dot, which reference.py's direct forms call
    _edit(root / "onnxspfq" / "kernels.py", "        acc += a[i] * b[i]\n", "        acc += 0.0 * a[i] * b[i]\n")
    folder3, _, r3 = _run(root, cache)
    assert folder3 not in (folder1, folder2) and r1 > 0 and r3 == 0.0


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))
