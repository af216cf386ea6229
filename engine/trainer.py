"""The one trainer: `Trainer(model, objective, dataset, cfg).fit()` for teachers, students and pruned fine-tunes.

One process on CPU/GPU, or `torchrun` DDP (gloo on CPU, nccl on GPU) when WORLD_SIZE > 1. SGD with momentum, a
warm-up + polynomial learning rate (arcface_torch's PolyScheduler, power 2), gradient clipping on the model,
optional AMP (bf16, or fp16 with a GradScaler), channels_last and EMA weights.

Exact resume: the data order is a pure function of (seed, epoch) (one global permutation per epoch, each step takes
the next `batch_size` indices, rank r takes its 1/world slice), the flip augmentation a pure function of
(seed, step), the learning rate a pure function of step; the checkpoint holds weights, optimiser, EMA, scaler and
RNG states. So a run resumed from `checkpoint.pt` reaches the same weights as one that was never stopped.

Loss semantics under DDP: each rank averages the objective over its slice and DDP averages gradients over ranks,
so the gradient is that of the mean over the global batch, as in one process with the same global batch.
BatchNorm statistics are per rank (no SyncBatchNorm), the one expected difference.

Run directory `cfg.out`: checkpoint.pt (resume state, `torch.load(weights_only=True)`), log.jsonl (one JSON line per
log interval / evaluation), status.json (step, images seen, rate, ETA; rewritten at every log line, for watching a
background run), learning_curve.csv/.png (accuracy per verification set against images seen, at every evaluation),
metrics.json (final), model.safetensors (final weights through facekd.models).

Stopping a long run cleanly: create the file `cfg.out/STOP` (or send SIGTERM/SIGINT). The trainer finishes the
step, writes checkpoint.pt and raises `TrainingStopped`; the same command with `--resume` continues exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from facekd.io import (FacekdError, atomic_torch_save, atomic_write_json, atomic_write_text, cpu_model_name,
                       fingerprint, provenance, run_lock)
from facekd.models import load_state_dict_strict

CHECKPOINT_FORMAT = "facekd-train-checkpoint/1"
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
SWITCH_CHOICES = ("auto", "on", "off")
STOP_FILE = "STOP"  # touch OUT/STOP to checkpoint and stop a run cleanly


class TrainingStopped(FacekdError):
    """A run stopped on request (OUT/STOP or a signal) after writing its checkpoint; `--resume` continues it."""


# Settings that do not change the trained weights' arithmetic, so a resume may change them (steps extends a run).
RESUMABLE_FIELDS = ("steps", "out", "workers", "log_every", "ckpt_every", "eval_every", "device")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), so that CPU autocast to bf16 pays.

    Measured on the 2-core Xeon (AMX): r18 training 10.1 -> 23.5-26.4 images/s (2.4x), MobileFaceNet 35-37 -> 39
    images/s (1.1x, depthwise convs gain little). On AVX2-only CPUs bf16 is emulated and slower than fp32.
    """
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128            # global: summed over DDP ranks
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    power: float = 2.0               # poly decay exponent after warm-up
    grad_clip: float = 5.0           # max global L2 norm of the model's gradients (0 = off)
    amp: str = "auto"                # auto = bf16 on CUDA with bf16 support, else off; bf16 on CPU only when asked
    ema: float = 0.0                 # 0 = off, else EMA decay (evaluated and saved instead of raw weights)
    channels_last: str = "auto"      # auto = on (CUDA and CPU); off = NCHW
    flip: bool = True                # random horizontal flip, decided per sample by the trainer
    ckpt_every: int = 500
    eval_every: int = 0              # 0 = evaluate only at the end
    log_every: int = 10
    seed: int = 0
    workers: int | None = None       # DataLoader workers; None = auto
    device: str = "auto"             # auto | cpu | cuda
    out: str = "runs/train"
    arch: str | None = None          # registry name for model.safetensors; None = the model's own `.arch`
    model_kwargs: dict | None = None  # None = the model's own `.model_kwargs` (facekd.models adds pruned widths)

    def validate(self) -> "TrainConfig":
        from facekd.io import check_choice

        check_choice(self.amp, AMP_CHOICES, "amp")
        check_choice(self.channels_last, SWITCH_CHOICES, "channels_last")
        check_choice(self.device, ("auto", "cpu", "cuda"), "device")
        for name in ("steps", "batch_size", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise FacekdError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise FacekdError(f"ema must be 0 (off) or a decay in (0, 1), got {self.ema}")
        if self.lr <= 0:
            raise FacekdError(f"lr must be > 0, got {self.lr}")
        return self


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of 0-based step `step`: linear warm-up to cfg.lr, then lr * (1 - progress) ** power."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * max(0.0, 1.0 - (step - cfg.warmup_steps) / span) ** cfg.power


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def flip_mask(seed: int, step: int, batch_size: int) -> Tensor:
    """Which samples of the global batch of `step` are flipped: a pure function of (seed, step)."""
    return torch.from_numpy(np.random.default_rng([seed, step, 7]).random(batch_size) < 0.5)


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's indices for steps start..steps-1 of a global-permutation schedule (drop_last)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, steps: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.start, self.steps = n, batch_size, seed, start, steps
        self.rank, self.local = rank, batch_size // world
        self.steps_per_epoch = n // batch_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        perm, perm_epoch = None, -1
        for step in range(self.start, self.steps):
            epoch, i = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(self.seed, epoch, self.n), epoch
            lo = i * self.batch + self.rank * self.local
            yield perm[lo:lo + self.local].tolist()


class _Net(nn.Module):
    """Model + objective as one module, so DDP all-reduces the objective's gradients (margin head, projections)."""

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, images: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.objective(self.model(images), batch)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_primitive, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _primitive(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def hardware_label(device: torch.device, world: int = 1) -> str:
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)} x{world}"
    processes = f"{world} process{'es' if world > 1 else ''}"
    model = cpu_model_name()
    return f"cpu{' ' + model if model else ''} x{os.cpu_count()} ({torch.get_num_threads()} threads/process, {processes})"


class Trainer:
    def __init__(self, model: nn.Module, objective: nn.Module, dataset: Any, cfg: TrainConfig,
                 val_sets: Sequence[Any] = (), curve_sets: Sequence[Any] = ()) -> None:
        self.cfg = cfg.validate()
        # curve_sets (cheaper sets for a learning curve): evaluated every eval_every steps and at the end (logged
        # only); without them the intermediate evaluations use val_sets
        self.dataset, self.val_sets, self.curve_sets = dataset, list(val_sets), list(curve_sets)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
        if cuda and not torch.cuda.is_available():
            raise FacekdError("device cuda requested but CUDA is not available")
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
        if cfg.batch_size % self.world:
            raise FacekdError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} DDP processes")
        if len(dataset) < cfg.batch_size:
            raise FacekdError(f"dataset {getattr(dataset, 'name', '')!s} has {len(dataset)} images, fewer than one "
                              f"batch of {cfg.batch_size}; lower --batch-size")
        amp = cfg.amp
        if amp == "auto":
            amp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "off"
        if amp == "fp16" and not cuda:
            raise FacekdError("amp fp16 needs CUDA; on CPU use --amp bf16 (with native bfloat16) or off")
        if amp == "bf16" and not cuda and not cpu_has_native_bf16():
            raise FacekdError("amp bf16 on CPU needs native bfloat16 (AVX512-BF16 or AMX), which this CPU lacks: "
                              "emulated it is slower than fp32; use --amp off")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        # auto = on: measured faster on CPU too (engine.bench, 2-core Xeon, batch 64: MobileFaceNet +9-20%, r18 +31%)
        self.channels_last = cfg.channels_last != "off"
        self.model, self.objective = model, objective
        # a head sharded over ranks (Partial FC): each rank checkpoints its own shard
        self._sharded = self.world > 1 and any(getattr(p, "sharded", False) for p in objective.parameters())
        self.preprocessing = dict(getattr(model, "preprocessing", None) or _default_preprocessing())
        self.out = Path(cfg.out)
        # resuming may change only RESUMABLE_FIELDS; the dataset is part of the fingerprint
        self.settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_FIELDS}
        self.settings["dataset"] = str(getattr(dataset, "fingerprint", len(dataset)))
        # architecture and objective (margin type, s, m, KD weights...) as their repr's short hash
        self.settings["model"] = f"{type(model).__name__}:{fingerprint(repr(model))}"
        self.settings["objective"] = f"{type(objective).__name__}:{fingerprint(repr(objective))}"
        self.fingerprint = fingerprint(self.settings)

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        dev = self.device
        own_group = self.world > 1 and not dist.is_initialized()
        if own_group:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        self._stop_signal = None
        previous = self._catch_stop_signals()
        try:
            if not self.is_main:
                return self._fit(resume)
            with run_lock(self.out):  # one process owns a run directory: a second --resume is refused
                return self._fit(resume)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if own_group:
                dist.destroy_process_group()

    def _catch_stop_signals(self) -> dict[int, Any]:
        """SIGTERM/SIGINT ask for a checkpoint and a clean stop at the end of the current step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request(signum: int, _frame: Any) -> None:
            self._stop_signal = signal.Signals(signum).name

        return {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _fit(self, resume: bool) -> dict[str, Any]:
        cfg, dev = self.cfg, self.device
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed 112x112 shapes: let cuDNN pick its fastest kernels
        self.model.to(dev, memory_format=memory_format).train()
        self.objective.to(dev).train()
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False) if cfg.ema else None
        params = [p for m in (self.model, self.objective) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype is torch.float16)
        self._last, self._rates = {}, []
        start = self._resume() if resume else self._fresh_start()
        (self.out / STOP_FILE).unlink(missing_ok=True)  # a stale request must not stop the run it was meant to pause
        net: nn.Module = _Net(self.model, self.objective)
        if self.world > 1:
            # sharded parameters (a Partial FC head: each rank its own classes) stay out of DDP's broadcast and
            # all-reduce. No per-step buffer broadcast, as arcface_torch (BN statistics stay per rank; rank 0's are
            # saved). find_unused_parameters costs a graph walk per step: only for an objective that declares
            # parameters some steps leave unused (`objective.may_skip_parameters`)
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                net, [f"objective.{n}" for n, p in self.objective.named_parameters() if getattr(p, "sharded", False)])
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False,
                find_unused_parameters=bool(getattr(self.objective, "may_skip_parameters", False)))
        sampler = StepBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed, start, cfg.steps, self.rank, self.world)
        if sampler.steps_per_epoch < 1:
            raise FacekdError(f"dataset smaller than one batch of {cfg.batch_size}")
        from facedata import make_loader  # the one loader path; its own generator leaves the global RNG alone

        loader = make_loader(self.dataset, batch_sampler=sampler, workers=self._workers(), seed=cfg.seed,
                             pin_memory=dev.type == "cuda")
        model_params = [p for p in self.model.parameters() if p.requires_grad]
        self._pending, self._window_start = [], time.perf_counter()
        progress = _progress(start, cfg.steps, disable=not self.is_main)
        for step, (images, labels, indices) in enumerate(loader, start):
            batch = self._batch(step, images, labels, indices)
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            with torch.autocast(dev.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
                losses = net(batch["images"], batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses["loss"]).backward()
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model_params, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema_model is not None:
                self._update_ema()
            self._pending.append((step + 1, {k: v.detach().float() for k, v in losses.items()}))
            done = step + 1
            progress.update(1)
            is_ckpt, is_eval = done % cfg.ckpt_every == 0, bool(cfg.eval_every) and done % cfg.eval_every == 0
            if done % cfg.log_every == 0 or is_ckpt or is_eval or done == cfg.steps:
                self._flush(done, progress)  # also the NaN check: nothing non-finite is ever checkpointed
            if is_ckpt or done == cfg.steps:
                self._save_checkpoint(done)
            if is_eval and done != cfg.steps:
                self._evaluate(done, self.curve_sets or self.val_sets)
            if done != cfg.steps and self._stop_requested(done):
                if not is_ckpt:
                    self._save_checkpoint(done)
                progress.close()
                reason = self._stop_signal or f"{self.out / STOP_FILE}"
                raise TrainingStopped(f"stopped at step {done}/{cfg.steps} by {reason}; checkpoint "
                                      f"{self.out / 'checkpoint.pt'}; run the same command with --resume to continue")
        progress.close()
        return self._finish()

    def _stop_requested(self, done: int) -> bool:
        """OUT/STOP or a signal; under DDP the ranks agree at log boundaries (one small all-reduce)."""
        if self.world > 1 and done % self.cfg.log_every:
            return False
        local = self._stop_signal is not None or (self.is_main and (self.out / STOP_FILE).exists())
        if self.world > 1:
            flag = torch.tensor([int(local)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = bool(flag.item())
        if local and self.is_main:
            (self.out / STOP_FILE).unlink(missing_ok=True)
        return local

    # ------------------------------------------------------------------ pieces of a step
    def _batch(self, step: int, images: Tensor, labels: Tensor, indices: Tensor) -> dict[str, Any]:
        from facedata.transforms import normalize

        dev, local = self.device, self.cfg.batch_size // self.world
        if self.cfg.flip:
            flipped = flip_mask(self.cfg.seed, step, self.cfg.batch_size)[self.rank * local:(self.rank + 1) * local]
        else:
            flipped = torch.zeros(len(labels), dtype=torch.bool)
        images = images.to(dev, non_blocking=True)
        flipped = flipped.to(dev)
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
        x = normalize(images, self.preprocessing)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {"images": x, "labels": labels.to(dev, non_blocking=True).long(),
                "indices": indices.to(dev, non_blocking=True).long(), "flipped": flipped}

    @torch.no_grad()
    def _update_ema(self) -> None:
        torch._foreach_lerp_(list(self.ema_model.parameters()), [p.detach() for p in self.model.parameters()],
                             1.0 - self.cfg.ema)
        for e, b in zip(self.ema_model.buffers(), self.model.buffers()):  # BN statistics are copied, not averaged
            e.copy_(b)

    def _flush(self, done: int, progress: Any) -> None:
        """Average the losses of the last steps (over ranks too), stop on NaN/inf, log a JSONL line."""
        if not self._pending:
            return
        names = list(self._pending[0][1])
        table = torch.stack([torch.stack([d[k] for k in names]) for _, d in self._pending])  # (steps, components)
        if self.world > 1:
            dist.all_reduce(table)
            table /= self.world
        table = table.cpu()
        bad = (~torch.isfinite(table)).any(dim=1).nonzero()
        if len(bad):
            row = int(bad[0])
            values = ", ".join(f"{k}={v:.6g}" for k, v in zip(names, table[row].tolist()))
            ckpt = self.out / "checkpoint.pt"
            last = f"the last good checkpoint is {ckpt}" if ckpt.is_file() else "no checkpoint was saved before it"
            progress.close()  # the error line starts on a line of its own, not after the bar
            raise FacekdError(f"non-finite loss at step {self._pending[row][0]} ({values}); lower the learning "
                              f"rate or check the data; {last}")
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        images_per_s = len(self._pending) * self.cfg.batch_size / elapsed
        means = dict(zip(names, table.mean(dim=0).tolist()))
        self._last = {"step": done, "epoch": (done - 1) // (len(self.dataset) // self.cfg.batch_size),
                      "lr": lr_at(self.cfg, done - 1), **means, "images_per_s": round(images_per_s, 2)}
        self._rates.append(images_per_s)
        self._pending = []
        if self.is_main:
            self._log(self._last)
            self._write_status(done)
            progress.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{images_per_s:.1f}", refresh=False)
        self._window_start = time.perf_counter()

    def _write_status(self, done: int) -> None:
        """status.json: where a (background) run is, and a training-only ETA from the recent throughput."""
        rate = float(np.median(self._rates[-20:])) if self._rates else 0.0
        left = (self.cfg.steps - done) * self.cfg.batch_size
        eta = left / rate if rate > 0 else None
        atomic_write_json(self.out / "status.json", {
            "step": done, "steps": self.cfg.steps, "images_seen": done * self.cfg.batch_size,
            "images_total": self.cfg.steps * self.cfg.batch_size, "images_per_s": round(rate, 2),
            "eta_s": round(eta) if eta is not None else None,
            "eta": time.strftime("%Y-%m-%d %H:%M", time.localtime(time.time() + eta)) if eta is not None else None,
            "eta_note": "training only, at the median rate of the last log intervals; evaluations add to it",
            "last_log": self._last, "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "stop": f"touch {self.out / STOP_FILE} (checkpoints and exits; --resume continues)"})

    def _log(self, record: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def _evaluate(self, done: int, sets: Sequence[Any] | None = None) -> dict[str, Any]:
        sets = self.val_sets if sets is None else sets
        if not sets or not self.is_main:
            return {}
        from evaluate.embed import module_embedder
        from evaluate.verify import evaluate_sets

        model = self.ema_model if self.ema_model is not None else self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                # the final evaluation keeps its embeddings (val_embeddings/SET.npy) for paired tests between runs
                keep = self.out / "val_embeddings" if done == self.cfg.steps and sets is self.val_sets else None
                results = evaluate_sets(module_embedder(model, self.preprocessing, device=str(self.device)),
                                        sets, flip=True, progress=False, embeddings_dir=keep)
        finally:
            model.train(was_training)
        brief = {name: {k: v for k, v in m.items() if k not in ("roc", "pair_correct")} for name, m in results.items()}
        self._log({"step": done, "images_seen": done * self.cfg.batch_size, "eval": brief})
        write_learning_curve(self.out)
        summary = ", ".join(f"{n} acc={m['accuracy']:.4f}" for n, m in results.items())
        _progress_write(f"step {done}: {summary}")
        self._window_start = time.perf_counter()  # evaluation time is not training throughput
        return results

    # ------------------------------------------------------------------ start, resume, finish
    def _workers(self) -> int:
        if self.cfg.workers is not None:
            return self.cfg.workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return min(8, cores // 2) if self.device.type == "cuda" else min(2, max(0, cores // 4))

    def _fresh_start(self) -> int:
        ckpt = self.out / "checkpoint.pt"
        if ckpt.exists():
            raise FacekdError(f"{ckpt} exists from an earlier run; pass --resume to continue it, or choose "
                              f"another --out (or delete the directory) to start over")
        torch.manual_seed(self.cfg.seed + self.rank)
        np.random.seed(self.cfg.seed + self.rank)
        random.seed(self.cfg.seed + self.rank)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "log.jsonl").unlink(missing_ok=True)
            self._log({"event": "start", "step": 0, "fingerprint": self.fingerprint, "world_size": self.world,
                       "hardware": hardware_label(self.device, self.world), "config": dataclasses.asdict(self.cfg)})
        return 0

    def _resume(self) -> int:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            _progress_write(f"no checkpoint at {path}: starting from step 0")
            return self._fresh_start()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt or foreign file: one clear line, not an unpickling traceback
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise FacekdError(f"cannot read checkpoint {path}: {reason}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise FacekdError(f"{path} is not a facekd training checkpoint ({CHECKPOINT_FORMAT})")
        if state["fingerprint"] != self.fingerprint:
            old = state["settings"]
            diff = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            detail = "; ".join(f"{k}: checkpoint {old.get(k)!r} vs now {self.settings.get(k)!r}" for k in diff)
            raise FacekdError(f"cannot resume {path}: settings differ ({detail}); only "
                              f"{', '.join(RESUMABLE_FIELDS)} may change on resume")
        step = int(state["step"])
        if step > self.cfg.steps:
            raise FacekdError(f"{path} is at step {step}, beyond steps={self.cfg.steps}; raise --steps")
        if self._sharded:  # this rank's head shard and optimiser state; the rest is the same on every rank
            shard_path = self.out / f"checkpoint.rank{self.rank}.pt"
            shard = torch.load(shard_path, map_location="cpu", weights_only=True) if shard_path.exists() else {}
            if shard.get("step") != step or shard.get("fingerprint") != self.fingerprint:
                raise FacekdError(f"cannot resume {path}: {shard_path} is missing or not from step {step}")
            state["objective"], state["optimizer"] = shard["objective"], shard["optimizer"]
        load_state_dict_strict(self.model, state["model"], f"{path} (model)")
        load_state_dict_strict(self.objective, state["objective"], f"{path} (objective)")
        if self.ema_model is not None:
            load_state_dict_strict(self.ema_model, state["ema"], f"{path} (ema)")
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
        self._last, self._rates = dict(state.get("last_log", {})), list(state.get("rates", []))
        if self.is_main:
            self._truncate_log(step)
            self._log({"event": "resume", "step": step, "fingerprint": self.fingerprint, "world_size": self.world,
                       "hardware": hardware_label(self.device, self.world)})
        _progress_write(f"resumed {path} at step {step}/{self.cfg.steps}")
        return step

    def _truncate_log(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint (done before a crash, done again now)."""
        log = self.out / "log.jsonl"
        if log.exists():
            keep = []
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:  # a line cut by the crash
                    pass
            atomic_write_text(log, "".join(f"{line}\n" for line in keep))

    def _save_checkpoint(self, done: int) -> None:
        rng = _rng_state()
        if self.world > 1:  # every rank's RNG state, so each resumes its own stream
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        if self._sharded:  # each rank's own head shard and optimiser state (its momentum), beside checkpoint.pt
            atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": done, "fingerprint": self.fingerprint,
                               "objective": self.objective.state_dict(), "optimizer": self.optimizer.state_dict()},
                              self.out / f"checkpoint.rank{self.rank}.pt")
            dist.barrier()  # every shard is on disk before checkpoint.pt names the step
        if not self.is_main:
            return
        spe = len(self.dataset) // self.cfg.batch_size
        state = {
            "format": CHECKPOINT_FORMAT, "step": done, "epoch": done // spe, "index_in_epoch": done % spe,
            "fingerprint": self.fingerprint, "settings": self.settings, "config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(), "objective": self.objective.state_dict(),
            "ema": self.ema_model.state_dict() if self.ema_model is not None else {},
            "optimizer": self.optimizer.state_dict(), "scheduler": {"step": done, "kind": "warmup+poly"},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rng_states, "world_size": self.world,
            "last_log": dict(self._last), "rates": list(self._rates),
        }
        atomic_torch_save(state, self.out / "checkpoint.pt")
        self._window_start = time.perf_counter()  # saving time is not training throughput

    def _finish(self) -> dict[str, Any]:
        """Final evaluation, model.safetensors and metrics.json (rank 0); returns the metrics."""
        cfg = self.cfg
        if self._pending:
            self._flush(cfg.steps, _NullProgress())
        for module in (self.model, self.ema_model):  # callers (export, pruning) get the usual memory layout back
            if module is not None:
                module.to(memory_format=torch.contiguous_format)
        if not self.is_main:
            return {}
        val = self._evaluate(cfg.steps)
        if self.curve_sets and cfg.eval_every:
            self._evaluate(cfg.steps, self.curve_sets)
        final = self.ema_model if self.ema_model is not None else self.model
        model_path = None
        if cfg.arch or getattr(final, "arch", None):
            from facekd.models import save_checkpoint

            model_path = self.out / "model.safetensors"
            save_checkpoint(final, model_path, arch=cfg.arch, kwargs=cfg.model_kwargs,
                            extra={"train": {"steps": cfg.steps, "ema": cfg.ema, "fingerprint": self.fingerprint}})
        rates = self._rates
        metrics = {
            "step": cfg.steps, "train": {k: v for k, v in self._last.items() if k not in ("step", "epoch")},
            "images_per_s": round(float(np.median(rates)), 2) if rates else None,
            "hardware": hardware_label(self.device, self.world), "world_size": self.world,
            "val": val, "config": dataclasses.asdict(cfg), "fingerprint": self.fingerprint,
            "model": str(model_path) if model_path else None, "provenance": provenance(),
        }
        atomic_write_json(self.out / "metrics.json", metrics)
        return metrics


def learning_curve(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Verification accuracy against images seen, one row per (evaluation, set), from a run's log.jsonl."""
    rows = []
    log = Path(run_dir) / "log.jsonl"
    for line in log.read_text(encoding="utf-8").splitlines() if log.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for name, m in (record.get("eval") or {}).items():
            images = record.get("images_seen")
            if images is None:  # logs written before images_seen was recorded
                continue
            rows.append({"images_seen": images, "step": record["step"], "set": name, "accuracy": m["accuracy"],
                         "std": m.get("std"), "auc": m.get("auc"), "pairs": m.get("pairs"), "time": record.get("time")})
    return rows


def write_learning_curve(run_dir: str | os.PathLike) -> Path | None:
    """learning_curve.csv and .png in the run directory, rebuilt from log.jsonl (so a resumed run stays consistent)."""
    import csv

    rows = learning_curve(run_dir)
    if not rows:
        return None
    out = Path(run_dir)
    with open(out / "learning_curve.csv.tmp", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out / "learning_curve.csv.tmp", out / "learning_curve.csv")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name in dict.fromkeys(r["set"] for r in rows):
        pts = [r for r in rows if r["set"] == name]
        x = [r["images_seen"] for r in pts]
        y = [100 * r["accuracy"] for r in pts]
        err = [100 * (r["std"] or 0) for r in pts]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{name} ({pts[-1]['pairs']} pairs)")
    ax.set_xlabel("training images seen")
    ax.set_ylabel("verification accuracy % (10-fold mean ± std)")
    ax.set_title(f"learning curve: {out.resolve().parent.name}/{out.name}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png.tmp.png")
    plt.close(fig)
    os.replace(out / "learning_curve.png.tmp.png", out / "learning_curve.png")
    return out / "learning_curve.png"


def _default_preprocessing() -> dict[str, Any]:
    from facedata.transforms import INSIGHTFACE_PREPROCESSING

    return INSIGHTFACE_PREPROCESSING


class _NullProgress:
    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


def _progress(start: int, total: int, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=disable, unit="step", dynamic_ncols=True, smoothing=0.1)


def _progress_write(text: str) -> None:
    from tqdm.auto import tqdm

    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(text)
