"""torchrun DDP (2 processes, gloo, CPU) against one process with the same global batch.

The model here has no BatchNorm: with BN each rank normalises with the statistics of its own half batch, so a
2-process run legitimately differs from a 1-process one (by O(1/sqrt(local batch)) in the activations). Without
BN the two runs compute the same arithmetic: per-rank mean loss, gradients averaged over ranks = gradient of the
global-batch mean. So losses and final weights must agree to float32 rounding, which checks the sum/mean
semantics, the rank sharding of the global permutation and the per-sample flip slicing exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

SCRIPT = """
import os
import sys
sys.path.insert(0, sys.argv[1])
import torch
import facedata
from engine.margin import MarginHead, MarginObjective
from engine.trainer import TrainConfig, Trainer
from test_engine import TinyNet

data = facedata.open_train_set("synthfaces:tiny")
torch.manual_seed(0)
model = TinyNet(bn=False)
head = MarginHead(model.embedding_dim, data.num_classes, "arcface")
cfg = TrainConfig(steps=5, batch_size=16, lr=0.1, warmup_steps=1, ckpt_every=5, log_every=1, workers=0,
                  out=sys.argv[2])
Trainer(model, MarginObjective(head), data, cfg).fit()
if os.environ.get("RANK", "0") == "0":
    torch.save({"model": model.state_dict(), "head": head.state_dict()}, sys.argv[2] + "/final.pt")
"""


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(script), str(TESTS), str(one)], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(script), str(TESTS), str(two)], env)

    def losses(out: Path) -> list[float]:
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    start = json.loads((two / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
    assert len(losses(one)) == 5
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-5)
    a = torch.load(one / "final.pt", weights_only=True)
    b = torch.load(two / "final.pt", weights_only=True)
    for part in ("model", "head"):
        for name, value in a[part].items():
            torch.testing.assert_close(b[part][name], value, atol=2e-5, rtol=1e-4, msg=f"{part}.{name}")
    assert torch.load(two / "checkpoint.pt", weights_only=True)["world_size"] == 2
