"""`python -m results.study`: seeds, statistics against hand computations, the results columns, and one end-to-end
study on synthfaces:tiny that is stopped, killed mid-run and resumed (slow)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from facekd import table
from facekd.io import FacekdError
from results import report, study


def test_seeds_plain_and_per_variant():
    variants = ["none", "logit", "feature"]
    assert study.parse_seeds("0,1,2", variants) == {v: [0, 1, 2] for v in variants}
    assert study.parse_seeds("none:3,logit:1", variants) == {"none": [0, 1, 2], "logit": [0], "feature": [0]}
    assert study.parse_seeds("5,none:2", variants) == {"none": [0, 1], "logit": [5], "feature": [5]}
    with pytest.raises(FacekdError, match="not one of --variants"):
        study.parse_seeds("adadistill:2", variants)
    with pytest.raises(FacekdError, match="neither a seed nor VARIANT:COUNT"):
        study.parse_seeds("x", variants)
    with pytest.raises(FacekdError, match="count >= 1"):
        study.parse_seeds("none:0", variants)


def _fake_study(tmp_path: Path, runs: dict) -> dict:
    """A study record plus metrics.json per run: {(variant, seed): (accuracy, fold std, pair_correct)}."""
    record = {"format": study.STUDY_FORMAT, "settings": {"val": ["set"]}, "runs": {}}
    for (variant, seed), (acc, std, correct) in runs.items():
        run_dir = Path(variant) / f"seed{seed}"
        (tmp_path / run_dir).mkdir(parents=True)
        (tmp_path / run_dir / "metrics.json").write_text(json.dumps({"val": {"set": {"pair_correct": correct}}}))
        record["runs"][study.run_key(variant, seed)] = {
            "variant": variant, "seed": seed, "run_dir": str(run_dir), "wall_s": 10.0 + seed, "images_seen": 640,
            "batch_size": 64, "val": {"set": {"accuracy": acc, "std": std, "nfolds": 10, "tar_at_far_1e3": None}}}
    return record


def test_summary_statistics_match_hand_computation(tmp_path):
    # 10 pairs; per seed, logit fixes pairs none gets wrong (b) and breaks others (c)
    runs = {("none", 0): (0.70, 0.05, "1111111000"), ("none", 1): (0.60, 0.04, "1111110000"),
            ("logit", 0): (0.80, 0.03, "1111111110"), ("logit", 1): (0.90, 0.02, "0111111111"),
            ("feature", 0): (0.50, 0.10, "1111100000")}
    stats = study.summarise(_fake_study(tmp_path, runs), tmp_path)
    logit = stats[("logit", "set")]
    assert logit["seeds"] == [0, 1] and logit["accuracy"] == pytest.approx(0.85)
    # seed 0: b = 2 (pairs 7, 8), c = 0; seed 1: b = 4 (pairs 6..9), c = 1 (pair 0) -> b = 6, c = 1
    assert logit["discordant"] == (6, 1)
    assert logit["p_value"] == pytest.approx(2 * (1 + 7) / 2 ** 7)  # 2 P(X <= 1), X ~ Bin(7, 1/2)
    s = math.sqrt(((0.80 - 0.85) ** 2 + (0.90 - 0.85) ** 2) / 1)
    assert logit["std"] == pytest.approx(s)
    assert logit["ci_high"] - 0.85 == pytest.approx(12.7062047362 * s / math.sqrt(2), abs=1e-9)  # t_{0.975, 1}
    assert logit["delta"] == pytest.approx(0.20)
    # differences 0.10, 0.30: t = 0.2 / (sqrt(0.02) / sqrt 2) = 2, df 1: p = 1 - 2 atan(2) / pi
    assert logit["seed_t_p"] == pytest.approx(1 - 2 * math.atan(2) / math.pi)
    feature = stats[("feature", "set")]  # one seed: t over the 10 folds, population std -> s / sqrt(n) = std / 3
    assert feature["ci_high"] - 0.50 == pytest.approx(2.26215716280 * 0.10 / 3, abs=1e-9)
    assert feature["discordant"] == (0, 2) and "seed_t_p" not in feature
    assert "p_value" not in stats[("none", "set")]
    rows = study.aggregate_rows(stats, {}, "S", "mobilefacenet", tmp_path / "study.json", "cmd")
    by_run = {r["run"]: r for r in rows}
    assert by_run["S/logit"]["n_seeds"] == 2 and by_run["S/logit"]["wall_s"] == 10.5
    assert by_run["S/logit"]["p_value"] == pytest.approx(0.125) and by_run["S/none"]["p_value"] is None


def test_old_tables_stay_valid_and_pandas_reads_new_columns_plainly(tmp_path):
    old_columns = [c for c in table.COLUMNS if c not in table.ADDED_COLUMNS]
    old = tmp_path / "old.csv"
    old.write_text(",".join(old_columns) + "\n" + ",".join(
        {"stage": "student", "model": "m", "run": "r", "dataset": "d", "accuracy": "0.9"}.get(c, "")
        for c in old_columns) + "\n")
    frame = table.read_table(old)
    assert frame.loc[0, "accuracy"] == pytest.approx(0.9) and pd.isna(frame.loc[0, "p_value"])
    table.upsert_rows([table.model_row("study", "m", "S/logit", dataset="d", accuracy=0.8, n_seeds=3, ci_low=0.7,
                                       ci_high=0.9, p_value=1.5e-7, images_seen=12800, wall_s=301.5)], old)
    plain = pd.read_csv(old)  # no converters, no special cases
    assert list(plain.columns) == list(table.COLUMNS)
    for column in table.ADDED_COLUMNS:
        assert pd.api.types.is_numeric_dtype(plain[column]), column
    row = plain[plain["run"] == "S/logit"].iloc[0]
    assert row["p_value"] == pytest.approx(1.5e-7) and row["images_seen"] == 12800 and np.isnan(row["seed"])
    (tmp_path / "bad.csv").write_text(old.read_text().replace(",p_value,", ",pvalue,", 1))
    with pytest.raises(FacekdError, match="unexpected \\['pvalue'\\]"):
        table.read_table(tmp_path / "bad.csv")


def test_changed_settings_are_refused(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(json.dumps({"format": study.STUDY_FORMAT, "runs": {}, "settings": {
        "student": "mobilefacenet", "teacher": "sface", "teacher_weights_sha256": None, "data": "synthfaces:tiny",
        "val": ["synthfaces:tiny"], "preset": "smoke", "steps": 8, "batch_size": None, "distill_options": []}}))
    with pytest.raises(SystemExit) as exc:
        study.main(["--out", str(tmp_path / "s"), "--data", "synthfaces:tiny", "--preset", "smoke", "--steps", "4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps: recorded 8 vs now 4" in err and "use another --out" in err


@pytest.mark.slow
def test_study_end_to_end_stops_resumes_and_reports(tmp_path, monkeypatch):
    from engine.trainer import Trainer
    from facekd.models import create_model, save_checkpoint

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(create_model("mobilefacenet", embedding_dim=256), tmp_path / "teacher.safetensors")
    results = tmp_path / "results" / "summary.csv"
    argv = ["--out", "runs/st", "--teacher", "mobilefacenet", "--teacher-weights", "teacher.safetensors",
            "--data", "synthfaces:tiny", "--preset", "smoke", "--steps", "2", "--variants", "none,logit",
            "--seeds", "0,1", "--eval-every-images", "16", "--workers", "0", "--results", str(results)]
    assert study.main(argv + ["--max-runs", "1"]) == 0
    record = json.loads(Path("runs/st/study.json").read_text())
    assert list(record["runs"]) == ["none/seed0"]
    first_log = Path("runs/st/none/seed0/log.jsonl").read_text()

    original = Trainer._save_checkpoint
    def killed_after_checkpoint(self, done):  # the process dies after the last checkpoint, before metrics.json
        original(self, done)
        if done == self.cfg.steps:
            raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "_save_checkpoint", killed_after_checkpoint)
    with pytest.raises(SystemExit) as exc:
        study.main(argv)
    assert exc.value.code == 130
    assert Path("runs/st/none/seed1/checkpoint.pt").is_file() and not Path("runs/st/none/seed1/metrics.json").exists()
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)

    assert study.main(argv) == 0
    record = json.loads(Path("runs/st/study.json").read_text())
    assert sorted(record["runs"]) == ["logit/seed0", "logit/seed1", "none/seed0", "none/seed1"]
    assert Path("runs/st/none/seed0/log.jsonl").read_text() == first_log  # not redone
    events = [json.loads(line).get("event") for line in Path("runs/st/none/seed1/log.jsonl").read_text().splitlines()]
    assert events.count("resume") == 1  # the killed run continued from its checkpoint
    frame = table.read_table(results)
    runs = frame[(frame["stage"] == "study") & frame["seed"].notna()]
    assert sorted(runs["run"]) == ["st/logit/seed0", "st/logit/seed1", "st/none/seed0", "st/none/seed1"]
    assert (runs["images_seen"] == 32).all() and (runs["wall_s"] > 0).all()
    agg = frame[(frame["stage"] == "study") & frame["n_seeds"].notna()].set_index("run")
    assert list(agg.loc[["st/none", "st/logit"], "n_seeds"]) == [2, 2]
    logit_runs = runs[runs["kd"] == "logit"]["accuracy"]
    assert agg.loc["st/logit", "accuracy"] == pytest.approx(logit_runs.mean())
    assert agg.loc["st/logit", "ci_low"] <= agg.loc["st/logit", "accuracy"] <= agg.loc["st/logit", "ci_high"]
    assert 0 < agg.loc["st/logit", "p_value"] <= 1 and pd.isna(agg.loc["st/none", "p_value"])
    curves = json.loads((tmp_path / "results" / "curves" / "st.json").read_text())
    assert {(r["variant"], r["seed"]) for r in curves["runs"]} == {("none", 0), ("none", 1), ("logit", 0), ("logit", 1)}
    assert all({p["images"] for p in r["points"]} == {16, 32} for r in curves["runs"])

    built = report.build_report(results, tmp_path / "results")
    assert tmp_path / "results" / "plots" / "learning_curves.png" in built["plots"]
    markdown = (tmp_path / "results" / "summary.md").read_text()
    assert "![learning_curves](plots/learning_curves.png)" in markdown
    assert "| logit | 2 |" in markdown and "Differences not marked significant are not claimed." in markdown


@pytest.mark.slow
def test_adopt_records_a_matching_distill_run_and_refuses_others(tmp_path, monkeypatch, capsys):
    from distill import run as distill_run

    monkeypatch.chdir(tmp_path)
    common = ["--data", "synthfaces:tiny", "--preset", "smoke", "--steps", "2", "--workers", "0"]
    assert distill_run.main(["--teacher", "sface", "--kd", "none", "--seed", "1", "--out", "runs/solo",
                             "--no-results", *common]) == 0
    metrics_path = Path("runs/solo/student/metrics.json")
    metrics = json.loads(metrics_path.read_text())
    expected = dict(metrics["val"]["synthfaces:tiny"])
    del metrics["val"]["synthfaces:tiny"]["pair_correct"]  # as written before per-pair decisions existed
    metrics_path.write_text(json.dumps(metrics))
    results = tmp_path / "summary.csv"
    argv = ["--out", "runs/st", "--variants", "none", "--seeds", "1", "--results", str(results), *common]
    with pytest.raises(SystemExit):
        study.main([*argv[:-6], "--data", "synthfaces:tiny", "--preset", "smoke", "--steps", "3", "--workers", "0",
                    "--adopt", "runs/solo", "--out", "runs/other"])
    assert "train.steps: 2 vs 3" in capsys.readouterr().err
    # a no-KD student is the same whoever the teacher: another teacher's study may adopt it, not with other margins
    assert study.main([*argv[:-6], *common, "--teacher", "dlib_resnet", "--variants", "none", "--seeds", "1",
                       "--adopt", "runs/solo", "--out", "runs/dlib", "--plan", "--no-results"]) == 0
    assert "adopt: none/seed1 <- runs/solo/student" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        study.main([*argv[:-6], *common, "--teacher", "dlib_resnet", "--variants", "none", "--seeds", "1",
                    "--margin", "cosface", "--adopt", "runs/solo", "--out", "runs/dlib-m", "--plan", "--no-results"])
    assert "margin: 'arcface' vs 'cosface'" in capsys.readouterr().err
    assert study.main([*argv, "--adopt", "runs/solo", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "adopt: none/seed1 <- runs/solo/student" in out and "remaining (0)" in out
    stored = json.loads(Path("runs/st/none/seed1/metrics.json").read_text())["val"]["synthfaces:tiny"]
    assert stored["pair_correct"] == expected["pair_correct"]  # re-evaluated from model.onnx: same decisions
    assert stored["accuracy"] == pytest.approx(expected["accuracy"])
    # the adopted run's training log comes along: its logged evaluations are the run's learning curve
    assert Path("runs/st/none/seed1/log.jsonl").read_text() == Path("runs/solo/student/log.jsonl").read_text()
    assert study.main(argv) == 0  # nothing left to train; the aggregate row is written
    frame = table.read_table(results).set_index("run")
    assert frame.loc["st/none/seed1", "seed"] == 1 and frame.loc["st/none/seed1", "images_seen"] == 32
    assert frame.loc["st/none/seed1", "notes"] == "adopted: trained as runs/solo/student"
    assert frame.loc["st/none/seed1", "artifact"] == "runs/solo/student/model.onnx"
    assert frame.loc["st/none", "n_seeds"] == 1


def _rows_for_report(p_logit: float, seeds_feature: int = 1):
    rows = []
    for kd, base in (("none", 0.80), ("logit", 0.84), ("feature", 0.81)):
        for s in range(2 if kd != "feature" else seeds_feature):
            rows.append(table.model_row("study", "mobilefacenet", f"S/{kd}/seed{s}", dataset="synthfaces", kd=kd,
                                        accuracy=base + 0.01 * s * (kd == "logit"), seed=s, images_seen=12800))
    rows += [table.model_row("study", "mobilefacenet", "S/none", dataset="synthfaces", kd="none", accuracy=0.80,
                             std=0.0, n_seeds=2, ci_low=0.79, ci_high=0.81, images_seen=12800),
             table.model_row("study", "mobilefacenet", "S/logit", dataset="synthfaces", kd="logit", accuracy=0.845,
                             std=0.007, n_seeds=2, ci_low=0.80, ci_high=0.89, p_value=p_logit, images_seen=12800),
             table.model_row("study", "mobilefacenet", "S/feature", dataset="synthfaces", kd="feature",
                             accuracy=0.81, std=0.02, n_seeds=1, ci_low=0.78, ci_high=0.84, p_value=0.01,
                             images_seen=12800)]
    return rows


def test_report_calls_significant_only_what_every_test_supports(tmp_path):
    path = tmp_path / "s.csv"
    table.upsert_rows(_rows_for_report(p_logit=1e-6), path)
    text = report.study_markdown(table.read_table(path))
    # logit: McNemar p 1e-6, but seed differences 0.04, 0.05 -> t = 9, df 1 -> p = 1 - 2 atan(9) / pi = 0.0704
    t_p = 1 - 2 * math.atan(9.0) / math.pi
    assert f"| logit | 2 | 84.50 ± 0.70 | 80.00 – 89.00 | +4.50 | 1e-06 | {t_p:.3g} | not significant at p < 0.05 |" \
        in text
    # feature: one seed, McNemar p 0.01: significant on these pairs only, and said so
    assert "feature: better, significant on these pairs at p < 0.05 (1 seed: seed variance untested)" in text
    assert "of no KD's 79.00 – 81.00 %" in text and "Differences not marked significant are not claimed." in text


def test_report_compares_the_best_two_kd_variants_by_seed_paired_t(tmp_path):
    rows = []
    for kd, accs in (("none", (0.75, 0.76)), ("logit", (0.84, 0.85)), ("feature+logit", (0.83, 0.83))):
        rows += [table.model_row("study", "mobilefacenet", f"S/{kd}/seed{s}", dataset="synthfaces", kd=kd,
                                 accuracy=a, seed=s, images_seen=12800) for s, a in enumerate(accs)]
        rows.append(table.model_row("study", "mobilefacenet", f"S/{kd}", dataset="synthfaces", kd=kd,
                                    accuracy=sum(accs) / 2, std=0.01, n_seeds=2, ci_low=0.7, ci_high=0.9,
                                    p_value=None if kd == "none" else 1e-9, images_seen=12800))
    path = tmp_path / "s.csv"
    table.upsert_rows(rows, path)
    text = report.study_markdown(table.read_table(path))
    # differences 0.01, 0.02 -> mean 0.015, sd 0.00707, t = 3 with 1 df -> p = 1 - 2 atan(3) / pi
    t_p = 1 - 2 * math.atan(3.0) / math.pi
    assert (f"- best two KD variants: logit vs feature+logit, +1.50 points over 2 matched seeds, seed-paired t p = "
            f"{t_p:.3g}: not significant at p < 0.05") in text


def test_learning_curve_shows_no_kd_and_the_best_kd_variant_with_a_curve(tmp_path):
    def run(variant, seed, final, curve=True):
        points = [{"images": 6400, "set": "synthfaces[:1200]", "accuracy": 0.7}] if curve else []
        points += [{"images": 12800, "set": "synthfaces[:1200]", "accuracy": final},
                   {"images": 12800, "set": "synthfaces", "accuracy": final}]
        return {"variant": variant, "seed": seed, "points": points}

    data = {"study": "S", "final_sets": ["synthfaces"], "teacher": {"name": "sface", "val": {"synthfaces": 0.83}},
            "runs": [run("none", 0, 0.80), run("none", 1, 0.82), run("logit", 0, 0.84), run("feature", 0, 0.86, False),
                     run("adadistill", 0, 0.79)]}
    with_curve, finals, shown = report.curve_variants(data)
    assert shown == ["none", "logit"]  # feature scored higher but was not evaluated during training
    assert finals["none"] == [0.80, 0.82] and len(with_curve) == 4
    (tmp_path / "curves").mkdir()
    (tmp_path / "curves" / "S.json").write_text(json.dumps(data))
    assert report.plot_learning_curves(tmp_path / "curves", tmp_path / "lc.png").stat().st_size > 10_000


def test_a_second_study_on_the_same_directory_is_refused(tmp_path, capsys):
    from filelock import FileLock

    (tmp_path / "s").mkdir()
    with FileLock(str(tmp_path / "s" / ".study.lock")):
        with pytest.raises(SystemExit) as exc:
            study.main(["--out", str(tmp_path / "s"), "--data", "synthfaces:tiny", "--plan"])
    assert exc.value.code == 2
    assert f"error: another results.study is running on {tmp_path / 's'}" in capsys.readouterr().err
    assert study.main(["--out", str(tmp_path / "s"), "--data", "synthfaces:tiny", "--plan"]) == 0  # released


def test_options_the_study_sets_itself_are_not_passed_on(capsys):
    with pytest.raises(SystemExit) as exc:
        study.main(["--out", "runs/x", "--data", "synthfaces:tiny", "--kd", "logit", "--w-logit", "2"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --kd: set by results.study itself (use --variants, --seeds, "
                                               "--out, --eval-every-images)")


@pytest.mark.slow
def test_two_teacher_study_records_each_members_accuracy_and_plots_both(tmp_path, monkeypatch):
    """`--teacher A+B` in a study distils from both caches (as distill.run does) and keeps each member's measured
    accuracy: in study.json, as teacher rows, and as one line per member in the learning-curve plot."""
    from facekd.models import create_model, save_checkpoint
    from teachers import cache as teacher_cache

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    for arch in ("mobilefacenet", "mobilefacenet_s"):
        save_checkpoint(create_model(arch), tmp_path / f"{arch}.safetensors")
        assert teacher_cache.main(["--teacher", arch, "--teacher-weights", f"{arch}.safetensors", "--data",
                                   "synthfaces:tiny", "--val", "synthfaces:tiny", "--workers", "0",
                                   "--out", f"runs/teacher-cache/{arch}"]) == 0
    results = tmp_path / "results" / "summary.csv"
    assert study.main(["--out", "runs/pair", "--eval-every-images", "16", "--teacher", "mobilefacenet+mobilefacenet_s", "--variants", "logit",
                       "--seeds", "0", "--data", "synthfaces:tiny", "--preset", "smoke", "--steps", "2",
                       "--workers", "0", "--results", str(results)]) == 0
    record = json.loads(Path("runs/pair/study.json").read_text())
    members = record["teacher"]["members"]
    assert set(members) == {"mobilefacenet", "mobilefacenet_s"} and "val" not in record["teacher"]
    for arch in members:
        manifest = json.loads(Path(f"runs/teacher-cache/{arch}/manifest.json").read_text())
        assert members[arch]["synthfaces:tiny"] == manifest["teacher_val"]["synthfaces:tiny"]["accuracy"]
    frame = table.read_table(results)
    teachers = frame[frame["stage"] == "teacher"].set_index("model")["accuracy"]
    assert teachers.to_dict() == pytest.approx({a: members[a]["synthfaces:tiny"] for a in members})
    assert (frame["run"] == "pair/logit/seed0").sum() == 1

    from matplotlib.axes import Axes

    lines = []
    monkeypatch.setattr(Axes, "axhline", lambda self, y, **kw: lines.append((round(y, 6), kw["label"])))
    report.build_report(results, tmp_path / "results")
    assert sorted(label.split(" on ")[0] for _, label in lines) == ["teacher mobilefacenet",
                                                                    "teacher mobilefacenet_s"]


def test_a_requested_stop_pauses_the_study_with_exit_0(tmp_path, monkeypatch, capsys):
    """touch RUN/STOP (or SIGTERM) in a background study is a pause, not a failure: exit 0, the run not recorded."""
    from distill import run as distill_run
    from engine.trainer import TrainingStopped

    def stopped(*args, **kwargs):
        raise TrainingStopped("stopped at step 3/200 by runs/st/none/seed0/STOP; checkpoint runs/st/none/seed0/"
                              "checkpoint.pt; run the same command with --resume to continue")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(distill_run, "train_student", stopped)
    assert study.main(["--out", "runs/st", "--variants", "none", "--data", "synthfaces:tiny", "--preset", "smoke",
                       "--workers", "0", "--no-results"]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 3/200" in out and "study st paused; the same command continues it" in out
    assert json.loads(Path("runs/st/study.json").read_text())["runs"] == {}
