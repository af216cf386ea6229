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
from typing import Any

import numpy as np

from facekd.io import FacekdError, atomic_write_json, cli_main

# key -> (label, quantize_onnx keyword arguments, or {"fp32_form": FORM} for an exact float form of the model)
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "fp32": ("fp32 (as exported)", None),
    "fp32-relu": ("fp32, PReLU as a*x + (1-a)*Relu(x)", {"fp32_form": "relu"}),
    "fp32-maxmul": ("fp32, PReLU as Max(x, a*x)", {"fp32_form": "maxmul"}),
    "fp32-max": ("fp32 + PReLU->Max rewrite", {"fp32_form": "max"}),
    "qdq-s8": ("int8 QDQ S8S8 (plain PTQ, ORT defaults)", dict(activations="s8", prelu="float", fmt="qdq")),
    "qdq-u8": ("int8 QDQ U8S8", dict(activations="u8", prelu="float", fmt="qdq")),
    "qop-u8": ("int8 QOperator U8S8", dict(activations="u8", prelu="float", fmt="qoperator")),
    "qdq-s8-max": ("int8 QDQ S8S8 + PReLU->Max", dict(activations="s8", prelu="max", fmt="qdq")),
    "qdq-u8-max": ("int8 QDQ U8S8 + PReLU->Max", dict(activations="u8", prelu="max", fmt="qdq")),
    "qop-u8-max": ("int8 QOperator U8S8 + PReLU->Max", dict(activations="u8", prelu="max", fmt="qoperator")),
    "qop-u8-max-pt": ("int8 QOperator U8S8 + PReLU->Max, per-tensor w",
                      dict(activations="u8", prelu="max", fmt="qoperator", per_channel=False)),
    "qop-u8-mulmax": ("int8 QOperator U8S8 + PReLU->Max(x,a*x) (default)",
                      dict(activations="u8", prelu="mulmax", fmt="qoperator")),
    "qop-s8-mulmax": ("int8 QOperator S8S8 + PReLU->Max(x,a*x)",
                      dict(activations="s8", prelu="mulmax", fmt="qoperator")),
}


def compare(fp32: str | Path, calib_images: np.ndarray, vset: Any | None, *, runs: int = 100,
            variants: list[str] | None = None, out: str | Path | None = None, log=print) -> list[dict[str, Any]]:
    """Build each variant, time all of them interleaved, measure fidelity; print and return the table rows."""
    from evaluate.latency import measure_latency, system_info

    from quantize.ptq import cosine_rows, profile_ops, quantize_onnx

    fp32 = Path(fp32)
    names = variants or list(VARIANTS)
    names = ["fp32"] + [n for n in names if n != "fp32"]  # the reference comes first
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise FacekdError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="facekd-qbench-") as tmp:
        paths: dict[str, Path] = {}
        for i, name in enumerate(names):
            label, kwargs = VARIANTS[name]
            if kwargs is None:
                paths[name] = fp32
                continue
            path = Path(tmp) / f"v{i}.onnx"
            if "fp32_form" in kwargs:
                from quantize.target import write_fp32_form

                write_fp32_form(fp32, path, kwargs["fp32_form"])
            else:
                log(f"quantising: {label}")
                quantize_onnx(fp32, path, calib_images, **kwargs)
            paths[name] = path
        lat = measure_latency([paths[n] for n in names], threads=(1,), runs=runs, warmup=10) if runs > 0 else None
        ref_emb = None
        for i, name in enumerate(names):
            row: dict[str, Any] = {"key": name, "variant": VARIANTS[name][0], "file_bytes": paths[name].stat().st_size}
            if lat is not None:
                row["latency_ms"] = lat[i]["median_ms"]
                # against the fastest exact fp32 form timed here, never a slow spelling of the same model
                best = min(lat[j]["median_ms"] for j, n in enumerate(names) if n.startswith("fp32"))
                row["latency_ratio"] = lat[i]["median_ms"] / best
            prof = profile_ops(paths[name], runs=20)
            row["top_ops"] = dict(list(prof["ms_per_op_type"].items())[:5])
            if vset is not None:
                from evaluate.embed import OnnxEmbedder, embed_images
                from evaluate.metrics import verification_metrics

                emb = embed_images(OnnxEmbedder(paths[name]), vset.images, flip=True, progress=False)
                ref_emb = emb if ref_emb is None else ref_emb
                cos = cosine_rows(ref_emb, emb)
                row["cos_mean"], row["cos_p1"] = float(cos.mean()), float(np.percentile(cos, 1))
                row["accuracy"] = verification_metrics(emb, vset.issame)["accuracy"]
            rows.append(row)
    base = rows[0]["file_bytes"]
    for row in rows:
        row["size_ratio"] = row["file_bytes"] / base
    log(format_table(rows, vset.name if vset is not None else None, runs))
    if out:
        atomic_write_json(out, {"rows": rows, "host": system_info(), "runs": runs,
                                "dataset": vset.name if vset is not None else None})
    return rows


def format_table(rows: list[dict[str, Any]], dataset: str | None, runs: int) -> str:
    head = f"{'variant':48s} {'ms':>7s} {'x best fp32':>11s} {'MB':>6s} {'size':>6s} {'cos':>7s} {'cos p1':>7s} {'acc':>7s}"
    lines = [f"quantisation options (onnxruntime CPU, batch 1, 1 thread, {runs} interleaved runs, median; fidelity on "
             f"{dataset or '-'} with flip)", head, "-" * len(head)]
    for r in rows:
        def f(key: str, fmt: str) -> str:
            return fmt.format(r[key]) if key in r else "-"
        lines.append(f"{r['variant']:48s} {f('latency_ms', '{:7.2f}'):>7s} {f('latency_ratio', '{:11.2f}'):>11s} "
                     f"{r['file_bytes'] / 1e6:6.3f} {100 * r['size_ratio']:5.1f}% {f('cos_mean', '{:7.4f}'):>7s} "
                     f"{f('cos_p1', '{:7.4f}'):>7s} {f('accuracy', '{:7.4f}'):>7s}")
    lines.append("where the time goes (kernel ms per inference, top op types):")
    for r in rows:
        lines.append(f"  {r['variant']:46s} " + ", ".join(f"{k} {v:.2f}" for k, v in r["top_ops"].items()))
    return "\n".join(lines)


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
