"""Per-layer and whole-model figures of a compression run: a readable table and JSON."""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxspfq.emit_nbits import STORED_BITS
from onnxspfq.evaluate import Agreement


@dataclass
class LayerReport:
    """One compressed layer. c_alpha and C: the values used, averaged over the output channels where each channel
    chose its own (the default at channel granularity)."""

    name: str
    op: str
    shape: list[int]
    bits: int | None
    method: str
    rel_error: float
    clip_fraction: float
    c_alpha: float | None
    time_s: float
    groups: int = 1
    C: float | None = None
    sparsity: float = 0.0
    bits_per_weight: float = 0.0
    nm: str | None = None
    path: str = ""  # spfq: the path following the channels kept (QuantConfig.path), with shares when they differ
    note: str = ""


@dataclass
class Report:
    """The whole run: layers, what was left alone, sizes and output agreement with the float model."""

    model: str
    output: str | None
    config: dict  # every setting as it ran, defaults resolved (CompressConfig.effective)
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    agreement: Agreement | None = None
    agreement_data: str | None = None  # what the agreement was measured on: "calibration" or "held out (--eval-data)"
    time_s: float = 0.0
    opset: str = ""  # the output's default-domain opset, and whether it was raised from the input's
    target: str = ""  # what --target changed, in one line (targets.Plan.changed; "" when nothing)
    embeddings: str = ""  # the embedding tables stored int8, in one line ("" when none)
    warnings: list[str] = field(default_factory=list)
    input_sha256: str | None = None
    output_sha256: str | None = None  # of the .onnx file (its external data, if any, is named in it)
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    versions: dict = field(default_factory=lambda: versions())

    def as_dict(self) -> dict:
        d = asdict(self)
        d["agreement"] = self.agreement.as_dict() if self.agreement else None
        return d

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=2)

    def table(self) -> str:
        """A plain-text table for the terminal."""
        head = (f"{'layer':<32} {'op':<6} {'shape':<18} {'bits':>4} {'method':<6} {'rel.err':>9} {'clip':>6} "
                f"{'zeros':>6} {'b/w':>5} {'time s':>7}")
        rows = [head, "-" * len(head)]
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            bits = "-" if r.bits is None else str(r.bits)
            rows.append(f"{r.name[:32]:<32} {r.op:<6} {shape[:18]:<18} {bits:>4} {r.method:<6} "
                        f"{r.rel_error:>9.2e} {r.clip_fraction:>6.3f} {r.sparsity:>6.3f} {r.bits_per_weight:>5.2f} "
                        f"{r.time_s:>7.2f}" + (f"  [{r.path}]" if "%" in r.path else "")
                        + (f"  ({r.note})" if r.note else ""))
        for s in self.skipped:
            rows.append(f"{s['name'][:32]:<32} {s['op']:<6} left alone: {s['reason']}")
        rows.append("-" * len(head))
        n = sum(int(np.prod(r.shape)) for r in self.layers)
        if n:
            zeros = sum(r.sparsity * np.prod(r.shape) for r in self.layers) / n
            bpw = sum(r.bits_per_weight * np.prod(r.shape) for r in self.layers) / n
            rows.append(f"compressed weights: {n} in {len(self.layers)} layers, {100 * zeros:.1f}% zeros, "
                        f"{bpw:.2f} bits per weight on disk")
            if self.config.get("avg_bits") is not None:
                per = {b: sum(1 for r in self.layers if r.bits == b) for b in sorted({r.bits for r in self.layers})}
                codes = sum(r.bits * np.prod(r.shape) for r in self.layers) / n
                kept = sum(STORED_BITS[r.bits] * np.prod(r.shape) for r in self.layers) / n
                rows.append(f"--avg-bits {self.config['avg_bits']:g}: " + ", ".join(f"{c} layers at {b} bits"
                            for b, c in per.items()) + f"; {codes:.2f} code bits per weight, {kept:.2f} stored "
                            "(3-bit codes in INT4; scales apart)")
        ratio = self.size_before / self.size_after if self.size_after else float("nan")
        rows.append(f"size: {self.size_before / 1e6:.3f} MB -> {self.size_after / 1e6:.3f} MB ({ratio:.2f}x smaller)"
                    + (f"; {self.opset}" if self.opset else ""))
        if self.target:
            rows.append(self.target)
        if self.embeddings:
            rows.append(self.embeddings)
        if self.agreement is not None:
            a = self.agreement
            on = "held-out" if (self.agreement_data or "").startswith("held") else "calibration"
            line = f"output vs float model on {a.samples} {on} samples: cosine {a.cosine:.5f}, rel.err {a.rel_error:.4f}"
            if a.top1_agreement is not None:
                line += f", top-1 agreement {100 * a.top1_agreement:.2f}%"
            if a.padding_left_out:
                line += f" (padding positions, {a.padding_left_out} = 0, left out)"
            rows.append(line)
            if on == "calibration":  # the data the methods fitted: it overstates (RESULTS.md section 6)
                rows.append("  (measured on the data the layers were fitted to, which overstates agreement; "
                            "--eval-data measures it on held-out inputs)")
        rows.append(f"total time: {self.time_s:.1f} s")
        return "\n".join(rows)


# Output agreement below either of these counts as poor: the run then warns (issue 10's thresholds)
POOR_COSINE = 0.9
POOR_TOP1 = 0.5


def better_setting(config: dict, layers: list[LayerReport]) -> str:
    """The setting that measured better than this run's, for the kind of run it was (docs/RESULTS.md)."""
    q = config["quant"]
    if (q["sparsity"] or q["nm"]) and q["operator"] == "stochastic":
        return ("--operator nearest (pruning to 0.75 kept 87.0 % top-1 on the Fashion-MNIST CNN with it, 10.6 % "
                "with stochastic T; RESULTS.md section 7)")
    if q["sparsity"] and q["sparsity"] > 0.75:
        return ("a lower --sparsity (the Fashion-MNIST CNN kept 87.0 % top-1 at 0.75 and 67.8 % at 0.9; "
                "RESULTS.md section 7)")
    if config["method"] == "spfq" and q["operator"] == "stochastic":
        return ("the default operator, nearest (drop --operator stochastic: MiniLM-L6 4-bit embedding cosine 0.985 "
                "with it vs 0.895; RESULTS.md section 11)")
    if isinstance(q["bits"], int) and q["bits"] <= 2:
        return ("--bits 3 or 4, or --avg-bits to give the sensitive layers more bits (every model measured lost most "
                "of its agreement at 2 bits and below; RESULTS.md section 3)")
    return "--avg-bits with a budget above this run's bits, or --skip the worst layers (they stay in float)"


def poor_result(report: "Report") -> str | None:
    """A warning when the output agreement is poor: the figures, the worst layers, the setting that measured
    better; None when the agreement is fine or was not measured."""
    a = report.agreement
    if a is None:
        return None
    poor_top1 = a.top1_agreement is not None and a.top1_agreement < POOR_TOP1
    if not (a.cosine < POOR_COSINE or poor_top1 or not np.isfinite(a.cosine)):
        return None
    worst = sorted(report.layers, key=lambda r: -r.rel_error)[:3]
    figures = f"cosine {a.cosine:.3f}" + (f", top-1 agreement {100 * a.top1_agreement:.1f} %"
                                         if a.top1_agreement is not None else "")
    return (f"poor output agreement with the float model ({figures}; warn below cosine {POOR_COSINE} or top-1 "
            f"{100 * POOR_TOP1:.0f} %); worst layers by reconstruction error: "
            + ", ".join(f"{r.name} ({r.rel_error:.3g})" for r in worst)
            + f"; try {better_setting(report.config, report.layers)}")


def versions() -> dict[str, str]:
    """The versions a result depends on: this tool, onnx, onnxruntime, numpy, numba."""
    import numba
    import onnxruntime

    from onnxspfq import __version__

    return {"onnxspfq": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "numba": numba.__version__, "python": sys.version.split()[0]}


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 16 MB chunks (a multi-GB model is never held whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
