"""Configuration as plain, validated dataclasses."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import math

from onnxspfq.errors import OnnxspfqError
from onnxspfq import targets
from onnxspfq.targets import TARGETS

# The projected path's alignment ridge (QuantConfig.align_ridge): 1 for weight-only runs (docs/RESULTS.md section
# 11); none (inf: W itself) when activations are quantized too, where the alignment fits the rare rows whose inputs
# were clipped: MiniLM-L6 W8A8 cosine 0.857 with ridge 1 and percentile calibration, 0.983 with no alignment; the
# CNN and EfficientNet-Lite0 tied (section 13)
ALIGN_RIDGE = 1.0
ALIGN_RIDGE_W8A8 = math.inf

SCREEN = 2  # QuantConfig.screen's default at 3-8 bits (measured next to the field)
BITS = (8, 4, 3, 2, 1)
METHODS = ("spfq", "gpfq", "gptq", "rtn")
OPERATORS = ("stochastic", "nearest")
PATHS = ("plain", "projected", "best")
GRANULARITIES = ("channel", "layer", "block")
FORMATS = ("qdq", "float", "nbits", "sparse")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits' accuracy_level: 0 / 1 fp32 math, 2 fp16, 3 bf16, 4 int8 activations


def levels(bits: int) -> int:
    """K, the largest integer code: 2^(b-1) - 1 for b >= 2, 1 for binary (codes live in {-K..K}; bits 1 and 2 both
    give K = 1). The one definition of the grid (operators, emitters, methods read it from here)."""
    if bits not in BITS:
        raise OnnxspfqError(f"unsupported bits value {bits!r}: use one of {', '.join(map(str, BITS))}")
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix is quantized.

    bits: stored bits (8, 4, 3, 2 = ternary, 1 = binary {-a, +a}).
    c_alpha: step-size multiplier on max|w| (None: chosen per layer by the exact Gram reconstruction error).
    C: SPFQ damping of the error correction (C = 1 is SPFQ, C -> inf is independent stochastic rounding).
    operator: the operator T: "stochastic" (unbiased rounding, the SPFQ paper's) or "nearest" (deterministic);
        None (default): nearest (see the field's comment for the measurement).
    path: which path following runs (spfq): "plain" (the papers' path following: merged form, or two-phase with
        `order` / perfect alignment), "projected" (each X~_t projected off the later columns: the error of every
        quantized column is spread over the later columns through H^-1, which is OPTQ's update; ALGORITHM.md section
        6), or "best" (both; every output channel keeps the one with the smaller exact error). None (default):
        projected at 3-8 bits, best at 1-2 bits; plain when pruning, or when a setting only the plain path has is
        given (operator "stochastic", C != 1, order > 1, perfect_alignment; see the field's comment).
    granularity: one step per output channel, per layer, or per block of `block_size` along the reduction axis.
    order: alignment order r (1 = merged form; r > 1 = two-phase with r alignment passes).
    perfect_alignment: phase I solves the least-squares alignment exactly instead of r passes.
    damp: GPTQ's relative Hessian damping (fraction of mean diag(H)).
    sparsity: target fraction of zero weights per layer (stochastic pruning; joint with quantization when bits is
        set); 0 = no unstructured pruning.
    nm: (N, M) structured pruning, e.g. (2, 4): in every group of M consecutive weights along the reduction axis
        at most N are non-zero, decided inside the path following.
    refit_scale: after the codes are fixed, re-fit each channel's step to minimise the exact reconstruction
        error (ALGORITHM Section 6; per-channel / per-layer granularity).
    draws: stochastic operators only: run the path following with this many independent draws of xi and keep,
        per output channel, the draw with the smallest exact Gram error (Section 6: measurable from the Grams).
        Neurons are independent, so each kept row is one complete SPFQ run; 1 = plain SPFQ. None (default): 8 at
        1 and 2 bits without pruning (where one draw's variance costs most; docs/RESULTS.md section 4), else 1.
    align_ridge: phase I of the projected path (spfq): it quantizes W~ = argmin ||X w - X~ v||^2 + ridge * mean(diag
        H) ||v - w||^2 instead of W, so each layer also corrects the error the earlier layers left in its input
        (perfect alignment at 0, which over-fits the calibration set; W itself, OPTQ, at inf).
    act_order: process the input columns in decreasing order of their energy diag(H) (GPTQ's act-order) instead of
        their stored order, so the largest-norm inputs are rounded first and the rest correct them. Any column order
        is a valid path following; channel / layer granularity without N:M only (blocks and N:M groups are defined
        along the stored axis). None (default): on for spfq's projected and best paths where allowed (measured
        better on MiniLM-L6, even on Fashion-MNIST: docs/RESULTS.md section 11), off for the baselines and the
        plain path.
    screen: how many candidate steps (c_alpha) each output channel runs the path following with, after ranking
        every candidate by the OPTQ loss of plain rounding onto its grid (search.py); 0 runs every candidate.
        None (default): SCREEN at 3-8 bits, 0 at 1-2 bits (see the field's comment).
    bits None means prune only (weights stay float); then sparsity or nm must be set.
    """

    bits: int | None = 4
    c_alpha: float | None = None
    C: float = 1.0
    # None: "nearest". Pruning (docs/RESULTS.md section 7, Fashion-MNIST CNN test set): at 0.5 / 0.75 / 0.9 sparsity
    # stochastic T gave 89.7 / 10.6 / 9.2 % where nearest gave 91.3 / 87.0 / 67.8 %; with 4 bits and 2:4 or 0.5 /
    # 0.75 sparsity nearest won every case too. Quantization (section 11): stochastic T lost to nearest on every model
    # and width measured, and so did the best of 8 stochastic draws per channel (MiniLM-L6 4-bit cosine 0.898 vs
    # 0.978 for nearest on the same plain path).
    operator: str | None = None
    # None: "projected" at 3-8 bits, "best" at 1-2 bits, "plain" when pruning; measured in docs/RESULTS.md section 11
    path: str | None = None
    # MiniLM-L6 (docs/RESULTS.md section 11): projected path on W 0.9853 / 0.9479 cosine at 4 / 3 bits, on the ridge-
    # aligned W~ with ridge 1: 0.9877 / 0.9578 (ridge 0.3 and 3 measured there too)
    align_ridge: float | None = None  # None: ALIGN_RIDGE, or ALIGN_RIDGE_W8A8 under --activations int8
    granularity: str = "channel"
    block_size: int = 128
    order: int = 1
    perfect_alignment: bool = False
    damp: float = 0.01
    sparsity: float = 0.0
    nm: tuple[int, int] | None = None
    refit_scale: bool = False
    draws: int | None = None
    act_order: bool | None = None
    # None: 2 at 3-8 bits, every candidate at 1-2 bits. Keeping each channel's best 2 by the ranking (the projected
    # path's OPTQ loss with the error feedback left out) lost 0.19 / 0.14 % of MiniLM-L6's exact error at 4 / 3 bits
    # and 0.39 % of EfficientNet-Lite0's at 4, at 1.32x / 1.19x / 1.61x one pass where every candidate cost 2.0x /
    # 1.8x / 2.1x (tools/bench_search.py); held-out figures unchanged (MiniLM 4-bit cosine 0.9878 vs 0.9877); the
    # Fashion-MNIST CNN lost 10 % of its 3-bit error (docs/RESULTS.md section 16). At 1-2 bits the default path
    # "best" also runs the plain form, which has no such ranking, and nothing was measured there, so all run.
    screen: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise OnnxspfqError(f"sparsity must be in [0, 1), got {self.sparsity}: e.g. --sparsity 0.5 or 2:4")
        if self.bits is None and not (self.sparsity > 0 or self.nm):
            raise OnnxspfqError("nothing to do: give bits to quantize, or a sparsity / N:M pattern to prune")
        if self.bits is not None and self.bits not in BITS:
            raise OnnxspfqError(f"unsupported bits value {self.bits!r}: use one of {', '.join(map(str, BITS))}")
        if self.c_alpha is not None and not 0 < self.c_alpha < math.inf:
            raise OnnxspfqError(f"c_alpha must be a finite number > 0, got {self.c_alpha}: e.g. --c-alpha 2, or "
                                "leave it unset to have it chosen per channel")
        if not 1 <= self.C < math.inf:
            raise OnnxspfqError(f"C must be a finite number >= 1, got {self.C}: use C = 1 (SPFQ) or larger (e.g. "
                                "1e6) to damp the correction")
        if self.operator is not None and self.operator not in OPERATORS:
            raise OnnxspfqError(f"unknown operator {self.operator!r}: use one of {', '.join(OPERATORS)}")
        if self.align_ridge is not None and (not 0 <= self.align_ridge <= math.inf
                                             or self.align_ridge != self.align_ridge):
            raise OnnxspfqError(f"align_ridge must be >= 0 (inf: no alignment), got {self.align_ridge}: e.g. --align-ridge 1")
        if self.path is not None and self.path not in PATHS:
            raise OnnxspfqError(f"unknown path {self.path!r}: use one of {', '.join(PATHS)}")
        if self.granularity not in GRANULARITIES:
            raise OnnxspfqError(f"unknown granularity {self.granularity!r}: use one of {', '.join(GRANULARITIES)}")
        if self.block_size < 1:
            raise OnnxspfqError(f"block_size must be >= 1, got {self.block_size}")
        if self.order < 1:
            raise OnnxspfqError(f"alignment order must be >= 1, got {self.order}")
        if not 0 <= self.damp < 1:
            raise OnnxspfqError(f"damp must be in [0, 1), got {self.damp}")
        if self.nm is not None:
            n, m = self.nm
            if not (1 <= n < m <= 16):
                raise OnnxspfqError(f"N:M pattern {n}:{m} is invalid: need 1 <= N < M <= 16, e.g. 2:4")
            if self.sparsity:
                raise OnnxspfqError("give either an unstructured sparsity or an N:M pattern, not both")
        if self.screen is not None and not 0 <= self.screen <= 64:
            raise OnnxspfqError(f"screen must be in 0..64 (0: every candidate), got {self.screen}: e.g. --screen 2")
        if self.draws is not None and not 1 <= self.draws <= 256:
            raise OnnxspfqError(f"draws must be in 1..256, got {self.draws}: e.g. --draws 8")
        if self.draws is not None and self.draws > 1 and (self.sparsity or self.nm):
            raise OnnxspfqError("--draws applies to quantization without pruning: drop --draws or --sparsity")
        if self.act_order and (self.nm or self.granularity == "block"):
            raise OnnxspfqError("--act-order permutes the reduction axis: it cannot be combined with N:M or block "
                                "granularity; drop one of them")
        if self.bits == 1 and (self.sparsity or self.nm):
            raise OnnxspfqError("1-bit codes {-a,+a} have no zero: use --bits 2 (ternary) or more with pruning")

    def effective(self) -> dict:
        """Every setting as it runs: the fields, with defaults that depend on others resolved."""
        d = asdict(self)
        d["draws"], d["operator"], d["path"], d["align_ridge"] = self.n_draws, self.T, self.route, self.ridge
        return d

    @property
    def ridge(self) -> float:
        """The alignment ridge the projected path runs with (see `align_ridge`)."""
        return ALIGN_RIDGE if self.align_ridge is None else self.align_ridge

    @property
    def T(self) -> str:
        """The operator T that runs (see `operator`)."""
        return self.operator if self.operator is not None else "nearest"

    @property
    def route(self) -> str:
        """The path following spfq runs (see `path`)."""
        if self.path is not None:
            return self.path
        if self.sparsity or self.nm or self.bits is None:
            return "plain"
        # settings only the plain path has ask for it: the paper's SPFQ is --operator stochastic (stochastic rounding
        # on the projected path was tried and measured worse than on the plain one, section 11)
        if self.T == "stochastic" or self.order > 1 or self.perfect_alignment or self.C != 1.0:
            return "plain"
        return "best" if self.bits <= 2 else "projected"

    def ordered(self, method: str) -> bool:
        """Whether `method` runs the columns in act-order (see `act_order`)."""
        if self.act_order is not None:
            return self.act_order
        return method == "spfq" and self.route != "plain" and self.granularity != "block" and self.nm is None

    @property
    def n_draws(self) -> int:
        """How many draws of xi the stochastic operator runs (see `draws`)."""
        if self.draws is not None:
            return self.draws
        return 8 if self.bits in (1, 2) and not (self.sparsity or self.nm) else 1

    @property
    def n_screen(self) -> int:
        """How many candidate steps each channel runs after the ranking (0: all; see `screen`)."""
        if self.screen is not None:
            return self.screen
        return 0 if self.bits in (1, 2) else SCREEN

    @property
    def levels(self) -> int:
        """K: the largest integer code; codes live in {-K..K} (b >= 2) or {-1, +1} (b = 1)."""
        if self.bits is None:
            raise ValueError("no quantization grid: bits is None (prune only)")
        return levels(self.bits)


ACT_CALIBRATIONS = ("minmax", "percentile")
ACT_TYPES = ("uint8", "int8")
EMBEDDINGS = ("int8", "float")  # --embeddings (embeddings.py)


@dataclass(frozen=True)
class ActConfig:
    """Activation quantization (W8A8, activations.py): per-tensor 8-bit on each compressed layer's input (and on
    Conv / Gemm outputs under --target ort-cpu), its scale from the float values on the calibration data: "minmax"
    maps max|x| to 127 (255 for a tensor that cannot be negative, stored uint8); "percentile" that percentile of
    |x|, clipping the rare outliers (of transformer activations) instead of spending the grid on them."""

    # percentile with the W8A8 default path (no alignment, ALIGN_RIDGE_W8A8) measured best (docs/RESULTS.md
    # section 13): MiniLM-L6 cosine 0.9834 vs 0.9757 with minmax; the CNN and EfficientNet-Lite0 tied
    calibration: str = "percentile"
    percentile: float = 99.99
    # how the symmetric codes are stored (None: by target, CompressConfig): uint8 with zero point 128 holds the
    # same values as int8 with zero point 0, and is what onnxruntime's CPU int8 kernels (u8 x s8) run fast:
    # MiniLM-L6 W8A8 1.83x / 1.78x faster than float at batch 1 / 16 as uint8, 0.70x / 1.11x as int8
    # (`tools/bench_speed.py --models minilm`, RESULTS.md section 13); TensorRT reads only int8 with zero point 0
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in ACT_TYPES:
            raise OnnxspfqError(f"unknown --act-type {self.dtype!r}: use one of {', '.join(ACT_TYPES)}")
        if self.calibration not in ACT_CALIBRATIONS:
            raise OnnxspfqError(f"unknown --act-calibration {self.calibration!r}: use one of {', '.join(ACT_CALIBRATIONS)}")
        if not (math.isfinite(self.percentile) and 50 < self.percentile <= 100):
            raise OnnxspfqError(f"--act-percentile must be in (50, 100], got {self.percentile}: e.g. 99.99")


@dataclass(frozen=True)
class CompressConfig:
    """One compression run over a whole model."""

    method: str = "spfq"
    quant: QuantConfig = field(default_factory=QuantConfig)
    seed: int = 0
    samples: int | None = None
    batch_size: int = 16
    # Conv im2col patches per LAYER over all calibration batches (capture._patch_picks). EfficientNet-Lite0 3-bit
    # held-out logits cosine over seeds 0 / 1 / 2: 0.641 / 0.658 / 0.670 at 12,288 patches, 0.675 / 0.686 / 0.638 at
    # 32,768 (no difference beyond the seed's); 4-bit 0.905-0.911 at every cap from 4,096 to 65,536; the
    # Fashion-MNIST CNN flat from 4,096 up (docs/RESULTS.md section 16). So the cheaper cap; the old cap of 4,096 per
    # BATCH fed the CLI's batch 16 40,960 patches of 150 crops (the grid of section 11 ran batch 50: 12,288).
    max_patches: int | None = 12288
    # the same cap for grouped / depthwise Convs (the smaller applies; None: max_patches alone): their groups have
    # N0 = 9 or 25 inputs, so 12,288 rows were 490-1,365 rows per input where a dense layer's Gram has 10-85, and
    # EfficientNet-Lite0's 16 depthwise layers were most of its Gram building. At 4,096 its held-out logits cosine,
    # 3 bit seeds 0 / 1 / 2: 0.655 / 0.668 / 0.663 vs 0.652 / 0.654 / 0.670 at 12,288; 4 bit 0.908 vs 0.912
    # (2,048: 0.909): no change beyond the seeds' spread, compress 117 -> 84 s (docs/RESULTS.md section 17)
    group_patches: int | None = 4096
    # MatMul rows of padding tokens left out of the Grams: the graph input (batch, sequence) whose zeros mark them
    # ("auto": `attention_mask` where the model has such an input, the name every Hugging Face export uses; "none":
    # every row). A padding position's output is masked away downstream, so fitting it spends the weights on rows
    # the model discards: MiniLM-L6's 256 calibration sentences are 5,364 tokens in 16,384 padded rows.
    token_mask: str = "auto"
    skip: tuple[str, ...] = ()
    # the runtime the output is for (targets.py): its rules adapt or refuse settings, and set the defaults below
    target: str = "generic"
    # None: from bits and target (resolved on construction): qdq with bits; when pruning only, sparse (float for
    # tensorrt, which reads dense weights); nbits under ort-cpu (MatMulNBits runs packed weights without a
    # dequantization per run), qdq there too with --activations int8
    format: str | None = None
    # MatMulNBits' accuracy_level (--format nbits); None: 4 under ort-cpu (int8 activations in the kernel: MiniLM-L6
    # 1.23x float at batch 1 vs 1.09x at level 0, cosine 0.9870 vs 0.9877; the Qwen2 tiny decoder's token 4.79x vs
    # 2.61x, same cosine; RESULTS.md section 14), else 0 (fp32 math: the output equals the compressed model's
    # de-quantized weights to fp32 rounding)
    accuracy_level: int | None = None
    auto_C: bool = False
    # bits per layer from mixed.CHOICES by each layer's measured effect on the output, at most this many bits per
    # weight on average in a file no larger than a uniform ceil(avg_bits) model's (mixed.py); None: quant.bits
    avg_bits: float | None = None
    # --avg-bits' file bound: at most this many stored bits per weight; None: a uniform ceil(avg_bits) model's
    stored_bits: float | None = None
    # W8A8: each compressed layer's input quantized too (int8 per tensor), the weights at 8 bits; None: weights only
    activations: ActConfig | None = None
    # the output's default-domain opset; None: the model's own, raised only as far as the stored weights need
    opset: int | None = None
    # embedding tables (embeddings.py): "int8" (per row) or "float"; None: int8 when the weights are quantized
    # to qdq / nbits outside tensorrt (MiniLM-L6 at 4 bits: 53.3 -> 17.7 MB, held-out cosine 0.98769 -> 0.98767;
    # RESULTS.md section 15), else float
    embeddings: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OnnxspfqError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.target not in TARGETS:
            raise OnnxspfqError(f"unknown --target {self.target!r}: use one of {', '.join(TARGETS)}")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            raise OnnxspfqError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))} "
                                f"(MatMulNBits: 0 / 1 fp32, 2 fp16, 3 bf16, 4 int8), got {self.accuracy_level}")
        if self.format is None:
            object.__setattr__(self, "format", self._default_format())
        if self.activations is not None and self.activations.dtype is None:
            object.__setattr__(self, "activations", replace(
                self.activations, dtype="int8" if self.target == "tensorrt" else "uint8"))
        if self.format not in FORMATS:
            raise OnnxspfqError(f"unknown output format {self.format!r}: use one of {', '.join(FORMATS)}")
        if self.embeddings is None:
            object.__setattr__(self, "embeddings", "int8" if self.format in ("qdq", "nbits") and self.quant.bits
                               is not None and self.target != "tensorrt" else "float")
        if self.embeddings not in EMBEDDINGS:
            raise OnnxspfqError(f"unknown --embeddings {self.embeddings!r}: use one of {', '.join(EMBEDDINGS)}")
        if self.quant.bits is None and self.format in ("qdq", "nbits"):
            raise OnnxspfqError(f"--format {self.format} stores integer codes: give --bits, or use --format sparse / float to prune only")
        if self.samples is not None and self.samples < 1:
            raise OnnxspfqError(f"samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise OnnxspfqError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_patches is not None and self.max_patches < 1:
            raise OnnxspfqError(f"max_patches must be >= 1, got {self.max_patches}")
        if self.group_patches is not None and self.group_patches < 1:
            raise OnnxspfqError(f"group_patches must be >= 1, got {self.group_patches}")
        if not self.token_mask:
            raise OnnxspfqError("--token-mask needs an input name, auto or none")
        if not 0 <= self.seed < 2 ** 63:
            raise OnnxspfqError(f"seed must be in 0..2**63-1, got {self.seed}: e.g. --seed 0")
        if self.avg_bits is not None:
            if not 2 <= self.avg_bits <= 8:
                raise OnnxspfqError(f"--avg-bits must be in [2, 8] (bits per weight on average; each layer gets 8, "
                                    f"4, 3 or 2), got {self.avg_bits}: e.g. --avg-bits 4")
            if self.stored_bits is not None and not 2 <= self.stored_bits <= 8:
                raise OnnxspfqError(f"--stored-bits must be in [2, 8] (stored bits per weight; 2-bit codes store 2), "
                                    f"got {self.stored_bits}: e.g. --stored-bits 3")
            if self.quant.sparsity or self.quant.nm or self.quant.bits is None:
                raise OnnxspfqError("--avg-bits assigns bits per layer to quantize, not to prune: drop --sparsity, "
                                    "or --avg-bits")
            if self.format in ("float", "sparse"):
                raise OnnxspfqError(f"--avg-bits budgets the stored integer bits; --format {self.format} stores floats: "
                                    "use --format qdq or nbits")
        if self.opset is not None and not 7 <= self.opset <= 25:
            raise OnnxspfqError(f"--opset must be in 7..25 (onnxruntime's CPU DequantizeLinear stops at 25), got "
                                f"{self.opset}")
        if self.activations is not None:
            if self.quant.bits != 8 or self.avg_bits is not None:
                raise OnnxspfqError("--activations int8 quantizes weights and activations to 8 bits (W8A8): use "
                                    "--bits 8 (the default with it), without --avg-bits")
            if self.format != "qdq":
                raise OnnxspfqError(f"--activations int8 emits QuantizeLinear / DequantizeLinear pairs: use --format "
                                    f"qdq, not {self.format}")
        for option, why in self.ignored():
            raise OnnxspfqError(f"{option} has no effect here: {why}; drop it")
        if self.accuracy_level is None and self.format == "nbits":
            object.__setattr__(self, "accuracy_level", 4 if self.target == "ort-cpu" else 0)
        if (why := targets.refusals(self)) is not None:
            raise OnnxspfqError(why)

    @property
    def reads_cross_gram(self) -> bool:
        """Whether the method reads G = X~^T X itself: the plain path's kernels (gpfq; spfq's plain and best paths
        without perfect alignment). The others read G only as W G^T, which the capture can build more cheaply
        (gram.Grams' weight form)."""
        q = self.quant
        return self.method == "gpfq" or (self.method == "spfq" and q.route != "projected" and not q.perfect_alignment)

    def _default_format(self) -> str:
        """The output format when none is given (see `format`)."""
        if self.quant.bits is None:
            return "float" if self.target == "tensorrt" else "sparse"
        return "nbits" if self.target == "ort-cpu" and self.activations is None else "qdq"

    def resolved(self) -> "CompressConfig":
        """This run's settings with the defaults that depend on other options filled in: the projected path's
        alignment ridge under activation quantization (ALIGN_RIDGE_W8A8)."""
        q = self.quant
        if self.activations is not None and q.align_ridge is None and self.method == "spfq" and q.route != "plain":
            return replace(self, quant=replace(q, align_ridge=ALIGN_RIDGE_W8A8))
        return self

    def ignored(self) -> list[tuple[str, str]]:
        """Settings given a non-default value that this run would not read: (option, why). They are refused, as a
        setting that silently does nothing misleads (a user who passes --C to rtn believes C was applied)."""
        q, base, m = self.quant, QuantConfig(), self.method
        spfq = m == "spfq"
        plain = spfq and q.route != "projected"
        reads = {  # setting: (option, read by this run?, who reads it)
            "C": ("--C", plain and not self.auto_C, "only --method spfq's plain path reads it (--path plain or "
                  "best), and --auto-C chooses C itself"),
            "operator": ("--operator", spfq, f"only --method spfq uses an operator T ({m} rounds to nearest)"),
            "path": ("--path", spfq, f"only --method spfq chooses its path following ({m} has one)"),
            "align_ridge": ("--align-ridge", spfq and q.route != "plain", "only --method spfq's projected path (--path "
                            "projected or best) aligns with a ridge"),
            "order": ("--order", plain, "only --method spfq's plain path (--path plain or best) has an alignment order"),
            "perfect_alignment": ("--perfect-alignment", plain, "only --method spfq's plain path (--path plain or "
                                  "best) aligns"),
            "draws": ("--draws", spfq and q.T == "stochastic",
                      "draws of xi exist only for --method spfq with --operator stochastic"),
            "refit_scale": ("--refit-scale", m != "rtn", "rtn stays the data-free baseline: no re-fit"),
            "act_order": ("--act-order", m != "rtn", "rtn rounds each weight alone: column order changes nothing"),
            "damp": ("--damp", m == "gptq" or (spfq and (q.perfect_alignment or q.route != "plain")),
                     "only --method gptq (and spfq's projected path or --perfect-alignment) damp a Hessian"),
            "block_size": ("--block-size", q.granularity == "block", "it applies to --granularity block only"),
        }
        out = [(opt, why) for name, (opt, used, why) in reads.items()
               if not used and getattr(q, name) != getattr(base, name)]
        if self.accuracy_level is not None and self.format != "nbits":
            out.append(("--accuracy-level", f"it is MatMulNBits' attribute and --format {self.format} has none "
                        "(--format nbits, or --target ort-cpu, writes MatMulNBits)"))
        if self.auto_C and not plain:
            out.append(("--auto-C", f"only --method spfq has a C to choose ({m} does not)" if not spfq else
                        "C belongs to spfq's plain path, and this run takes the projected one (add --path plain or best)"))
        if self.stored_bits is not None and self.avg_bits is None:
            out.append(("--stored-bits", "it bounds the file of --avg-bits' mixed precision (add --avg-bits B)"))
        return out

    def effective(self) -> dict:
        """Every setting as it runs (the report's `effective`): defaults resolved, e.g. the number of draws."""
        d = asdict(self)
        d["quant"] = self.quant.effective()
        d["quant"]["act_order"] = self.quant.ordered(self.method)
        if self.avg_bits is not None:  # each layer's bits (and what resolves from them) are in the report's layers
            d["quant"]["bits"] = "per layer (--avg-bits)"
        return d
