"""Side-by-side table of int8 quantisation options: latency, size and fidelity measured in one run.

    python -m quantize.bench runs/NAME/student/model.safetensors --calib synthfaces --eval synthfaces:small
    python -m quantize.bench runs/NAME/pruned/model.safetensors --reference runs/NAME/student/model.safetensors \
        --targets a53,a72,a76,x86 --runtimes onnxruntime,litert

Every variant is timed in the same interleaved rounds (onnxruntime CPU, batch 1, 1 thread), so the ratios against
the fastest exact fp32 form (as exported, relu, maxmul, max; whichever variants are timed) are fair even on a busy
machine. Fidelity is the fp32-vs-int8 embedding cosine on the evaluation
images (with flip, like verification) and the verification accuracy of each variant.

With --targets (issue 15's ratios): per target core and runtime, the cheapest exact fp32 form of the reference
(unpruned) and of MODEL and the cheapest int8 form of MODEL (quantize.target for onnxruntime, quantize.litert for
LiteRT), their ratios, and one `best` row per core (BEST_DEFINITION).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from facekd.io import FacekdError, atomic_write_json, cli_main
from quantize.ptq import VARIANTS, compare, format_table  # noqa: F401  (format_table: the table compare prints)

RUNTIMES = ("onnxruntime", "litert")
ISSUE_GOALS = {"a53": 0.60, "a72": 0.60, "a76": 0.40}  # pruned int8 / unpruned fp32 on the best runtime (issue 15)
BEST_DEFINITION = ("best = per core, each cost is the cheapest over the runtimes measured (each may come from a "
                   "different runtime, named with its form): int8/ref = min over runtimes of the pruned int8 / min "
                   "over runtimes of the unpruned fp32 (the most demanding reading: no runtime gets a slow "
                   "baseline), int8/fp32 = min int8 / min fp32 of the same model; per-runtime rows take all three "
                   "from that runtime")


def with_ratios(row: dict[str, Any]) -> dict[str, Any]:
    """`row` (costs fp32_reference, fp32, int8 on one target) plus the issue's ratios and checks."""
    goal = ISSUE_GOALS.get(row["target"])
    row.update(int8_over_reference_fp32=row["int8"] / row["fp32_reference"], int8_over_own_fp32=row["int8"] / row["fp32"],
               int8_not_above_fp32=bool(row["int8"] <= row["fp32"]), goal=goal)
    row["meets_goal"] = None if goal is None else bool(row["int8_over_reference_fp32"] <= goal)
    return row


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The `best` row of one target's per-runtime rows (BEST_DEFINITION)."""
    best: dict[str, Any] = {"target": rows[0]["target"], "runtime": "best", "unit": rows[0]["unit"]}
    for key in ("fp32_reference", "fp32", "int8"):
        r = min(rows, key=lambda r: r[key])
        best[key], best[f"{key}_form"] = r[key], f"{r['runtime']} {r[f'{key}_form']}"
    return with_ratios(best)


def target_table(model: Path, reference: Path, torch_models: tuple[Any, Any], calib_images: np.ndarray,
                 targets: Sequence[str], runtimes: Sequence[str], *, runs: int = 100,
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Per target: one row per runtime (cheapest exact fp32 of `reference` and of `model`, cheapest int8 of
    `model`) and its `best` row. `torch_models` = (model, reference) PyTorch modules, needed for LiteRT. Every
    candidate is built once and costed per target; host-ms targets re-time every winner of every runtime side by
    side (the forms were timed in separate rounds)."""
    from quantize import litert, target as tg
    from quantize.calib import preprocess
    from quantize.core import read_preprocessing

    x = preprocess(calib_images[:8], read_preprocessing(reference))
    table: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="facekd-targets-") as tmp:
        built: dict[str, dict[str, dict[str, Any]]] = {}  # runtime -> {ref, own, int8: candidates}
        for runtime in runtimes:
            d = {k: Path(tmp) / runtime / k for k in ("ref", "own", "int8")}
            for path in d.values():
                path.mkdir(parents=True)
            if runtime == "onnxruntime":
                built[runtime] = {"ref": tg.fp32_candidates(reference, x, d["ref"]),
                                  "own": tg.fp32_candidates(model, x, d["own"]),
                                  "int8": tg.int8_candidates(model, calib_images, d["int8"], log=log)}
            else:
                own_m, ref_m = torch_models
                built[runtime] = {"ref": litert.fp32_candidates(ref_m, x, d["ref"], log=log),
                                  "own": litert.fp32_candidates(own_m, x, d["own"], log=log),
                                  "int8": litert.int8_candidates(own_m, preprocess(calib_images, own_m.preprocessing),
                                                                 d["int8"], log=log)}
        for target in targets:
            target, rows, files = tg.resolve_target(target), [], []
            for runtime in runtimes:
                row: dict[str, Any] = {"target": target, "runtime": runtime, "unit": tg.cost_unit(target), "forms": {}}
                for key, what in (("fp32_reference", "ref"), ("fp32", "own"), ("int8", "int8")):
                    cand = built[runtime][what]
                    dst = Path(tmp) / target / runtime / f"{what}{cand['paths'][next(iter(cand['paths']))].suffix}"
                    best, found = tg.pick_cheapest(cand["paths"], dst, target, cosine=cand.get("cosine"), runs=runs,
                                                   log=log, what=f"{runtime} {key} forms")
                    row.update({key: found[best], f"{key}_form": best})
                    row["forms"][key] = found
                    files.append(dst)
                row["int8_held_out_cosine"] = built[runtime]["int8"]["cosine"]
                rows.append(row)
            if tg.cost_unit(target) == "ms":
                ms = tg.costs(files, target, runs=runs)
                for i, row in enumerate(rows):
                    row["fp32_reference"], row["fp32"], row["int8"] = ms[3 * i:3 * i + 3]
            table += [with_ratios(r) for r in rows] + [best_row(rows)]
    log(format_target_table(table))
    return table


def format_target_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'target':7s} {'runtime':11s} {'ref fp32 (form)':>28s} {'fp32 (form)':>28s} {'int8 (form)':>31s} "
            f"{'int8/ref':>8s} {'goal':>5s} {'int8/fp32':>9s}")
    lines = ["cheapest form per target and runtime (ref = unpruned fp32; M = emulated aarch64 instructions per "
             "inference under QEMU, not time; ms = host, all winners of a target timed side by side)", head,
             "-" * len(head)]
    for r in rows:
        def c(key: str) -> str:
            v, form = r[key], r[f"{key}_form"]
            return (f"{v:.2f}" if r["unit"] == "ms" else f"{v / 1e6:.1f}M") + f" ({form})"
        goal = "-" if r["goal"] is None else f"{r['goal']:.2f}" + ("" if r["meets_goal"] else "!")
        lines.append(f"{r['target']:7s} {r['runtime']:11s} {c('fp32_reference'):>28s} {c('fp32'):>28s} "
                     f"{c('int8'):>31s} {r['int8_over_reference_fp32']:8.3f} {goal:>5s} "
                     f"{r['int8_over_own_fp32']:9.3f}" + ("" if r["int8_not_above_fp32"] else "  int8 > fp32!"))
    lines.append("goal: issue 15's bound on int8/ref (! = not met); " + BEST_DEFINITION)
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        worse = [r["target"] for r in rows if r["runtime"] == runtime and not r["int8_not_above_fp32"]]
        lines.append(f"int8 <= same-model fp32 on every target, {runtime}: "
                     + ("yes" if not worse else f"NO ({', '.join(worse)})"))
    return "\n".join(lines)


def resolve_runtimes(spec: str | None, model: Path, reference: Path | None) -> tuple[list[str], str | None]:
    """(runtimes to measure, why LiteRT was skipped or None). Default: both when LiteRT can run here (its extra
    installed, MODEL and the reference PyTorch checkpoints), else onnxruntime alone; an explicit litert that cannot
    run is an error."""
    from quantize.litert import litert_missing

    names = [r.strip() for r in (spec or ",".join(RUNTIMES)).split(",") if r.strip()]
    unknown = [r for r in names if r not in RUNTIMES]
    if unknown or not names:
        raise FacekdError(f"--runtimes: unknown runtime {(unknown or [spec])[0]!r}; choose from: {', '.join(RUNTIMES)}")
    why = None
    if "litert" in names:
        onnx = [str(p) for p in (model, reference) if p is not None and p.suffix.lower() == ".onnx"]
        why = litert_missing() or (f"LiteRT converts from the PyTorch module: pass facekd checkpoints (.safetensors), "
                                   f"not {onnx[0]}" if onnx else None)
        if why and spec:
            raise FacekdError(f"--runtimes litert: {why}")
        names = [r for r in names if r != "litert" or not why]
    return names, why


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="facekd checkpoint or fp32 ONNX model")
    p.add_argument("--arch", help="architecture for checkpoints without facekd metadata")
    p.add_argument("--calib", default="synthfaces", help="calibration images (as quantize.ptq; bnstats too)")
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--eval", default="synthfaces:small", help="verification set for fidelity ('none' skips)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per variant (interleaved)")
    p.add_argument("--variants", nargs="*", help=f"subset of: {', '.join(VARIANTS)} (fp32 is always the reference)")
    p.add_argument("--out", help="also write the table as JSON here")
    p.add_argument("--targets", help="instead of the options table: the best fp32 and int8 forms per target and the "
                   "issue's ratios, e.g. a53,a72,a76,x86 (ARM targets count emulated instructions; see quantize.target)")
    p.add_argument("--reference", help="with --targets: the unpruned fp32 model the int8/fp32 ratios are taken "
                   "against (default: MODEL itself)")
    p.add_argument("--runtimes", help=f"with --targets: comma list of {', '.join(RUNTIMES)} (default: both when "
                   "the litert extra is installed and MODEL and --reference are checkpoints, else onnxruntime)")
    args = p.parse_args(argv)
    from quantize.ptq import calibration_images, prepare_float_model

    if args.runtimes and not args.targets:
        raise FacekdError("--runtimes needs --targets")
    if args.targets:
        from quantize.target import resolve_target

        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        for t in targets:
            resolve_target(t)  # fail on a bad name before any work
        reference = Path(args.reference) if args.reference else None
        if reference and not reference.is_file():
            raise FacekdError(f"--reference not found: {args.reference}")
        runtimes, skipped = resolve_runtimes(args.runtimes, Path(args.model), reference)
        if skipped:
            print(f"LiteRT skipped: {skipped}")
        with tempfile.TemporaryDirectory(prefix="facekd-qbench-") as tmp:
            fp32, torch_model = prepare_float_model(args.model, Path(tmp), arch=args.arch)
            (Path(tmp) / "ref").mkdir()
            ref, torch_ref = prepare_float_model(reference, Path(tmp) / "ref", arch=args.arch) if reference \
                else (fp32, torch_model)
            images = calibration_images(args.calib, args.num_calib, torch_model=torch_model)
            rows = target_table(fp32, ref, (torch_model, torch_ref), images, targets, runtimes, runs=args.runs)
        if args.out:
            from evaluate.latency import system_info

            atomic_write_json(args.out, {"targets": rows, "runtimes": runtimes, "litert_skipped": skipped,
                                         "best": BEST_DEFINITION, "host": system_info(), "runs": args.runs})
        return 0

    vset = None
    if args.eval != "none":
        from facedata import open_verification_set
        vset = open_verification_set(args.eval)
    with tempfile.TemporaryDirectory(prefix="facekd-qbench-") as tmp:
        fp32, torch_model = prepare_float_model(args.model, Path(tmp), arch=args.arch)
        images = calibration_images(args.calib, args.num_calib, torch_model=torch_model)
        compare(fp32, images, vset, runs=args.runs, variants=args.variants, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
