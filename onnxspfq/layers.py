"""Everything op-specific about a compressible layer, one class per op: how the node's weight W0 maps to the N1 x N0
matrix W of ALGORITHM.md Section 1 (rows = output neurons) and back, which axes hold the channels and the
reduction, how the layer's input becomes the rows X with X @ W.T = the node's output (without bias), the Conv
groups, the N:M groups along the axis TensorRT reads, and which nodes of the op the pass can take.

Adding an op is one class here (plus tests against onnxruntime); graph.find_layers, the capture, the methods and
the emitters only talk to `Layer`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxspfq.gram import im2col, patch_count
from onnxspfq.operators import nm_groups_for

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
Pick = Callable[[int], "np.ndarray | None"]  # total rows -> sorted row indices to keep (None: all)


def conv_pads(spatial: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...],
              dilations: tuple[int, ...], auto_pad: str, pads: tuple[int, ...] | None) -> tuple[int, ...]:
    """ONNX Conv padding rules: explicit pads, VALID, or SAME_UPPER / SAME_LOWER (extra pad at the end / begin)."""
    nd = len(kernel)
    if auto_pad in ("NOTSET", ""):
        return tuple(pads) if pads else (0,) * (2 * nd)
    if auto_pad == "VALID":
        return (0,) * (2 * nd)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        if auto_pad == "SAME_UPPER":
            begins.append(small), ends.append(total - small)
        else:
            begins.append(total - small), ends.append(small)
    return tuple(begins + ends)


# ------------------------------------------------------------------------------------------------------- the ops
class MatMul:
    """y = x @ W0, W0 [K, N]: W = W0.T; rows are the input's last axis (one row per token)."""

    name = "MatMul"

    def ineligible(self, rank: int, attrs: dict) -> str | None:
        return None if rank == 2 else f"weight has rank {rank} (only 2-D weights are compressed)"

    def configure(self, layer: "Layer", attrs: dict) -> None:
        pass

    def channel_axis(self, layer: "Layer") -> int:
        return 1

    def reduction_axis(self, layer: "Layer") -> int:
        return 1 - self.channel_axis(layer)

    def groups(self, layer: "Layer") -> int:
        return 1

    def matrix(self, layer: "Layer", w: np.ndarray) -> np.ndarray:
        return w if self.channel_axis(layer) == 0 else w.T

    def tensor(self, layer: "Layer", W: np.ndarray) -> np.ndarray:
        return W if self.channel_axis(layer) == 0 else W.T

    def row_count(self, layer: "Layer", shape: tuple[int, ...]) -> int:
        return int(np.prod(shape[:-1]))

    def rows(self, layer: "Layer", x: np.ndarray, pick: Pick) -> np.ndarray:
        if x.shape[-1] != layer.n0:
            raise ValueError(f"layer {layer.name}: input last dim {x.shape[-1]} != weight rows {layer.n0}")
        return x.reshape(-1, layer.n0)

    def nm_groups(self, layer: "Layer", n: int, m: int) -> tuple[np.ndarray | None, str]:
        if layer.n0 % m:
            return None, f"{n}:{m} not applicable: reduction size {layer.n0} is no multiple of {m}"
        return nm_groups_for(layer.n0, m), ""


class Gemm(MatMul):
    """y = alpha * A' @ B' + C with B constant: W = B (transB) or B.T; A' = A.T when transA."""

    name = "Gemm"

    def configure(self, layer: "Layer", attrs: dict) -> None:
        layer.trans_a = bool(attrs.get("transA", 0))
        layer.trans_b = bool(attrs.get("transB", 0))
        layer.alpha = float(attrs.get("alpha", 1.0))

    def channel_axis(self, layer: "Layer") -> int:
        return 0 if layer.trans_b else 1

    def row_count(self, layer: "Layer", shape: tuple[int, ...]) -> int:
        return int(shape[1] if layer.trans_a else shape[0])

    def rows(self, layer: "Layer", x: np.ndarray, pick: Pick) -> np.ndarray:
        return x.T if layer.trans_a else x


class Conv:
    """W0 [M, C/g, *k]: W = W0.reshape(M, -1), one block of M/g rows per group; rows are im2col patches."""

    name = "Conv"

    def ineligible(self, rank: int, attrs: dict) -> str | None:
        if rank not in (3, 4, 5):
            return f"{self.name} weight has rank {rank} (1-D, 2-D and 3-D convolutions are supported)"
        return None

    def configure(self, layer: "Layer", attrs: dict) -> None:
        nd = len(layer.dims) - 2
        layer.groups = int(attrs.get("group", 1))
        layer.kernel_shape = tuple(int(k) for k in attrs.get("kernel_shape", layer.dims[2:]))
        layer.strides = tuple(int(s) for s in attrs.get("strides", (1,) * nd))
        layer.dilations = tuple(int(d) for d in attrs.get("dilations", (1,) * nd))
        ap = attrs.get("auto_pad", b"NOTSET")
        layer.auto_pad = ap.decode() if isinstance(ap, bytes) else str(ap)
        explicit = tuple(int(p) for p in attrs.get("pads", (0,) * (2 * nd)))
        if layer.auto_pad in ("NOTSET", "", "VALID"):
            layer.pads = conv_pads((), layer.kernel_shape, layer.strides, layer.dilations, layer.auto_pad, explicit)
        else:
            shp = layer.input_shape
            spatial = shp[2:] if shp is not None and len(shp) == nd + 2 else None
            layer.pads = (None if spatial is None or any(s is None for s in spatial) else
                          conv_pads(tuple(spatial), layer.kernel_shape, layer.strides, layer.dilations,
                                    layer.auto_pad, None))

    def channel_axis(self, layer: "Layer") -> int:
        return 0

    def reduction_axis(self, layer: "Layer") -> int:
        return 1

    def groups(self, layer: "Layer") -> int:
        return layer.groups

    def matrix(self, layer: "Layer", w: np.ndarray) -> np.ndarray:
        return w.reshape(w.shape[0], -1)

    def tensor(self, layer: "Layer", W: np.ndarray) -> np.ndarray:
        return W.reshape(layer.dims)

    def _pads(self, layer: "Layer", shape: tuple[int, ...]) -> tuple[int, ...]:
        return layer.pads if layer.pads is not None else layer.resolve_pads(tuple(shape[2:]))

    def row_count(self, layer: "Layer", shape: tuple[int, ...]) -> int:
        return patch_count(shape, layer.kernel_shape, layer.strides, self._pads(layer, shape), layer.dilations)

    def rows(self, layer: "Layer", x: np.ndarray, pick: Pick) -> np.ndarray:
        pads = self._pads(layer, x.shape)
        return im2col(x, layer.kernel_shape, layer.strides, pads, layer.dilations, pick(self.row_count(layer, x.shape)))

    def nm_groups(self, layer: "Layer", n: int, m: int) -> tuple[np.ndarray | None, str]:
        channels, stride = layer.dims[1], int(np.prod(layer.dims[2:]))
        if channels % m:
            return None, f"{n}:{m} not applicable: {channels} input channels per group is no multiple of {m}"
        return nm_groups_for(layer.n0, m, stride), ""  # n0 is already one group's columns


class ConvTranspose(Conv):
    """W0 [C, M, *k] (group 1). y = ConvTranspose(x, W0) is the Conv of x with zeros inserted between its elements
    (stride - 1 per gap), padded by d * (k - 1) - pad at the begin (+ output_padding at the end), by the kernel
    flipped and its two channel axes swapped: so W = flip(W0).swapaxes(0, 1).reshape(M, -1) and the rows are the
    im2col patches of that stretched input with stride 1."""

    name = "ConvTranspose"

    def ineligible(self, rank: int, attrs: dict) -> str | None:
        if int(attrs.get("group", 1)) != 1:
            return ("grouped ConvTranspose: DequantizeLinear's one channel axis cannot hold a scale per output "
                    "channel of every group")
        if "output_shape" in attrs:
            return "ConvTranspose with output_shape (the pads are then implicit): not supported"
        ap = attrs.get("auto_pad", b"NOTSET")
        if (ap.decode() if isinstance(ap, bytes) else str(ap)) not in ("NOTSET", "", "VALID"):
            return "ConvTranspose with auto_pad SAME_*: not supported"
        return super().ineligible(rank, attrs)

    def configure(self, layer: "Layer", attrs: dict) -> None:
        super().configure(layer, attrs)
        nd = len(layer.dims) - 2
        layer.output_padding = tuple(int(p) for p in attrs.get("output_padding", (0,) * nd))

    def channel_axis(self, layer: "Layer") -> int:
        return 1

    def reduction_axis(self, layer: "Layer") -> int:
        return 0

    def _kernel_axes(self, layer: "Layer") -> tuple[int, ...]:
        return tuple(range(2, len(layer.dims)))

    def matrix(self, layer: "Layer", w: np.ndarray) -> np.ndarray:
        w = np.flip(w, self._kernel_axes(layer)).swapaxes(0, 1)
        return w.reshape(w.shape[0], -1)

    def tensor(self, layer: "Layer", W: np.ndarray) -> np.ndarray:
        d = layer.dims
        w = W.reshape((d[1], d[0]) + tuple(d[2:])).swapaxes(0, 1)
        return np.flip(w, self._kernel_axes(layer))

    def _stretched(self, layer: "Layer", shape: tuple[int, ...]):
        """The transposed convolution as a unit-stride Conv: the stretched input's shape (zeros between the
        inputs), the crop of it and the pads (a pad larger than d * (k - 1) crops the stretched input instead)."""
        nd = len(layer.kernel_shape)
        s, d, k = layer.strides, layer.dilations, layer.kernel_shape
        up = tuple(shape[:2]) + tuple((n - 1) * s[i] + 1 for i, n in enumerate(shape[2:]))
        begin = [d[i] * (k[i] - 1) - layer.pads[i] for i in range(nd)]
        end = [d[i] * (k[i] - 1) - layer.pads[nd + i] + layer.output_padding[i] for i in range(nd)]
        crop = tuple(slice(max(0, -b), up[2 + i] - max(0, -e)) for i, (b, e) in enumerate(zip(begin, end)))
        cropped = tuple(up[:2]) + tuple(len(range(*c.indices(up[2 + i]))) for i, c in enumerate(crop))
        return up, crop, cropped, tuple(max(0, b) for b in begin) + tuple(max(0, e) for e in end)

    def row_count(self, layer: "Layer", shape: tuple[int, ...]) -> int:
        _, _, cropped, pads = self._stretched(layer, shape)
        return patch_count(cropped, layer.kernel_shape, (1,) * len(layer.kernel_shape), pads, layer.dilations)

    def rows(self, layer: "Layer", x: np.ndarray, pick: Pick) -> np.ndarray:
        nd, s, k, d = len(layer.kernel_shape), layer.strides, layer.kernel_shape, layer.dilations
        up_shape, crop, _, pads = self._stretched(layer, x.shape)
        up = np.zeros(up_shape, dtype=x.dtype)
        up[(slice(None), slice(None)) + tuple(slice(None, None, s[i]) for i in range(nd))] = x
        up = up[(slice(None), slice(None)) + crop]
        ones = (1,) * nd
        return im2col(up, k, ones, pads, d, pick(self.row_count(layer, x.shape)))

    def nm_groups(self, layer: "Layer", n: int, m: int) -> tuple[np.ndarray | None, str]:
        return None, f"{n}:{m} not applied to ConvTranspose (no TensorRT sparse deconvolution form is checked here)"


OPS = {op.name: op for op in (MatMul(), Gemm(), Conv(), ConvTranspose())}
WEIGHT_OPS = tuple(OPS)
MATMUL_OPS = ("MatMul", "Gemm")  # the ops with a 2-D weight and no im2col: what MatMulNBits and block scales hold


# ----------------------------------------------------------------------------------------------------- the Layer
@dataclass
class Layer:
    """One compressible node (see the op classes above for each op's weight layout).

    matrix() is W (N1 x N0, float64 unless asked otherwise), rows = output neurons; tensor() is its exact inverse.
    pads are ONNX order (begins then ends), resolved from auto_pad with the inferred input shape; None when the
    input's spatial size is unknown before run time (use resolve_pads).
    """

    name: str
    op: str
    input: str
    output: str
    weight: str
    dims: tuple[int, ...]
    read: Callable[[], np.ndarray] = field(repr=False, compare=False)
    node_index: int = 0
    groups: int = 1
    kernel_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] | None = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    output_padding: tuple[int, ...] = ()
    trans_a: bool = False
    trans_b: bool = False
    alpha: float = 1.0
    bias: str | None = None
    weight_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    input_shape: tuple[int | None, ...] | None = None
    shared_with: list[str] = field(default_factory=list)
    stacked: bool = False  # the input arrives as [iterations, *input]: a Loop body's layer (branches.py)

    @property
    def kind(self):
        """The op class that knows this layer's layout (OPS[op])."""
        return OPS[self.op]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dims)

    @property
    def W0(self) -> np.ndarray:
        """The weight as the node reads it, float32, read from its model now (not kept: a layer of a large model
        holds no weight between calls)."""
        return np.ascontiguousarray(self.read(), dtype=np.float32)

    @property
    def channel_axis(self) -> int:
        """Axis of W0 that indexes the N1 output neurons (per-channel scales live along it)."""
        return self.kind.channel_axis(self)

    @property
    def reduction_axis(self) -> int:
        """Axis of W0 summed over by the node (convolutions: the input channels; the kernel axes follow it)."""
        return self.kind.reduction_axis(self)

    @property
    def n1(self) -> int:
        return int(self.dims[self.channel_axis])

    @property
    def n0(self) -> int:
        """Columns of W per group (a grouped Conv's groups each see C/g input channels)."""
        return int(np.prod(self.dims, dtype=np.int64) // self.n1)

    def matrix(self, w0: np.ndarray | None = None, dtype: type = np.float64) -> np.ndarray:
        """W (N1 x N0) of `w0` when given (an array in W0's layout), else of the layer's own weight."""
        w = np.asarray(self.W0 if w0 is None else w0, dtype=dtype)
        return np.ascontiguousarray(self.kind.matrix(self, w))

    def tensor(self, W: np.ndarray) -> np.ndarray:
        """Inverse of matrix(): W (N1 x N0) back to W0's shape and layout (float32, or W's dtype if integer)."""
        W = np.asarray(W)
        if W.shape != (self.n1, self.n0):
            raise ValueError(f"layer {self.name}: expected a ({self.n1}, {self.n0}) matrix, got {W.shape}")
        dtype = W.dtype if np.issubdtype(W.dtype, np.integer) else np.float32
        return np.ascontiguousarray(self.kind.tensor(self, W), dtype=dtype)

    def group_rows(self) -> list[slice]:
        """Row slices of matrix() per Conv group (one slice covering all rows otherwise)."""
        g = self.kind.groups(self)
        per = self.n1 // g
        return [slice(i * per, (i + 1) * per) for i in range(g)]

    def row_count(self, shape: tuple[int, ...]) -> int:
        """How many rows rows() makes of an input of this shape (im2col patches for a convolution)."""
        if self.stacked:
            shape = (int(shape[0]) * int(shape[1]),) + tuple(shape[2:])
        return self.kind.row_count(self, tuple(int(n) for n in shape))

    def rows(self, x: np.ndarray, pick: Pick = lambda total: None) -> np.ndarray:
        """The layer's input `x` (one batch) as rows X with X @ W.T = the node's output before bias (per group:
        the columns of group g are [g * n0, (g + 1) * n0)); `pick` subsamples convolution patches."""
        if self.stacked:  # a Loop body's input over its iterations: every iteration's rows
            x = np.asarray(x).reshape((-1,) + tuple(np.shape(x)[2:]))
        return self.kind.rows(self, x, pick)

    def nm_groups(self, n: int, m: int) -> tuple[np.ndarray | None, str]:
        """Column groups of W for N:M pruning along the axis TensorRT reads, or None and why N:M cannot apply."""
        return self.kind.nm_groups(self, n, m)

    def resolve_pads(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Conv pads (begins then ends) for an input of the given spatial size, honouring auto_pad."""
        return conv_pads(spatial, self.kernel_shape, self.strides, self.dilations, self.auto_pad,
                         self.pads if self.auto_pad in ("NOTSET", "") else None)


def ineligible(node: onnx.NodeProto, inits: dict, overridable: set[str]) -> str | None:
    """Why a weight-op node cannot be compressed, or None."""
    if node.domain not in ("", "ai.onnx"):
        return f"op in domain {node.domain!r}"
    if len(node.input) < 2:
        return "node has no weight input"
    a, b = node.input[0], node.input[1]
    if b not in inits:
        if node.op_type == "MatMul" and a in inits:
            return "constant is the first MatMul input (only activation @ constant is supported)"
        return "weight is computed at run time (not a constant initializer)"
    if a in inits:
        return "both inputs are constants"
    t = inits[b]
    if t.data_type not in FLOAT_TYPES:
        return f"weight dtype {onnx.helper.tensor_dtype_to_string(t.data_type)} is not floating point"
    attrs = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
    return OPS[node.op_type].ineligible(len(t.dims), attrs)


def make_layer(node: onnx.NodeProto, name: str, index: int, init: onnx.TensorProto,
               shapes: dict[str, tuple[int | None, ...]], read: Callable[[], np.ndarray]) -> Layer:
    """The Layer of an eligible node whose weight is `init` (`read` returns its value)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    layer = Layer(name=name, op=node.op_type, input=node.input[0], output=node.output[0], weight=init.name,
                  dims=tuple(int(d) for d in init.dims), read=read, node_index=index,
                  weight_dtype=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)),
                  input_shape=shapes.get(node.input[0]),
                  bias=node.input[2] if len(node.input) > 2 and node.input[2] else None)
    layer.kind.configure(layer, attrs)
    return layer
