"""Post-training int8 quantisation of a face model (onnxruntime static quantisation) with a fidelity report.

    python -m quantize.ptq runs/NAME/student/model.safetensors --calib synthfaces --out runs/NAME/int8

Pipeline: export to ONNX (facekd checkpoints) -> onnxruntime pre-processing (shape inference, BatchNorm folding)
-> PReLU rewritten as Max of two convolutions (`quantize.graph`, exact in float) -> `quantize_static` (int8
per-channel symmetric weights, 8-bit activations calibrated on real face crops through the model's own
preprocessing) -> PReLU Max fused to run on 8-bit tensors, twin convs share int8 weights -> metadata copied
(+ quantisation settings), checked.

Format: QOperator by default (QLinearConv carries its int32 bias without per-channel bias-scale tensors, so the
file is ~28% of fp32 instead of ~31% for QDQ); QDQ (`--format qdq`) runs at the same speed with the same numerics
in onnxruntime, which fuses DQ->Conv->Q into the same QLinearConv kernels.

Activations default to uint8 (`--activations u8`): for asymmetric activation ranges uint8 and int8 quantisation are
the same grid shifted by 128 (scale and rounding identical), but onnxruntime's x86 CPU path only fuses residual
Adds (QLinearAdd) and avoids float fallbacks with uint8 activations; `--activations s8` gives the literal S8S8 model.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from facekd.io import FacekdError, atomic_path, atomic_write_json, check_choice, cli_main, provenance, \
    write_manifest
from quantize.core import ACTIVATIONS, FORMATS, METHODS, PRELU_INT8, _ort_version, check_not_quantized, cosine_rows, \
    quantize_onnx, raw_embeddings, read_preprocessing


# ----------------------------------------------------------------------------------------------- models in

def prepare_float_model(model: str | Path, out_dir: Path, *, arch: str | None = None) -> tuple[Path, Any]:
    """(fp32 ONNX path, torch model or None): an `.onnx` is used as is; a checkpoint is exported to out_dir."""
    model = Path(model)
    if not model.is_file():
        raise FacekdError(f"model not found: {model}")
    if model.suffix.lower() == ".onnx":
        return model, None
    from facekd.models import export_onnx, load_checkpoint

    torch_model = load_checkpoint(model, arch=arch)
    path = export_onnx(torch_model, out_dir / "model_fp32.onnx")
    return path, torch_model


# ----------------------------------------------------------------------------------------------- quantising

def choose_method(src: str | Path, dst: str | Path, calib_images: np.ndarray, *, holdout: float = 0.25,
                  log=print, **kwargs: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """`--method auto`: quantise with each calibration method on (1 - holdout) of the images and keep the one whose
    int8 embeddings are closest (mean cosine) to fp32 on the held-out images. Returns (info, {method: cosine})."""
    from quantize.calib import preprocess

    n_hold = max(1, int(round(len(calib_images) * holdout)))
    if len(calib_images) - n_hold < 1:
        raise FacekdError(f"--method auto needs at least 2 calibration images, got {len(calib_images)}")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(calib_images))
    hold, fit = calib_images[order[:n_hold]], calib_images[order[n_hold:]]
    pre = kwargs.get("preprocessing") or read_preprocessing(src)
    x = preprocess(hold, pre)
    ref = raw_embeddings(src, x)
    scores: dict[str, float] = {}
    best: tuple[float, str, dict[str, Any]] | None = None
    with tempfile.TemporaryDirectory(prefix="facekd-auto-") as tmp:
        for method in METHODS[:-1]:
            cand = Path(tmp) / f"{method}.onnx"
            info = quantize_onnx(src, cand, fit, method=method, **kwargs)
            scores[method] = float(cosine_rows(ref, raw_embeddings(cand, x)).mean())
            log(f"method {method}: mean cosine fp32 vs int8 on {n_hold} held-out calibration images = "
                f"{scores[method]:.5f}")
            if best is None or scores[method] > best[0]:
                best = (scores[method], method, info)
                shutil.copyfile(cand, Path(tmp) / "best.onnx")
        assert best is not None
        with atomic_path(dst) as tmp_dst:
            shutil.copyfile(Path(tmp) / "best.onnx", tmp_dst)
    info = {**best[2], "auto": {"scores": scores, "chosen": best[1], "held_out_images": n_hold}}
    return info, scores


# ----------------------------------------------------------------------------------------------- measuring

def profile_ops(path: str | Path, runs: int = 50, seed: int = 0) -> dict[str, Any]:
    """Where the time goes: onnxruntime's profiler (1 thread), kernel time per op type in ms per inference."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="facekd-prof-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        for _ in range(5):
            session.run(None, {inp.name: x})
        # profile only the timed runs: restart the profiler by opening a second session is costly; subtract warm-up
        for _ in range(runs):
            session.run(None, {inp.name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1000.0
            counts[op] = counts.get(op, 0) + 1
    total_runs = runs + 5
    per_op = {k: round(v / total_runs, 4) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}
    return {"ms_per_op_type": per_op, "nodes_per_op_type": {k: counts[k] // total_runs for k in per_op},
            "kernel_ms_total": round(sum(per_op.values()), 4), "runs": total_runs, "threads": 1}


def fidelity_report(fp32: str | Path, int8: str | Path, vset: Any, *, runs: int = 100, flip: bool = True,
                    profile: bool = True, fp32_timed: str | Path | None = None, log=print) -> dict[str, Any]:
    """fp32 vs int8 on a verification set: embedding cosine (mean, 1st percentile), verification metrics of both,
    file sizes, host latency of both measured side by side (interleaved, 1 thread) and the per-op profile.

    `fp32_timed`: an exact, faster form of `fp32` (quantize.target.best_fp32) to time and profile instead, so the
    int8 speed-up is against the best fp32 model, not a slow spelling of it."""
    from evaluate.embed import OnnxEmbedder, embed_set
    from evaluate.latency import measure_latency, system_info
    from evaluate.metrics import verification_metrics

    fp32, int8 = Path(fp32), Path(int8)
    emb, metrics, roc = {}, {}, {}
    for key, path in (("fp32", fp32), ("int8", int8)):
        emb[key] = embed_set(OnnxEmbedder(path), vset, flip=flip, cache=True)
        m = verification_metrics(emb[key], vset.issame, nfolds=getattr(vset, "nfolds", 10))
        metrics[key] = {k: v for k, v in m.items() if k != "roc"}
        roc[key] = m["roc"]
        log(f"{key}: {vset.name} accuracy {m['accuracy']:.4f} +- {m['std']:.4f}")
    cos = cosine_rows(emb["fp32"], emb["int8"])
    sizes = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
    report: dict[str, Any] = {
        "dataset": vset.name, "images": int(len(vset.images)), "pairs": int(len(vset.issame)), "flip": flip,
        "cosine": {"mean": float(cos.mean()), "p1": float(np.percentile(cos, 1)), "min": float(cos.min())},
        "metrics": metrics, "roc": {vset.name: roc["int8"]},  # the int8 model's, for results.report's ROC plot
        "accuracy_drop_points": 100.0 * (metrics["fp32"]["accuracy"] - metrics["int8"]["accuracy"]),
        "file_bytes": sizes, "size_ratio": sizes["int8"] / sizes["fp32"],
    }
    timed = Path(fp32_timed or fp32)
    if runs > 0:
        lat = measure_latency([timed, int8], threads=(1,), runs=runs, warmup=10)
        report["latency"] = {
            "fp32_ms": lat[0]["median_ms"], "int8_ms": lat[1]["median_ms"],
            "int8_over_fp32": lat[1]["median_ms"] / lat[0]["median_ms"],
            "speedup": lat[0]["median_ms"] / lat[1]["median_ms"],
            "settings": f"onnxruntime {_ort_version()} CPU, batch 1, intra_op_num_threads=1, 10 warm-up, {runs} "
                        "runs each interleaved (fp32, int8, fp32, ...), median",
            "fp32_timed": str(timed),
            "host": system_info(),
        }
    if profile:
        report["profile"] = {"fp32": profile_ops(timed), "int8": profile_ops(int8)}
    return report


def format_report(r: dict[str, Any]) -> str:
    m = r["metrics"]
    lines = [f"fidelity on {r['dataset']} ({r['pairs']} pairs, {r['images']} images, flip={r['flip']}):",
             f"  cosine fp32 vs int8: mean {r['cosine']['mean']:.5f}  p1 {r['cosine']['p1']:.5f}  "
             f"min {r['cosine']['min']:.5f}",
             f"  accuracy: fp32 {m['fp32']['accuracy']:.4f}  int8 {m['int8']['accuracy']:.4f}  "
             f"(drop {r['accuracy_drop_points']:+.2f} points)",
             f"  file: fp32 {r['file_bytes']['fp32'] / 1e6:.3f} MB  int8 {r['file_bytes']['int8'] / 1e6:.3f} MB  "
             f"({100 * r['size_ratio']:.1f}%)"]
    if "latency" in r:
        lat = r["latency"]
        lines.append(f"  latency: fp32 {lat['fp32_ms']:.2f} ms  int8 {lat['int8_ms']:.2f} ms  "
                     f"(int8/fp32 {lat['int8_over_fp32']:.2f}, {lat['speedup']:.2f}x faster) [{lat['settings']}; "
                     f"{lat['host'].get('cpu', '')}]")
    if "profile" in r:
        for key in ("fp32", "int8"):
            p = r["profile"][key]
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(p["ms_per_op_type"].items())[:6])
            lines.append(f"  profile {key} (kernel ms/inference, 1 thread): total {p['kernel_ms_total']:.2f}: {top}")
    return "\n".join(lines)


def _float_model_on_meta(path: Path):
    """The float model a facekd-exported ONNX file came from, rebuilt on the meta device (no memory), or None."""
    import torch

    from facekd.models import create_model, read_onnx_metadata

    meta = read_onnx_metadata(path) or {}
    if not meta.get("arch"):
        return None
    try:
        with torch.device("meta"):
            return create_model(meta["arch"], **(meta.get("kwargs") or {}))
    except Exception:  # a foreign or renamed architecture: the counts stay empty rather than wrong
        return None


def results_rows(report: dict[str, Any], *, arch: str, run: str, int8_path: Path, params: int | None = None,
                 macs: int | None = None, embedding_dim: int | None = None, target: str | None = None
                 ) -> list[dict[str, Any]]:
    """The int8 row of `results/summary.csv` (stage int8) from a fidelity report; an ARM target's measured
    instruction count of the chosen form goes into its arm_instr_ column."""
    from facekd.table import model_row

    lat = report.get("latency") or {}
    host = lat.get("host") or {}
    cpu = f"{host.get('cpu', '')} x{host.get('cores', '')} ({host.get('arch', '')})" if host else None  # as latency
    metrics = report["metrics"]["int8"]
    chosen = report["quantization"].get("target") or {}
    arm = {f"arm_instr_{target}": int(chosen["costs"][chosen["form"]])} \
        if target in ("a53", "a72", "a76") and chosen.get("unit") == "instructions" else {}
    return [model_row("int8", arch, run, dataset=report["dataset"], metrics=metrics, kd="",
                      params=params, macs=macs, file_bytes=report["file_bytes"]["int8"],
                      embedding_dim=embedding_dim, host_latency_ms=lat.get("int8_ms"), host_cpu=cpu,
                      hardware="cpu (post-training quantisation, no training)", artifact=str(int8_path),
                      target=target, runtime="onnxruntime", **arm)]


def _write_results(rows: list[dict[str, Any]], path: str, log=print) -> None:
    from facekd import table

    table.upsert_rows(rows, path)
    log(f"results: {len(rows)} row(s) -> {path}")


def _run_name(model: Path) -> str:
    parts = model.resolve().parts
    if "runs" in parts and parts.index("runs") + 1 < len(parts) - 1:
        return parts[parts.index("runs") + 1]
    return model.stem


# ----------------------------------------------------------------------------------------------- options side by side (quantize.bench)

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


def build_parser() -> argparse.ArgumentParser:
    from engine.presets import PRESET_CHOICES

    p = argparse.ArgumentParser(prog="python -m quantize.ptq", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="facekd checkpoint (.safetensors; exported to ONNX first) or an ONNX model")
    p.add_argument("--arch", help="architecture for checkpoints without facekd metadata")
    p.add_argument("--calib", default=None,
                   help="calibration images: synthfaces[:small|:tiny] (train split), an image folder of aligned "
                        "112x112 RGB crops, a .bin, a .npy, or bnstats (data-free; needs a facekd checkpoint); "
                        "default synthfaces, with --preset smoke synthfaces:tiny")
    p.add_argument("--num-calib", type=int, default=None, help="number of calibration images (default 512; "
                                                                "smoke 64)")
    p.add_argument("--preset", default="auto", choices=PRESET_CHOICES,
                   help="smoke: tiny calibration and evaluation data, 64 images, rows to results/smoke/summary.csv "
                        "marked as smoke; the others change nothing here")
    p.add_argument("--method", default="minmax", help=f"calibration method: {', '.join(METHODS)} (default minmax)")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                   help="per-channel weight scales (default on)")
    p.add_argument("--format", default="qoperator",
                   help="qoperator (default: QLinearConv with int32 bias, 28%% of fp32 size) or qdq (QuantizeLinear/"
                        "DequantizeLinear pairs; same speed and numerics, ~31%% size, portable to other EPs)")
    p.add_argument("--activations", default="u8", help="u8 (default; see module doc) or s8")
    p.add_argument("--weights", default="s8", help="s8 (default; symmetric) or u8 (asymmetric) weights")
    p.add_argument("--prelu", default="mulmax",
                   help="int8 PReLU form: mulmax (default: Max(x, a*x), an 8-bit multiply and Max; qoperator only), "
                        "max (Max of the conv and a twin conv with a*W) or float (PRelu left in float)")
    p.add_argument("--no-prelu-rewrite", dest="prelu", action="store_const", const="float",
                   help="same as --prelu float")
    p.add_argument("--target", default="none",
                   help="choose the int8 and fp32 forms for a core by their measured cost there: a53 | a72 | a76 "
                        "(emulated aarch64 instructions; needs evaluate.latency --arm-setup), x86 | host (host ms), "
                        "auto (this machine), none (default: the forms given by --prelu/--format/--activations). "
                        "Overrides --prelu, --format, --activations, --weights")
    p.add_argument("--fp32-form", default="auto",
                   help="PReLU form of the fp32 reference (model_fp32_best.onnx, exact): auto (default: cheapest on "
                        "the target, or on this host), prelu (as exported), relu, maxmul")
    p.add_argument("--keep-float", nargs="*", default=[],
                   help="node names (or 'first' / 'last' weighted layer) left in float")
    p.add_argument("--bnstats-steps", type=int, default=200, help="optimisation steps per bnstats batch")
    p.add_argument("--eval", default=None, help="verification set for the fidelity report "
                   "(default synthfaces, smoke synthfaces:tiny; 'none' skips it)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per model for the latency ratio (0 skips)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-op onnxruntime profile")
    p.add_argument("--compare", action="store_true", help="also print the quantisation-options table "
                   "(python -m quantize.bench)")
    p.add_argument("--out", help="output directory (default: <model dir>/../int8 for runs/NAME/STAGE/, "
                   "else <model dir>/int8)")
    p.add_argument("--run", help="run name for results/summary.csv (default from runs/NAME/...)")
    p.add_argument("--results", default=None, help="results table (default results/summary.csv, smoke "
                                                   "results/smoke/summary.csv; 'none' skips)")
    p.add_argument("--seed", type=int, default=0)
    return p


def calibration_images(spec: str, num: int, *, torch_model: Any, seed: int = 0, bnstats_steps: int = 200,
                       log=print) -> np.ndarray:
    """Images for calibration: loaded from `spec`, or synthesised from the checkpoint for `bnstats`."""
    from quantize.calib import load_calibration_images

    if spec != "bnstats":
        return load_calibration_images(spec, num, seed=seed)
    if torch_model is None:
        raise FacekdError("--calib bnstats needs a facekd checkpoint (BatchNorm statistics live there); a plain "
                          "ONNX model has them folded away. Pass the .safetensors checkpoint instead")
    from quantize.bnstats import bn_match_error, synthesize

    t0 = time.perf_counter()
    images = synthesize(torch_model, num, steps=bnstats_steps, seed=seed)
    log(f"bnstats: synthesised {len(images)} images in {time.perf_counter() - t0:.0f} s; BN statistics error "
        f"{bn_match_error(torch_model, images[:64]):.4f}")
    return images


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.presets import default_data, preset_notes, resolve_preset, results_path

    preset = resolve_preset(args.preset)
    args.calib = args.calib or default_data(preset)
    args.eval = args.eval or default_data(preset)
    args.num_calib = args.num_calib if args.num_calib is not None else (64 if preset == "smoke" else 512)
    if str(args.results).lower() != "none":
        args.results = str(results_path(preset, args.results))
    check_choice(args.method, METHODS, "--method")
    check_choice(args.format, FORMATS, "--format")
    check_choice(args.activations, ACTIVATIONS, "--activations")
    check_choice(args.weights, ("s8", "u8"), "--weights")
    check_choice(args.prelu, PRELU_INT8, "--prelu")
    check_choice(args.fp32_form, ("auto", "prelu", "relu", "maxmul"), "--fp32-form")
    from quantize.target import best_fp32, best_int8, resolve_target, write_fp32_form

    target = None if args.target == "none" else resolve_target(args.target)
    if target and args.method == "auto":
        raise FacekdError("--target and --method auto together would quantise every form with every method; "
                          "pick a --method")
    if args.prelu == "mulmax" and args.format != "qoperator" and not target:
        raise FacekdError("--prelu mulmax needs --format qoperator; use --prelu max with --format qdq")
    if args.num_calib < 1:
        raise FacekdError(f"--num-calib must be >= 1, got {args.num_calib}")
    model = Path(args.model)
    if not model.is_file():
        raise FacekdError(f"model not found: {model}")
    if args.calib == "bnstats" and model.suffix.lower() == ".onnx":
        raise FacekdError("--calib bnstats needs a facekd checkpoint (BatchNorm statistics live there); a plain "
                          "ONNX model has them folded away. Pass the .safetensors checkpoint instead")
    if model.suffix.lower() == ".onnx":
        check_not_quantized(model)
    out = Path(args.out) if args.out else (model.parent.parent / "int8" if "runs" in model.resolve().parts
                                           else model.parent / "int8")
    out.mkdir(parents=True, exist_ok=True)
    vset = None
    if args.eval != "none":  # fail fast on a bad --eval before minutes of calibration
        from facedata import open_verification_set
        vset = open_verification_set(args.eval)
    fp32, torch_model = prepare_float_model(model, out, arch=args.arch)
    images = calibration_images(args.calib, args.num_calib, torch_model=torch_model, seed=args.seed,
                                bnstats_steps=args.bnstats_steps)
    int8 = out / "model_int8.onnx"
    # the fp32 reference every ratio is taken against: its cheapest exact PReLU form on the target (or this host)
    fp32_best, fp32_info = out / "model_fp32_best.onnx", None
    cost_target = target or resolve_target("auto")
    if args.fp32_form != "auto":
        fp32_info = {"form": args.fp32_form, "rewritten": write_fp32_form(fp32, fp32_best, args.fp32_form)}
    elif target or args.runs > 0:
        from quantize.calib import preprocess

        fp32_info = best_fp32(fp32, fp32_best, preprocess(images[:8], read_preprocessing(fp32)), cost_target,
                              runs=max(args.runs, 20))
    else:
        fp32_best = fp32
    t0 = time.perf_counter()
    if target:
        info = best_int8(fp32, int8, images, target, method=args.method, per_channel=args.per_channel,
                         keep_float=args.keep_float, runs=max(args.runs, 20))
    else:
        kwargs = dict(per_channel=args.per_channel, fmt=args.format, activations=args.activations,
                      prelu=args.prelu, weights=args.weights, keep_float=args.keep_float)
        if args.method == "auto":
            info, _ = choose_method(fp32, int8, images, **kwargs)
        else:
            info = quantize_onnx(fp32, int8, images, method=args.method, **kwargs)
    info["calib"] = args.calib
    print(f"quantised {fp32.name} -> {int8} in {time.perf_counter() - t0:.0f} s ({info['method']}, {info['format']}, "
          f"{info['activations']} activations, PReLU form {info['prelu_form']}"
          + (f", chosen for {target}" if target else "") + ")")
    report: dict[str, Any] = {"fp32": str(fp32), "fp32_best": str(fp32_best), "fp32_form": fp32_info,
                              "int8": str(int8), "quantization": info, "provenance": provenance()}
    if vset is not None:
        report.update(fidelity_report(fp32, int8, vset, runs=args.runs, profile=not args.no_profile,
                                      fp32_timed=fp32_best))
        print(format_report(report))
    atomic_write_json(out / "fidelity.json", report)
    print(f"wrote {out / 'fidelity.json'}")
    write_manifest(out, "int8", {k: v for k, v in vars(args).items() if k not in ("out",)},
                   inputs={"model": str(model)}, fidelity=report.get("cosine"))
    if vset is not None and str(args.results).lower() != "none":
        arch = (torch_model is not None and getattr(torch_model, "arch", None)) or _arch_of(fp32)
        float_model = torch_model if torch_model is not None else _float_model_on_meta(fp32)
        params = macs = dim = None
        if float_model is not None:  # int8 keeps the float model's parameter and multiply-add counts
            from facekd.models import count_macs, count_params
            params, macs = count_params(float_model), count_macs(float_model)
            dim = getattr(float_model, "embedding_dim", None)
        run = args.run or _run_name(model)
        rows = results_rows(report, arch=arch, run=f"{run}-{target}" if target else run, int8_path=int8,
                            params=params, macs=macs, embedding_dim=dim, target=target)
        _write_results([{**row, "notes": preset_notes(preset)} for row in rows], args.results)
    if args.compare:
        compare(fp32, images, vset, runs=args.runs)
    return 0


def _arch_of(path: Path) -> str:
    try:
        from facekd.models import read_onnx_metadata

        return str((read_onnx_metadata(path) or {}).get("arch") or path.stem)
    except Exception:
        return path.stem


if __name__ == "__main__":
    raise SystemExit(main())
