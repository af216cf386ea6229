"""Prune a facekd student's channels, fine-tune it (KD from the teacher cache), save, export, measure.

    python -m prune.run runs/NAME/student --target-macs 150M --steps 2 --finetune-steps 200
    python -m prune.run runs/NAME/student/model.safetensors --ratio 0.2 --importance taylor --kd feature+logit

Each round prunes 1/steps of the ratio (Torch-Pruning, per-layer by default, widths rounded to --round-to) and
fine-tunes with `engine.Trainer` and distill's objective. Writes to --out (default runs/NAME/pruned):
model.safetensors (a facekd checkpoint whose kwargs["channels"] rebuild the pruned widths; no pickles),
model.onnx, metrics.json (accuracy before / after pruning / after fine-tune, MACs, params, channel widths,
ONNX parity, latency of pruned vs unpruned measured side by side), manifest.json, rounds/ (per-round
checkpoints: an interrupted job continues with --resume) and finetune/roundK/ (trainer run directories).
Adds rows (stage=pruned) to results/summary.csv.
"""
from __future__ import annotations

import argparse
import copy
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facekd.io import FacekdError, atomic_write_json, cli_main, read_json, sha256_file, write_manifest

KIND = "pruned-student"
FINETUNE_LR_SCALE = 0.2  # fine-tuning starts from trained weights: a fifth of the preset's from-scratch rate


# ----------------------------------------------------------------------------------------------- inputs

def parse_macs(text: str | int | float) -> int:
    """'150M' / '1.5e8' / '0.15G' / 150000000 -> int multiply-adds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise FacekdError(f"--target-macs: cannot read {text!r}; write e.g. 150M, 0.15G or 150000000")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if value <= 0:
        raise FacekdError(f"--target-macs must be positive, got {text!r}")
    return int(value)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (runs/NAME/student) or a file -> the facekd checkpoint file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FacekdError(f"student checkpoint not found: {path}")
    return path


def compare_latency(models: dict[str, str | Path], *, threads: int = 1, runs: int = 100,
                    warmup: int = 10) -> dict[str, dict[str, Any]]:
    """`evaluate.latency.measure_latency` rows keyed by label (interleaved rounds; ratios vs the first model)."""
    from evaluate.latency import measure_latency

    rows = measure_latency([str(p) for p in models.values()], threads=(threads,), runs=runs, warmup=warmup)
    return {label: {k: v for k, v in row.items() if k != "times_ms"} for label, row in zip(models, rows)}


def run_layout(ckpt: Path) -> tuple[str, Path]:
    """(run name, run directory) of a checkpoint at runs/NAME/student/model.safetensors (or anywhere else)."""
    folder = ckpt.parent
    run_dir = folder.parent if folder.name in ("student", "pruned") else folder
    return run_dir.name, run_dir


def channel_config(model: nn.Module) -> dict[str, Any]:
    """The model's per-layer widths as plain data (its module's `channel_config`); the pruned architecture record."""
    fn = getattr(model, "channel_config", None)
    if callable(fn):
        return fn()
    import importlib

    module = importlib.import_module(type(model).__module__)
    if not hasattr(module, "channel_config"):
        raise FacekdError(f"{getattr(model, 'arch', type(model).__name__)} cannot be pruned: its model family has no "
                          "channel_config (it could not be rebuilt from its checkpoint after pruning)")
    return module.channel_config(model)


# ----------------------------------------------------------------------------------------------- objective

def find_teacher_cache(dataset: Any, run_dir: Path, cache_dir: str | None, prefer: str | None = None) -> Any:
    """--cache, else a cache of this dataset, the student's own (manifest fingerprint `prefer`) first."""
    from teachers.cache import TeacherCache, dataset_key, search_dirs

    expect = dataset_key(dataset)
    if cache_dir:
        return TeacherCache.open(cache_dir, expect)
    return TeacherCache.find(expect, search_dirs(run_dir), prefer=prefer)


def student_recipe(ckpt: Path) -> dict[str, Any]:
    """The student's distillation settings (kd, margin, loss weights, data, val...) from its run's manifest."""
    path = ckpt.parent / "manifest.json"
    if not path.is_file():
        return {}
    manifest = read_json(path, "student manifest")
    recipe = {**manifest.get("settings", {}), "teacher_cache": manifest.get("inputs", {}).get("teacher_cache")}
    if not recipe.get("data") and str(manifest.get("dataset", "")).startswith("synthfaces"):
        recipe["data"] = manifest["dataset"]  # students distilled before the spec was recorded: SynthFaces names it
    return recipe


def stage_sets(args: argparse.Namespace, recipe: dict[str, Any], preset: str) -> tuple[str, list[str]]:
    """(fine-tune data, verification sets): --data/--val, else the student's own recipe, else the preset's default."""
    from engine.presets import default_data, default_val

    if args.data:
        data = args.data
        val = args.val if args.val is not None else default_val(data)
    else:
        data = recipe.get("data") or default_data(preset)
        val = args.val if args.val is not None else (recipe.get("val") if recipe.get("val") is not None
                                                     else default_val(data))
    return data, list(val)


# DistillObjective keywords that distill.run records in the student's manifest settings
_RECIPE_KEYS = ("margin", "s", "m", "weights", "temperature", "logit_scale", "feature_metric", "adadistill_m")


def build_objective(kd_spec: str, model: nn.Module, dataset: Any, *, ckpt: Path, run_dir: Path,
                    cache_dir: str | None) -> tuple[nn.Module, str]:
    """Distill's objective (margin loss + the --kd losses against the teacher cache) with the student's recipe.

    Margin, loss weights, temperature... come from the student's manifest (written by distill.run). `auto` reuses
    the student's recorded KD spec when a matching teacher cache exists, else the margin loss alone.
    The margin head starts from the student's own training head when its checkpoint.pt holds a compatible one,
    else from the class centres of the student's embeddings, so the first fine-tune steps refine, not scramble.
    """
    from distill.objective import CachedTeacher, DistillObjective, kd_label, parse_kd

    recipe = student_recipe(ckpt)
    cache = None
    if kd_spec == "auto":
        recorded = recipe.get("kd")
        cache = (find_teacher_cache(dataset, run_dir, cache_dir, recipe.get("teacher_cache"))
                 if recorded not in (None, "none") else None)
        kd = parse_kd(recorded) if cache is not None else ()
        print(f"--kd auto: {kd_label(kd)}" + (f" (the student's recipe, teacher cache {cache.root})" if cache else
                                              " (no recorded KD recipe with a matching teacher cache)"))
    else:
        kd = parse_kd(kd_spec)
        if kd:
            cache = find_teacher_cache(dataset, run_dir, cache_dir, recipe.get("teacher_cache"))
            if cache is None:
                raise FacekdError(f"--kd {kd_spec} needs a teacher cache for {dataset.name}; none in {run_dir / 'cache'}"
                                  " or the default cache root; build it with `python -m teachers.cache` or pass --cache")
    if cache is not None and recipe.get("teacher_cache") and cache.manifest.get("fingerprint") != recipe["teacher_cache"]:
        print(f"note: teacher cache {cache.root} is not the one the student was distilled with")
    teacher = CachedTeacher(cache) if cache is not None else None
    objective = DistillObjective(kd, student_dim=int(model.embedding_dim), num_classes=int(dataset.num_classes),
                                 teacher=teacher, teacher_dim=cache.embedding_dim if cache is not None else None,
                                 centres=cache.centres if cache is not None else None,
                                 **{k: recipe[k] for k in _RECIPE_KEYS if recipe.get(k) is not None})
    if not _load_student_objective(objective, ckpt) and hasattr(objective, "head"):
        with torch.no_grad():
            objective.head.weight.copy_(embedding_centres(model, dataset))
    return objective, kd_label(kd)


def _load_student_objective(objective: nn.Module, ckpt: Path) -> bool:
    path = ckpt.parent / "checkpoint.pt"
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # never a silent fresh start: a damaged file beside the student is worth knowing about
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise FacekdError(f"cannot read the student's training state {path} ({reason}); restore it, or move it "
                          "away to start the margin head from the student's embedding centres") from None
    if not isinstance(state, dict):
        raise FacekdError(f"{path} is not a facekd training checkpoint; move it away to start the margin head "
                          "from the student's embedding centres")
    state = state.get("objective", {})
    own = objective.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        return False
    objective.load_state_dict(state)
    print(f"margin head and KD projection start from the student's training state ({path})")
    return True


@torch.no_grad()
def embedding_centres(model: nn.Module, dataset: Any, per_class: int = 8, batch_size: int = 128) -> torch.Tensor:
    """Normalised mean embedding per class over up to `per_class` images of each class (C x D)."""
    from facedata.transforms import normalize

    labels = np.asarray(dataset.labels)
    # the first per_class images of each class, class by class: one stable sort, not a scan per class
    order = np.argsort(labels, kind="stable")
    first = np.searchsorted(labels[order], labels[order], side="left")
    picks = order[np.arange(len(order)) - first < per_class]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(dataset.num_classes, int(model.embedding_dim))
    for start in range(0, len(picks), batch_size):
        idx = picks[start:start + batch_size]
        images = torch.stack([dataset[int(i)][0] for i in idx]).to(device)
        emb = nn.functional.normalize(model(normalize(images, model.preprocessing)).float(), dim=1).cpu()
        sums.index_add_(0, torch.as_tensor(labels[idx]), emb)
    model.train(was_training)
    return nn.functional.normalize(sums, dim=1)


def make_grad_fn(objective: nn.Module, dataset: Any, *, batches: int = 4, batch_size: int = 32, seed: int = 0):
    """For Taylor importance: accumulate d(loss)/d(weights) over a few training batches (BatchNorm in eval mode)."""
    from facedata.transforms import normalize

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset), size=min(len(dataset), batches * batch_size), replace=False)

    def grad_fn(model: nn.Module) -> None:
        device = next(model.parameters()).device
        objective.to(device)
        was_training = model.training
        model.eval()  # gradients without moving BatchNorm statistics
        for start in range(0, len(picks), batch_size):
            items = [dataset[int(i)] for i in picks[start:start + batch_size]]
            images = torch.stack([it[0] for it in items]).to(device)
            batch = {"images": normalize(images, model.preprocessing),
                     "labels": torch.as_tensor([int(it[1]) for it in items], device=device),
                     "indices": torch.as_tensor([int(it[2]) for it in items], device=device),
                     "flipped": torch.zeros(len(items), dtype=torch.bool, device=device)}
            objective(model(batch["images"]), batch)["loss"].backward()
        model.train(was_training)
        objective.zero_grad(set_to_none=True)

    return grad_fn


# ----------------------------------------------------------------------------------------------- measuring

def evaluate_model(model: nn.Module | Path, val_sets: list[Any], keep_roc: bool = False) -> dict[str, dict]:
    """Verification metrics of a module, or of an ONNX file (whose embeddings quantize.ptq then reuses)."""
    if not val_sets:
        return {}
    from evaluate.embed import OnnxEmbedder, module_embedder
    from evaluate.verify import evaluate_sets

    if isinstance(model, Path):
        results = evaluate_sets(OnnxEmbedder(model, threads=torch.get_num_threads()), val_sets, cache=True)
    else:
        device = str(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                results = evaluate_sets(module_embedder(model, model.preprocessing, device=device), val_sets)
        finally:
            model.train(was_training)
    return {name: {k: v for k, v in m.items() if keep_roc or k != "roc"} for name, m in results.items()}


def recorded_accuracy(ckpt: Path, val_sets: list[Any]) -> dict[str, dict]:
    """The student's final verification metrics from its trainer's metrics.json, when they cover exactly these sets.

    `engine.Trainer` evaluates the weights it saves with the same protocol (`evaluate_sets`, flip on), so the
    numbers are the ones `evaluate_model` would recompute; reusing them saves a full pass over every set.
    """
    path = ckpt.parent / "metrics.json"
    if not val_sets or not path.is_file():
        return {}
    metrics = read_json(path, "student metrics")
    val = metrics.get("val") or {}
    if (metrics.get("model") is None or Path(metrics["model"]).resolve() != ckpt.resolve()
            or (metrics.get("config") or {}).get("ema") or set(val) != {v.name for v in val_sets}):
        return {}
    print(f"unpruned accuracy: from {path} (evaluated by the trainer on the same sets)")
    return {name: {k: v for k, v in m.items() if k != "roc"} for name, m in val.items()}


def onnx_parity(model: nn.Module, onnx_path: Path, batch: int = 4, seed: int = 0) -> float:
    """Max |torch - onnxruntime| over a random batch, relative to the largest torch output magnitude."""
    import onnxruntime as ort

    h, w = model.input_size
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))


def describe(model: nn.Module) -> dict[str, int]:
    from facekd.models import count_macs, count_params

    return {"macs": count_macs(model), "params": count_params(model)}


def results_rows(*, model_name: str, run: str, kd: str, info: dict[str, Any], accuracy: dict[str, dict],
                 onnx_path: Path, latency: dict[str, Any] | None, hardware: str) -> list[dict[str, Any]]:
    """Rows for results/summary.csv (stage=pruned): one per verification set."""
    from facekd.table import model_row

    cells = {"kd": kd, "params": info["params"], "macs": info["macs"], "file_bytes": onnx_path.stat().st_size,
             "embedding_dim": info["embedding_dim"], "hardware": hardware, "artifact": str(onnx_path)}
    if latency:
        from evaluate.latency import table_values

        cells.update(table_values(latency))
    return [model_row("pruned", model_name, run, dataset=name, metrics=metrics, **cells)
            for name, metrics in accuracy.items()]


# ----------------------------------------------------------------------------------------------- the command

def build_parser() -> argparse.ArgumentParser:
    from engine.presets import PRESET_CHOICES
    from prune.core import IMPORTANCES

    p = argparse.ArgumentParser(prog="python -m prune.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="facekd student checkpoint: runs/NAME/student or its model.safetensors")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, help="fraction of channels removed per layer, in (0, 1)")
    how.add_argument("--target-macs", help="prune until the model has this many multiply-adds (e.g. 150M); the ratio "
                                           "is found by bisection")
    p.add_argument("--importance", default="magnitude", help=f"channel importance: {', '.join(IMPORTANCES)} "
                                                             "(default magnitude; taylor uses real batches)")
    p.add_argument("--steps", type=int, default=1, help="iterative prune + fine-tune rounds (default 1)")
    p.add_argument("--round-to", type=int, default=8, help="kept widths are multiples of this (default 8; 1 = off)")
    p.add_argument("--max-layer-ratio", type=float, default=0.7, help="no layer loses more than this fraction "
                                                                      "(default 0.7)")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank channels across layers (off by default: it over-prunes some MobileFaceNet layers)")
    p.add_argument("--finetune-steps", type=int, help="fine-tune steps after each round (default: the preset's "
                                                      "steps / --steps; 0 = no fine-tune)")
    p.add_argument("--kd", default="auto", help="distillation losses for the fine-tune, as distill.run's --kd "
                                                "(feature+logit, none, ...); auto = the student's own recipe when "
                                                "its teacher cache is found, else none")
    p.add_argument("--cache", help="teacher cache directory (default: runs/NAME/cache, then the default cache root)")
    p.add_argument("--data", default=None, help="training set spec for fine-tuning (default: the student's own "
                                               "training set, else synthfaces; smoke preset synthfaces:tiny)")
    p.add_argument("--val", nargs="*", default=None, help="verification sets (default: the SynthFaces set of --data, "
                                                          "else the student's own verification sets)")
    p.add_argument("--preset", default="auto", choices=PRESET_CHOICES, help="training preset (default auto: gpu with "
                                                                            "CUDA, else cpu)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help=f"fine-tune learning rate (default {FINETUNE_LR_SCALE} x the preset's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", help="output directory (default runs/NAME/pruned)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted job in --out")
    p.add_argument("--latency-runs", type=int, default=100, help="interleaved onnxruntime runs per model "
                                                                  "(0 = skip latency)")
    p.add_argument("--results", default=None, help="results table to update (default results/summary.csv, smoke "
                                                   "results/smoke/summary.csv); 'none' = do not write rows")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.presets import PRESETS, make_config, preset_notes, resolve_preset, results_path
    from facekd.io import run_lock
    from facekd.models import load_checkpoint, read_checkpoint_metadata
    from prune.core import PruneConfig, search_ratio

    # every flag is checked, and the target MACs resolved to a ratio, before any data is generated or read
    target = parse_macs(args.target_macs) if args.target_macs is not None else None
    cfg = PruneConfig(ratio=args.ratio if args.ratio is not None else 0.5, importance=args.importance,
                      steps=args.steps, round_to=args.round_to, max_layer_ratio=args.max_layer_ratio,
                      global_pruning=args.global_pruning)
    if args.ratio is None:
        cfg.ratio = min(0.5, cfg.max_layer_ratio)
    cfg.check()
    preset = resolve_preset(args.preset)
    steps_per_round = (args.finetune_steps if args.finetune_steps is not None
                       else max(1, PRESETS[preset]["steps"] // cfg.steps))
    if steps_per_round < 0:
        raise FacekdError(f"--finetune-steps must be >= 0, got {steps_per_round}")
    if args.latency_runs < 0:
        raise FacekdError(f"--latency-runs must be >= 0, got {args.latency_runs}")
    make_config(preset, steps=max(1, steps_per_round), batch_size=args.batch_size, device=args.device,
                lr=args.lr if args.lr is not None else FINETUNE_LR_SCALE * PRESETS[preset]["lr"], out="unused")
    ckpt = resolve_checkpoint(args.checkpoint)
    run, run_dir = run_layout(ckpt)
    out = Path(args.out) if args.out else run_dir / "pruned"
    state_path = out / "rounds" / "state.json"
    if not args.resume and (state_path.is_file() or (out / "model.safetensors").is_file()):
        raise FacekdError(f"{out} holds an earlier pruning job; pass --resume to continue it, or choose another --out")
    header = read_checkpoint_metadata(ckpt)
    student = load_checkpoint(ckpt)
    channel_config(student)  # fail early, one line, for a family that cannot record pruned widths
    base = {**describe(student), "embedding_dim": int(student.embedding_dim)}
    # per-layer pruning's widths do not depend on the importance, so the search needs no data unless it is global
    search_needs_data = cfg.global_pruning and cfg.importance == "taylor"
    if target is not None and target >= base["macs"]:
        raise FacekdError(f"--target-macs {target / 1e6:.1f}M is not below the student's {base['macs'] / 1e6:.1f}M")

    def search(grad_fn) -> None:
        cfg.ratio, found = search_ratio(student, target, cfg, grad_fn=grad_fn)
        print(f"--target-macs {target / 1e6:.1f}M: ratio {cfg.ratio} gives {found / 1e6:.1f}M "
              f"({100 * (found - target) / target:+.1f}%) from {base['macs'] / 1e6:.1f}M")

    if target is not None and not search_needs_data:
        search(None)
    data, val = stage_sets(args, student_recipe(ckpt), preset)
    results = None if str(args.results).lower() == "none" else results_path(preset, args.results)
    with run_lock(out):  # one process owns the output directory: a second --resume is refused
        return _prune(args, ckpt=ckpt, run=run, run_dir=run_dir, out=out, header=header, student=student, cfg=cfg,
                      preset=preset, steps_per_round=steps_per_round, base=base, target=target, data=data, val=val,
                      results=results, notes=preset_notes(preset), search=search if search_needs_data else None)


def _prune(args: argparse.Namespace, *, ckpt: Path, run: str, run_dir: Path, out: Path, header: dict[str, Any],
           student: nn.Module, cfg: Any, preset: str, steps_per_round: int, base: dict[str, int], target: int | None,
           data: str, val: list[str], results: Path | None, notes: str, search: Any) -> int:
    from engine.presets import PRESETS, make_config
    from facedata import open_train_set, open_verification_set
    from facekd.models import export_onnx, load_checkpoint
    from prune.core import ChannelPruner

    state_path = out / "rounds" / "state.json"
    needs_data = steps_per_round > 0 or cfg.importance == "taylor"
    dataset = open_train_set(data) if needs_data else None
    val_sets = [open_verification_set(v) for v in val]
    objective, kd = (build_objective(args.kd, student, dataset, ckpt=ckpt, run_dir=run_dir, cache_dir=args.cache)
                     if dataset is not None else (None, "none"))
    grad_fn = make_grad_fn(objective, dataset) if cfg.importance == "taylor" else None
    if search is not None:
        search(grad_fn)
    settings = {"prune": cfg.to_dict(), "target_macs": target, "finetune_steps_per_round": steps_per_round,
                "kd": kd, "data": data if dataset is not None else None, "preset": preset,
                "lr": args.lr, "batch_size": args.batch_size}
    inputs = {"student": sha256_file(ckpt)}
    from facekd.io import fingerprint

    job = fingerprint({"settings": settings, "inputs": inputs})

    model = copy.deepcopy(student)
    pruner = ChannelPruner(model, cfg, grad_fn=grad_fn)
    if args.resume and state_path.is_file():
        state = read_json(state_path, "pruning state")
        if state.get("job") != job:
            raise FacekdError(f"cannot resume {out}: it was made with other settings or another student; "
                              "choose another --out or drop --resume")
        if state["rounds_done"]:
            pruner.restore(state)
            from facekd.models import load_state_dict_strict, read_state_dict

            last = out / "rounds" / f"round{state['rounds_done']}.safetensors"
            load_state_dict_strict(model, read_state_dict(last), str(last))
            print(f"resumed after round {state['rounds_done']}/{cfg.steps} ({last})")

    accuracy = {"unpruned": recorded_accuracy(ckpt, val_sets) or evaluate_model(student, val_sets)}
    hardware = "none (no fine-tune)"
    for k in range(pruner.rounds_done + 1, cfg.steps + 1):
        pruner.step()
        print(f"round {k}/{cfg.steps}: {describe(model)['macs'] / 1e6:.1f}M MACs, widths {channel_config(model)}")
        if k == cfg.steps:  # with several rounds, earlier rounds were fine-tuned already
            label = "pruned_no_finetune" if cfg.steps == 1 else "pruned_before_last_finetune"
            accuracy[label] = evaluate_model(model, val_sets)
        if steps_per_round > 0:
            from engine.trainer import Trainer, hardware_label

            tcfg = make_config(preset, steps=steps_per_round, batch_size=args.batch_size, device=args.device,
                               lr=args.lr if args.lr is not None else FINETUNE_LR_SCALE * PRESETS[preset]["lr"],
                               out=str(out / "finetune" / f"round{k}"), eval_every=0,
                               # a short warm-up: the weights are trained already, only the momentum is new
                               warmup_steps=min(PRESETS[preset]["warmup_steps"], steps_per_round // 10))
            trainer = Trainer(model, objective, dataset, tcfg, val_sets=())
            trainer.fit(resume=args.resume)
            if getattr(trainer, "ema_model", None) is not None:
                model.load_state_dict(trainer.ema_model.state_dict())
            hardware = hardware_label(trainer.device)
        model.cpu()
        from facekd.models import save_checkpoint

        save_checkpoint(model, out / "rounds" / f"round{k}.safetensors", arch=header["arch"],
                        kwargs={**header.get("kwargs", {}), "channels": channel_config(model)})
        atomic_write_json(state_path, {"job": job, **pruner.state()})
    model.cpu().eval()

    # The deliverable: a checkpoint that rebuilds from plain kwargs, checked by reloading it.
    from facekd.models import save_checkpoint

    info = {**describe(model), "embedding_dim": int(model.embedding_dim)}
    extra = {"pruning": {**settings, "student": str(ckpt), "student_macs": base["macs"], "macs": info["macs"]}}
    model_path = save_checkpoint(model, out / "model.safetensors", arch=header["arch"],
                                 kwargs={**header.get("kwargs", {}), "channels": channel_config(model)}, extra=extra)
    reloaded = load_checkpoint(model_path)
    x = torch.randn(2, 3, *model.input_size)
    with torch.no_grad():
        if not torch.equal(reloaded(x), model(x)):
            raise FacekdError(f"{model_path} does not reproduce the pruned model's outputs after reloading")
    onnx_path = export_onnx(model, out / "model.onnx", metadata={"stage": "pruned"})
    parity = onnx_parity(model, onnx_path)
    if steps_per_round > 0:  # the deployable file itself, so quantize.ptq's fp32 reference is a cache hit
        accuracy["pruned_finetuned"] = evaluate_model(onnx_path, val_sets, keep_roc=True)
    final_roc = {name: m.pop("roc") for name, m in (accuracy.get("pruned_finetuned") or {}).items() if "roc" in m}

    latency = None
    if args.latency_runs > 0:
        with tempfile.TemporaryDirectory(prefix="prune-") as tmp:
            unpruned_onnx = export_onnx(student, Path(tmp) / "unpruned.onnx")
            timed = compare_latency({"unpruned": unpruned_onnx, "pruned": onnx_path}, threads=1,
                                    runs=args.latency_runs)
        latency = {**timed["pruned"], "unpruned_median_ms": timed["unpruned"]["median_ms"]}
        print(f"onnxruntime latency, batch 1, 1 thread, {args.latency_runs} interleaved rounds on {latency['cpu']}: "
              f"unpruned {latency['unpruned_median_ms']:.3f} ms, pruned {latency['median_ms']:.3f} ms, "
              f"time ratio {latency['ratio_vs_first']:.3f} (MACs ratio {info['macs'] / base['macs']:.3f})")

    metrics = {"run": run, "arch": header["arch"], "kd": kd, "student": {**base, "path": str(ckpt)},
               "pruned": {**info, "path": str(model_path), "onnx": str(onnx_path),
                          "onnx_bytes": onnx_path.stat().st_size, "channels": channel_config(model)},
               "macs_ratio": info["macs"] / base["macs"], "params_ratio": info["params"] / base["params"],
               "accuracy": accuracy, "roc": final_roc, "onnx_parity_rel": parity, "latency": latency, "hardware": hardware,
               "settings": settings}
    atomic_write_json(out / "metrics.json", metrics)
    write_manifest(out, KIND, settings, inputs, job=job)
    for stage, acc in accuracy.items():
        for name, m in acc.items():
            print(f"{stage:>20} {name}: accuracy {m['accuracy']:.4f}")
    print(f"pruned: {info['macs'] / 1e6:.1f}M MACs ({100 * (1 - metrics['macs_ratio']):.1f}% fewer), "
          f"{info['params'] / 1e6:.3f}M params, ONNX parity {parity:.1e} -> {model_path}")

    final = accuracy.get("pruned_finetuned") or accuracy.get("pruned_no_finetune") or {}
    # (with several rounds and no fine-tune there is nothing else to report: the last evaluation is the model's)
    final = final or accuracy.get("pruned_before_last_finetune") or {}
    if results is not None and final:
        from facekd.table import upsert_rows

        rows = results_rows(model_name=header["arch"], run=run, kd=kd, info=info, accuracy=final,
                            onnx_path=onnx_path, latency=latency, hardware=hardware)
        upsert_rows([{**row, "notes": notes} for row in rows], results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
