"""Images as model inputs: how an image file, or a uint8 `images` array in an .npz, becomes one input sample
(converted to RGB / L, resized bilinearly, scaled, normalised per channel, laid out NCHW / NHWC). Used by the
calibration reader (calib.py) for `compress` and `evaluate` alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onnxspfq.errors import OnnxspfqError

if TYPE_CHECKING:  # calib.py imports this module; the specs are its InputSpec
    from onnxspfq.calib import InputSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image file becomes one model input sample.

    The image is converted to RGB (3 channels) or L (1 channel, from the model's channel dim), resized to
    `size` = (height, width) with bilinear filtering (None: the model input's static H, W), then
    `x = (pixel * scale - mean[c]) / std[c]` per channel, in `layout` "NCHW" or "NHWC".
    Example for ImageNet models: ImagePreprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise OnnxspfqError(f"unknown image layout {self.layout!r}: use 'NCHW' or 'NHWC'")
        if self.size is not None and not all(isinstance(v, int) and 1 <= v <= 16384 for v in self.size):
            raise OnnxspfqError(f"image size must be two integers in 1..16384, got {tuple(self.size)}: e.g. "
                                "--image-size 224 224")
        if not all(np.isfinite(v) for v in (*self.mean, *self.std, self.scale)):
            raise OnnxspfqError("image mean, std and scale must be finite numbers")
        if any(s == 0 for s in self.std):
            raise OnnxspfqError("image std must be non-zero in every channel")


def read_images(files: list[Path], specs: list[InputSpec], pre: ImagePreprocess) -> dict[str, np.ndarray]:
    prepare, spec = _image_pipeline(specs, pre)
    out = []
    for f in files:
        try:
            from PIL import Image

            with Image.open(f) as im:
                out.append(prepare(im))
        except OSError as e:
            raise OnnxspfqError(f"cannot read image {f.name!r} ({e}); remove or replace it") from None
    return {spec.name: np.stack(out)}


def images_or_arrays(arrays: dict, specs: list[InputSpec], pre: ImagePreprocess, where: str) -> dict:
    """`arrays` as they are, or, where they hold `images` and no model input, those images preprocessed."""
    names = {s.name for s in specs}
    if "images" in arrays and "images" not in names and not names & set(arrays):
        return _image_arrays(np.asarray(arrays["images"]), specs, pre, where)
    return arrays


def _image_arrays(images: np.ndarray, specs: list[InputSpec], pre: ImagePreprocess, where: str) -> dict[str, np.ndarray]:
    """An .npz's `images` (uint8 [N, H, W] or [N, H, W, C]) through the same pipeline as image files."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise OnnxspfqError(f"{where}: 'images' must be uint8 pixels [N, H, W] or [N, H, W, C] with C = 1 or 3, got "
                            f"{images.dtype} {list(images.shape)}; or store the model's input under its own name")
    prepare, spec = _image_pipeline(specs, pre)
    from PIL import Image

    pixels = images[..., 0] if images.ndim == 4 and images.shape[3] == 1 else images
    return {spec.name: np.stack([prepare(Image.fromarray(a)) for a in pixels])}


def _image_pipeline(specs: list[InputSpec], pre: ImagePreprocess):
    """(prepare, spec): prepare(PIL image) -> one input sample (converted, resized, normalised, laid out)."""
    try:
        from PIL import Image
    except ImportError:
        raise OnnxspfqError("reading calibration images needs Pillow: run `pip install pillow`, "
                            "or pass the preprocessed images as a .npz/.npy file") from None
    if len(specs) != 1 or len(specs[0].shape) != 4:
        raise OnnxspfqError("images feed a model with one 4-D input (N, C, H, W or N, H, W, C); this model's "
                            "inputs differ: pass arrays named after its inputs in a .npz instead")
    spec = specs[0]
    shp = spec.shape
    chan_axis = 1 if pre.layout == "NCHW" else 3
    hw = (shp[2], shp[3]) if pre.layout == "NCHW" else (shp[1], shp[2])
    size = pre.size or (hw if None not in hw else None)
    if size is None:
        raise OnnxspfqError("the model's image height/width are dynamic: give the size with --image-size H W (ImagePreprocess(size=(H, W)) in Python)")
    channels = shp[chan_axis] or len(pre.mean)
    if channels not in (1, 3):
        raise OnnxspfqError(f"image calibration supports 1 or 3 channels, the model wants {channels}")
    mean = np.asarray(pre.mean[:channels] if len(pre.mean) >= channels else pre.mean * channels, np.float32)
    std = np.asarray(pre.std[:channels] if len(pre.std) >= channels else pre.std * channels, np.float32)
    dtype = spec.dtype if spec.dtype.kind == "f" else np.float32

    def prepare(im) -> np.ndarray:
        im = im.convert("RGB" if channels == 3 else "L")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        a = (np.asarray(im, dtype=np.float32).reshape(size[0], size[1], channels) * pre.scale - mean) / std
        return (a.transpose(2, 0, 1) if pre.layout == "NCHW" else a).astype(dtype)

    return prepare, spec
