"""Target-aware graph forms: the fastest exact fp32 PReLU form and the cheapest int8 form for one target core.

    python -m quantize.ptq runs/NAME/pruned/model.onnx --target a72       # quantize.ptq uses this module
    python -m quantize.bench runs/NAME/pruned/model.onnx --reference runs/NAME/student/model.onnx --targets a53,a72,a76,x86

The cost of a candidate on a target is measured, never modelled:
- x86 (or `host`, an aarch64 machine running this): median milliseconds on this machine, onnxruntime CPU, batch 1,
  1 thread, all candidates timed in the same interleaved rounds;
- a53 / a72 / a76: aarch64 instructions per inference under QEMU `-cpu cortex-A..` (evaluate.latency's ARM path;
  instructions, not time; needs `python -m evaluate.latency --arm-setup` once). The a53 and a72 run the same
  ARMv8.0 code paths in onnxruntime (no dot product), so their counts agree; the a76 has the dot-product kernels.

fp32 candidates (all exact; each is checked against the original to 1e-5 before it may win) are the PReLU spellings
of `quantize.graph.prelu_fp32_form`; int8 candidates are (PReLU form, format, activations) triples for
`quantize.core.quantize_onnx`. The cheapest int8 candidate whose held-out fp32-vs-int8 cosine is within
`COSINE_SLACK` of the best candidate's wins.
"""
from __future__ import annotations

import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from facekd.io import FacekdError, atomic_path, cli_main

TARGETS = ("a53", "a72", "a76", "x86", "host", "auto")
FP32_CANDIDATES = ("prelu", "relu", "maxmul")
INT8_CANDIDATES: dict[str, dict[str, str]] = {
    "mulmax-u8": {"prelu": "mulmax", "fmt": "qoperator", "activations": "u8"},
    "max-u8": {"prelu": "max", "fmt": "qoperator", "activations": "u8"},
    "mulmax-s8": {"prelu": "mulmax", "fmt": "qoperator", "activations": "s8"},
}
COSINE_SLACK = 0.002
EXACT_TOL = 1e-5


def resolve_target(target: str) -> str:
    """`auto` -> x86 on an x86 host, `host` (measured latency on this device) on aarch64; checks the name."""
    if target not in TARGETS:
        raise FacekdError(f"--target: unknown target {target!r}; choose from: {', '.join(TARGETS)}")
    machine = platform.machine().lower()
    is_x86 = machine in ("x86_64", "amd64", "i686", "i386")
    if target == "auto":
        return "x86" if is_x86 else "host"
    if target == "x86" and not is_x86:
        raise FacekdError(f"--target x86: this machine is {machine}; use --target host to measure it")
    return target


def cost_unit(target: str) -> str:
    return "ms" if target in ("x86", "host") else "instructions"


def costs(paths: Sequence[str | Path], target: str, *, runs: int = 100) -> list[float]:
    """Cost of each model on `target`: interleaved host median ms, or emulated aarch64 instructions."""
    if target in ("x86", "host"):
        from evaluate.latency import measure_latency

        return [r["median_ms"] for r in measure_latency(list(paths), threads=(1,), runs=runs, warmup=10)]
    from evaluate.latency import arm_instruction_record

    return [float(arm_instruction_record(p, f"cortex-{target}")["instructions"]) for p in paths]


def write_fp32_form(src: str | Path, dst: str | Path, form: str) -> int:
    """Write `src` with every constant-slope PRelu in `form` (metadata kept); returns how many were rewritten."""
    import onnx

    from quantize.graph import prelu_fp32_form

    proto, n = prelu_fp32_form(onnx.load(str(src)), form)
    onnx.checker.check_model(proto)
    with atomic_path(dst) as tmp:
        onnx.save(proto, str(tmp))
    return n


def best_fp32(src: str | Path, dst: str | Path, x: np.ndarray, target: str, *,
              forms: Sequence[str] = FP32_CANDIDATES, runs: int = 100, log: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """Write to `dst` the cheapest exact fp32 form of `src` on `target`; `x` are preprocessed check inputs.

    Returns {"form", "unit", "costs": {form: cost}, "max_abs_diff": {form: ...}}. A form that is not equal to the
    original within EXACT_TOL is an error (a bug, never a trade-off).
    """
    from quantize.core import raw_embeddings

    ref = raw_embeddings(src, x)
    with tempfile.TemporaryDirectory(prefix="facekd-fp32form-") as tmp:
        paths, diffs = {}, {}
        for form in forms:
            paths[form] = Path(tmp) / f"{form}.onnx"
            write_fp32_form(src, paths[form], form)
            diffs[form] = float(np.abs(raw_embeddings(paths[form], x) - ref).max())
            if diffs[form] > EXACT_TOL * max(1.0, float(np.abs(ref).max())):
                raise FacekdError(f"fp32 PReLU form {form!r} differs from the original by {diffs[form]:.2e} "
                                  f"(> {EXACT_TOL}); refusing it")
        log(f"fp32 PReLU forms: measuring {', '.join(forms)} on {target} ({cost_unit(target)})")
        found = dict(zip(forms, costs([paths[f] for f in forms], target, runs=runs)))
        best = min(found, key=found.get)
        with atomic_path(dst) as tmp_dst:
            shutil.copyfile(paths[best], tmp_dst)
    log("fp32 forms on " + target + ": " + ", ".join(f"{f} {_fmt(c, target)}" for f, c in found.items())
        + f" -> {best}")
    return {"form": best, "unit": cost_unit(target), "costs": found, "max_abs_diff": diffs}


def best_int8(src: str | Path, dst: str | Path, calib_images: np.ndarray, target: str, *,
              candidates: Sequence[str] = tuple(INT8_CANDIDATES), holdout: float = 0.25, runs: int = 100,
              log: Callable[[str], None] = print, **kwargs: Any) -> dict[str, Any]:
    """Quantise `src` in every candidate form, keep the cheapest on `target` among those whose held-out cosine to
    fp32 is within COSINE_SLACK of the best one. Returns quantize_onnx's info plus a `target` entry."""
    from quantize.calib import preprocess
    from quantize.core import cosine_rows, quantize_onnx, raw_embeddings, read_preprocessing

    unknown = [c for c in candidates if c not in INT8_CANDIDATES]
    if unknown:
        raise FacekdError(f"unknown int8 form(s) {unknown}; known: {', '.join(INT8_CANDIDATES)}")
    n_hold = max(1, int(round(len(calib_images) * holdout))) if len(calib_images) > 1 else 0
    order = np.random.default_rng(0).permutation(len(calib_images))
    hold = calib_images[order[:n_hold]] if n_hold else calib_images
    fit = calib_images[order[n_hold:]] if n_hold else calib_images
    x = preprocess(hold, kwargs.get("preprocessing") or read_preprocessing(src))
    ref = raw_embeddings(src, x)
    with tempfile.TemporaryDirectory(prefix="facekd-int8form-") as tmp:
        paths, infos, cos = {}, {}, {}
        for name in candidates:
            paths[name] = Path(tmp) / f"{name}.onnx"
            log(f"int8 form {name}: quantising")
            infos[name] = quantize_onnx(src, paths[name], fit, **INT8_CANDIDATES[name], **kwargs)
            cos[name] = float(cosine_rows(ref, raw_embeddings(paths[name], x)).mean())
        log(f"int8 forms: measuring {', '.join(candidates)} on {target} ({cost_unit(target)})")
        found = dict(zip(candidates, costs([paths[c] for c in candidates], target, runs=runs)))
        ok = [c for c in candidates if cos[c] >= max(cos.values()) - COSINE_SLACK]
        best = min(ok, key=found.get)
        with atomic_path(dst) as tmp_dst:
            shutil.copyfile(paths[best], tmp_dst)
    log("int8 forms on " + target + ": " + ", ".join(f"{c} {_fmt(found[c], target)} (cos {cos[c]:.5f})"
                                                    for c in candidates) + f" -> {best}")
    return {**infos[best], "target": {"name": target, "form": best, "unit": cost_unit(target), "costs": found,
                                      "held_out_cosine": cos, "held_out_images": int(len(hold))}}


def _fmt(cost: float, target: str) -> str:
    return f"{cost:.2f} ms" if cost_unit(target) == "ms" else f"{cost / 1e6:.1f}M"


def target_table(pruned: str | Path, reference: str | Path, calib_images: np.ndarray, targets: Sequence[str], *,
                 runs: int = 100, log: Callable[[str], None] = print, **kwargs: Any) -> list[dict[str, Any]]:
    """The issue's ratios per target, from one run: for each target the best fp32 form of the reference
    (unpruned) and of `pruned`, the best int8 form of `pruned`, and int8 / fp32 cost ratios."""
    from quantize.calib import preprocess
    from quantize.core import read_preprocessing

    x = preprocess(calib_images[:8], read_preprocessing(reference))
    rows = []
    with tempfile.TemporaryDirectory(prefix="facekd-targets-") as tmp:
        for target in targets:
            target = resolve_target(target)
            ref = best_fp32(reference, Path(tmp) / "ref.onnx", x, target, runs=runs, log=log)
            own = best_fp32(pruned, Path(tmp) / "own.onnx", x, target, runs=runs, log=log)
            q = best_int8(pruned, Path(tmp) / "int8.onnx", calib_images, target, runs=runs, log=log, **kwargs)
            int8_cost = q["target"]["costs"][q["target"]["form"]]
            if target in ("x86", "host"):  # ms from separate rounds: re-time the three winners side by side
                shutil.copyfile(Path(tmp) / "int8.onnx", Path(tmp) / "int8_best.onnx")
                ref_c, own_c, int8_cost = costs([Path(tmp) / "ref.onnx", Path(tmp) / "own.onnx",
                                                 Path(tmp) / "int8_best.onnx"], target, runs=runs)
            else:
                ref_c, own_c = ref["costs"][ref["form"]], own["costs"][own["form"]]
            rows.append({"target": target, "unit": cost_unit(target), "fp32_reference_form": ref["form"],
                         "fp32_reference": ref_c, "fp32_form": own["form"], "fp32": own_c,
                         "int8_form": q["target"]["form"], "int8": int8_cost,
                         "int8_over_reference_fp32": int8_cost / ref_c, "int8_over_own_fp32": int8_cost / own_c,
                         "fp32_forms": ref["costs"], "int8_forms": q["target"]["costs"]})
    log(format_target_table(rows))
    return rows


def format_target_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'target':7s} {'unit':>6s} {'ref fp32 (form)':>22s} {'fp32 (form)':>22s} {'int8 (form)':>24s} "
            f"{'int8/ref':>8s} {'int8/fp32':>9s}")
    lines = ["best form per target (ref = unpruned fp32; instructions under QEMU or host ms side by side)", head,
             "-" * len(head)]
    for r in rows:
        def c(v: float) -> str:
            return f"{v:.2f}" if r["unit"] == "ms" else f"{v / 1e6:.1f}M"
        lines.append(f"{r['target']:7s} {r['unit'][:6]:>6s} {c(r['fp32_reference']) + ' (' + r['fp32_reference_form'] + ')':>22s} "
                     f"{c(r['fp32']) + ' (' + r['fp32_form'] + ')':>22s} {c(r['int8']) + ' (' + r['int8_form'] + ')':>24s} "
                     f"{r['int8_over_reference_fp32']:8.3f} {r['int8_over_own_fp32']:9.3f}")
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> int:
    """`python -m quantize.target MODEL.onnx --out FAST.onnx [--target T] [--form auto|prelu|relu|maxmul]`:
    write the fp32 deployable model in its cheapest exact PReLU form for a target (the fp32 half of --target)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m quantize.target", description=main.__doc__.split("\n")[0])
    p.add_argument("model", help="fp32 ONNX model")
    p.add_argument("--out", required=True, help="where to write the rewritten fp32 model")
    p.add_argument("--target", default="auto", help=f"one of {', '.join(TARGETS)} (default auto: this machine)")
    p.add_argument("--form", default="auto", help="auto (cheapest measured on --target) or one of "
                                                  f"{', '.join(FP32_CANDIDATES)}")
    p.add_argument("--runs", type=int, default=100, help="timed runs per form for host targets")
    args = p.parse_args(argv)
    target = resolve_target(args.target)
    if args.form != "auto" and args.form not in FP32_CANDIDATES:
        raise FacekdError(f"--form: unknown form {args.form!r}; choose from auto, {', '.join(FP32_CANDIDATES)}")
    src = Path(args.model)
    if not src.is_file() or src.suffix.lower() != ".onnx":
        raise FacekdError(f"not an ONNX file: {src}")
    if args.form != "auto":
        n = write_fp32_form(src, args.out, args.form)
        print(f"wrote {args.out}: {n} PRelu nodes as {args.form}")
        return 0
    from quantize.calib import load_calibration_images, preprocess
    from quantize.core import read_preprocessing

    x = preprocess(load_calibration_images("synthfaces:tiny", 8, seed=0), read_preprocessing(src))
    info = best_fp32(src, args.out, x, target, runs=args.runs)
    print(f"wrote {args.out}: fp32 PReLU form {info['form']} (max |diff| to the original "
          f"{info['max_abs_diff'][info['form']]:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
