"""teachers.train end to end on SynthFaces:tiny with a tiny registered model: learning, outputs, kill -9 + resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # the tiny model lives in test_engine, whatever pytest's import mode
from test_engine import TINY, register_tiny  # noqa: E402


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _argv(out: Path, *extra: str) -> list[str]:
    return ["--arch", TINY, "--data", "synthfaces:tiny", "--margin", "cosface", "--preset", "smoke",
            "--batch-size", "16", "--lr", "0.1", "--log-every", "1", "--workers", "0", "--out", str(out), *extra]


def test_teacher_training_reduces_the_loss_and_writes_its_artifacts(tmp_path: Path) -> None:
    from teachers.train import main

    register_tiny()
    out, results = tmp_path / "runs" / "tiny" / "teacher", tmp_path / "summary.csv"
    assert main(_argv(out, "--steps", "30", "--ckpt-every", "30", "--val", "synthfaces:tiny",
                      "--results", str(results))) == 0
    losses = [loss for _, loss in _losses(out)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 30
    manifest = json.loads((out / "manifest.json").read_text())
    import facedata

    assert manifest["kind"] == "teacher"
    assert manifest["inputs"]["dataset"] == facedata.open_train_set("synthfaces:tiny").fingerprint
    from facekd.models import load_checkpoint

    model = load_checkpoint(out / "model.safetensors")
    assert model.arch == TINY and model.embedding_dim == 32
    # the recorded accuracy is the saved model's, re-measured here through the PyTorch embedder
    from evaluate.embed import TorchEmbedder
    from evaluate.verify import evaluate_sets

    again = evaluate_sets(TorchEmbedder(model.eval(), model.preprocessing), [facedata.open_verification_set(
        "synthfaces:tiny")])["synthfaces:tiny"]
    assert metrics["val"]["synthfaces:tiny"]["accuracy"] == pytest.approx(again["accuracy"], abs=1e-9)
    assert metrics["val"]["synthfaces:tiny"]["accuracy"] > 0.6  # learnt something: chance is 0.5
    from facekd import table

    rows = table.read_rows(results)
    assert [(r["stage"], r["model"], r["run"]) for r in rows] == [("teacher", TINY, "tiny")]


@pytest.mark.slow
def test_kill_9_then_resume_finishes_without_redoing_steps_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    from teachers.train import main

    register_tiny()
    steps = ["--steps", "10", "--ckpt-every", "3", "--val"]
    ref = tmp_path / "ref"
    assert main(_argv(ref, *steps)) == 0

    run = tmp_path / "run"
    # the child sleeps 0.3 s per training step (a TinyNet option that changes no arithmetic), so it is
    # still between checkpoints when killed
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_engine; test_engine.register_tiny(); "
            "from teachers.train import main; sys.exit(main(sys.argv[2:]))")
    child = subprocess.Popen([sys.executable, "-c", code, str(TESTS),
                              *_argv(run, *steps, "--model-kwargs", '{"sleep": 0.3}')],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert saved in (3, 6)  # 3 unless this process was descheduled for > 0.9 s
    assert not (run / "model.safetensors").exists()

    assert main(_argv(run, *steps, "--resume")) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    resume_at = next(i for i, r in enumerate(records) if r.get("event") == "resume")
    assert records[resume_at]["step"] == saved
    after = [r["step"] for r in records[resume_at:] if "loss" in r]
    assert after == list(range(saved + 1, 11))  # the checkpointed steps are not redone
    assert [s for s, _ in _losses(run)] == list(range(1, 11))
    assert [loss for _, loss in _losses(run)] == pytest.approx([loss for _, loss in _losses(ref)], abs=1e-6)
    a, b = _weights(ref / "model.safetensors"), _weights(run / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from teachers.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--arch", "no-such-model", "--data", "synthfaces:tiny", "--val", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--arch", TINY, "--data", "synthfaces:tiny", "--model-kwargs", "{oops", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "error: --model-kwargs is not valid JSON" in capsys.readouterr().err
