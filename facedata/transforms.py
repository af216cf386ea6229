"""Preprocessing on the device, flips, and 5-point alignment of raw photos to the ArcFace 112x112 template.

Preprocessing is plain data (stored in checkpoints and ONNX metadata); `normalize` applies it to a uint8 NCHW batch:
channel order, central crop to the target aspect ratio then bilinear resize, then (pixel - mean) / std.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from facekd.io import FacekdError
from facekd.models import INSIGHTFACE_PREPROCESSING  # noqa: F401  (the one default, defined with the registry)

# insightface arcface_dst: left eye, right eye, nose tip, left and right mouth corners in a 112x112 crop
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def check_preprocessing(p: dict[str, Any]) -> dict[str, Any]:
    """A validated, canonical copy of a preprocessing dict (one-line FacekdError when malformed)."""
    try:
        h, w = (int(v) for v in p["input_size"])
        order = p["channel_order"]
        mean, std = [float(v) for v in p["mean"]], [float(v) for v in p["std"]]
    except (KeyError, TypeError, ValueError) as err:
        raise FacekdError(f"preprocessing {p!r} is malformed ({err}); expected input_size, channel_order, mean, std") from None
    if order not in ("RGB", "BGR") or len(mean) != 3 or len(std) != 3 or min(std) <= 0 or h <= 0 or w <= 0:
        raise FacekdError(f"preprocessing {p!r}: channel_order must be RGB/BGR, mean/std 3 values, std > 0")
    return {"input_size": [h, w], "channel_order": order, "mean": mean, "std": std}


def normalize(batch_uint8_nchw: torch.Tensor, preprocessing: dict[str, Any] | None = None) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> float (N, 3, h, w) as the model expects, on the batch's device."""
    p = check_preprocessing(preprocessing or INSIGHTFACE_PREPROCESSING)
    x = batch_uint8_nchw
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise FacekdError(f"normalize expects (N, 3, H, W) images, got {tuple(batch_uint8_nchw.shape)}")
    x = x.float()
    if p["channel_order"] == "BGR":
        x = x.flip(1)
    h, w = p["input_size"]
    H, W = x.shape[-2:]
    if (H, W) != (h, w):
        if W * h > H * w:       # too wide for the target aspect: keep the central columns
            cw = round(H * w / h); x0 = (W - cw) // 2
            x = x[..., x0:x0 + cw]
        elif W * h < H * w:     # too tall: keep the central rows
            ch = round(W * h / w); y0 = (H - ch) // 2
            x = x[..., y0:y0 + ch, :]
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    mean = torch.tensor(p["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(p["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def hflip(batch: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Mirror left-right: torch tensors are (..., H, W) (NCHW/CHW); numpy arrays are (..., H, W, 3) (NHWC/HWC)."""
    if isinstance(batch, torch.Tensor):
        return batch.flip(-1)
    return np.ascontiguousarray(np.asarray(batch)[..., ::-1, :])


def random_hflip(batch: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each image of an NCHW batch with probability p; returns (batch, flipped mask)."""
    mask = torch.rand(batch.shape[0], generator=generator) < p
    mask = mask.to(batch.device)
    return torch.where(mask.view(-1, 1, 1, 1), batch.flip(-1), batch), mask


def template_for(output_size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """The 5-point template for an (h, w) crop: 112x112 as is, 112x96 shifted left by 8 (insightface), else scaled."""
    h, w = output_size
    scale = h / 112.0
    return ARCFACE_TEMPLATE * scale + np.array([(w - h) / 2.0, 0.0])


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991) mapping src points onto dst: 2x3 matrix [sR | t]."""
    src = np.asarray(src, np.float64); dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise FacekdError(f"landmarks must be (K, 2) with K >= 2 matching the template, got {src.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.diag([1.0, np.sign(np.linalg.det(U) * np.linalg.det(Vt)) or 1.0])
    R = U @ D @ Vt
    var_s = (sc ** 2).sum() / len(src)
    if var_s == 0:
        raise FacekdError("landmarks are all the same point; cannot align")
    s = float(np.trace(np.diag(S) @ D) / var_s)
    return np.hstack([s * R, (mu_d - s * R @ mu_s)[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, output_size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Warp a raw RGB photo so its 5 landmarks (x, y pixel indices: eyes, nose, mouth corners) land on the
    ArcFace template; returns uint8 (h, w, 3). Same geometry as insightface's norm_crop (cv2.warpAffine)."""
    M = estimate_similarity(landmarks, template_for(output_size))
    A = np.vstack([M, [0, 0, 1]])
    inv = np.linalg.inv(A)[:2]
    # PIL samples output pixel (x, y) at its centre (x+0.5, y+0.5) and reads input at centres too: shift by 0.5
    a, b, c = inv[0]; d, e, f = inv[1]
    c = c + 0.5 - 0.5 * (a + b); f = f + 0.5 - 0.5 * (d + e)
    h, w = output_size
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    out = img.transform((w, h), Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR)
    return np.asarray(out.convert("RGB"))
