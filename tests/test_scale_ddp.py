"""At scale, on CPU: `torchrun --nproc_per_node 2 -m distill.run` with Partial FC, relational KD over the gathered
batch and a teacher cache that both ranks build, then a resume from the per-rank head shards.

The cache both ranks built must equal, array for array, the one a single process builds with `teachers.cache`; each
rank's checkpoint shard must hold its half of the classes; the resumed run must continue at the step it stopped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


@pytest.mark.slow
def test_torchrun_two_ranks_distil_with_partial_fc_and_a_sharded_cache_build(tmp_path: Path) -> None:
    from facekd.models import create_model, save_checkpoint
    from teachers.cache import TeacherCache
    from teachers.cache import main as cache_main

    repo = Path(__file__).resolve().parents[1]
    torch.manual_seed(0)
    weights = tmp_path / "teacher.safetensors"
    save_checkpoint(create_model("mobilefacenet", embedding_dim=64), weights)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "run"
    argv = ["-m", "distill.run", "--teacher", "mobilefacenet", "--teacher-weights", str(weights),
            "--data", "synthfaces:tiny", "--val", "--kd", "feature+relational", "--head", "partial_fc",
            "--sample-rate", "0.5", "--preset", "smoke", "--batch-size", "16", "--cache-batch-size", "8",
            "--workers", "0", "--out", str(out), "--no-results"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _run([*torchrun, *argv, "--steps", "2"], tmp_path, env)

    two = TeacherCache.open(out / "cache", verify=True)
    assert two.manifest["world_size"] == 2
    # the same arithmetic as the torchrun ranks (OMP_NUM_THREADS=1): float sums in another thread split could round
    # differently in the last fp16 bit, which is not what this compares
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cache_main(["--teacher", "mobilefacenet", "--teacher-weights", str(weights), "--data",
                           "synthfaces:tiny", "--batch-size", "8", "--workers", "0", "--device", "cpu",
                           "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one = TeacherCache.open(tmp_path / "one")
    for name in ("embeddings.npy", "centres.npy"):
        assert np.array_equal(np.load(one.root / name), np.load(two.root / name)), name
    assert one.manifest["content_sha256"] == two.manifest["content_sha256"]

    student = out / "student"
    shards = [torch.load(student / f"checkpoint.rank{r}.pt", weights_only=True) for r in (0, 1)]
    classes = [s["objective"]["head.weight"].shape[0] for s in shards]
    assert classes == [8, 8] and all(s["step"] == 2 for s in shards)  # synthfaces:tiny has 16 identities
    assert not torch.equal(shards[0]["objective"]["head.weight"], shards[1]["objective"]["head.weight"])

    _run([*torchrun, *argv, "--steps", "4", "--resume"], tmp_path, env)
    log = [json.loads(line) for line in (student / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if "event" in r] == ["start", "resume"]
    assert log[0]["world_size"] == 2 and max(r["step"] for r in log) == 4
    assert {"ce", "feature", "relational"} <= set(log[-1])
    resumed = torch.load(student / "checkpoint.rank1.pt", weights_only=True)
    assert resumed["step"] == 4 and (student / "model.onnx").is_file()
