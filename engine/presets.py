"""Training presets as plain data: `smoke` (seconds), `cpu` (the pipeline's budget on 2 cores), `cpu-long`, `gpu`.

A preset fills `TrainConfig` fields; explicit flags override it. With no preset, `auto` picks `gpu` when CUDA is
available, else `cpu`.

The cpu preset (200 steps x 64 = 12,800 images, 0.64 epoch of the default SynthFaces set) is sized by the pipeline's
bound, not by the learning curve: the whole default pipeline (distill, a fine-tune of the same length after pruning,
five evaluations of 6,000 pairs, int8, LiteRT, latency) must stay within 30 minutes on 2 cores, and at ~44 images/s
the two trainings alone take ~10 of them. It is under-trained, and measured so (results.study on the default set,
SFace cache, 2-core Xeon): no-KD students reach 74.99 % at 200 steps (3 seeds) and 82.43 % at 600 (1 seed), logit-KD
students 82.98 % and 87.82 %: the 200-step accuracy is 91 % (no KD) and 94 % (logit KD) of the 600-step one, and the
600-step curves (on 1,200 pairs) still move by about 2 points between their last evaluations, so where the plateau
lies is not measured. `cpu-long` is that 3x budget (600 steps, ~15 min of training per run on 2 idle cores).

The gpu preset counts epochs as arcface_torch's train_v2.py does: steps per epoch = images // global batch,
warm-up = warmup_epochs x that, total = epochs x that, then warm-up + poly(2) (`engine.trainer.lr_at`). Its
numbers follow arcface_torch's MS1MV3 configs (lr 0.1 per 512 images of global batch, SGD momentum 0.9, weight decay
5e-4; 20 epochs with 2 warm-up epochs): MS1MV3 (5,179,510 images) at batch 512 is 10,116 steps per epoch, 202,320
steps. `steps`/`warmup_steps` stay in the preset for callers that do not know the data size (prune's fine-tune
budget); `make_config(..., num_images=N)` replaces them by the epoch counts.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facekd.io import check_choice

if TYPE_CHECKING:
    from engine.trainer import TrainConfig

_CPU = {"steps": 200, "batch_size": 64, "lr": 0.05, "warmup_steps": 10, "ckpt_every": 25, "eval_every": 0,
        "log_every": 5}
PRESETS: dict[str, dict[str, Any]] = {
    # a few seconds on tiny data: wiring checks, CI
    "smoke": {"steps": 20, "batch_size": 16, "lr": 0.05, "warmup_steps": 2, "ckpt_every": 10, "eval_every": 0,
              "log_every": 5},
    # the pipeline's budget on 2 CPU cores (see above): ~5 min of MobileFaceNet training at batch 64
    "cpu": _CPU,
    # 3x the cpu budget, nothing else changed: the KD study's long runs (no KD 82.4 %, logit KD 87.8 %)
    "cpu-long": {**_CPU, "steps": 600},
    # one GPU or torchrun over several: arcface_torch's schedule in epochs (global batch 512), bf16 autocast
    "gpu": {"epochs": 20, "warmup_epochs": 2, "steps": 20000, "warmup_steps": 1000, "batch_size": 512, "lr": 0.1,
            "ckpt_every": 1000, "eval_every": 2000, "log_every": 50},
}
PRESET_CHOICES = ("auto", *PRESETS)

# A smoke run checks wiring in seconds: tiny data unless --data says otherwise, and its rows go to a table of their
# own (marked in `notes`), never into the committed results/summary.csv.
SMOKE_DATA = "synthfaces:tiny"
SMOKE_NOTE = "smoke preset: a wiring check on tiny data, its accuracy means nothing"


def default_data(preset: str, data: str | None = None) -> str:
    """--data if given, else synthfaces:tiny for the smoke preset and the default SynthFaces for the others."""
    return data or (SMOKE_DATA if preset == "smoke" else "synthfaces")


def default_val(data: str) -> list[str]:
    """The verification set that matches a SynthFaces training spec; none for other data."""
    return [data] if data.split(":")[0] == "synthfaces" else []


def results_path(preset: str, results: str | os.PathLike | None = None) -> Path:
    """--results if given, else results/smoke/summary.csv for the smoke preset, else the results table."""
    from facekd.table import DEFAULT_PATH

    if results:
        return Path(results)
    return DEFAULT_PATH.parent / "smoke" / DEFAULT_PATH.name if preset == "smoke" else DEFAULT_PATH


def preset_notes(preset: str) -> str:
    return SMOKE_NOTE if preset == "smoke" else ""


def resolve_preset(name: str | None) -> str:
    name = check_choice(name or "auto", PRESET_CHOICES, "--preset")
    if name == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return name


def make_config(preset: str | None = None, num_images: int | None = None, **overrides: Any) -> TrainConfig:
    """A `TrainConfig` from a preset plus overrides; overrides that are None are ignored. With `num_images` (the
    training set size) a preset counted in epochs sets steps and warm-up from them, unless overridden."""
    from engine.trainer import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown TrainConfig field(s): {unknown}")
    values = dict(PRESETS[resolve_preset(preset)])
    epochs, warmup_epochs = values.pop("epochs", None), values.pop("warmup_epochs", 0)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if epochs is not None and num_images is not None:
        per_epoch = max(1, num_images // overrides.get("batch_size", values["batch_size"]))
        values["steps"], values["warmup_steps"] = epochs * per_epoch, warmup_epochs * per_epoch
        if "steps" in overrides and "warmup_steps" not in overrides:  # a shorter run keeps the warm-up's share
            values["warmup_steps"] = overrides["steps"] * warmup_epochs // epochs
    return TrainConfig(**{**values, **overrides}).validate()
