"""The whole pipeline in one command: distill -> prune -> quantize -> latency -> report.

    python -m results.pipeline                       # embedded default (SynthFaces), SFace teacher, auto preset
    python -m results.pipeline --preset smoke        # a couple of minutes: tiny data, a few steps each; rows and
                                                     # plots go to results/smoke/, marked as smoke (not results)
    python -m results.pipeline --teacher r100 --teacher-weights backbone.pth   # your own insightface r100

The default teacher is SFace (OpenCV's pretrained recogniser): its knowledge of the default SynthFaces training set
ships in teachers/zoo/, so the default pipeline runs no teacher at all. A teacher with no matching cache is run
once over the training set first (SFace from the `sface` extra; r100 needs --teacher-weights, or is trained).

Each step is the stage's own command (`distill.run`, `prune.run`, `quantize.ptq`, `evaluate.latency`,
`results.report`) run on the artifacts of the step before, under runs/NAME/. Finished steps are recorded in
runs/NAME/pipeline.json with the settings they ran under, so an interrupted pipeline re-run with the same command
skips what is done and resumes the step it was in; changed settings are refused (use another --run).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

from facekd import table
from facekd.io import FacekdError, atomic_write_json, cli_main, fingerprint, read_json

STEPS = ("distill", "prune", "quantize", "litert", "latency", "report")


def build_parser() -> argparse.ArgumentParser:
    from engine.presets import PRESET_CHOICES

    p = argparse.ArgumentParser(prog="python -m results.pipeline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="run name under runs/ (default: pipeline-PRESET)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="parent folder of run directories")
    p.add_argument("--preset", default="auto", choices=PRESET_CHOICES,
                   help="training preset (smoke: tiny data, results to results/smoke/, accuracy meaningless)")
    p.add_argument("--teacher", default="sface", help="teacher: sface (default; cache shipped for SynthFaces), r18..r200 "
                   "(with --teacher-weights), onnx:PATH, or any registry name")
    p.add_argument("--teacher-weights", help="teacher checkpoint (facekd .safetensors or insightface backbone.pth)")
    p.add_argument("--student", default="mobilefacenet", help="student registry name")
    p.add_argument("--data", default=None, help="training set (default synthfaces; smoke: synthfaces:tiny)")
    p.add_argument("--val", nargs="*", default=None, help="verification sets (default: the SynthFaces set of --data)")
    p.add_argument("--kd", default="feature+logit", help="distillation losses (see distill.run --kd)")
    # 0.5: from the measured curve (README): after the KD fine-tune 0.7 / 0.6 / 0.5 all score at or above the
    # unpruned student, and only 0.5 makes the int8 file smaller than 0.70 MB
    p.add_argument("--target-macs-ratio", type=float, default=0.5,
                   help="pruned multiply-adds as a fraction of the student's (default 0.5: half)")
    p.add_argument("--calib", default=None, help="int8 calibration data (default: --data; or bnstats)")
    p.add_argument("--arm", choices=("auto", "on", "off"), default="auto",
                   help="count emulated ARM instructions (auto: when `evaluate.latency --arm-setup` was run)")
    p.add_argument("--litert", choices=("auto", "on", "off"), default="auto",
                   help="also export the pruned model to LiteRT .tflite, fp32 and int8 (auto: when the litert extra "
                        "is installed)")
    p.add_argument("--results", type=Path, default=None, help="results table (default results/summary.csv; smoke: "
                                                              "results/smoke/summary.csv)")
    p.add_argument("--steps", type=int, help="override the preset's training steps (distill and fine-tune)")
    return p


def _resolved(args: argparse.Namespace) -> dict[str, Any]:
    from engine.presets import default_data, default_val, resolve_preset

    preset = resolve_preset(args.preset)
    data = default_data(preset, args.data)
    return {"preset": preset, "teacher": args.teacher, "teacher_weights": args.teacher_weights,
            "student": args.student, "data": data, "val": args.val if args.val is not None else default_val(data),
            "kd": args.kd, "target_macs_ratio": args.target_macs_ratio, "calib": args.calib or data,
            "steps": args.steps}


class Pipeline:
    """Runs the steps in order, recording each finished one in runs/NAME/pipeline.json."""

    def __init__(self, run_dir: Path, settings: dict[str, Any]):
        self.run_dir, self.settings = run_dir, settings
        self.state_path = run_dir / "pipeline.json"
        state = read_json(self.state_path, "pipeline state") if self.state_path.is_file() else None
        if state and state["fingerprint"] != fingerprint(settings):
            changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            raise FacekdError(f"{run_dir} was started with other settings ({', '.join(changed)} differ); "
                              f"use another --run or remove {self.state_path}")
        self.state = state or {"settings": settings, "fingerprint": fingerprint(settings), "done": {}}

    def step(self, name: str, action: Callable[[], Any]) -> None:
        if name in self.state["done"]:
            print(f"[pipeline] {name}: done earlier ({self.state['done'][name]['seconds']:.0f} s), skipping")
            return
        print(f"[pipeline] {name} ...", flush=True)
        start = time.perf_counter()
        action()
        seconds = time.perf_counter() - start
        self.state["done"][name] = {"seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                            time.gmtime())}
        atomic_write_json(self.state_path, self.state)
        print(f"[pipeline] {name}: {seconds:.0f} s", flush=True)


def _litert_enabled(choice: str) -> bool:
    import importlib.util

    installed = all(importlib.util.find_spec(m) is not None for m in ("litert_torch", "ai_edge_litert"))
    if choice == "on" and not installed:
        raise FacekdError("--litert on needs the litert extra: pip install -e '.[litert]'")
    return choice == "on" or (choice == "auto" and installed)


def _arm_enabled(choice: str) -> bool:
    from evaluate.arm.prefix import arm_enabled

    return arm_enabled(choice, log=lambda msg: print(f"[pipeline] {msg}"))


@cli_main
def main(argv: list[str] | None = None) -> int:
    import distill.run
    import evaluate.latency
    import prune.run
    import quantize.ptq
    import results.report
    from facekd.models import count_macs, load_checkpoint

    args = build_parser().parse_args(argv)
    if not 0 < args.target_macs_ratio < 1:
        raise FacekdError(f"--target-macs-ratio must be in (0, 1), got {args.target_macs_ratio}")
    s = _resolved(args)
    litert = _litert_enabled(args.litert)
    from engine.presets import results_path

    args.results = results_path(s["preset"], args.results)
    run_dir = args.runs / (args.run or f"pipeline-{s['preset']}")
    pipeline = Pipeline(run_dir, s)
    student, pruned, int8 = run_dir / "student", run_dir / "pruned", run_dir / "int8"
    results_flag = ["--results", str(args.results)]
    steps = ["--steps", str(s["steps"])] if s["steps"] else []
    val = ["--val", *s["val"]] if s["val"] else []
    start = time.perf_counter()

    def run_distill() -> None:
        argv = ["--teacher", s["teacher"], "--student", s["student"], "--data", s["data"], *val, "--kd", s["kd"],
                "--preset", s["preset"], "--out", str(run_dir), *results_flag, *steps]
        if s["teacher_weights"]:
            argv += ["--teacher-weights", s["teacher_weights"]]
        if (student / "checkpoint.pt").is_file():
            argv.append("--resume")
        distill.run.main(argv)

    def run_prune() -> None:
        macs = count_macs(load_checkpoint(student / "model.safetensors"))
        argv = [str(student), "--target-macs", str(int(macs * s["target_macs_ratio"])), "--data", s["data"], *val,
                "--preset", s["preset"], "--out", str(pruned), *results_flag]
        if s["steps"]:
            argv += ["--finetune-steps", str(s["steps"])]
        if (pruned / "checkpoint.pt").is_file() or (pruned / "state.json").is_file():
            argv.append("--resume")
        prune.run.main(argv)

    def run_quantize() -> None:
        eval_set = s["val"][0] if s["val"] else s["data"]
        num_calib = "64" if s["preset"] == "smoke" else "512"
        quantize.ptq.main([str(pruned / "model.onnx"), "--calib", s["calib"], "--num-calib", num_calib,
                           "--eval", eval_set, "--out", str(int8), "--run", run_dir.name, "--preset", s["preset"],
                           *results_flag])

    def run_litert() -> None:
        import quantize.litert

        num_calib = "64" if s["preset"] == "smoke" else "512"
        from engine.presets import preset_notes

        # quantize.litert knows no presets: the smoke note goes in through --notes; --arm: the latency step's policy
        quantize.litert.main([str(pruned / "model.safetensors"), "--calib", s["calib"], "--num-calib", num_calib,
                              "--eval", s["val"][0] if s["val"] else s["data"], "--out", str(run_dir / "litert"),
                              "--run", run_dir.name, "--results", str(args.results), "--arm", args.arm,
                              "--notes", preset_notes(s["preset"])])

    def run_latency() -> None:
        models = [student / "model.onnx", pruned / "model.onnx", int8 / "model_int8.onnx"]
        missing = [str(m) for m in models if not m.is_file()]
        if missing:
            raise FacekdError(f"latency: model file(s) missing: {', '.join(missing)}")
        argv = [*map(str, models), "--threads", "1", "--table", str(args.results)]
        if _arm_enabled(args.arm):
            argv.append("--arm-emulate")
        evaluate.latency.main(argv)

    pipeline.step("distill", run_distill)
    pipeline.step("prune", run_prune)
    pipeline.step("quantize", run_quantize)
    if litert:  # not recorded as done when skipped: a later run with the extra installed exports then
        pipeline.step("litert", run_litert)
    else:
        print("[pipeline] litert: skipped (--litert off, or the litert extra is not installed: "
              "pip install -e '.[litert]')")
    pipeline.step("latency", run_latency)
    pipeline.step("report", lambda: (table.ensure_literature(args.results),
                                     results.report.main(["--summary", str(args.results)])))
    print(f"\n[pipeline] finished in {time.perf_counter() - start:.0f} s (this invocation); run directory {run_dir}")
    print((args.results.parent / "summary.md").read_text())
    print(f"plots: {args.results.parent / 'plots'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
