"""`python -m students.bench`: training throughput (forward + backward + SGD step, images/s) of models side by side.

Every model runs in the same process, with the same batch, threads and dtype, so the printed ratios compare
like with like; absolute numbers depend on the machine and its load (the load average is printed; say so when
quoting them). `--channels-last off on` (the default) measures each model in both memory layouts, interleaved
step by step so that a change in the machine's load hits both alike: "off" is plain NCHW, "on" is what
`engine.Trainer` uses on CPU and GPU. `--profile` prints torch.profiler's top operators of one training step.

Profile of one MobileFaceNet step (batch 64, channels_last, 2 threads, 2-core Xeon under load): convolutions
(forward + backward) about a third of the CPU time, BatchNorm forward + backward about a third, PReLU forward +
backward a fifth. Tried and not kept, measured side by side: PReLU written as relu(x) - a * relu(-x) or as a
where() (2.4x slower than F.prelu's fused kernel, forward + backward), SGD `foreach=True` and flushing denormals
(no difference beyond the load noise).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from facekd.io import FacekdError, cli_main
from facekd.models import count_macs, count_params, create_model


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _setup(name: str, batch: int, channels_last: bool):
    model = create_model(name).train()
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, *model.input_size).contiguous(memory_format=memory)
    return model, opt, x


def _step(model, opt, x) -> float:
    t0 = time.perf_counter()
    loss = model(x).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def train_throughput(name: str, *, batch: int = 32, steps: int = 5, warmup: int = 1,
                     layouts: tuple[bool, ...] = (False, True)) -> list[dict]:
    """Images/s of SGD training steps on random inputs, one dict per memory layout (median step after `warmup`);
    the layouts take turns step by step."""
    torch.manual_seed(0)
    setups = [_setup(name, batch, cl) for cl in layouts]
    times: list[list[float]] = [[] for _ in layouts]
    for step in range(warmup + steps):
        for i, setup in enumerate(setups):
            elapsed = _step(*setup)
            if step >= warmup:
                times[i].append(elapsed)
    model = setups[0][0]
    params, macs = count_params(model), count_macs(model)
    rows = []
    for cl, ts in zip(layouts, times):
        median = sorted(ts)[len(ts) // 2]
        rows.append({"model": name, "channels_last": cl, "params": params, "macs": macs, "batch": batch,
                     "step_s": round(median, 3), "images_per_s": round(batch / median, 2)})
    return rows


def profile_step(name: str, batch: int, channels_last: bool, rows: int = 12) -> str:
    """torch.profiler's operator table (self CPU time) of one training step after one warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    model, opt, x = _setup(name, batch, channels_last)
    _step(model, opt, x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, opt, x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m students.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilefacenet", "r50", "r100"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and layout (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--channels-last", nargs="+", default=["off", "on"], choices=("off", "on"),
                        help="memory layouts to measure side by side (off: NCHW, before; on: the trainer's, after)")
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one step per model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if min(args.batch, args.threads, args.steps) < 1 or args.warmup < 0:
        raise FacekdError("--batch, --threads and --steps must be >= 1, --warmup >= 0")
    layouts = tuple(dict.fromkeys(v == "on" for v in args.channels_last))
    torch.set_num_threads(args.threads)
    rows = [r for m in args.models for r in train_throughput(m, batch=args.batch, steps=args.steps,
                                                             warmup=args.warmup, layouts=layouts)]
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_first"] = round(r["images_per_s"] / base, 3)
    header = {"torch": torch.__version__, "threads": args.threads, "dtype": "fp32", "cpu": _cpu_name(),
              "cores": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps({"settings": header, "rows": rows}, indent=2))
        return 0
    print(f"training throughput (forward+backward+SGD step, layouts interleaved step by step), {header}")
    print(f"{'model':<16} {'layout':<14} {'params':>12} {'MACs':>15} {'batch':>5} {'step s':>8} {'img/s':>8} "
          f"{'vs first':>8}")
    for r in rows:
        layout = "channels_last" if r["channels_last"] else "NCHW"
        print(f"{r['model']:<16} {layout:<14} {r['params']:>12,} {r['macs']:>15,} {r['batch']:>5} {r['step_s']:>8} "
              f"{r['images_per_s']:>8} {r['vs_first']:>8}")
    if len(layouts) == 2:
        for m in args.models:
            off, on = (next(r for r in rows if r["model"] == m and r["channels_last"] == cl) for cl in (False, True))
            print(f"{m}: channels_last {on['images_per_s'] / off['images_per_s']:.2f}x the images/s of NCHW")
    if args.profile:
        for m in args.models:
            print(f"\none training step of {m}, batch {args.batch}, "
                  f"{'channels_last' if layouts[-1] else 'NCHW'}:\n{profile_step(m, args.batch, layouts[-1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
