"""Target-aware graph forms: the fastest exact fp32 PReLU form and the cheapest int8 form for one target core.

    python -m quantize.ptq runs/NAME/pruned/model.onnx --target a72       # quantize.ptq uses this module
    python -m quantize.litert runs/NAME/pruned/model.safetensors --target a72   # and quantize.litert (LiteRT forms)
    python -m quantize.bench runs/NAME/pruned/model.safetensors --reference runs/NAME/student/model.safetensors \
        --targets a53,a72,a76,x86 --runtimes onnxruntime,litert

The cost of a candidate on a target is measured, never modelled:
- x86 (or `host`, an aarch64 machine running this): median milliseconds on this machine, batch 1, 1 thread
  (onnxruntime CPU for `.onnx`, the LiteRT interpreter for `.tflite`), all candidates in the same interleaved rounds;
- a53 / a72 / a76: aarch64 instructions per inference under QEMU `-cpu cortex-A..` (evaluate.latency's ARM path;
  instructions, not time; needs `python -m evaluate.latency --arm-setup` once). The a53 and a72 run the same
  ARMv8.0 code paths in onnxruntime (no dot product), so their counts agree; the a76 has the dot-product kernels.

fp32 candidates (all exact; each is checked against the original to 1e-5 before it may win) are the PReLU spellings
of `quantize.graph.prelu_fp32_form`; int8 candidates are (PReLU form, format, activations) triples for
`quantize.core.quantize_onnx`. The cheapest int8 candidate whose held-out fp32-vs-int8 cosine is within
`COSINE_SLACK` of the best candidate's wins. The choice itself (`pick_cheapest`, `check_exact`, `split_holdout`) is
runtime-blind: `quantize.litert` builds its `.tflite` candidates from the PyTorch module and picks through it too.
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


def fp32_candidates(src: str | Path, x: np.ndarray, out_dir: str | Path, forms: Sequence[str] = FP32_CANDIDATES
                    ) -> dict[str, Any]:
    """Every fp32 PReLU form of `src` written into `out_dir`, each checked against the original on the preprocessed
    inputs `x` (check_exact): {"paths": {form: path}, "max_abs_diff": {form: ...}}."""
    from quantize.core import raw_embeddings

    ref = raw_embeddings(src, x)
    paths, diffs = {}, {}
    for form in forms:
        paths[form] = Path(out_dir) / f"{form}.onnx"
        write_fp32_form(src, paths[form], form)
        diffs[form] = check_exact(form, raw_embeddings(paths[form], x), ref)
    return {"paths": paths, "max_abs_diff": diffs}


def best_fp32(src: str | Path, dst: str | Path, x: np.ndarray, target: str, *,
              forms: Sequence[str] = FP32_CANDIDATES, runs: int = 100, log: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """Write to `dst` the cheapest exact fp32 form of `src` on `target`; `x` are preprocessed check inputs.
    Returns {"form", "unit", "costs": {form: cost}, "max_abs_diff": {form: ...}}."""
    with tempfile.TemporaryDirectory(prefix="facekd-fp32form-") as tmp:
        cand = fp32_candidates(src, x, tmp, forms)
        best, found = pick_cheapest(cand["paths"], dst, target, runs=runs, log=log, what="fp32 PReLU forms")
    return {"form": best, "unit": cost_unit(target), "costs": found, "max_abs_diff": cand["max_abs_diff"]}


def check_exact(form: str, got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref|; a form further than EXACT_TOL (relative to the embedding's scale) from the original is an
    error, never a trade-off."""
    diff = float(np.abs(got - ref).max())
    if diff > EXACT_TOL * max(1.0, float(np.abs(ref).max())):
        raise FacekdError(f"fp32 PReLU form {form!r} differs from the original by {diff:.2e} (> {EXACT_TOL}); "
                          "refusing it")
    return diff


def split_holdout(images: np.ndarray, holdout: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) calibration images for choosing an int8 form; one image is used for both."""
    n_hold = max(1, int(round(len(images) * holdout))) if len(images) > 1 else 0
    order = np.random.default_rng(0).permutation(len(images))
    return (images[order[n_hold:]], images[order[:n_hold]]) if n_hold else (images, images)


def pick_cheapest(paths: dict[str, Path], dst: str | Path, target: str, *, cosine: dict[str, float] | None = None,
                  runs: int = 100, log: Callable[[str], None] = print, what: str = "forms"
                  ) -> tuple[str, dict[str, float]]:
    """Cost every candidate file (any runtime's) on `target`, copy the cheapest to `dst`; with `cosine` only the
    candidates within COSINE_SLACK of the best held-out cosine may win. Returns (winner, {name: cost})."""
    names = list(paths)
    log(f"{what}: measuring {', '.join(names)} on {target} ({cost_unit(target)})")
    found = dict(zip(names, costs([paths[n] for n in names], target, runs=runs)))
    ok = names if cosine is None else [n for n in names if cosine[n] >= max(cosine.values()) - COSINE_SLACK]
    best = min(ok, key=found.get)
    with atomic_path(dst) as tmp_dst:
        shutil.copyfile(paths[best], tmp_dst)
    log(f"{what} on {target}: " + ", ".join(f"{n} {fmt_cost(found[n], target)}"
                                           + (f" (cos {cosine[n]:.5f})" if cosine else "") for n in names)
        + f" -> {best}")
    return best, found


def int8_candidates(src: str | Path, calib_images: np.ndarray, out_dir: str | Path, *,
                    candidates: Sequence[str] = tuple(INT8_CANDIDATES), holdout: float = 0.25,
                    log: Callable[[str], None] = print, **kwargs: Any) -> dict[str, Any]:
    """`src` quantised in every candidate form into `out_dir` (calibrated on 1 - holdout of the images):
    {"paths", "infos" (quantize_onnx's), "cosine" (held-out fp32-vs-int8 mean), "held_out_images"}."""
    from quantize.calib import preprocess
    from quantize.core import cosine_rows, quantize_onnx, raw_embeddings, read_preprocessing

    unknown = [c for c in candidates if c not in INT8_CANDIDATES]
    if unknown:
        raise FacekdError(f"unknown int8 form(s) {unknown}; known: {', '.join(INT8_CANDIDATES)}")
    fit, hold = split_holdout(calib_images, holdout)
    x = preprocess(hold, kwargs.get("preprocessing") or read_preprocessing(src))
    ref = raw_embeddings(src, x)
    paths, infos, cos = {}, {}, {}
    for name in candidates:
        paths[name] = Path(out_dir) / f"{name}.onnx"
        log(f"int8 form {name}: quantising")
        infos[name] = quantize_onnx(src, paths[name], fit, **INT8_CANDIDATES[name], **kwargs)
        cos[name] = float(cosine_rows(ref, raw_embeddings(paths[name], x)).mean())
    return {"paths": paths, "infos": infos, "cosine": cos, "held_out_images": int(len(hold))}


def best_int8(src: str | Path, dst: str | Path, calib_images: np.ndarray, target: str, *,
              candidates: Sequence[str] = tuple(INT8_CANDIDATES), holdout: float = 0.25, runs: int = 100,
              log: Callable[[str], None] = print, **kwargs: Any) -> dict[str, Any]:
    """Quantise `src` in every candidate form, keep the cheapest on `target` among those whose held-out cosine to
    fp32 is within COSINE_SLACK of the best one. Returns quantize_onnx's info plus a `target` entry."""
    with tempfile.TemporaryDirectory(prefix="facekd-int8form-") as tmp:
        cand = int8_candidates(src, calib_images, tmp, candidates=candidates, holdout=holdout, log=log, **kwargs)
        best, found = pick_cheapest(cand["paths"], dst, target, cosine=cand["cosine"], runs=runs, log=log,
                                    what="int8 forms")
    return {**cand["infos"][best], "target": {"name": target, "form": best, "unit": cost_unit(target),
                                              "costs": found, "held_out_cosine": cand["cosine"],
                                              "held_out_images": cand["held_out_images"]}}


def fmt_cost(cost: float, target: str) -> str:
    return f"{cost:.2f} ms" if cost_unit(target) == "ms" else f"{cost / 1e6:.1f}M"


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
