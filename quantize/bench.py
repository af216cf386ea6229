"""Side-by-side table of int8 quantisation options: latency, size and fidelity measured in one run.

    python -m quantize.bench runs/NAME/student/model.safetensors --calib synthfaces --eval synthfaces:small

Every variant is timed in the same interleaved rounds (onnxruntime CPU, batch 1, 1 thread), so the ratios against
the fastest exact fp32 form (as exported, relu, maxmul, max; whichever variants are timed) are fair even on a busy
machine. Fidelity is the fp32-vs-int8 embedding cosine on the evaluation
images (with flip, like verification) and the verification accuracy of each variant.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from facekd.io import FacekdError, atomic_write_json, cli_main
from quantize.ptq import VARIANTS, compare, format_table  # noqa: F401  (format_table: the table compare prints)


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
    args = p.parse_args(argv)
    from quantize.ptq import calibration_images, prepare_float_model

    if args.targets:
        from quantize.target import resolve_target, target_table

        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        for t in targets:
            resolve_target(t)  # fail on a bad name before any work
        if args.reference and not Path(args.reference).is_file():
            raise FacekdError(f"--reference not found: {args.reference}")
        with tempfile.TemporaryDirectory(prefix="facekd-qbench-") as tmp:
            fp32, torch_model = prepare_float_model(args.model, Path(tmp), arch=args.arch)
            (Path(tmp) / "ref").mkdir()
            ref = prepare_float_model(args.reference, Path(tmp) / "ref", arch=args.arch)[0] if args.reference \
                else fp32
            images = calibration_images(args.calib, args.num_calib, torch_model=torch_model)
            rows = target_table(fp32, ref, images, targets, runs=args.runs)
        if args.out:
            from evaluate.latency import system_info

            atomic_write_json(args.out, {"targets": rows, "host": system_info(), "runs": args.runs})
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
