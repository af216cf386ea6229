"""Host latency (onnxruntime or LiteRT CPU, milliseconds) and emulated ARM cost (aarch64 instructions under QEMU).

    python -m evaluate.latency A.onnx B.onnx --threads 1,4          # interleaved A/B rounds, ratios vs A
    python -m evaluate.latency A.onnx --json --arm-emulate           # + instructions per inference on 3 ARM cores
    python -m evaluate.latency M.tflite A.onnx --arm-emulate         # a .tflite runs in LiteRT (XNNPACK), here and
                                                                     # under QEMU
    python -m evaluate.latency --arm-setup                           # install the emulation toolchain once

Two different quantities, never mixed:
- latency in ms, measured with onnxruntime (`.onnx`) or the LiteRT interpreter (`.tflite`) on this machine. On an
  aarch64 machine the same figures are the ARM latency columns (`arm_latency_ms`, `arm_device`); elsewhere those
  stay empty (None), never an estimate.
- emulated ARM cost: the number of aarch64 instructions one inference executes, counted under QEMU user-mode
  emulation (`-cpu cortex-a53 | cortex-a72 | cortex-a76`) by the project's TCG plugin `evaluate/arm/insncount.c`,
  with the model run by an aarch64 Python + onnxruntime (or LiteRT) unpacked into a prefix (`--arm-setup`). It is
  a count of instructions, deterministic to well under 0.1%; it is not a time (memory stalls, SIMD widths and
  clocks differ).

This module is the host timing and the command; the emulation lives in `evaluate.arm`: `prefix` (the toolchain,
`--arm-setup`), `emulate` (counting a model's instructions), `runner.py` (what runs inside the emulated Python, and
the session settings and inputs host timing shares with it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evaluate.arm.emulate import arm_instruction_record, arm_instructions, check_model  # noqa: F401  (re-exported)
from evaluate.arm.prefix import ARM_CPUS, arm_setup, arm_toolchain_status, default_prefix  # noqa: F401
from evaluate.arm.runner import InputError, open_model
from evaluate.remote import ARM_PARTS
from facekd.io import FacekdError, cli_main, cpuinfo_fields, sha256_file


# ---------------------------------------------------------------------------------------------------------------
# host latency

def system_info() -> dict[str, Any]:
    """Architecture, CPU model, core count and onnxruntime version of this machine."""
    import onnxruntime

    fields = cpuinfo_fields()
    cpu = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
    if not cpu and "CPU part" in fields:
        part = fields["CPU part"].lower()
        cpu = ARM_PARTS.get(part, f"ARM CPU part {part}")
    arch = platform.machine()
    device = None
    if arch in ("aarch64", "arm64"):
        try:  # boards name themselves here (e.g. "Raspberry Pi 4 Model B Rev 1.4")
            device = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
        except OSError:
            device = None
    return {"arch": arch, "cpu": cpu or platform.processor() or "unknown", "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "device": device}


def _open_model(path: Path, threads: int, seed: int) -> tuple[Any, dict[str, Any]]:
    runtime = "LiteRT" if path.suffix.lower() == ".tflite" else "onnxruntime"
    try:
        return open_model(str(path), threads, seed)
    except InputError as err:
        raise FacekdError(f"{path}: {err}") from None
    except ImportError as err:
        raise FacekdError(f"{path}: timing it needs {runtime} on this machine (for .tflite: pip install -e "
                          f"'.[litert]'): {err}") from None
    except Exception as err:  # the runtimes raise their own exception types for unreadable models
        raise FacekdError(f"{path}: {runtime} cannot load it: {str(err).splitlines()[0]}") from None


def measure_latency(paths: Sequence[str | os.PathLike], threads: Sequence[int] = (1,), runs: int = 100,
                    warmup: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """CPU latency of each model at each intra-op thread count, batch 1, in milliseconds: `.onnx` in onnxruntime,
    `.tflite` in the LiteRT interpreter with its default XNNPACK delegate (`evaluate.arm.runner.open_model`).

    Models are timed in interleaved rounds (A B A B ...) so drift in machine load hits them alike, which makes the
    ratios vs the first model fair. One dict per (model, threads), with every run's time in `times_ms`.
    On aarch64 `arm_latency_ms` / `arm_device` repeat the median / this CPU; elsewhere they are None.
    """
    if not paths:
        raise FacekdError("no model given")
    if runs < 1 or warmup < 0:
        raise FacekdError(f"--runs must be >= 1 and --warmup >= 0 (got {runs}, {warmup})")
    if not threads or any(int(t) < 1 for t in threads):
        raise FacekdError(f"--threads: thread counts must be >= 1 (got {list(threads)})")
    models = [check_model(p) for p in paths]
    info = system_info()
    on_arm = info["arch"] in ("aarch64", "arm64")
    results: list[dict[str, Any]] = []
    for n_threads in threads:
        opened = [_open_model(p, int(n_threads), seed) for p in models]
        for _ in range(warmup):
            for run, _info in opened:
                run()
        times = [[0.0] * runs for _ in models]
        for r in range(runs):
            for i, (run, _info) in enumerate(opened):
                start = time.perf_counter_ns()
                run()
                times[i][r] = (time.perf_counter_ns() - start) / 1e6
        first_median = None
        for path, t, (_run, run_info) in zip(models, times, opened):
            median = float(np.median(t))
            first_median = median if first_median is None else first_median
            results.append({
                "model": str(path), "name": path.stem, "sha256": sha256_file(path), "threads": int(n_threads),
                "runs": runs, "warmup": warmup, "median_ms": median, "p90_ms": float(np.percentile(t, 90)),
                "mean_ms": float(np.mean(t)), "min_ms": float(np.min(t)), "ratio_vs_first": median / first_median,
                "times_ms": t, "arch": info["arch"], "cpu": info["cpu"], "cores": info["cores"],
                "onnxruntime": info["onnxruntime"], "runtime": run_info["runtime"],
                "runtime_version": run_info["version"], **({"xnnpack": run_info["xnnpack"]} if "xnnpack" in run_info
                                                            else {}),
                "arm_latency_ms": median if on_arm else None,
                "arm_device": (info["device"] or info["cpu"]) if on_arm else None,
            })
    return results


# ---------------------------------------------------------------------------------------------------------------
# command line

def table_values(latency: dict[str, Any] | None = None, arm: dict[str, int] | None = None) -> dict[str, Any]:
    """Results-table columns (facekd.table) from one `measure_latency` row (1 thread) and/or `arm_instructions`."""
    values: dict[str, Any] = {}
    if latency is not None:
        values["host_latency_ms"] = round(latency["median_ms"], 4)
        values["host_cpu"] = f"{latency['cpu']} x{latency['cores']} ({latency['arch']})"
        if latency["arm_latency_ms"] is not None:
            values["arm_latency_ms"] = round(latency["arm_latency_ms"], 4)
            values["arm_device"] = latency["arm_device"]
    for cpu, count in (arm or {}).items():
        values[f"arm_instr_{cpu.removeprefix('cortex-')}"] = count
    return values


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FacekdError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise FacekdError(f"{flag}: expected positive integers, got {text!r}")
    return values


def _print_table(rows: list[dict[str, Any]], arm: dict[str, dict[str, Any]]) -> None:
    first = rows[0]
    print(f"host: {first['cpu']}, {first['cores']} cores, {first['arch']}, onnxruntime {first['onnxruntime']}; "
          f"batch 1, {first['runs']} runs after {first['warmup']} warm-up, models interleaved")
    width = max(len(r["name"]) for r in rows) + 2
    print(f"{'model':<{width}}  {'runtime':<18}  threads  median ms    p90 ms  vs first")
    for r in rows:
        runtime = f"{r['runtime']} {r['runtime_version']}"
        print(f"{r['name']:<{width}}  {runtime:<18}  {r['threads']:>7}  {r['median_ms']:>9.3f}  {r['p90_ms']:>8.3f}  "
              f"{r['ratio_vs_first']:>7.3f}x")
    if first["arm_latency_ms"] is None:
        print("ARM latency: not measured (this is not an aarch64 machine)")
    if arm:
        cpus = list(next(iter(arm.values())))
        aw = width + 9  # room for " (LiteRT)"
        print("emulated ARM cost, aarch64 instructions per inference (QEMU, 1 thread; instructions, not time):")
        print(f"{'model':<{aw}}  " + "  ".join(f"{c:>14}" for c in cpus) + "  (median of runs; spread)")
        base = None
        for path, per_cpu in arm.items():
            name = Path(path).stem + (" (LiteRT)" if Path(path).suffix.lower() == ".tflite" else "")
            counts = [per_cpu[c]["instructions"] for c in cpus]
            base = base or counts
            spread = max(per_cpu[c]["spread"] for c in cpus)
            outliers = sum(n > per_cpu[c]["instructions"] * 1.001 for c in cpus
                           for n in per_cpu[c]["runs_instructions"])
            print(f"{name:<{aw}}  " + "  ".join(f"{n:>14,}" for n in counts) +
                  f"  ({spread:.3%}; {outliers} outlier run(s))")
            if counts is not base:
                print(f"{'  vs first':<{aw}}  " + "  ".join(f"{n / b:>13.3f}x" for n, b in zip(counts, base)))


def _resolve_models(specs: list[str], workdir: Path, *, random_weights: bool = False) -> dict[str, str]:
    """MODEL arguments -> ONNX paths: ONNX files as they are; facekd checkpoints exported.

    A bare architecture name would export a freshly initialised model: fine for timing and instruction counts (fp32
    work does not depend on weight values), never for accuracy, and only when asked (`random_weights`).
    """
    from facekd.models import create_model, export_onnx, has_weights, load_checkpoint

    for spec in specs:  # every argument checked before the first export
        path = Path(spec)
        if path.is_file() or path.suffix.lower() == ".onnx":
            continue
        if "/" in spec or path.suffix:
            raise FacekdError(f"model not found: {spec}")
        if not random_weights and not has_weights(spec):
            raise FacekdError(f"{spec!r} is an architecture name, not a trained model; pass its ONNX file or "
                              f"checkpoint, or --random-weights to time a freshly initialised {spec} (latency does "
                              "not depend on weight values)")
    resolved: dict[str, str] = {}
    for spec in specs:
        path = Path(spec)
        if path.suffix.lower() == ".onnx" or (path.is_file() and path.suffix.lower() not in (".safetensors", ".pth",
                                                                                            ".pt")):
            resolved[spec] = spec  # measure_latency checks existence and format
            continue
        model = load_checkpoint(path) if path.is_file() else create_model(spec)
        out = workdir / f"{path.stem if path.is_file() else spec.replace(':', '_')}.onnx"
        resolved[spec] = str(export_onnx(model.eval(), out))
    return resolved


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluate.latency", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[
                                         __doc__.index("\n\n") + 2:])
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="ONNX or .tflite file; or a facekd checkpoint, exported to ONNX first")
    parser.add_argument("--threads", default="1", help="intra-op thread counts, comma-separated (default 1)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--arm-emulate", action="store_true",
                        help="also count aarch64 instructions per inference under QEMU (needs --arm-setup once)")
    parser.add_argument("--arm-cpus", default=",".join(ARM_CPUS), help=f"QEMU -cpu models (default {','.join(ARM_CPUS)})")
    parser.add_argument("--arm-setup", action="store_true", help="install the emulation toolchain, then continue")
    parser.add_argument("--prefix", default=None, help="emulation toolchain prefix (default $FACEKD_ARM_PREFIX "
                                                       "or ~/.cache/facekd/arm)")
    parser.add_argument("--no-cache", action="store_true", help="recount instructions even when cached")
    parser.add_argument("--random-weights", action="store_true",
                        help="accept a bare architecture name (e.g. mbf) and time it freshly initialised")
    parser.add_argument("--table", default=None, metavar="CSV",
                        help="write the 1-thread latency / instruction columns into this results table, on the "
                             "rows whose artifact is the model path")
    parser.add_argument("--device", help="measure on a real device instead: ssh://user@host[:port] or adb:SERIAL "
                                         "(evaluate.remote; .onnx or .tflite files)")
    args = parser.parse_args(argv)
    cpus = [c.strip() for c in args.arm_cpus.split(",") if c.strip()]
    for cpu in cpus:
        if cpu not in ARM_CPUS:
            raise FacekdError(f"--arm-cpus: unknown CPU {cpu!r}; choose from: {', '.join(ARM_CPUS)}")
    threads = _int_list(args.threads, "--threads")
    if args.arm_setup:
        log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
        arm_setup(args.prefix, log=log)
        if not args.models:
            return 0
    if not args.models:
        parser.error("give at least one MODEL (or --arm-setup)")
    if args.device:
        from evaluate.remote import run_cli
        return run_cli(args.models, args.device, threads=threads, runs=args.runs, warmup=args.warmup,
                       table=args.table, as_json=args.json)
    with tempfile.TemporaryDirectory(prefix="facekd-latency-") as workdir:
        onnx_of = _resolve_models(args.models, Path(workdir), random_weights=args.random_weights)
        rows = measure_latency(list(onnx_of.values()), threads=threads, runs=args.runs, warmup=args.warmup)
        arm: dict[str, dict[str, Any]] = {}
        if args.arm_emulate:
            for spec, path in onnx_of.items():
                arm[spec] = {cpu: arm_instruction_record(path, cpu, prefix=args.prefix, use_cache=not args.no_cache)
                             for cpu in cpus}
    for spec, path in onnx_of.items():
        for row in rows:
            if row["model"] == str(Path(path)) and spec != path:
                row["model"], row["exported_from"] = spec, spec
    if args.table:
        from facekd.table import update_columns

        for spec in args.models:
            one = next((r for r in rows if r["model"] == str(Path(spec)) and r["threads"] == 1), None)
            counts = {c: rec["instructions"] for c, rec in arm.get(spec, {}).items()}
            hits = update_columns({"artifact": spec}, table_values(one, counts), args.table)
            print(f"{args.table}: updated {hits} row(s) whose artifact is {spec}", file=sys.stderr)
    if args.json:
        print(json.dumps({"latency": rows, "arm_instructions": arm}, indent=2))
    else:
        _print_table(rows, arm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
