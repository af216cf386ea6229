"""Cost of a distillation step, side by side in one run: no KD vs cached-teacher KD vs online-teacher KD.

    python -m distill.bench [--student mobilefacenet] [--teacher r100] [--kd feature+logit] [--batch-size 64]

Each step is what `engine.Trainer` does per batch: student forward, `DistillObjective` (margin softmax + KD
terms; the teacher embedding comes from a memory-mapped fp16 cache lookup, or from a teacher forward pass under
no_grad for the online mode), backward and an SGD step. Random weights and random images: cost does not depend
on them. Target: cached KD <= 1.3x the no-KD step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facekd.io import cli_main


def _fake_cache(root: Path, n: int, classes: int, dim: int):
    """A real `TeacherCache` on disk (random unit embeddings), so lookups pay the memmap + fp16 conversion cost."""
    from facekd.io import write_manifest
    from teachers.cache import KIND, TeacherCache

    rng = np.random.default_rng(0)
    emb = np.lib.format.open_memmap(root / "embeddings.npy", mode="w+", dtype=np.float16, shape=(n, 2, dim))
    for lo in range(0, n, 4096):
        block = rng.standard_normal((min(4096, n - lo), 2, dim)).astype(np.float32)
        emb[lo:lo + len(block)] = (block / np.linalg.norm(block, axis=2, keepdims=True)).astype(np.float16)
    emb.flush()
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    np.save(root / "centres.npy", (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float16))
    write_manifest(root, KIND, {"bench": True}, key={"num_images": n}, embedding_dim=dim, num_classes=classes)
    return TeacherCache.open(root)


class _Mode:
    """One objective and its optimiser; `step` returns (wall seconds, process CPU seconds) of one training step."""

    def __init__(self, name: str, student, objective, steps: int, device: str) -> None:
        self.name, self.student, self.objective, self.steps, self.device = name, student, objective, steps, device
        params = [p for m in (student, objective) for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def step(self, batch, record: bool) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        losses = self.objective(self.student(batch["images"]), batch)
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.opt.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        if record:
            self.wall.append(time.perf_counter() - wall)
            self.cpu.append(time.process_time() - cpu)


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="mobilefacenet")
    ap.add_argument("--teacher", default="r100")
    ap.add_argument("--kd", default="feature+logit")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-classes", type=int, default=2000, help="identities (margin head and logit-KD centres)")
    ap.add_argument("--num-images", type=int, default=50_000, help="images in the fake cache")
    ap.add_argument("--steps", type=int, default=6, help="measured steps (no-KD and cached)")
    ap.add_argument("--online-steps", type=int, default=2, help="measured steps of the (slow) online mode")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from distill.objective import CachedTeacher, DistillObjective, OnlineTeacher, parse_kd
    from facekd.models import create_model

    kd = parse_kd(args.kd)
    dev = args.device
    torch.manual_seed(0)
    student = create_model(args.student).to(dev).train()
    teacher_model = create_model(args.teacher).to(dev).eval()
    tdim = teacher_model.embedding_dim
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        batches.append({"images": torch.randn(args.batch_size, 3, *student.input_size, generator=g).to(dev),
                        "labels": torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(dev),
                        "indices": torch.randint(0, args.num_images, (args.batch_size,), generator=g).to(dev),
                        "flipped": (torch.rand(args.batch_size, generator=g) < 0.5).to(dev)})
    with tempfile.TemporaryDirectory() as tmp:
        cache = _fake_cache(Path(tmp), args.num_images, args.num_classes, tdim)
        common = dict(student_dim=student.embedding_dim, num_classes=args.num_classes, teacher_dim=tdim,
                      centres=cache.centres)
        modes = [_Mode("no KD (margin softmax only)", student, DistillObjective("none", **common).to(dev),
                       args.steps, dev),
                 _Mode(f"cached teacher KD ({'+'.join(kd)})", student,
                       DistillObjective(kd, teacher=CachedTeacher(cache), **common).to(dev), args.steps, dev),
                 _Mode(f"online teacher KD ({'+'.join(kd)}, {args.teacher} fwd)", student,
                       DistillObjective(kd, teacher=OnlineTeacher(teacher_model, student_preprocessing=
                                                                  student.preprocessing), **common).to(dev),
                       args.online_steps, dev)]
        # Interleaved rounds (A, B, C, A, B, C, ...): load from other processes hits every mode alike.
        warmup = 1
        for r in range(warmup + args.steps):
            for mode in modes:
                if r < warmup + mode.steps:
                    mode.step(batches[r % len(batches)], record=r >= warmup)
    base_wall, base_cpu = statistics.median(modes[0].wall), statistics.median(modes[0].cpu)
    print(f"distill.bench: student {args.student}, teacher {args.teacher} (random weights), batch {args.batch_size}, "
          f"{args.num_classes} classes, device {dev} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads); "
          f"medians over interleaved steps; wall = elapsed, cpu = this process's CPU time (less sensitive to load)")
    print(f"{'mode':<48} {'wall ms/step':>12} {'images/s':>9} {'x no-KD':>8} {'cpu ms/step':>12} {'x no-KD':>8} "
          f"{'steps':>6}")
    for mode in modes:
        wall, cpu = statistics.median(mode.wall), statistics.median(mode.cpu)
        print(f"{mode.name:<48} {wall * 1e3:>12.1f} {args.batch_size / wall:>9.1f} {wall / base_wall:>8.2f} "
              f"{cpu * 1e3:>12.1f} {cpu / base_cpu:>8.2f} {len(mode.wall):>6}")
    ratio = statistics.median(modes[1].wall) / base_wall
    ratio_cpu = statistics.median(modes[1].cpu) / base_cpu
    print(f"cached KD / no KD = {ratio:.2f}x wall, {ratio_cpu:.2f}x cpu (target <= 1.3x: "
          f"{'met' if max(ratio, ratio_cpu) <= 1.3 else 'NOT met'}); online / cached = "
          f"{statistics.median(modes[2].wall) / statistics.median(modes[1].wall):.1f}x wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
