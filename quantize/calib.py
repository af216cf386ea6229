"""Calibration data for post-training quantisation: real face crops fed through the model's own preprocessing.

Sources (`--calib`): `synthfaces[:small|:tiny]` (the SynthFaces *train* split, so calibration never sees the
evaluation pairs), a folder of aligned 112x112 RGB face crops (searched recursively), an insightface `.bin`,
a `.npy` array (N, 112, 112, 3) uint8, or `bnstats` (data-free, see `quantize.bnstats`).
Calibration images must be what the model sees in deployment: aligned RGB 112x112 crops. Anything else (grey or
RGBA files, other sizes, blank images) is refused with one line instead of silently calibrating on wrong data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from facekd.io import FacekdError

IMAGE_SIZE = 112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def check_images(images: Any, source: str) -> np.ndarray:
    """uint8 (N, 112, 112, 3) RGB face crops, or a one-line FacekdError saying what is wrong with `source`."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise FacekdError(f"calibration set {source}: images must be uint8 pixels, got {images.dtype}")
    if images.ndim == 3:
        raise FacekdError(f"calibration set {source}: images have 1 channel (grey); need RGB (N, 112, 112, 3)")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        raise FacekdError(f"calibration set {source}: need aligned RGB face crops (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), "
                          f"got shape {tuple(images.shape)}")
    if len(images) == 0:
        raise FacekdError(f"calibration set {source}: no images")
    flat = images.reshape(len(images), -1)
    blank = flat.max(1) == flat.min(1)
    if blank.mean() > 0.5:
        raise FacekdError(f"calibration set {source}: {int(blank.sum())} of {len(images)} images are blank "
                          "(one colour); calibrate on real face crops")
    return images


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode, size = img.mode, img.size
            if mode not in ("RGB",):
                channels = {"L": 1, "LA": 2, "P": 1, "1": 1, "I": 1, "F": 1, "RGBA": 4, "CMYK": 4}.get(mode, "?")
                raise FacekdError(f"calibration image {path}: mode {mode} ({channels} channels); need RGB face crops")
            if size != (IMAGE_SIZE, IMAGE_SIZE):
                raise FacekdError(f"calibration image {path} is {size[0]}x{size[1]}; need aligned {IMAGE_SIZE}x"
                                  f"{IMAGE_SIZE} face crops (align first: facedata.transforms.align_face)")
            return np.asarray(img, dtype=np.uint8)
    except FacekdError:
        raise
    except Exception as err:  # PIL raises many types for corrupt files
        raise FacekdError(f"calibration image {path} cannot be read: {type(err).__name__}: {err}") from None


def _sample(n_total: int, num: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=min(num, n_total), replace=False))


def load_calibration_images(spec: str, num: int = 512, *, seed: int = 0) -> np.ndarray:
    """`num` calibration images (uint8 NHWC RGB 112x112) drawn reproducibly from `spec` (see module docstring)."""
    if num < 1:
        raise FacekdError(f"--num-calib must be >= 1, got {num}")
    spec = str(spec)
    if spec == "bnstats":
        raise FacekdError("bnstats calibration is synthesised from a checkpoint: use quantize.bnstats.synthesize")
    if spec.startswith("synthfaces"):
        from facedata import open_train_set

        ds = open_train_set(spec)
        images = getattr(ds, "images", None)
        idx = _sample(len(ds), num, seed)
        if images is not None:
            return check_images(np.asarray(images[idx]), spec)
        return check_images(np.stack([ds[int(i)][0].permute(1, 2, 0).numpy() for i in idx]), spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FacekdError(f"calibration set not found: {spec} (give synthfaces, an image folder, a .bin, a .npy "
                          "or bnstats)")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FacekdError(f"calibration folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        idx = _sample(len(files), num, seed)
        return check_images(np.stack([_read_image(files[i]) for i in idx]), str(path))
    if path.suffix == ".bin":
        from facedata.formats import read_bin

        images = read_bin(path).images
        return check_images(images[_sample(len(images), num, seed)], str(path))
    if path.suffix == ".npy":
        try:
            images = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise FacekdError(f"calibration array {path} cannot be read: {err}") from None
        images = check_images(images, str(path))
        return np.asarray(images[_sample(len(images), num, seed)])
    raise FacekdError(f"calibration set {spec}: not synthfaces, an image folder, a .bin, a .npy or bnstats")


def preprocess(images: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """uint8 NHWC RGB -> the model's float32 NCHW input (its own preprocessing, via the project's `normalize`)."""
    import torch

    from evaluate.embed import normalize

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return normalize(x, preprocessing).numpy().astype(np.float32, copy=False)


def calibration_reader(images: np.ndarray, preprocessing: dict[str, Any], input_name: str, batch_size: int = 16):
    """An onnxruntime `CalibrationDataReader` over `images` (rewindable), batches of `batch_size`.

    Every batch has the same size (the last one wraps around to the first images): onnxruntime's histogram
    calibrators (entropy, percentile) fail on batches of different sizes.
    """
    from onnxruntime.quantization import CalibrationDataReader

    batch_size = min(batch_size, len(images))
    if len(images) % batch_size:
        images = np.concatenate([images, images[: batch_size - len(images) % batch_size]])

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = list(range(0, len(images), batch_size))
            self.pos = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.pos >= len(self.starts):
                return None
            start = self.starts[self.pos]
            self.pos += 1
            return {input_name: preprocess(images[start:start + batch_size], preprocessing)}

        def rewind(self) -> None:
            self.pos = 0

        def __len__(self) -> int:
            return len(self.starts)

    return _Reader()
