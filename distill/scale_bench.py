"""Scale benchmark, one run, side by side: `python -m distill.scale_bench`.

Prints (and with --json writes):
1. teacher cache build time with 1 rank vs 2 ranks (gloo processes, 1 thread each: one rank = one device), ratio;
2. margin-head memory per rank at --classes (default 1M) x --dim (512): dense `MarginHead` vs `PartialFC`, measured
   at world size 1 and 2 (peak RSS growth of a fresh process over one SGD step, and the exact bytes of weight +
   gradient + momentum), and computed for world size 8 from the per-rank layout (`engine.partial_fc.head_bytes`);
3. loader images/s over a RecordIO copy of --data (JPEG decode), DataLoader workers 0 vs 2.

Everything runs on the CPU; a loaded machine slows the parallel figures most, so say so when quoting them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from facekd.io import FacekdError, cli_main

GB = 1e9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn: Any, world: int, *args: Any) -> dict:
    """Run fn(rank, world, port, out, *args) in `world` fresh gloo processes; returns their shared dict."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(fn, args=(world, _free_port(), out, *args), nprocs=world, join=True)
        return dict(out)


def _init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


# ------------------------------------------------------------------------------------------------ cache build

def _cache_rank(rank: int, world: int, port: int, out: dict, teacher: str, data: str, root: str, batch: int) -> None:
    import torch.distributed as dist

    from evaluate.embed import TorchEmbedder
    from facedata import open_train_set
    from facekd.models import create_model
    from teachers.cache import build_cache, cache_key

    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        model = create_model(teacher)
        embed = TorchEmbedder(model, model.preprocessing)
        dataset = open_train_set(data)
        key = cache_key(teacher_arch=teacher, teacher_sha256="bench", dataset=dataset,
                        preprocessing=model.preprocessing)
        dist.barrier()
        start = time.perf_counter()
        cache = build_cache(embed, dataset, f"{root}/world{world}", key=key, batch_size=batch, workers=0,
                            progress=False)
        out[rank] = {"seconds": time.perf_counter() - start, "images": cache.num_images,
                     "content_sha256": cache.manifest["content_sha256"]}
    finally:
        dist.destroy_process_group()


def bench_cache(teacher: str, data: str, batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as root:
        one = _spawn(_cache_rank, 1, teacher, data, root, batch)[0]
        two = _spawn(_cache_rank, 2, teacher, data, root, batch)
    seconds2 = max(r["seconds"] for r in two.values())
    return {"teacher": teacher, "data": data, "images": one["images"], "seconds_1_rank": round(one["seconds"], 2),
            "seconds_2_ranks": round(seconds2, 2), "speedup": round(one["seconds"] / seconds2, 2),
            "identical": one["content_sha256"] == two[0]["content_sha256"]}


# ------------------------------------------------------------------------------------------------ head memory

def _head_rank(rank: int, world: int, port: int, out: dict, kind: str, classes: int, dim: int, rate: float,
               batch: int) -> None:
    import torch.distributed as dist

    from engine.margin import MarginHead
    from engine.partial_fc import PartialFC

    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        local = batch // world
        emb = torch.randn(local, dim, requires_grad=True)
        labels = torch.randint(0, classes, (local,))
        warm = MarginHead(dim, 16)  # first-step allocations (autograd, gloo buffers) are not the head's
        warm(emb, labels % 16).backward()
        emb.grad = None
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        head = (MarginHead(dim, classes) if kind == "dense" else
                PartialFC(dim, classes, sample_rate=rate))
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        loss = head(emb, labels)
        loss.backward()
        opt.step()
        state = sum(t.numel() * t.element_size() for p in head.parameters()
                    for t in (p, p.grad, opt.state[p]["momentum_buffer"]))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        dist.barrier()
        out[rank] = {"state_bytes": state, "peak_rss_growth": peak, "loss": loss.item()}
    finally:
        dist.destroy_process_group()


def _available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_heads(classes: int, dim: int, rate: float, batch: int) -> list[dict[str, Any]]:
    from engine.partial_fc import head_bytes

    rows = []
    for kind, world, sr in (("dense", 1, 1.0), ("partial_fc", 1, rate), ("dense", 2, 1.0), ("partial_fc", 2, rate)):
        # the computed peak plus a fifth (a dense 1M x 512 head measured 12.3 GB against 10.7 computed)
        need = world * head_bytes(classes, dim, 1 if kind == "dense" else world, sr, batch)["total"] * 1.2
        if need > _available() - 2 * 2 ** 30:  # never squeeze the other jobs on this machine
            rows.append({"head": kind, "world": world, "sample_rate": sr, "skipped":
                         f"needs ~{need / GB:.1f} GB, {_available() / GB:.1f} GB available; a dense head is a full "
                         f"replica on every rank, so its per-rank memory is the world-1 figure"})
            continue
        res = _spawn(_head_rank, world, kind, classes, dim, sr, batch)
        rows.append({"head": kind, "world": world, "sample_rate": sr, "how": "measured",
                     "state_gb_per_rank": round(max(r["state_bytes"] for r in res.values()) / GB, 3),
                     "peak_gb_per_rank": round(max(r["peak_rss_growth"] for r in res.values()) / GB, 3)})
    for kind, sr in (("dense", 1.0), ("partial_fc", rate)):
        b = head_bytes(classes, dim, 1 if kind == "dense" else 8, sr, batch)
        rows.append({"head": kind, "world": 8, "sample_rate": sr, "how": "computed",
                     "state_gb_per_rank": round(b["state"] / GB, 3), "peak_gb_per_rank": round(b["total"] / GB, 3)})
    return rows


# ------------------------------------------------------------------------------------------------ loader

def bench_loader(data: str, batch: int, passes: int) -> dict[str, Any]:
    from facedata import formats, make_loader, open_train_set

    source = open_train_set(data)
    with tempfile.TemporaryDirectory() as root:
        images = source.images if hasattr(source, "images") else None
        if images is None:
            raise FacekdError(f"--loader-data {data}: needs an in-memory set (synthfaces) to write as RecordIO")
        rec = formats.write_recordio(Path(root) / "rec", images, source.labels, image_format="jpg")
        dataset = open_train_set(str(rec))
        result = {"data": f"{data} as RecordIO (JPEG q95)", "images": len(dataset), "batch": batch}
        for workers in (0, 2):
            loader = make_loader(dataset, batch, workers=workers, seed=0, shuffle=True, drop_last=False,
                                 pin_memory=False)
            next(iter(loader))  # worker start-up is not throughput
            start, seen = time.perf_counter(), 0
            for _ in range(passes):
                for images_, _, _ in loader:
                    seen += len(images_)
            result[f"images_per_s_workers_{workers}"] = round(seen / (time.perf_counter() - start), 1)
            del loader
        result["ratio"] = round(result["images_per_s_workers_2"] / result["images_per_s_workers_0"], 2)
    return result


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill.scale_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="mobilefacenet", help="registry model run (random weights) as the teacher")
    ap.add_argument("--data", default="synthfaces:small", help="training set of the cache build and the loader")
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--sample-rate", type=float, default=0.1)
    ap.add_argument("--head-batch", type=int, default=64, help="global batch of the head step")
    ap.add_argument("--cache-batch", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2, help="loader passes over the data per setting")
    ap.add_argument("--only", nargs="*", choices=("cache", "heads", "loader"), default=("cache", "heads", "loader"))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    for ok, what in ((args.classes >= 2, f"--classes must be >= 2, got {args.classes}"),
                     (args.dim >= 1, f"--dim must be >= 1, got {args.dim}"),
                     (0 < args.sample_rate <= 1, f"--sample-rate must be in (0, 1], got {args.sample_rate}"),
                     (args.head_batch >= 2 and args.head_batch % 2 == 0,
                      f"--head-batch must be even (split over 2 ranks), got {args.head_batch}"),
                     (args.passes >= 1 and args.cache_batch >= 1, "--passes and --cache-batch must be >= 1")):
        if not ok:
            raise FacekdError(what)
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    results: dict[str, Any] = {"cpu": f"{cpu}, {os.cpu_count()} cores", "load_average": os.getloadavg()}
    print(f"CPU: {results['cpu']}; load average {results['load_average'][0]:.1f} at start")
    if "cache" in args.only:
        c = results["cache"] = bench_cache(args.teacher, args.data, args.cache_batch)
        print(f"cache build ({c['teacher']} on {c['data']}, {c['images']} images x 2 views, 1 thread per rank): "
              f"1 rank {c['seconds_1_rank']} s, 2 ranks {c['seconds_2_ranks']} s -> {c['speedup']}x "
              f"(measured; same bytes: {c['identical']})")
    if "heads" in args.only:
        results["heads"] = bench_heads(args.classes, args.dim, args.sample_rate, args.head_batch)
        print(f"margin head, {args.classes:,} classes x {args.dim}, SGD momentum, global batch {args.head_batch}:")
        for r in results["heads"]:
            label = f"  {r['head']:<10} sample_rate {r['sample_rate']:<4} world {r['world']}: "
            if "skipped" in r:
                print(label + f"skipped ({r['skipped']})")
            else:
                print(label + f"weight+grad+momentum {r['state_gb_per_rank']:.3f} GB/rank, peak "
                      f"{r['peak_gb_per_rank']:.3f} GB/rank ({r['how']})")
    if "loader" in args.only:
        lo = results["loader"] = bench_loader(args.data, 64, args.passes)
        print(f"loader ({lo['data']}, {lo['images']} images, batch 64): workers 0 {lo['images_per_s_workers_0']} "
              f"img/s, workers 2 {lo['images_per_s_workers_2']} img/s -> {lo['ratio']}x (measured)")
    results["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
