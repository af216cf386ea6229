"""`python -m distill.run`: flag errors, teacher resolution errors, and one end-to-end smoke run (slow)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from distill import run


def test_unknown_kd_is_one_line_error_listing_valid_names(capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(["--teacher", "r100", "--kd", "feature+dark", "--data", "synthfaces:tiny"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown value 'dark'" in err and "none, feature, logit, relational, adadistill" in err


def test_non_default_data_without_teacher_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for ident in ("alice", "bob"):
        (tmp_path / "faces" / ident).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(tmp_path / "faces" / ident / f"{k}.png")
    with pytest.raises(SystemExit) as exc:
        run.main(["--teacher", "r100", "--data", str(tmp_path / "faces"), "--kd", "feature", "--preset", "smoke"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no r100 teacher for" in err and "--teacher-weights" in err and "teachers.train" in err


def test_find_trained_teacher_matches_arch_and_dataset(tmp_path):
    from facekd.io import write_manifest

    d = tmp_path / "r18" / "teacher"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    write_manifest(d, "teacher", {"arch": "r18"}, inputs={"dataset": "fp1"}, model="model.safetensors")
    assert run.find_trained_teacher("r18", "fp1", runs=tmp_path) == d / "model.safetensors"
    assert run.find_trained_teacher("r18", "fp2", runs=tmp_path) is None
    assert run.find_trained_teacher("r50", "fp1", runs=tmp_path) is None


@pytest.mark.slow
def test_smoke_feature_logit_end_to_end(tmp_path, monkeypatch, capsys):
    from facekd.models import create_model, save_checkpoint

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    # a tiny teacher: a 256-d MobileFaceNet (random weights), so the 128-d student needs the projection
    save_checkpoint(create_model("mobilefacenet", embedding_dim=256), tmp_path / "teacher.safetensors")
    results = tmp_path / "summary.csv"
    argv = ["--teacher", "mobilefacenet", "--teacher-weights", str(tmp_path / "teacher.safetensors"),
            "--data", "synthfaces:tiny", "--preset", "smoke", "--kd", "feature+logit", "--steps", "4",
            "--batch-size", "16", "--workers", "0", "--out", "runs/smoke", "--results", str(results)]
    assert run.main(argv) == 0
    student = tmp_path / "runs" / "smoke" / "student"
    for name in ("model.safetensors", "checkpoint.pt", "metrics.json", "log.jsonl", "manifest.json"):
        assert (student / name).is_file(), name
    state = torch.load(student / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4 and "proj.weight" in state["objective"]
    logged = [json.loads(line) for line in (student / "log.jsonl").read_text().splitlines()]
    assert any({"ce", "feature", "logit", "loss"} <= set(rec) for rec in logged)
    manifest = json.loads((student / "manifest.json").read_text())
    assert manifest["settings"]["kd"] == "feature+logit" and manifest["inputs"]["teacher_cache"]
    assert (tmp_path / "runs" / "smoke" / "cache" / "embeddings.npy").is_file()
    rows = list(csv.DictReader(results.open()))
    assert rows and all(r["stage"] == "student" and r["kd"] == "feature+logit" for r in rows)
    assert {r["dataset"] for r in rows} == {"synthfaces:tiny"}
    from evaluate.verify import main as verify_main
    from facekd.models import count_macs, count_params, load_checkpoint

    model = load_checkpoint(student / "model.safetensors")
    for r in rows:  # the row's numbers are its artifact's, re-measured independently
        assert (int(r["params"]), int(r["macs"])) == (count_params(model), count_macs(model))
        capsys.readouterr()
        assert verify_main([r["artifact"], r["dataset"], "--json"]) == 0
        printed = capsys.readouterr().out
        again = json.loads(printed[printed.index("{\n"):])[r["dataset"]]
        assert float(r["accuracy"]) == pytest.approx(again["accuracy"], abs=1e-9)


def test_default_data_trains_teacher_after_printing_estimate(tmp_path, monkeypatch, capsys):
    """No weights, no cache, no earlier teacher: on SynthFaces the teacher is trained first via teachers.train."""
    import argparse

    from teachers import train

    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(run, "estimate_teacher_training", lambda arch, preset, device, **kw: 754.0)
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or 0)
    ds = type("DS", (), {"name": "synthfaces:tiny", "fingerprint": "fp", "__len__": lambda self: 64})()
    monkeypatch.setattr("teachers.cache.dataset_key",
                        lambda d: {"dataset": "fp", "num_images": 64, "synthfaces_version": "1.0"})
    args = argparse.Namespace(teacher_weights=None, teacher="r18", online_teacher=False, data="synthfaces:tiny",
                              seed=3, results=None, no_results=True, device=None)
    info = run.resolve_teacher(args, ds, tmp_path / "runs" / "x", "cpu", "cpu")
    out = capsys.readouterr().out
    assert "estimated 12.6 min" in out and "training one first" in out
    assert calls == [["--arch", "r18", "--data", "synthfaces:tiny", "--preset", "cpu", "--out",
                      str(tmp_path / "runs" / "x" / "teacher"), "--seed", "3", "--no-results"]]
    assert info["weights"] == tmp_path / "runs" / "x" / "teacher" / "model.safetensors"


def test_ablation_writes_one_run_and_row_per_kd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []

    class Tiny(torch.nn.Sequential):
        embedding_dim, input_size = 8, (4, 4)

    def fake_train(args, kd, *, dataset, val_sets, out, run_dir, preset, teacher_info, device):
        seen.append((kd, run_dir))
        metrics = {"val": {"synthfaces:tiny": {"accuracy": 0.75, "std": 0.1, "tar_at_far": {"1e-3": 0.5}}},
                   "hardware": "cpu test"}
        return {"metrics": metrics, "student": Tiny(torch.nn.Flatten(), torch.nn.Linear(48, 8))}

    monkeypatch.setattr(run, "train_student", fake_train)
    monkeypatch.setattr(run, "resolve_teacher", lambda *a: {"weights": None, "cache": None, "how": "test"})
    results = tmp_path / "summary.csv"
    assert run.main(["--teacher", "r18", "--data", "synthfaces:tiny", "--ablation", "none,feature+logit,adadistill",
                     "--preset", "smoke", "--out", "runs/abl", "--results", str(results)]) == 0
    assert [k for k, _ in seen] == [(), ("feature", "logit"), ("adadistill",)]
    assert [d.as_posix() for _, d in seen] == [
        "runs/abl/ablation/none", "runs/abl/ablation/feature+logit", "runs/abl/ablation/adadistill"]
    rows = list(csv.DictReader(results.open()))
    assert sorted((r["run"], r["kd"]) for r in rows) == [("abl/ablation/adadistill", "adadistill"),
                                                        ("abl/ablation/feature+logit", "feature+logit"),
                                                        ("abl/ablation/none", "none")]
    assert all(float(r["accuracy"]) == 0.75 and r["tar_at_far_1e3"] == "0.5" for r in rows)


def test_teacher_accuracy_recorded_in_its_cache_becomes_the_teacher_row(tmp_path, monkeypatch):
    """A cache built with `teachers.cache --val` (the shipped SFace one) carries the teacher's accuracy; every
    distill run that uses it writes that row, stamped with the command that measured it, not its own."""
    monkeypatch.chdir(tmp_path)

    class Tiny(torch.nn.Sequential):
        embedding_dim, input_size = 8, (4, 4)

    manifest = {"key": {"teacher_arch": "sface"}, "embedding_dim": 128,
                "teacher_val": {"synthfaces:tiny": {"accuracy": 0.85, "std": 0.15, "pairs": 60,
                                                    "tar_at_far": {"1e-3": 0.4}}},
                "provenance": {"command": "python -m teachers.cache --teacher sface --val synthfaces:tiny",
                               "git_commit": "abc123", "timestamp": "2026-11-28T00:00:00Z", "facekd_version": "0.1.0"}}
    cache = type("Cache", (), {"manifest": manifest})()
    metrics = {"val": {"synthfaces:tiny": {"accuracy": 0.7, "std": 0.1, "tar_at_far": {"1e-3": 0.3}}},
               "hardware": "cpu test"}
    monkeypatch.setattr(run, "train_student", lambda *a, **k: {"metrics": metrics,
                                                               "student": Tiny(torch.nn.Flatten(), torch.nn.Linear(48, 8))})
    monkeypatch.setattr(run, "resolve_teacher", lambda *a: {"weights": None, "cache": cache, "how": "test"})
    results = tmp_path / "summary.csv"
    for _ in range(2):  # a second run replaces the row instead of adding one
        assert run.main(["--teacher", "sface", "--data", "synthfaces:tiny", "--preset", "smoke", "--out", "runs/a",
                         "--results", str(results)]) == 0
    rows = list(csv.DictReader(results.open()))
    teacher = [r for r in rows if r["stage"] == "teacher"]
    assert len(teacher) == 1 and len(rows) == 2
    (row,) = teacher
    assert (row["model"], row["run"], row["dataset"], row["accuracy"]) == ("sface", "teacher-cache",
                                                                           "synthfaces:tiny", "0.85")
    assert row["command"] == manifest["provenance"]["command"] and row["git_commit"] == "abc123"


def test_sface_on_default_synthfaces_uses_the_shipped_cache_without_loading_sface(tmp_path, monkeypatch):
    import argparse

    import teachers.cache
    from facedata import synthfaces

    def must_not_load(*a, **k):
        raise AssertionError("the teacher was loaded although a shipped cache matches")

    monkeypatch.setattr(teachers.cache, "teacher_embedder", must_not_load)
    monkeypatch.chdir(tmp_path)  # no runs/ caches here: only the zoo can match
    ds = type("DS", (), {"name": "synthfaces", "__len__": lambda self: 20000,
                         "fingerprint": synthfaces.dataset_fingerprint(synthfaces.settings_for("default"), "train")})()
    args = argparse.Namespace(teacher="sface", data="synthfaces")
    cache = run.teacher_cache(args, ds, tmp_path / "runs" / "x", None, "cpu")
    assert cache.root == teachers.cache.ZOO_DIR / "sface-synthfaces" and cache.num_images == 20000


@pytest.mark.slow
def test_two_teachers_each_get_a_cache_and_one_projection_and_ensemble_errors(tmp_path, monkeypatch, capsys):
    import facedata
    from facekd.io import write_manifest
    from facekd.models import create_model, save_checkpoint

    monkeypatch.chdir(tmp_path)
    fp = facedata.open_train_set("synthfaces:tiny").fingerprint
    torch.manual_seed(0)
    dims = {}
    for arch, dim in (("mobilefacenet", 64), ("mobilefacenet_s", 32)):  # two teachers trained earlier on this data
        d = tmp_path / "runs" / arch / "teacher"
        d.mkdir(parents=True)
        model = create_model(arch, embedding_dim=dim)
        dims[arch] = model.embedding_dim
        save_checkpoint(model, d / "model.safetensors")
        write_manifest(d, "teacher", {"arch": arch}, inputs={"dataset": fp}, model="model.safetensors")
    argv = ["--teacher", "mobilefacenet+mobilefacenet_s", "--data", "synthfaces:tiny", "--preset", "smoke",
            "--kd", "feature+logit", "--steps", "3", "--batch-size", "16", "--workers", "0", "--out", "runs/two",
            "--no-results"]
    assert run.main(argv) == 0
    student = tmp_path / "runs" / "two" / "student"
    state = torch.load(student / "checkpoint.pt", map_location="cpu", weights_only=True)
    # one projection per teacher, stacked
    assert tuple(state["objective"]["proj.weight"].shape) == (sum(dims.values()), 128) and dims["mobilefacenet"] == 64
    for arch, dim in dims.items():
        emb = np.load(tmp_path / "runs" / "two" / f"cache-{arch}" / "embeddings.npy")
        assert emb.shape == (64, 2, dim)
    manifest = json.loads((student / "manifest.json").read_text())
    assert len(manifest["inputs"]["teacher_caches"]) == 2
    # the final evaluation keeps its embeddings for paired tests (60 pairs -> 120 images)
    assert np.load(student / "val_embeddings" / "synthfaces_tiny.npy").shape == (120, 128)
    for bad, message in ((["--teacher", "mobilefacenet+mobilefacenet"], "distinct teacher names"),
                         (["--teacher", "mobilefacenet+mobilefacenet_s", "--online-teacher"], "take one teacher"),
                         (["--teacher", "sface", "--online-teacher", "--centre-teacher"], "drop --online-teacher")):
        with pytest.raises(SystemExit) as exc:
            run.main([*bad, "--data", "synthfaces:tiny", "--preset", "smoke", "--out", "runs/bad"])
        assert exc.value.code == 2 and message in capsys.readouterr().err
class _KDNet(torch.nn.Module):
    """A ~30k-parameter face model that exports to ONNX (distill.run delivers an ONNX file): seconds per run."""

    def __init__(self, embedding_dim: int = 32) -> None:
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.PReLU(8),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.PReLU(16),
                                  nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 7 * 7, embedding_dim))
        self.embedding_dim, self.input_size = embedding_dim, (112, 112)
        self.preprocessing = {"input_size": [112, 112], "channel_order": "RGB", "mean": [127.5] * 3,
                              "std": [127.5] * 3}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_feature_kd_moves_the_student_towards_its_teacher(tmp_path, monkeypatch):
    """Same seed, data and steps; only --kd differs. The feature-KD student ends closer (cosine) to the teacher's
    cached embeddings than the no-KD student: a KD loss disconnected from the student fails this."""
    import facedata
    from facedata.transforms import normalize
    from facekd.models import create_model, load_checkpoint, register_model, save_checkpoint

    name = "distill-test-kdnet"
    register_model(name, kind="any")(lambda **kw: _KDNet(**kw))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(123)  # the teacher: a fixed random 32-d net of the student's own architecture
    save_checkpoint(create_model(name), tmp_path / "teacher.safetensors")
    common = ["--teacher", name, "--teacher-weights", str(tmp_path / "teacher.safetensors"), "--student", name,
              "--data", "synthfaces:tiny", "--val", "--preset", "smoke", "--steps", "40", "--batch-size", "16",
              "--workers", "0", "--no-results"]
    assert run.main([*common, "--kd", "feature", "--out", "runs/kd"]) == 0
    assert run.main([*common, "--kd", "none", "--out", "runs/nokd"]) == 0

    train = facedata.open_train_set("synthfaces:tiny")
    images = torch.stack([train[i][0] for i in range(len(train))])
    teacher = np.load(tmp_path / "runs" / "kd" / "cache" / "embeddings.npy")[:, 0].astype(np.float32)  # unflipped

    def cosine(run_dir: str) -> float:
        model = load_checkpoint(tmp_path / "runs" / run_dir / "student" / "model.safetensors").eval()
        with torch.no_grad():
            emb = torch.nn.functional.normalize(model(normalize(images, model.preprocessing)), dim=1).numpy()
        return float((emb * teacher).sum(1).mean())

    kd, nokd = cosine("kd"), cosine("nokd")
    # measured: 0.74 with feature KD, -0.04 without; 0.20 with the feature loss detached from the student
    assert kd > 0.5 and kd > nokd + 0.3, (kd, nokd)
