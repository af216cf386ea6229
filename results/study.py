"""Train KD variants x seeds at one budget and compare them: `python -m results.study --out runs/NAME`.

    python -m results.study --teacher sface --data synthfaces --preset cpu --variants none,logit --seeds 0,1,2 \\
        --out runs/study-cpu --eval-every-images 3200

Every (variant, seed) is one `distill.run` student (its `train_student`, in this process: the data, the verification
sets and the teacher cache are loaded once) in `runs/NAME/VARIANT/seedS/`. Seed s is the same seed for every
variant: the same student initialisation, data order and flips, so variants differ only in their losses.

Resumable: each finished run is recorded in `runs/NAME/study.json` (with the settings, which a rerun must repeat:
another budget or teacher needs another --out); a rerun trains only what is missing, and a half-finished run
continues from its checkpoint (distill.run --resume). The same command with more variants or seeds extends the
study; the learning-curve options may differ between invocations (they do not change the trained weights).
`--max-runs N` stops after N runs; `--plan` prints what is done and what is left. A second study on the same
directory is refused while one runs (a lock file). `--adopt DIR ...` records students that
`python -m distill.run --kd V --seed S` trained with the same settings (checked against their manifest) as runs of
the study, so CPU time already spent is not spent again.

Results (facekd.table, stage `study`): one row per run (run `NAME/VARIANT/seedS`, with `seed`, `images_seen`,
`wall_s`) and one aggregate row per variant and verification set (run `NAME/VARIANT`): accuracy = the mean over
seeds, std = the sample std over seeds (ddof=1), `n_seeds`, a 95% Student t interval of the mean over seeds
(one seed: the t interval over the 10 fold accuracies, which holds the pairs' sampling only), and `p_value`, the
exact McNemar test against the `none` (no-KD) variant on the same verification pairs: per pair, the protocol's
correct/incorrect decision at its fold's threshold; discordant pairs are summed over matched seeds (seed i against
seed i). McNemar holds the trained models fixed: it does not model seed-to-seed variance, which the CI and the
report's seed-paired t-test (from the run rows) do.

Learning curves: with `--eval-every-images N` each run is evaluated every N images on `--curve-val` (default: the
first 1/5 of the first --val set's pairs, labelled `SET[:PAIRS]`; a set under 3,000 pairs is used whole) and at the end on the full sets; the points go to
`runs/NAME/curves.json` and `results/curves/NAME.json` (beside the results table), which `results.report` plots.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from facekd.io import FacekdError, atomic_write_json, cli_main

STUDY_FORMAT = "facekd-study/1"
# distill.run options the study sets per run; passing them on would make the record lie
STUDY_OWNED = ("--seed", "--kd", "--ablation", "--out", "--resume", "--eval-every", "--val", "--no-results")
DEFAULT_VARIANTS = "none,logit,feature,feature+logit,adadistill"


def build_parser() -> argparse.ArgumentParser:
    from engine.presets import PRESET_CHOICES

    p = argparse.ArgumentParser(prog="python -m results.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Other distill.run options (e.g. --temperature 2, --w-logit 2) are passed on.")
    p.add_argument("--out", required=True, help="study directory runs/NAME (NAME prefixes the results rows' run)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="--kd settings, comma-separated")
    p.add_argument("--seeds", default="0", help="seeds for every variant (0,1,2) and/or a count per variant "
                   "(none:3,logit:3 = seeds 0,1,2 for those; the others get the plain seeds, default 0)")
    p.add_argument("--teacher", default="sface", help="teacher, as distill.run --teacher")
    p.add_argument("--teacher-weights", help="as distill.run --teacher-weights")
    p.add_argument("--student", default="mobilefacenet")
    p.add_argument("--data", default="synthfaces", help="training set spec")
    p.add_argument("--val", nargs="+", metavar="SET", help="verification sets (default: --data for SynthFaces)")
    p.add_argument("--preset", default="cpu", choices=PRESET_CHOICES, help="budget preset (engine.presets)")
    p.add_argument("--steps", type=int, help="training steps (overrides the preset)")
    p.add_argument("--batch-size", type=int, help="batch size (overrides the preset)")
    p.add_argument("--eval-every-images", type=int, default=0,
                   help="learning-curve evaluation every N training images (0: only the final evaluation)")
    p.add_argument("--curve-val", help="set for the intermediate evaluations, SPEC or SPEC@PAIRS (its first PAIRS "
                   "pairs); default: the first --val set @ 1/5 of its pairs (whole when < 3,000 pairs)")
    p.add_argument("--results", default=None, help="results table (default results/summary.csv)")
    p.add_argument("--no-results", action="store_true", help="do not touch the results table")
    p.add_argument("--max-runs", type=int, help="stop after training this many runs (rerun to continue)")
    p.add_argument("--plan", action="store_true", help="print the finished and remaining runs, train nothing")
    p.add_argument("--adopt", nargs="+", metavar="DIR", help="record finished distill.run students (DIR or "
                   "DIR/student) trained with exactly this study's settings as its runs, instead of training them "
                   "again (re-evaluated when their metrics.json lacks the per-pair decisions)")
    p.add_argument("--workers", type=int, help="DataLoader workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    return p


def parse_seeds(text: str, variants: list[str]) -> dict[str, list[int]]:
    """'0,1,2' -> every variant gets seeds 0,1,2; 'none:3,logit:1' -> none 0,1,2, logit 0, the rest the plain ones."""
    from distill.objective import kd_label, parse_kd

    plain, counts = [], {}
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        name, _, count = token.rpartition(":")
        try:
            value = int(count)
        except ValueError:
            raise FacekdError(f"--seeds: {token!r} is neither a seed nor VARIANT:COUNT") from None
        if name:
            label = kd_label(parse_kd(name))
            if label not in variants:
                raise FacekdError(f"--seeds: {name!r} is not one of --variants ({', '.join(variants)})")
            if value < 1:
                raise FacekdError(f"--seeds: {token!r} needs a count >= 1")
            counts[label] = list(range(value))
        elif value < 0:
            raise FacekdError(f"--seeds: seeds must be >= 0, got {value}")
        else:
            plain.append(value)
    plain = sorted(set(plain)) or [0]
    return {v: counts.get(v, plain) for v in variants}


def run_key(variant: str, seed: int) -> str:
    return f"{variant}/seed{seed}"


def _segments_s(log_path: Path) -> float:
    """Wall seconds spent in earlier (killed) segments of a run: from each start/resume event to its last log line."""
    if not log_path.is_file():
        return 0.0
    total, start, last = 0.0, None, None
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") in ("start", "resume"):
            if start is not None and last is not None:
                total += last - start
            start = last = rec.get("time")
        elif start is not None and "time" in rec:
            last = rec["time"]
    if start is not None and last is not None:
        total += last - start
    return total


def curve_points(log_path: Path, batch_size: int) -> list[dict[str, Any]]:
    """Evaluations logged by the trainer: [{"images", "set", "accuracy"}] in step order."""
    points = []
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            for name, m in (rec.get("eval") or {}).items():
                points.append({"images": int(rec["step"]) * batch_size, "set": name, "accuracy": m["accuracy"]})
    return points


def _subset(vset: Any, pairs: int) -> Any:
    """The first `pairs` pairs of a verification set (SynthFaces' folds are contiguous and identity-disjoint)."""
    from facedata.formats import VerificationSet

    ids = getattr(vset, "identities", None)
    return VerificationSet(name=f"{vset.name}[:{pairs}]", images=vset.images[:2 * pairs], issame=vset.issame[:pairs],
                           identities=None if ids is None else ids[:2 * pairs], nfolds=getattr(vset, "nfolds", 10))


def open_curve_set(spec: str | None, val_sets: list) -> Any | None:
    """The intermediate-evaluation set; None when it would be the first val set itself."""
    import facedata

    if spec is None:
        first = val_sets[0]  # 1/5 of a large set; a small one (< 3,000 pairs) whole: 10 folds of a few pairs say nothing
        return _subset(first, len(first.issame) // 5) if len(first.issame) >= 3000 else None
    name, _, pairs = spec.rpartition("@") if "@" in spec else (spec, "", "")
    vset = next((v for v in val_sets if v.name == name), None) or facedata.open_verification_set(name)
    if not pairs:
        return vset
    if not pairs.isdigit() or not 0 < int(pairs) <= len(vset.issame):
        raise FacekdError(f"--curve-val {spec}: PAIRS must be 1..{len(vset.issame)}")
    return _subset(vset, int(pairs)) if int(pairs) < len(vset.issame) else vset


# ----------------------------------------------------------------------------------------------- statistics

def summarise(record: dict[str, Any], study_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (variant, set): seeds, mean, std over seeds, 95% CI, McNemar p vs none, seed-paired t-test p."""
    import numpy as np

    from evaluate.metrics import mcnemar_exact, paired_discordance, t_interval, t_quantile, t_test_p

    runs = record["runs"]
    correct: dict[tuple[str, int, str], str] = {}
    for key, run in runs.items():
        metrics = json.loads((study_dir / run["run_dir"] / "metrics.json").read_text()) \
            if (study_dir / run["run_dir"] / "metrics.json").is_file() else {}
        for name, m in (metrics.get("val") or {}).items():
            if m.get("pair_correct"):
                correct[(run["variant"], run["seed"], name)] = m["pair_correct"]
    out = {}
    variants = list(dict.fromkeys(r["variant"] for r in runs.values()))
    for variant in variants:
        mine = sorted((r for r in runs.values() if r["variant"] == variant), key=lambda r: r["seed"])
        for name in dict.fromkeys(n for r in mine for n in r["val"]):
            have = [r for r in mine if name in r["val"]]
            accs = [r["val"][name]["accuracy"] for r in have]
            s: dict[str, Any] = {"variant": variant, "set": name, "seeds": [r["seed"] for r in have],
                                 "accuracy": sum(accs) / len(accs), "runs": have}
            if len(accs) >= 2:
                s["mean"], s["ci_low"], s["ci_high"] = t_interval(accs)
                s["std"] = float(np.std(accs, ddof=1))
                s["ci_method"] = f"t over {len(accs)} seeds"
            else:
                v = have[0]["val"][name]
                folds = int(v.get("nfolds") or 10)
                half = t_quantile(0.95, folds - 1) * v["std"] / math.sqrt(folds - 1)  # pop. std -> s / sqrt(n)
                s["std"], s["ci_low"], s["ci_high"] = v["std"], accs[0] - half, accs[0] + half
                s["ci_method"] = f"t over {folds} folds (1 seed)"
            tars = [r["val"][name].get("tar_at_far_1e3") for r in have]
            s["tar_at_far_1e3"] = sum(tars) / len(tars) if all(t is not None for t in tars) else None
            base = {r["seed"]: r["val"][name]["accuracy"] for r in runs.values()
                    if r["variant"] == "none" and name in r["val"]}
            matched = [seed for seed in s["seeds"] if seed in base]
            if variant != "none" and matched:
                pairs_a = [correct.get((variant, seed, name)) for seed in matched]
                pairs_b = [correct.get(("none", seed, name)) for seed in matched]
                if all(pairs_a) and all(pairs_b):
                    s["discordant"] = paired_discordance(pairs_a, pairs_b)
                    s["p_value"] = mcnemar_exact(*s["discordant"])
                diffs = [next(r for r in have if r["seed"] == seed)["val"][name]["accuracy"] - base[seed]
                         for seed in matched]
                s["delta"], s["matched_seeds"] = sum(diffs) / len(diffs), matched
                if len(matched) >= 2:
                    s["seed_t_p"] = t_test_p(diffs)
            out[(variant, name)] = s
    return out


def aggregate_rows(stats: dict, record: dict[str, Any], name: str, student: str, artifact: Path,
                   command: str) -> list[dict[str, Any]]:
    from facekd import table

    rows = []
    for (variant, set_name), s in stats.items():
        first = s["runs"][0]
        walls = [r["wall_s"] for r in s["runs"] if r.get("wall_s") is not None]
        rows.append(table.model_row(
            "study", student, f"{name}/{variant}", dataset=set_name, kd=variant,
            accuracy=s["accuracy"], std=s["std"], tar_at_far_1e3=s["tar_at_far_1e3"], n_seeds=len(s["seeds"]),
            ci_low=s["ci_low"], ci_high=s["ci_high"], p_value=s.get("p_value"),
            images_seen=first["images_seen"], wall_s=round(sum(walls) / len(walls), 1) if walls else None,
            artifact=str(artifact), command=command, **first.get("cells", {})))
    return rows


# ----------------------------------------------------------------------------------------------- the study

def distill_rows(student: str, run: str, variant: str, model: Any, metrics: dict[str, Any], artifact: Path,
                 command: str, seed: int, images: int, wall: float | None) -> list[dict[str, Any]]:
    """distill.run's result rows of one run, as study rows."""
    from distill import run as distill_run

    rows = distill_run.result_rows(student=student, run=run, kd=variant, model=model, metrics=metrics,
                                   artifact=artifact, command=command)
    for row in rows:
        row.update(stage="study", seed=seed, images_seen=images, wall_s=wall)
    return rows


def _run_record(variant: str, seed: int, run_dir: Path, wall: float | None, images: int, train: dict[str, Any],
                metrics: dict[str, Any], rows: list[dict[str, Any]], val: dict[str, Any], **extra: Any) -> dict:
    cells = {k: rows[0].get(k) for k in ("params", "macs", "file_bytes", "file_mb", "embedding_dim", "hardware")} \
        if rows else {}
    return {"variant": variant, "seed": seed, "run_dir": str(run_dir), "wall_s": wall, "images_seen": images,
            "batch_size": int(train["batch_size"]), "images_per_s": metrics.get("images_per_s"), "cells": cells,
            "val": {n: {"accuracy": m["accuracy"], "std": m["std"], "nfolds": m.get("nfolds"),
                        "tar_at_far_1e3": (m.get("tar_at_far") or {}).get("1e-3")} for n, m in val.items()},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


def _settings(args: argparse.Namespace, passthrough: list[str]) -> dict[str, Any]:
    from facekd.io import sha256_file

    return {"student": args.student, "teacher": args.teacher,
            "teacher_weights_sha256": sha256_file(args.teacher_weights) if args.teacher_weights else None,
            "data": args.data, "val": args.val, "preset": args.preset, "steps": args.steps,
            "batch_size": args.batch_size, "distill_options": passthrough}


def _distill_args(args: argparse.Namespace, passthrough: list[str], seed: int) -> argparse.Namespace:
    from distill import run as distill_run

    argv = ["--teacher", args.teacher, "--student", args.student, "--data", args.data, "--preset", args.preset,
            "--seed", str(seed), *passthrough]
    for flag, value in (("--teacher-weights", args.teacher_weights), ("--steps", args.steps),
                        ("--batch-size", args.batch_size), ("--workers", args.workers), ("--device", args.device),
                        ("--results", args.results)):
        if value is not None:
            argv += [flag, str(value)]
    if args.no_results:
        argv.append("--no-results")
    return distill_run.build_parser().parse_args(argv)


def _print_plan(plan: list[tuple[str, int]], record: dict[str, Any]) -> None:
    done = [k for k in (run_key(v, s) for v, s in plan) if k in record["runs"]]
    left = [k for k in (run_key(v, s) for v, s in plan) if k not in record["runs"]]
    extra = [k for k in record["runs"] if k not in done]
    print(f"finished ({len(done)}): {', '.join(done) or '-'}")
    if extra:
        print(f"finished, not in this plan ({len(extra)}): {', '.join(extra)}")
    print(f"remaining ({len(left)}): {', '.join(left) or '-'}")
    walls = [r["wall_s"] for r in record["runs"].values() if r.get("wall_s")]
    if left and walls:
        print(f"computed: ~{len(left) * sum(walls) / len(walls) / 60:.0f} min for the remaining runs at the mean "
              f"wall time of the {len(walls)} finished one(s) ({sum(walls) / len(walls) / 60:.1f} min each)")


def _format_stats(stats: dict) -> str:
    p = lambda v: "" if v is None else f"{v:.3g}"  # noqa: E731
    lines = [f"{'variant':<16} {'set':<18} {'seeds':>5} {'accuracy %':>11} {'95% CI %':>15} {'vs none pts':>11} "
             f"{'McNemar p':>10} {'seed t p':>9}"]
    for s in stats.values():
        delta = f"{100 * s['delta']:+.2f}" if "delta" in s else ""
        lines.append(f"{s['variant']:<16} {s['set']:<18} {len(s['seeds']):>5} {100 * s['accuracy']:>11.2f} "
                     f"{100 * s['ci_low']:>7.2f}-{100 * s['ci_high']:<7.2f} {delta:>11} "
                     f"{p(s.get('p_value')):>10} {p(s.get('seed_t_p')):>9}")
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> int:
    from distill.objective import kd_label, parse_kd

    args, passthrough = build_parser().parse_known_args(argv)
    owned = sorted({t.split("=")[0] for t in passthrough} & set(STUDY_OWNED))
    if owned:
        raise FacekdError(f"{', '.join(owned)}: set by results.study itself (use --variants, --seeds, --out, "
                          "--eval-every-images)")
    variants = list(dict.fromkeys(kd_label(parse_kd(v)) for v in args.variants.split(",") if v.strip()))
    if not variants:
        raise FacekdError("--variants is empty")
    seeds = parse_seeds(args.seeds, variants)
    for flag in ("steps", "batch_size", "max_runs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise FacekdError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.eval_every_images < 0:
        raise FacekdError(f"--eval-every-images must be >= 0, got {args.eval_every_images}")
    if args.teacher_weights and not Path(args.teacher_weights).is_file():
        raise FacekdError(f"--teacher-weights not found: {args.teacher_weights}")
    if args.val is None:
        if args.data.split(":")[0] != "synthfaces":
            raise FacekdError("--val is required for data other than SynthFaces (a study compares accuracies)")
        args.val = [args.data]
    base_args = _distill_args(args, passthrough, 0)  # argparse errors in the passed-on options surface here
    from engine.presets import make_config, resolve_preset

    preset = resolve_preset(args.preset)
    cfg = make_config(preset, steps=args.steps, batch_size=args.batch_size)
    eval_every = args.eval_every_images // cfg.batch_size if args.eval_every_images else 0
    if args.eval_every_images and eval_every < 1:
        raise FacekdError(f"--eval-every-images {args.eval_every_images} is less than one batch ({cfg.batch_size})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / ".study.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FacekdError(f"another results.study is running on {out} (lock {out / '.study.lock'})") from None
    try:
        command = " ".join(["python -m results.study", *(argv if argv is not None else sys.argv[1:])])
        return _study(args, passthrough, variants, seeds, preset, cfg, eval_every, base_args, out, command)
    finally:
        lock.release()


def _study(args: argparse.Namespace, passthrough: list[str], variants: list[str], seeds: dict[str, list[int]],
           preset: str, cfg: Any, eval_every: int, base_args: argparse.Namespace, out: Path, command: str) -> int:
    from distill.objective import parse_kd
    from facekd import table

    name = out.name
    record_path = out / "study.json"
    settings = _settings(args, passthrough)
    record = json.loads(record_path.read_text()) if record_path.is_file() else \
        {"format": STUDY_FORMAT, "settings": settings, "runs": {}}
    if record.get("format") != STUDY_FORMAT:
        raise FacekdError(f"{record_path} is not a facekd study record ({STUDY_FORMAT})")
    if record["settings"] != settings:
        diff = sorted(k for k in set(settings) | set(record["settings"])
                      if settings.get(k) != record["settings"].get(k))
        detail = "; ".join(f"{k}: recorded {record['settings'].get(k)!r} vs now {settings.get(k)!r}" for k in diff)
        raise FacekdError(f"{record_path} was made with other settings ({detail}); use another --out")
    plan = [(v, s) for v in variants for s in seeds[v]]
    if args.adopt:
        adopt_runs(args, base_args, record, out, preset, table.DEFAULT_PATH if args.results is None else
                   Path(args.results), command=command)
        atomic_write_json(record_path, record)
    if args.plan:
        _print_plan(plan, record)
        return 0
    todo = [(v, s) for v, s in plan if run_key(v, s) not in record["runs"]]
    results_path = None if args.no_results else Path(args.results or table.DEFAULT_PATH)

    teacher_info: dict[str, Any] | None = None
    if todo:
        import facedata
        from distill import run as distill_run
        from engine.trainer import TrainingStopped

        device = distill_run._device(args.device)
        dataset = facedata.open_train_set(args.data)
        val_sets = [facedata.open_verification_set(v) for v in args.val]
        curve = open_curve_set(args.curve_val, val_sets) if eval_every else None
        curve_sets = [curve] if curve is not None else []
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record_path, record)
        limit = len(todo) if args.max_runs is None else min(args.max_runs, len(todo))
        print(f"study {name}: {len(plan)} runs planned, {len(plan) - len(todo)} finished, training {limit} now "
              f"({cfg.steps} steps x {cfg.batch_size} images each, preset {preset})", flush=True)
        started = time.perf_counter()
        for i, (variant, seed) in enumerate(todo[:limit]):
            kd = parse_kd(variant)
            if kd and teacher_info is None:
                teacher_info = distill_run.resolve_teachers(base_args, dataset, out, preset, device)
                print(f"teacher: {args.teacher} from {teacher_info['how']}", flush=True)
            run_dir = out / variant / f"seed{seed}"
            dargs = _distill_args(args, passthrough, seed)
            dargs.eval_every = eval_every
            dargs.resume = (run_dir / "checkpoint.pt").is_file()
            earlier = _segments_s(run_dir / "log.jsonl") if dargs.resume else 0.0
            eta = ""
            if i:
                per_run = (time.perf_counter() - started) / i
                eta = f", ETA {per_run * (limit - i) / 60:.1f} min for this invocation"
            print(f"[{i + 1}/{limit}] {name}: kd={variant} seed={seed}{' (resuming)' if dargs.resume else ''}{eta}",
                  flush=True)
            t0 = time.perf_counter()
            try:
                result = distill_run.train_student(
                    dargs, kd, dataset=dataset, val_sets=val_sets, out=out, run_dir=run_dir, preset=preset,
                    teacher_info=teacher_info or {"weights": None, "cache": None, "how": "none (--kd none)"},
                    device=device, curve_sets=curve_sets)
            except TrainingStopped as stop:  # RUN/STOP or a signal: a requested pause, not a failure
                print(f"{stop}\nstudy {name} paused; the same command continues it", flush=True)
                return 0
            wall = round(earlier + time.perf_counter() - t0, 1)
            metrics = result["metrics"]
            run_cfg = metrics["config"]
            images = int(run_cfg["steps"]) * int(run_cfg["batch_size"])
            rows = distill_rows(args.student, f"{name}/{run_key(variant, seed)}", variant, result["student"], metrics,
                                run_dir / "model.onnx", command, seed, images, wall)
            if results_path is not None and rows:
                table.upsert_rows(rows, results_path)
            record["runs"][run_key(variant, seed)] = _run_record(
                variant, seed, run_dir.relative_to(out), wall, images, run_cfg, metrics, rows, metrics.get("val") or {},
                eval_every_images=args.eval_every_images)
            if teacher_info is not None and "teacher" not in record:
                # one teacher, or each member of an ensemble (A+B), as far as its cache recorded an accuracy
                members = teacher_info.get("members") or [(args.teacher, teacher_info)]
                caches = [(n, info["cache"]) for n, info in members if info.get("cache") is not None]
                if len(caches) == len(members):
                    accuracy = {n: {s: m.get("accuracy") for s, m in (c.manifest.get("teacher_val") or {}).items()}
                                for n, c in caches}
                    record["teacher"] = {"name": args.teacher, "how": teacher_info["how"], "members": accuracy}
                    if len(caches) == 1:
                        record["teacher"]["val"] = accuracy[args.teacher]
                    if results_path is not None:
                        from teachers.cache import teacher_rows

                        trows = [row for _, c in caches for row in teacher_rows(c.manifest)]
                        if trows:
                            table.upsert_rows(trows, results_path, stamp=False)
            atomic_write_json(record_path, record)
        if limit < len(todo):
            print(f"stopped after {limit} run(s) (--max-runs); {len(todo) - limit} left: rerun the same command "
                  "to continue", flush=True)
    if not record["runs"]:
        print("no finished runs yet")
        return 0

    stats = summarise(record, out)
    if results_path is not None:
        table.upsert_rows(aggregate_rows(stats, record, name, args.student, record_path, command), results_path)
    curves = write_curves(record, out, name, results_path)
    print(f"study {name} ({len(record['runs'])} finished runs; McNemar vs none on the same pairs, seed i vs seed i):")
    print(_format_stats(stats))
    if curves:
        print(f"learning curves: {', '.join(str(c) for c in curves)}")
    return 0


def adopt_runs(args: argparse.Namespace, base_args: argparse.Namespace, record: dict[str, Any], out: Path,
               preset: str, results: Path, command: str) -> None:
    """Record finished distill.run students as study runs after checking that they match the study's settings."""
    import dataclasses

    import facedata
    from distill.objective import DEFAULT_WEIGHTS
    from engine.presets import make_config
    from engine.trainer import RESUMABLE_FIELDS
    from evaluate.embed import OnnxEmbedder
    from evaluate.verify import evaluate_sets
    from facekd import table
    from facekd.io import read_manifest
    from facekd.models import load_checkpoint

    dataset = facedata.open_train_set(args.data)
    val_sets = None
    for given in args.adopt:
        d = Path(given) / "student" if (Path(given) / "student" / "manifest.json").is_file() else Path(given)
        manifest = read_manifest(d) or {}
        if manifest.get("kind") != "student" or not (d / "metrics.json").is_file() or not (d / "model.onnx").is_file():
            raise FacekdError(f"--adopt {given}: not a finished distill.run student (manifest.json, metrics.json, "
                              "model.onnx)")
        st, metrics = manifest["settings"], json.loads((d / "metrics.json").read_text())
        train = st["train"]
        variant, seed = st["kd"], int(train["seed"])
        want_train = dataclasses.asdict(make_config(preset, steps=args.steps, batch_size=args.batch_size,
                                                    lr=base_args.lr, seed=seed, arch=args.student))
        fixed = [k for k in want_train if k not in RESUMABLE_FIELDS or k == "steps"]
        want = {"student": args.student, "teacher": args.teacher, "online_teacher": base_args.online_teacher,
                "margin": base_args.margin, "s": base_args.s, "m": base_args.m, "temperature": base_args.temperature,
                "logit_scale": base_args.logit_scale, "feature_metric": base_args.feature_metric,
                "adadistill_m": base_args.adadistill_m,
                "weights": {n: getattr(base_args, f"w_{n}") for n in DEFAULT_WEIGHTS}}
        if variant == "none":  # no teacher and no KD loss touch a no-KD student: it serves any teacher's study
            want = {k: want[k] for k in ("student", "margin", "s", "m")}
        diff = [f"{k}: {st.get(k)!r} vs {v!r}" for k, v in want.items() if st.get(k) != v]
        diff += [f"train.{k}: {train.get(k)!r} vs {want_train[k]!r}" for k in fixed if train.get(k) != want_train[k]]
        if manifest.get("inputs", {}).get("dataset") != dataset.fingerprint:
            diff.append(f"dataset: not {args.data}")
        if diff:
            raise FacekdError(f"--adopt {given}: trained with other settings than this study ({'; '.join(diff)})")
        key = run_key(variant, seed)
        if key in record["runs"]:
            print(f"adopt: {key} is already in the study; {given} not adopted")
            continue
        val = metrics.get("val") or {}
        if not all(val.get(n, {}).get("pair_correct") for n in args.val):
            if val_sets is None:
                val_sets = [facedata.open_verification_set(v) for v in args.val]
            print(f"adopt: re-evaluating {d / 'model.onnx'} for its per-pair decisions", flush=True)
            val = evaluate_sets(OnnxEmbedder(str(d / "model.onnx")), val_sets, progress=True)
        val = {n: {k: v for k, v in val[n].items() if k != "roc"} for n in args.val}
        run_dir = out / variant / f"seed{seed}"
        if (run_dir / "checkpoint.pt").exists():
            raise FacekdError(f"--adopt {given}: {run_dir} already holds a half-trained {key}; finish or remove it")
        atomic_write_json(run_dir / "metrics.json", {"val": val, "adopted_from": str(d), "config": train})
        if (d / "log.jsonl").is_file():  # its logged evaluations become the run's learning curve
            shutil.copyfile(d / "log.jsonl", run_dir / "log.jsonl")
        images = int(train["steps"]) * int(train["batch_size"])
        wall = round(_segments_s(d / "log.jsonl"), 1) or None
        model = load_checkpoint(d / "model.safetensors")
        rows = distill_rows(args.student, f"{out.name}/{key}", variant, model, {"val": val,
                            "hardware": metrics.get("hardware")}, d / "model.onnx", command, seed, images, wall)
        for row in rows:  # the same model may serve several studies: one row each, all naming its artifact
            row["notes"] = f"adopted: trained as {d}"
        if not args.no_results and rows:
            table.upsert_rows(rows, results)
        record["runs"][key] = _run_record(variant, seed, run_dir.relative_to(out), wall, images, train, metrics,
                                          rows, val, adopted_from=str(d))
        accs = ", ".join(f"{n} {m['accuracy']:.4f}" for n, m in val.items())
        print(f"adopt: {key} <- {d} (accuracy {accs})")


def write_curves(record: dict[str, Any], out: Path, name: str, results_path: Path | None) -> list[Path]:
    """curves.json: every run's logged evaluations by images seen, plus the teacher's accuracy, for results.report."""
    runs = []
    for run in record["runs"].values():
        points = curve_points(out / run["run_dir"] / "log.jsonl", run["batch_size"])
        if points:
            runs.append({"variant": run["variant"], "seed": run["seed"], "points": points})
    if not any(len({p["images"] for p in r["points"]}) > 1 for r in runs):
        return []
    data = {"study": name, "settings": record["settings"], "final_sets": list(record["settings"]["val"] or []),
            "teacher": record.get("teacher"), "runs": runs}
    paths = [out / "curves.json"]
    if results_path is not None:
        paths.append(results_path.parent / "curves" / f"{name}.json")
    for path in paths:
        atomic_write_json(path, data)
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
