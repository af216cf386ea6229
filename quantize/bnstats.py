"""Data-free calibration (ZeroQ, Cai et al. 2020): synthesise inputs whose activations match BatchNorm statistics.

For users who cannot share face images: start from random pixels and optimise them so that, at every BatchNorm
layer of the float model, the batch mean and standard deviation of the layer's input match the running statistics
the layer learnt in training. The result is returned as uint8 RGB images (the inverse of the model's
preprocessing, clipped to pixel range), so it calibrates exactly like real images do.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from facekd.io import FacekdError


def synthesize(model: Any, num: int = 128, *, steps: int = 200, batch_size: int = 32, lr: float = 0.1, seed: int = 0,
               progress: bool = True) -> np.ndarray:
    """`num` uint8 (N, 112, 112, 3) images whose BatchNorm-input statistics match `model`'s running statistics.

    `model` is a torch face model (eval mode, `.preprocessing`); it must contain BatchNorm layers.
    """
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
           and m.running_mean is not None]
    if not bns:
        raise FacekdError("bnstats calibration needs a model with BatchNorm running statistics; this one has none "
                          "(calibrate on images instead: --calib synthfaces or an image folder)")
    pre = model.preprocessing
    h, w = (int(v) for v in pre["input_size"])
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (255 - mean) / std
    losses: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mu, sd = x.mean(dims), torch.sqrt(x.var(dims, unbiased=False) + module.eps)
        run_sd = torch.sqrt(module.running_var + module.eps)
        losses.append(torch.norm(mu - module.running_mean) / (torch.norm(module.running_mean) + 1.0)
                      + torch.norm(sd - run_sd) / (torch.norm(run_sd) + 1.0))

    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    gen = torch.Generator().manual_seed(seed)
    out = []
    try:
        batches = [min(batch_size, num - s) for s in range(0, num, batch_size)]
        with tqdm(total=len(batches) * steps, desc="bnstats synthesis", unit="step", disable=not progress) as bar:
            for n in batches:
                x = torch.randn(n, 3, h, w, generator=gen).clamp(lo, hi).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=lr)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
                for _ in range(steps):
                    losses.clear()
                    model(x)
                    loss = torch.stack(losses).sum()
                    if not torch.isfinite(loss):
                        raise FacekdError("bnstats synthesis diverged (NaN loss); try a smaller learning rate")
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                pixels = (x.detach() * std + mean).round().clamp(0, 255).to(torch.uint8)
                if pre.get("channel_order", "RGB").upper() == "BGR":
                    pixels = pixels.flip(1)
                if (h, w) != (112, 112):
                    pixels = torch.nn.functional.interpolate(pixels.float(), size=(112, 112), mode="bilinear",
                                                             align_corners=False).round().clamp(0, 255).to(torch.uint8)
                out.append(pixels.permute(0, 2, 3, 1).numpy())
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    return np.concatenate(out)


def bn_match_error(model: Any, images: np.ndarray) -> float:
    """Mean relative error between BatchNorm-input batch statistics on `images` and the running statistics."""
    import torch
    from torch import nn

    from quantize.calib import preprocess

    errs: list[float] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mu, sd = x.mean(dims), x.std(dims)
        run_sd = torch.sqrt(module.running_var + module.eps)
        errs.append(float(torch.norm(mu - module.running_mean) / (torch.norm(module.running_mean) + 1.0)
                          + torch.norm(sd - run_sd) / (torch.norm(run_sd) + 1.0)))

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(preprocess(images, model.preprocessing)))
    finally:
        for handle in handles:
            handle.remove()
    return float(np.mean(errs)) if errs else float("nan")
