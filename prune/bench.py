"""Does pruning turn into time? ONNX Runtime latency of models measured side by side, interleaved, in one run.

    python -m prune.bench runs/NAME/student --ratio 0.3 --round-to 8 1     # unpruned vs pruned at each round_to
    python -m prune.bench --onnx a.onnx b.onnx                              # given files; ratios against the first

The first form prunes copies of the checkpoint (no fine-tune: latency does not depend on weight values), exports
each to ONNX and times all of them with `evaluate.latency.measure_latency`: interleaved rounds (every round runs
each model once), so load from other processes and CPU frequency drift hit all models alike. Reported: median
and p90 ms per image at batch 1 with `--threads` intra-op threads, and each median as a ratio of the first
(unpruned), next to the multiply-add ratio: fewer MACs that do not turn into time are not a win.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from facekd.io import FacekdError, cli_main


def format_latency(results: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]] | None = None) -> str:
    extra = extra or {}
    first = next(iter(results))
    lines = [f"{'model':<22} {'MACs':>9} {'MACs ratio':>10} {'params':>8} {'median ms':>10} {'p90 ms':>8}  "
             f"time ratio vs {first}"]
    base_macs = extra.get(first, {}).get("macs")
    for label, r in results.items():
        e = extra.get(label, {})
        macs = f"{e['macs'] / 1e6:.1f}M" if e.get("macs") else "-"
        macs_ratio = f"{e['macs'] / base_macs:.3f}" if e.get("macs") and base_macs else "-"
        params = f"{e['params'] / 1e6:.3f}M" if e.get("params") else "-"
        lines.append(f"{label:<22} {macs:>9} {macs_ratio:>10} {params:>8} {r['median_ms']:>10.3f} "
                     f"{r['p90_ms']:>8.3f}  {r['ratio_vs_first']:.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prune.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", nargs="?", help="facekd student checkpoint (runs/NAME/student or its model.safetensors)")
    p.add_argument("--onnx", nargs="+", metavar="FILE", help="time these ONNX files instead (ratios vs the first)")
    p.add_argument("--ratio", type=float, help="channel pruning ratio (per layer)")
    p.add_argument("--target-macs", help="prune to this many multiply-adds instead, e.g. 150M")
    p.add_argument("--round-to", type=int, nargs="+", default=[8, 1], help="round_to values to compare (default 8 1)")
    p.add_argument("--importance", default="magnitude", help="channel importance (magnitude, taylor needs data: "
                                                              "not offered here)")
    p.add_argument("--max-layer-ratio", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=200, help="timed repetitions per model (default 200)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--keep", metavar="DIR", help="keep the exported ONNX files here")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from prune.run import compare_latency, parse_macs, resolve_checkpoint  # here: prune.run imports torch

    extra: dict[str, dict[str, Any]] = {}
    if args.onnx:
        models = {f"{i}:{Path(p).name}": p for i, p in enumerate(args.onnx)}
        results = compare_latency(models, threads=args.threads, runs=args.runs, warmup=args.warmup)
    else:
        if not args.checkpoint:
            raise FacekdError("give a student checkpoint, or --onnx FILES")
        if (args.ratio is None) == (args.target_macs is None):
            raise FacekdError("give exactly one of --ratio or --target-macs")
        if args.importance == "taylor":
            raise FacekdError("--importance taylor needs training data; latency does not depend on it, use magnitude")
        import copy

        from facekd.models import count_macs, count_params, export_onnx, load_checkpoint
        from prune.core import PruneConfig, prune_model, search_ratio

        student = load_checkpoint(resolve_checkpoint(args.checkpoint))
        variants = {"unpruned": student}
        for r in args.round_to:
            cfg = PruneConfig(ratio=args.ratio or 0.5, importance=args.importance, round_to=r,
                              max_layer_ratio=args.max_layer_ratio)
            if args.target_macs is not None:
                cfg.ratio, _ = search_ratio(student, parse_macs(args.target_macs), cfg)
            variants[f"pruned round_to={r}"] = prune_model(copy.deepcopy(student), cfg)
            extra.setdefault(f"pruned round_to={r}", {})["ratio_used"] = cfg.ratio
        with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
            folder = Path(args.keep) if args.keep else Path(tmp)
            models = {}
            for label, model in variants.items():
                path = folder / (label.replace(" ", "_").replace("=", "") + ".onnx")
                export_onnx(model, path)
                models[label] = path
                extra.setdefault(label, {}).update(macs=count_macs(model), params=count_params(model),
                                                   file_bytes=path.stat().st_size)
            results = compare_latency(models, threads=args.threads, runs=args.runs, warmup=args.warmup)
    first = next(iter(results.values()))
    print(f"onnxruntime CPU latency, batch 1, {args.threads} thread(s), {args.runs} interleaved rounds, "
          f"host: {first['cpu']} x{first['cores']} ({first['arch']})")
    print(format_latency(results, extra))
    for label, e in extra.items():
        if "ratio_used" in e:
            print(f"{label}: channel ratio {e['ratio_used']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
