"""Training throughput of the real trainer: `python -m engine.bench --arch mobilefacenet r18 r50 --batch-size 64`.

Each model trains `--steps` SGD steps through `engine.Trainer` (margin head over 1,000 classes, flip, normalise,
clipping; no checkpoint or evaluation inside the timed steps) on random uint8 112x112 images held in memory, and
the median images/s of the steps after `--warmup` is printed with the hardware, threads and the load average
(other processes on the machine lower the figure; the load says how busy it was).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facekd.io import cli_main


class RandomFaces(torch.utils.data.Dataset):
    def __init__(self, n: int, num_classes: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = torch.from_numpy(rng.integers(0, 256, (n, 3, 112, 112), dtype=np.uint8))
        self.labels = rng.integers(0, num_classes, n)
        self.num_classes, self.name, self.fingerprint = num_classes, "random", f"random-{n}-{seed}"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), i


def measure(arch: str, batch_size: int, steps: int, warmup: int, device: str = "auto", amp: str = "auto",
            workers: int = 0, channels_last: str = "auto") -> dict:
    from engine.margin import MarginHead, MarginObjective
    from engine.trainer import TrainConfig, Trainer, hardware_label
    from facekd.models import create_model

    torch.manual_seed(0)
    model = create_model(arch)
    data = RandomFaces(batch_size * (steps + warmup), 1000)
    objective = MarginObjective(MarginHead(model.embedding_dim, data.num_classes))
    rows, cpu_s, wall_s = [], 0.0, 0.0
    for phase, n in (("warmup", warmup), ("timed", steps)):
        if n == 0:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(steps=n, batch_size=batch_size, lr=0.01, ckpt_every=10 ** 9, log_every=1,
                              workers=workers, device=device, amp=amp, channels_last=channels_last, out=tmp)
            trainer = Trainer(model, objective, data, cfg)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            trainer.fit()
            if phase == "timed":
                cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
                rows = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return {"arch": arch, "batch_size": batch_size, "steps_timed": len(rates),
            "images_per_s": round(float(np.median(rates)), 2),
            # CPU seconds of this process (all its threads) per image: less sensitive to other processes' load
            "images_per_cpu_s": round(steps * batch_size / cpu_s, 2) if trainer.device.type == "cpu" else None,
            "wall_s": round(wall_s, 1), "hardware": hardware_label(trainer.device),
            "amp": str(trainer.amp_dtype), "channels_last": trainer.channels_last,
            "load_avg_1min": round(os.getloadavg()[0], 2)}


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["mobilefacenet", "r18", "r50"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--channels-last", nargs="+", default=["auto"], choices=("auto", "on", "off"),
                   help="memory format(s); several are measured one after the other per model (e.g. off on)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    results = []
    for arch in args.arch:
        for layout in args.channels_last:
            r = measure(arch, args.batch_size, args.steps, args.warmup, args.device, args.amp,
                        channels_last=layout)
            results.append(r)
            print(f"{arch:>16}  batch {r['batch_size']:4d}  channels_last {str(r['channels_last']):5}  "
                  f"{r['images_per_s']:9.1f} images/s  {r['images_per_cpu_s']} images/cpu-s  "
                  f"({r['steps_timed']} steps, {r['hardware']}, amp {r['amp']}, load {r['load_avg_1min']})",
                  flush=True)
    if args.json:
        from facekd.io import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
