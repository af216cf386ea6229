"""engine: margin heads against insightface's formulas, schedule, data sharding, NaN stop, checkpoint/resume.

`TinyNet` (registered as `engine-test-tiny`) is a ~10k-parameter stand-in for a face model so the trainer runs a
step in milliseconds; tests/test_teacher_train.py and tests/test_engine_ddp.py import it from here.
"""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from engine.margin import MarginHead, MarginObjective
from engine.trainer import StepBatchSampler, TrainConfig, Trainer, epoch_permutation, flip_mask, lr_at
from facekd.io import FacekdError

TINY = "engine-test-tiny"


class TinyNet(nn.Module):
    """conv(4x4, stride 4) - PReLU - conv(stride 2) - PReLU - pool - linear: a cheap 112x112 face model."""

    def __init__(self, embedding_dim: int = 32, bn: bool = True, sleep: float = 0.0) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.body = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), norm(8), nn.PReLU(8),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), norm(16), nn.PReLU(16),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, embedding_dim))
        self.embedding_dim, self.input_size, self.sleep = embedding_dim, (112, 112), sleep
        self.preprocessing = {"input_size": [112, 112], "channel_order": "RGB", "mean": [127.5] * 3,
                              "std": [127.5] * 3}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sleep and self.training:
            time.sleep(self.sleep)  # lets a test kill a training process between checkpoints
        return self.body(x)


def register_tiny() -> None:
    from facekd.models import register_model

    register_model(TINY, kind="any")(lambda **kw: TinyNet(**kw))


def tiny_model(**kw) -> nn.Module:
    register_tiny()
    from facekd.models import create_model

    return create_model(TINY, **kw)


@pytest.fixture(scope="module")
def tiny_data():
    import facedata

    return facedata.open_train_set("synthfaces:tiny")


# ---------------------------------------------------------------------------------------------- margin heads

def _reference_arcface(cos: torch.Tensor, labels: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """insightface CombinedMarginLoss (m1=1, m2=m, m3=0, easy_margin=False), written with acos."""
    cos = cos.detach()
    out = cos.clone()
    for i, y in enumerate(labels.tolist()):
        c = float(cos[i, y])
        theta = math.acos(c)
        out[i, y] = math.cos(theta + m) if c > math.cos(math.pi - m) else c - math.sin(math.pi - m) * m
    return s * out


def test_arcface_logits_match_insightface_including_theta_plus_m_beyond_pi() -> None:
    torch.manual_seed(0)
    head = MarginHead(16, 5, "arcface")
    emb = torch.randn(6, 16, dtype=torch.float64).float()
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    emb[5] = -100 * head.weight[0].detach() + 0.1 * torch.randn(16)  # theta near pi: the fall-back branch
    cos = head.cosine(emb)
    assert cos[5, 0] < math.cos(math.pi - 0.5)
    got = head.margin_logits(emb, labels)
    torch.testing.assert_close(got, _reference_arcface(cos, labels, 64.0, 0.5), atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(head.logits(emb), 64.0 * cos)
    loss = head(emb, labels)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(got, labels))


def test_cosface_default_margin_and_exact_target_gradient_is_finite() -> None:
    torch.manual_seed(1)
    head = MarginHead(8, 4, "cosface", s=30.0)
    assert head.m == pytest.approx(0.35)
    emb = torch.randn(3, 8)
    labels = torch.tensor([2, 0, 3])
    cos = head.cosine(emb)
    expected = cos.clone()
    expected[torch.arange(3), labels] -= 0.35
    torch.testing.assert_close(head.margin_logits(emb, labels), 30.0 * expected)
    # an embedding exactly on its class weight (cos = 1) must not give NaN gradients (sqrt at 0)
    arc = MarginHead(8, 4, "arcface")
    e = arc.weight.detach()[1:2].clone().requires_grad_(True)
    arc(e, torch.tensor([1])).backward()
    assert torch.isfinite(e.grad).all() and torch.isfinite(arc.weight.grad).all()


def test_centres_initialise_class_weights_and_bad_shape_is_rejected() -> None:
    centres = torch.nn.functional.normalize(torch.randn(7, 12), dim=1)
    head = MarginHead(12, 7, centres=centres)
    torch.testing.assert_close(head.weight.detach(), centres)
    torch.testing.assert_close(head.logits(centres).diagonal(), torch.full((7,), 64.0))
    with pytest.raises(ValueError, match=r"\(7, 12\)"):
        MarginHead(12, 7, centres=torch.randn(7, 10))
    with pytest.raises(ValueError, match="margin"):
        MarginHead(12, 7, margin="sphereface")


# ---------------------------------------------------------------------------------------------- schedule, data order

def test_presets_are_plain_overridable_data() -> None:
    from engine.presets import PRESETS, make_config

    cfg = make_config("smoke", steps=7, lr=None, out="x")
    smoke = PRESETS["smoke"]
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.out) == (7, smoke["lr"], smoke["batch_size"], "x")
    with pytest.raises(TypeError, match="stepz"):
        make_config("cpu", stepz=3)
    with pytest.raises(FacekdError, match="--preset: unknown value 'huge'"):
        make_config("huge")
    with pytest.raises(FacekdError, match="amp fp16 needs CUDA"):
        Trainer(nn.Linear(1, 1), nn.Identity(), list(range(200)), make_config("cpu", amp="fp16", device="cpu"))


def test_cpu_bf16_only_with_native_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 autocast on CPU is allowed where the CPU computes bf16 natively and refused (one line) where emulated."""
    import engine.trainer as trainer_mod
    from engine.presets import make_config

    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(FacekdError, match=r"amp bf16 on CPU needs native bfloat16 .*use --amp off"):
        Trainer(nn.Linear(1, 1), nn.Identity(), list(range(200)), make_config("cpu", amp="bf16", device="cpu"))
    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda: True)
    trainer = Trainer(nn.Linear(1, 1), nn.Identity(), list(range(200)), make_config("cpu", amp="bf16", device="cpu"))
    assert trainer.amp_dtype is torch.bfloat16
    assert Trainer(nn.Linear(1, 1), nn.Identity(), list(range(200)),
                   make_config("cpu", device="cpu")).amp_dtype is None  # auto stays fp32 on CPU


def test_lr_warmup_then_poly2() -> None:
    cfg = TrainConfig(steps=110, lr=0.1, warmup_steps=10, power=2.0)
    assert lr_at(cfg, 0) == pytest.approx(0.01)
    assert lr_at(cfg, 9) == pytest.approx(0.1)
    assert lr_at(cfg, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 60) == pytest.approx(0.1 * 0.5 ** 2)
    assert lr_at(cfg, 109) == pytest.approx(0.1 * (1 / 100) ** 2)


def test_rank_shards_partition_the_global_batches_and_resume_continues_the_same_order() -> None:
    n, batch, seed, steps = 50, 8, 3, 14  # 6 steps per epoch: crosses two epoch boundaries
    one = list(StepBatchSampler(n, batch, seed, 0, steps))
    r0 = list(StepBatchSampler(n, batch, seed, 0, steps, rank=0, world=2))
    r1 = list(StepBatchSampler(n, batch, seed, 0, steps, rank=1, world=2))
    assert [a + b for a, b in zip(r0, r1)] == one
    assert list(StepBatchSampler(n, batch, seed, 5, steps)) == one[5:]
    assert one[0] == epoch_permutation(seed, 0, n)[:8].tolist() and one[6] == epoch_permutation(seed, 1, n)[:8].tolist()
    assert len(set(sum(one[:6], []))) == 48  # no index twice within an epoch
    assert one != list(StepBatchSampler(n, batch, seed + 1, 0, steps))
    assert torch.equal(flip_mask(0, 5, 64), flip_mask(0, 5, 64))
    assert not torch.equal(flip_mask(0, 5, 64), flip_mask(0, 6, 64))


# ---------------------------------------------------------------------------------------------- the loop

class _Failing(nn.Module):
    """Margin objective that returns NaN (or raises) at a given step, counting calls."""

    def __init__(self, head: MarginHead, nan_at: int = 0, raise_at: int = 0) -> None:
        super().__init__()
        self.inner, self.nan_at, self.raise_at, self.calls = MarginObjective(head), nan_at, raise_at, 0

    def forward(self, emb, batch):
        self.calls += 1
        if self.calls == self.raise_at:
            raise RuntimeError("simulated crash")
        out = self.inner(emb, batch)
        if self.calls == self.nan_at:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out


def _trainer(data, out, *, steps=6, objective_kw=None, **cfg_kw):
    torch.manual_seed(0)
    model = tiny_model()
    head = MarginHead(model.embedding_dim, data.num_classes, "cosface")
    cfg = TrainConfig(**{"steps": steps, "batch_size": 16, "lr": 0.05, "warmup_steps": 2, "ckpt_every": 3,
                         "log_every": 1, "workers": 0, "out": str(out), **cfg_kw})
    return Trainer(model, _Failing(head, **(objective_kw or {})), data, cfg)


def test_nan_loss_stops_with_the_step_and_components_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path) -> None:
    trainer = _trainer(tiny_data, tmp_path, objective_kw={"nan_at": 5})
    with pytest.raises(FacekdError, match=r"non-finite loss at step 5 \(loss=nan, cosface=[0-9.]+\)"):
        trainer.fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3


def test_interrupted_run_resumes_to_bit_identical_weights(tiny_data, tmp_path) -> None:
    ref = _trainer(tiny_data, tmp_path / "ref", steps=7, ema=0.9)
    ref.fit()
    crashed = _trainer(tiny_data, tmp_path / "run", steps=7, ema=0.9, objective_kw={"raise_at": 5})
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    per_epoch = len(tiny_data) // 16
    assert (state["step"], state["epoch"], state["index_in_epoch"]) == (3, 3 // per_epoch, 3 % per_epoch)
    with pytest.raises(FacekdError, match="--resume"):
        _trainer(tiny_data, tmp_path / "run", steps=7, ema=0.9).fit()
    resumed = _trainer(tiny_data, tmp_path / "run", steps=7, ema=0.9)
    resumed.fit(resume=True)
    assert resumed.objective.calls == 4  # steps 4..7 only
    for a, b in [(ref.model, resumed.model), (ref.ema_model, resumed.ema_model), (ref.objective, resumed.objective)]:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    import json

    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "model.safetensors"))  # EMA on: the EMA weights are the model
    assert all(torch.equal(saved[k], v) for k, v in ref.ema_model.state_dict().items())
    assert not torch.equal(saved["body.0.weight"], ref.model.state_dict()["body.0.weight"])
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 8))


def test_resume_refuses_changed_settings_naming_them(tiny_data, tmp_path) -> None:
    _trainer(tiny_data, tmp_path, steps=3).fit()
    with pytest.raises(FacekdError, match=r"settings differ \(lr: checkpoint 0.05 vs now 0.1"):
        _trainer(tiny_data, tmp_path, steps=3, lr=0.1).fit(resume=True)
    more = _trainer(tiny_data, tmp_path, steps=5)  # steps may grow
    more.fit(resume=True)
    assert more.objective.calls == 2
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FacekdError, match="cannot read checkpoint"):
        _trainer(tiny_data, tmp_path, steps=5).fit(resume=True)


def test_stop_file_and_sigterm_checkpoint_cleanly_and_resume_to_identical_weights(tiny_data, tmp_path) -> None:
    import json
    import os
    import signal

    from engine.trainer import STOP_FILE, TrainingStopped

    ref = _trainer(tiny_data, tmp_path / "ref", steps=7)
    ref.fit()

    run = tmp_path / "run"
    (run).mkdir()
    (run / STOP_FILE).write_text("")  # left over from an earlier pause: must not stop the next start
    paused = _trainer(tiny_data, run, steps=7)
    paused.objective.forward = _after_calls(paused.objective.forward, 2, lambda: (run / STOP_FILE).write_text(""))
    with pytest.raises(TrainingStopped, match=rf"stopped at step 2/7 by {run / STOP_FILE}.*--resume"):
        paused.fit()
    assert not (run / STOP_FILE).exists()  # the request is consumed
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2  # off the ckpt_every=3 grid
    status = json.loads((run / "status.json").read_text())
    assert (status["step"], status["images_seen"], status["images_total"]) == (2, 32, 112)

    signalled = _trainer(tiny_data, run, steps=7)
    signalled.objective.forward = _after_calls(signalled.objective.forward, 2,
                                               lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TrainingStopped, match="stopped at step 4/7 by SIGTERM"):
        signalled.fit(resume=True)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = _trainer(tiny_data, run, steps=7)
    resumed.fit(resume=True)
    assert resumed.objective.calls == 3  # steps 5..7 only
    for (name, x), y in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(x, y), name


def _after_calls(forward, n, action):
    calls = [0]

    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            action()
        return out

    return wrapped


def test_learning_curve_rows_follow_the_log_and_survive_a_resume_truncation(tmp_path) -> None:
    import json

    from engine.trainer import learning_curve, write_learning_curve

    lines = [{"event": "start", "step": 0},
             {"step": 10, "images_seen": 640, "eval": {"synthfaces:small": {"accuracy": 0.61, "std": 0.02,
                                                                            "auc": 0.66, "pairs": 600}}},
             {"step": 10, "loss": 3.0},
             "{cut by a crash",
             {"step": 20, "images_seen": 1280, "eval": {"synthfaces:small": {"accuracy": 0.7, "std": 0.03,
                                                                             "auc": 0.75, "pairs": 600}}}]
    (tmp_path / "log.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    rows = learning_curve(tmp_path)
    assert [(r["images_seen"], r["accuracy"]) for r in rows] == [(640, 0.61), (1280, 0.7)]
    png = write_learning_curve(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = (tmp_path / "learning_curve.csv").read_text().splitlines()
    assert csv[0].startswith("images_seen,step,set,accuracy") and csv[2].startswith("1280,20,synthfaces:small,0.7")


def test_hardware_label_names_the_cpu_model(monkeypatch):
    """Training rows name their CPU: speeds differ between the project's machines and compare only within one."""
    import engine.trainer as trainer

    monkeypatch.setattr(trainer, "cpu_model_name", lambda: "AMD EPYC")
    assert trainer.hardware_label(torch.device("cpu"), world=2).startswith("cpu AMD EPYC x")
    assert trainer.hardware_label(torch.device("cpu")).endswith(f"({torch.get_num_threads()} threads/process, 1 process)")
    monkeypatch.setattr(trainer, "cpu_model_name", lambda: "")
    assert trainer.hardware_label(torch.device("cpu")).startswith("cpu x")
