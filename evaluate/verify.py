"""Face-verification accuracy of a model on pair sets: `python -m evaluate.verify MODEL SET [SET ...]`.

MODEL is an ONNX file (run with onnxruntime; preprocessing from its facekd metadata or the flags) or anything
`evaluate.embed.load_embedder` resolves (facekd `.safetensors` checkpoint, insightface `backbone.pth` with `--arch`,
`sface`, `onnx:PATH`). A bare architecture name (`r100`) is refused: it has random weights.
SET is whatever `facedata.open_verification_set` opens: an insightface `.bin`, an LFW folder with pairs.txt, or
`synthfaces` / `synthfaces:tiny` / `synthfaces:small`. The protocol is insightface's (evaluate.metrics).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from evaluate.metrics import plot_roc, verification_metrics
from facekd.io import FacekdError, cli_main

SUMMARY_KEYS = ("accuracy", "std", "tar_at_far", "auc", "eer", "pairs")


def evaluate_sets(embedder, sets: Iterable[Any], flip: bool = True, batch_size: int = 256,
                  roc_dir: str | Path | None = None, nfolds: int | None = None, progress: bool = True,
                  cache: bool = False, embeddings_dir: str | Path | None = None) -> dict[str, dict]:
    """Verification metrics of `embedder` on each set (objects with `name`, `images` (2P,H,W,3) uint8, `issame`).

    Folds: `nfolds` when given, else the set's own `nfolds` (LFW's pairs.txt header, SynthFaces' identity-disjoint
    folds), else 10. Returns `{set name: verification_metrics(...) plus "nfolds"}` (a repeated name gets a `#2`
    suffix); with `roc_dir`, also writes `roc_dir/roc_<name>.png` per set. `cache`: see `evaluate.embed.embed_set`.
    `embeddings_dir`: also keep each set's normalised embeddings there as `<name>.npy` (fp16, 2P x D), so paired
    comparisons between models on the same pairs (results.study) need no second pass over the images.
    """
    from evaluate.embed import embed_set

    results: dict[str, dict] = {}
    for vset in sets:
        name = str(vset.name)
        unique, n = name, 2
        while unique in results:
            unique, n = f"{name}#{n}", n + 1
        if len(vset.images) != 2 * len(vset.issame):
            raise FacekdError(f"set {name}: {len(vset.images)} images for {len(vset.issame)} pairs")
        embeddings = embed_set(embedder, vset, batch_size=batch_size, flip=flip, progress=progress, cache=cache)
        if embeddings_dir is not None:
            import numpy as np

            from facekd.io import atomic_path

            with atomic_path(Path(embeddings_dir) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', unique)}.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, embeddings.astype(np.float16))
        folds = nfolds or int(getattr(vset, "nfolds", 10) or 10)
        results[unique] = verification_metrics(embeddings, vset.issame, nfolds=folds)
        results[unique]["nfolds"] = folds
        if roc_dir is not None:
            roc = results[unique]["roc"]
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", unique)
            plot_roc({unique: (roc["fpr"], roc["tpr"])}, Path(roc_dir) / f"roc_{safe}.png",
                     title=f"ROC {getattr(embedder, 'name', '')} on {unique}")
    return results


def summary(results: dict[str, dict]) -> dict[str, dict]:
    """The results without ROC arrays: what `--json` prints."""
    return {name: {key: metrics[key] for key in SUMMARY_KEYS} for name, metrics in results.items()}


def format_table(results: dict[str, dict]) -> str:
    fars = sorted({far for metrics in results.values() for far in metrics["tar_at_far"]},
                  key=lambda k: -float(k))
    header = ["set", "pairs", "folds", "accuracy +- std"] + [f"TAR@FAR={far}" for far in fars] + ["AUC", "EER"]
    rows = [header]
    fmt = lambda v, spec="{:.4f}": "n/a" if v is None else spec.format(v)  # noqa: E731
    for name, m in results.items():
        rows.append([name, str(m["pairs"]), str(m.get("nfolds", "")), f"{m['accuracy']:.5f} +- {m['std']:.5f}"]
                    + [fmt(m["tar_at_far"].get(far)) for far in fars] + [fmt(m["auc"], "{:.5f}"), fmt(m["eer"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def _open_set(spec: str):
    if not spec.startswith("synthfaces") and not Path(spec).exists():
        raise FacekdError(f"verification set not found: {spec} (give an insightface .bin, an LFW folder with "
                          "pairs.txt, or synthfaces / synthfaces:tiny / synthfaces:small)")
    from facedata import open_verification_set

    return open_verification_set(spec)


def _preprocessing_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.channel_order:
        overrides["channel_order"] = args.channel_order
    for key in ("mean", "std"):
        values = getattr(args, key)
        if values is not None:
            if len(values) not in (1, 3):
                raise FacekdError(f"--{key} takes 1 or 3 values (pixel units), got {len(values)}")
            overrides[key] = values * 3 if len(values) == 1 else values
    if args.input_size is not None:
        overrides["input_size"] = args.input_size
    return overrides


def load_model(model: str, *, arch: str | None = None, device: str = "cpu", threads: int | None = None,
               overrides: dict[str, Any] | None = None, allow_random_weights: bool = False):
    """MODEL argument -> embedder: ONNX files directly, everything else through evaluate.embed.load_embedder
    (which refuses a bare architecture name unless `allow_random_weights`)."""
    path = Path(model)
    looks_like_file = path.suffix.lower() in (".onnx", ".pth", ".pt", ".safetensors") or "/" in model
    if looks_like_file and not path.is_file():
        raise FacekdError(f"model not found: {model}")
    if path.suffix.lower() == ".onnx":
        if arch is not None:
            raise FacekdError(f"--arch {arch}: an ONNX file carries its own architecture; --arch is for checkpoints "
                              "without facekd metadata (insightface backbone.pth)")
        from evaluate.embed import OnnxEmbedder  # imported here: torch is slow to import, errors above are not

        return OnnxEmbedder(path, overrides or None, threads=threads)
    from evaluate.embed import load_embedder

    embedder = load_embedder(model, arch=arch, device=device, allow_random_weights=allow_random_weights)
    if overrides:
        from facedata.transforms import check_preprocessing

        embedder.preprocessing = check_preprocessing({**embedder.preprocessing, **overrides})
    return embedder


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluate.verify",
        description="Verification accuracy (insightface/LFW 10-fold protocol, image + flip), TAR@FAR, AUC, EER.")
    parser.add_argument("model", help="ONNX file, facekd .safetensors checkpoint, insightface backbone.pth (--arch), "
                                      "or an ONNX teacher name (sface, onnx:PATH)")
    parser.add_argument("sets", nargs="+", metavar="SET",
                        help="insightface .bin, LFW folder with pairs.txt, synthfaces[:tiny|:small]")
    parser.add_argument("--json", action="store_true", help="print {set: {accuracy, std, tar_at_far, auc, eer, pairs}}")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-flip", action="store_true", help="embed the image only (default: image + mirror)")
    parser.add_argument("--nfolds", type=int, help="folds (default: the set's own, 10 for a .bin)")
    parser.add_argument("--arch", help="architecture of a checkpoint that does not say (e.g. r100, r50, mbf)")
    parser.add_argument("--device", default="cpu", help="torch device for non-ONNX models (default cpu)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    parser.add_argument("--roc", metavar="PNG", help="write the ROC curves of all sets to this PNG")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--rgb", dest="channel_order", action="store_const", const="RGB",
                       help="override the model's channel order")
    order.add_argument("--bgr", dest="channel_order", action="store_const", const="BGR")
    parser.add_argument("--mean", type=float, nargs="+", help="override mean, pixel units (1 or 3 values)")
    parser.add_argument("--std", type=float, nargs="+", help="override std, pixel units (1 or 3 values)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="override the input size")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--results", metavar="CSV", help="also write one row per set into this results table")
    parser.add_argument("--stage", default="teacher", help="stage of the rows written with --results "
                        "(teacher, student, pruned, int8)")
    parser.add_argument("--run", default="verify", help="run name of the rows written with --results")
    parser.add_argument("--random-weights", action="store_true",
                        help="tests only: accept a bare architecture name (e.g. r100) and evaluate it with random "
                             "weights; its accuracy means nothing, so --results is refused with it")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.nfolds is not None and args.nfolds < 1):
        raise FacekdError("--batch-size and --nfolds must be >= 1")
    if args.random_weights and args.results:
        raise FacekdError("--random-weights is for tests: a random-weight accuracy is no result; drop --results")

    embedder = load_model(args.model, arch=args.arch, device=args.device, threads=args.threads,
                          overrides=_preprocessing_overrides(args), allow_random_weights=args.random_weights)
    sets = [_open_set(spec) for spec in args.sets]
    results = evaluate_sets(embedder, sets, flip=not args.no_flip, batch_size=args.batch_size, nfolds=args.nfolds,
                            progress=not args.quiet)
    if args.roc:
        plot_roc({name: (m["roc"]["fpr"], m["roc"]["tpr"]) for name, m in results.items()}, args.roc,
                 title=f"ROC {embedder.name}")
    if args.json:
        print(json.dumps(summary(results), indent=2))
    else:
        print(f"model: {embedder.name} ({args.model}); preprocessing {embedder.preprocessing}; "
              f"flip: {'no' if args.no_flip else 'yes'}")
        print(format_table(results))
        if args.roc:
            print(f"ROC curves: {args.roc}")
    if args.results:
        from facekd import table

        artifact = Path(args.model)
        cells = {"embedding_dim": embedder.embedding_dim, "hardware": "evaluation only (no training here)"}
        if artifact.is_file():
            cells.update(artifact=str(artifact), file_bytes=artifact.stat().st_size)
        name = args.arch or (artifact.stem if artifact.is_file() else args.model)
        table.upsert_rows([table.model_row(args.stage, name, args.run, dataset=set_name, metrics=metrics, **cells)
                           for set_name, metrics in results.items()], args.results)
        print(f"results: {len(results)} row(s) -> {args.results}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
