"""Train a face-recognition teacher with a margin softmax: `python -m teachers.train --arch r100 --data DATA`.

Any registry name trains (r18 ... r200, mbf, timm:NAME). ArcFace (s=64, m=0.5) or CosFace (m=0.35), SGD with
warm-up + poly decay as arcface_torch, weight decay, gradient clipping, bf16 autocast on GPU, torchrun DDP
(`torchrun --nproc_per_node=N -m teachers.train ...`), atomic checkpoints, `--resume`, verification every N steps.

Writes to --out (default runs/ARCH/teacher): model.safetensors, checkpoint.pt, log.jsonl, metrics.json and
manifest.json (kind "teacher", with the dataset fingerprint, so later stages find a teacher trained on the same
data), and upserts one `teacher` row per validation set into the results table (--results, default
results/summary.csv; --no-results to skip).

Long runs (hours to days on a CPU) are meant to run in the background: `status.json` in --out says where the run is
and its ETA, `learning_curve.csv/.png` the accuracy on the --val sets every --eval-every steps; `touch OUT/STOP` (or
SIGTERM/SIGINT) checkpoints and exits 0; the same command with `--resume` continues exactly, also on another day.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from facekd.io import FacekdError, cli_main, sha256_file, write_manifest


def build_parser() -> argparse.ArgumentParser:
    from engine.margin import MARGINS
    from engine.partial_fc import HEADS
    from engine.presets import PRESET_CHOICES
    from engine.trainer import AMP_CHOICES

    p = argparse.ArgumentParser(prog="python -m teachers.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", required=True, help="registered model name (r18, r50, r100, mbf, timm:NAME, ...)")
    p.add_argument("--model-kwargs", default="{}", help="JSON of extra model arguments, e.g. '{\"num_features\": 256}'")
    p.add_argument("--data", default=None, help="training set: synthfaces[:tiny|:small], image folder, or .rec "
                                               "(default synthfaces; with --preset smoke synthfaces:tiny)")
    p.add_argument("--val", nargs="*", default=None,
                   help="verification sets (default: the same synthfaces size when --data is synthfaces, else none)")
    p.add_argument("--margin", default="arcface", choices=sorted(MARGINS))
    p.add_argument("--s", type=float, default=64.0, help="logit scale")
    p.add_argument("--m", type=float, default=None, help="margin (default 0.5 arcface, 0.35 cosface)")
    p.add_argument("--head", default="dense", choices=HEADS,
                   help="dense margin head, or partial_fc: class centres sharded over torchrun ranks and sampled")
    p.add_argument("--sample-rate", type=float, default=1.0,
                   help="partial_fc: fraction of each rank's classes per step (positives always; arcface_torch 0.3)")
    p.add_argument("--preset", default="auto", choices=PRESET_CHOICES, help="auto: gpu with CUDA, else cpu")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size (summed over torchrun processes)")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--amp", choices=AMP_CHOICES)
    p.add_argument("--ema", type=float, help="EMA decay of the weights (0 = off)")
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--eval-every", type=int, help="0 = only at the end")
    p.add_argument("--log-every", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="DataLoader workers per process (default: auto)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    p.add_argument("--out", help="run directory (default runs/ARCH/teacher)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (exactly; starts fresh when there is none)")
    p.add_argument("--results", default=None, help="results table to upsert teacher rows into (default results/"
                                                   "summary.csv; with --preset smoke results/smoke/summary.csv)")
    p.add_argument("--no-results", action="store_true", help="do not touch the results table")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import facedata
    from engine.margin import MarginObjective
    from engine.partial_fc import make_head
    from engine.presets import default_data, default_val, make_config, preset_notes, resolve_preset, results_path
    from engine.trainer import Trainer, TrainingStopped
    from facekd.models import create_model

    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise FacekdError(f"--model-kwargs is not valid JSON: {err}") from None
    if not isinstance(model_kwargs, dict):
        raise FacekdError("--model-kwargs must be a JSON object")
    check_head(args.head, args.sample_rate)
    out = Path(args.out or Path("runs") / args.arch.replace(":", "_").replace("/", "_") / "teacher")
    preset = resolve_preset(args.preset)
    config_args = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, amp=args.amp, ema=args.ema,
                       ckpt_every=args.ckpt_every, eval_every=args.eval_every, log_every=args.log_every,
                       seed=args.seed, workers=args.workers, device=args.device, flip=not args.no_flip,
                       out=str(out), arch=args.arch)
    make_config(preset, **config_args)  # flags checked before any data
    args.data = default_data(preset, args.data)
    args.results = str(results_path(preset, args.results))
    args.notes = preset_notes(preset)
    dataset = facedata.open_train_set(args.data)
    val_specs = args.val if args.val is not None else default_val(args.data)
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 evaluates
    val_sets = [facedata.open_verification_set(v) for v in val_specs] if is_main else []
    # a preset counted in epochs (gpu) sets its steps from the training set's size
    cfg = make_config(preset, num_images=len(dataset), **config_args)
    torch.manual_seed(args.seed)  # same initial weights on every rank and every run
    model = create_model(args.arch, **model_kwargs)
    head = make_head(args.head, model.embedding_dim, dataset.num_classes, margin=args.margin, s=args.s, m=args.m,
                     sample_rate=args.sample_rate)
    objective = MarginObjective(head)
    try:
        metrics = Trainer(model, objective, dataset, cfg, val_sets=val_sets).fit(resume=args.resume)
    except TrainingStopped as stop:  # a requested pause, not a failure: a background run exits 0
        print(stop)
        return 0
    if not is_main:
        return 0

    settings = {"arch": args.arch, "model_kwargs": model_kwargs, "margin": args.margin, "s": head.s, "m": head.m,
                "head": args.head, "sample_rate": args.sample_rate,
                "train": metrics["config"]}
    model_path = out / "model.safetensors"
    write_manifest(out, "teacher", settings, inputs={"dataset": dataset.fingerprint},
                   dataset=dataset.name, num_classes=dataset.num_classes, model="model.safetensors",
                   model_sha256=sha256_file(model_path), val={k: v["accuracy"] for k, v in metrics["val"].items()})
    if not args.no_results:
        _append_results(args, out, model, model_path, metrics)
    summary = ", ".join(f"{k}: accuracy {v['accuracy']:.4f}" for k, v in metrics["val"].items()) or "no validation"
    print(f"teacher {args.arch} trained {cfg.steps} steps on {dataset.name} -> {model_path} ({summary})")
    return 0


def check_head(head: str, sample_rate: float) -> None:
    """--head/--sample-rate, checked before any data or model is loaded."""
    if not 0.0 < sample_rate <= 1.0:
        raise FacekdError(f"--sample-rate must be in (0, 1], got {sample_rate}")
    if head == "dense" and sample_rate != 1.0:
        raise FacekdError(f"--sample-rate {sample_rate} needs --head partial_fc (the dense head uses every class)")


def _append_results(args: argparse.Namespace, out: Path, model, model_path: Path, metrics: dict) -> None:
    from facekd import table
    from facekd.models import count_macs

    run = out.parent.name if out.name == "teacher" else out.name
    cells = {"params": sum(p.numel() for p in model.parameters()), "macs": count_macs(model.cpu()),
             "file_bytes": model_path.stat().st_size, "embedding_dim": model.embedding_dim, "kd": "none",
             "hardware": metrics["hardware"], "artifact": str(model_path), "notes": args.notes}
    rows = [table.model_row("teacher", args.arch, run, dataset=name, metrics=m, **cells)
            for name, m in metrics["val"].items()]
    if rows:
        table.upsert_rows(rows, args.results)


if __name__ == "__main__":
    raise SystemExit(main())
