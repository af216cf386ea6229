"""`python -m students.bench`: training throughput (forward + backward + SGD step, images/s) of models side by side.

Every model runs in the same process, with the same batch, threads and dtype, so the printed ratios compare
like with like; absolute numbers depend on the machine and its load (say so when quoting them).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from facekd.io import cli_main
from facekd.models import count_macs, count_params, create_model


def train_throughput(name: str, *, batch: int = 32, steps: int = 5, warmup: int = 1,
                     channels_last: bool = False) -> dict:
    """Images/s of SGD training steps on random 112x112 inputs (median step time after `warmup` steps)."""
    model = create_model(name).train()
    h, w = model.input_size
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, h, w).contiguous(memory_format=memory)
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"model": name, "params": count_params(model), "macs": count_macs(model), "batch": batch,
            "step_s": round(median, 3), "images_per_s": round(batch / median, 2)}


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m students.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilefacenet", "r50", "r100"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [train_throughput(m, batch=args.batch, steps=args.steps, warmup=args.warmup,
                             channels_last=args.channels_last) for m in args.models]
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_first"] = round(r["images_per_s"] / base, 3)
    header = {"torch": torch.__version__, "threads": args.threads, "dtype": "fp32", "cpu": platform.processor()
              or platform.machine(), "channels_last": args.channels_last}
    if args.json:
        print(json.dumps({"settings": header, "rows": rows}, indent=2))
        return 0
    print(f"training throughput (forward+backward+SGD step), {header}")
    print(f"{'model':<16} {'params':>12} {'MACs':>15} {'batch':>5} {'step s':>8} {'img/s':>8} {'vs first':>8}")
    for r in rows:
        print(f"{r['model']:<16} {r['params']:>12,} {r['macs']:>15,} {r['batch']:>5} {r['step_s']:>8} "
              f"{r['images_per_s']:>8} {r['vs_first']:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
