"""Side-by-side table of int8 quantisation options: latency, size and fidelity measured in one run.

    python -m quantize.bench runs/NAME/student/model.safetensors --calib synthfaces --eval synthfaces:small

Every variant is timed in the same interleaved rounds (onnxruntime CPU, batch 1, 1 thread), so the ratios against
the fp32 model are fair even on a busy machine. Fidelity is the fp32-vs-int8 embedding cosine on the evaluation
images (with flip, like verification) and the verification accuracy of each variant.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from facekd.io import cli_main
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
    args = p.parse_args(argv)
    from quantize.ptq import calibration_images, prepare_float_model

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
