"""Structured channel pruning of a face student with Torch-Pruning, keeping the embedding head intact.

Torch-Pruning's `DependencyGraph` couples every layer that shares a channel dimension (a convolution's outputs, its
BatchNorm, the PReLU slopes, the depthwise convolution that follows and every branch of a residual add), so one
pruning decision removes the same channels everywhere and the network stays runnable. What this module adds:

- the head is protected: everything from the first layer whose output is spatially 1x1 (the GDC depthwise conv, the
  linear 1x1 conv / Linear, the final BatchNorm1d) keeps its weights bit-identical, so the embedding size and the
  embedding space's last projection do not change;
- grouped (not depthwise) convolutions are protected too: Torch-Pruning would have to remove whole per-group slices,
  which `round_to` cannot keep aligned;
- channel counts are rounded to `round_to` (default 8): ragged widths make ONNX Runtime's convolution kernels slower,
  so a pruned model with unrounded channels can lose wall time while saving multiply-adds;
- `search_ratio` bisects the channel ratio on a copy to hit a multiply-add target.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from facekd.io import FacekdError, check_choice

IMPORTANCES = ("magnitude", "taylor", "lamp", "fpgm")

GradFn = Callable[[nn.Module], None]  # runs forward + backward on real data so parameters carry .grad


@dataclass
class PruneConfig:
    ratio: float = 0.3             # fraction of channels removed from every prunable layer (local) or overall (global)
    importance: str = "magnitude"  # magnitude | taylor | lamp | fpgm
    steps: int = 1                 # iterative prune rounds; the ratio is reached linearly over the rounds
    round_to: int = 8              # kept channel counts are multiples of this
    max_layer_ratio: float = 0.7   # no layer loses more than this fraction of its channels
    global_pruning: bool = False   # rank channels across layers (known to over-prune some MobileFaceNet layers)

    def check(self) -> "PruneConfig":
        if not 0.0 < self.ratio < 1.0:
            raise FacekdError(f"--ratio must be in (0, 1), got {self.ratio}")
        check_choice(self.importance, IMPORTANCES, "--importance")
        if self.steps < 1:
            raise FacekdError(f"--steps must be >= 1, got {self.steps}")
        if self.round_to < 1:
            raise FacekdError(f"--round-to must be >= 1, got {self.round_to}")
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise FacekdError(f"--max-layer-ratio must be in (0, 1), got {self.max_layer_ratio}")
        if not self.global_pruning and self.ratio > self.max_layer_ratio:
            raise FacekdError(f"--ratio {self.ratio} exceeds --max-layer-ratio {self.max_layer_ratio}; "
                              "with per-layer pruning every layer loses --ratio of its channels")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def make_importance(name: str) -> tp.importance.Importance:
    check_choice(name, IMPORTANCES, "--importance")
    return {"magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.TaylorImportance(),
            "lamp": lambda: tp.importance.LAMPImportance(p=2),
            "fpgm": lambda: tp.importance.FPGMImportance(p=2)}[name]()


def example_input(model: nn.Module) -> torch.Tensor:
    h, w = getattr(model, "input_size", (112, 112))
    device = next(model.parameters()).device
    return torch.randn(1, 3, h, w, device=device)


def protected_layers(model: nn.Module, example_inputs: torch.Tensor | None = None) -> list[nn.Module]:
    """The layers pruning must not touch: the embedding head and grouped (non-depthwise) convolutions.

    The head is found by tracing, not by name, so any backbone whose head starts where the feature map becomes 1x1
    (GDC, or global pooling + Linear) is covered.
    """
    example_inputs = example_input(model) if example_inputs is None else example_inputs
    order: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, _inp, out: order.append((mod, tuple(out.shape))))
             for m in model.modules() if len(list(m.children())) == 0]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    protected: list[nn.Module] = []
    in_head = False
    for module, shape in order:
        in_head = in_head or len(shape) == 2 or (len(shape) == 4 and shape[2] * shape[3] == 1)
        if in_head and module not in protected:
            protected.append(module)
    if not protected:
        raise FacekdError(f"{type(model).__name__}: no embedding head found (no layer with a 1x1 or flat output)")
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels and m not in protected:
            protected.append(m)
    return protected


class NearestRoundingPruner(tp.pruner.BasePruner):
    """Torch-Pruning's pruner, rounding kept widths to the nearest multiple of `round_to` instead of down.

    Flooring in every round compounds (32 channels at ratio 0.3 over two rounds: 32 -> 24 -> 16); Torch-Pruning
    computes each round's target from the initial width, so rounding to the nearest multiple stays on target.
    """

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        kept = current_channels - n_pruned
        rounded = max(round_to, int(kept / round_to + 0.5) * round_to)
        return max(current_channels - rounded, 0)


class ChannelPruner:
    """One pruning job: Torch-Pruning's dependency graph + pruner over a model, advanced round by round.

    `step()` prunes one round in place (1/steps of the ratio each round); fine-tune between calls.
    """

    def __init__(self, model: nn.Module, cfg: PruneConfig, *, grad_fn: GradFn | None = None,
                 example_inputs: torch.Tensor | None = None):
        self.cfg = cfg.check()
        if cfg.importance == "taylor" and grad_fn is None:
            raise FacekdError("--importance taylor needs training data for its backward pass (give --data)")
        self.model = model
        self.grad_fn = grad_fn
        example_inputs = example_input(model) if example_inputs is None else example_inputs
        self.protected = protected_layers(model, example_inputs)
        self._head_shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in self.protected]
        was_training = model.training
        model.eval()  # tracing in eval mode keeps BatchNorm running statistics untouched
        self.pruner = NearestRoundingPruner(
            model, example_inputs, importance=make_importance(cfg.importance), global_pruning=cfg.global_pruning,
            pruning_ratio=cfg.ratio, max_pruning_ratio=cfg.max_layer_ratio, iterative_steps=cfg.steps,
            ignored_layers=self.protected, round_to=cfg.round_to if cfg.round_to > 1 else None)
        self._prime_scopes()
        model.train(was_training)

    def _prime_scopes(self) -> None:
        # Torch-Pruning records each ranking scope's initial width during the first round. A round at ratio 0
        # (step 0 of the schedule) records them without pruning anything, so a restored pruner (see `restore`)
        # measures every later round against the original widths, exactly like an uninterrupted run.
        importance, self.pruner.importance = self.pruner.importance, tp.importance.MagnitudeImportance(p=2)
        try:
            for _ in self.pruner._prune():
                raise AssertionError("priming round pruned channels")
        finally:
            self.pruner.importance = importance

    @property
    def rounds_done(self) -> int:
        return self.pruner.current_step

    @property
    def rounds_left(self) -> int:
        return self.cfg.steps - self.pruner.current_step

    def step(self) -> None:
        """Prune the next round in place (Taylor importance first runs `grad_fn` for fresh gradients)."""
        if self.rounds_left <= 0:
            raise FacekdError(f"all {self.cfg.steps} pruning rounds are done")
        if self.cfg.importance == "taylor":
            self.model.zero_grad(set_to_none=True)
            self.grad_fn(self.model)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            self.pruner.step()
        self.model.train(was_training)
        self.model.zero_grad(set_to_none=True)
        self._check_head()

    def state(self) -> dict:
        """JSON-able record of the rounds done: which channel indices left which layer (Torch-Pruning history)."""
        history = [[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in self.pruner.pruning_history()]
        return {"rounds_done": self.rounds_done, "history": history}

    def restore(self, state: dict) -> None:
        """Re-apply a `state()` to this pruner's (unpruned) model: the same channels go, the schedule resumes."""
        if self.rounds_done:
            raise FacekdError("restore() needs a fresh pruner on the unpruned model")
        with torch.no_grad():
            self.pruner.load_pruning_history([tuple(h) for h in state["history"]])
        self.pruner.current_step = int(state["rounds_done"])
        self._check_head()

    def _check_head(self) -> None:
        for m, shapes in zip(self.protected, self._head_shapes):
            for k, v in m.state_dict().items():
                if shapes.get(k) != v.shape:
                    raise FacekdError(f"pruning changed protected layer {type(m).__name__} ({k}); "
                                      "this model's head is not separable from its trunk")


def prune_model(model: nn.Module, cfg: PruneConfig, *, grad_fn: GradFn | None = None,
                example_inputs: torch.Tensor | None = None) -> nn.Module:
    """Prune `model` in place through all rounds with no fine-tuning in between; returns it."""
    pruner = ChannelPruner(model, cfg, grad_fn=grad_fn, example_inputs=example_inputs)
    while pruner.rounds_left:
        pruner.step()
    return model


def search_ratio(model: nn.Module, target_macs: int, cfg: PruneConfig, *, grad_fn: GradFn | None = None,
                 tol: float = 0.02, resolution: float = 0.004) -> tuple[float, int]:
    """Bisect the channel ratio (on copies) so the pruned model's multiply-adds come within `tol` of `target_macs`.

    Returns (ratio, macs of the model pruned at that ratio). Channel rounding makes MACs a step function of the ratio,
    so when no ratio lands inside `tol` the closest one found (ratio bracket narrower than `resolution`) is returned
    and the caller reports the miss (about 8 trials).
    """
    from facekd.models import count_macs

    base = count_macs(model)
    if target_macs >= base:
        raise FacekdError(f"--target-macs {target_macs / 1e6:.1f}M is not below the model's {base / 1e6:.1f}M")
    hi_limit = cfg.max_layer_ratio if not cfg.global_pruning else 0.95
    lo, hi = 0.0, hi_limit
    best: tuple[float, int] | None = None

    # Per-layer pruning removes the same count from a layer whichever channels rank lowest, so the widths (and
    # MACs) do not depend on the importance: search with the cheap magnitude score unless ranking is global.
    search_cfg = cfg.to_dict() if cfg.global_pruning else {**cfg.to_dict(), "importance": "magnitude"}

    def macs_at(ratio: float) -> int:
        trial = copy.deepcopy(model)
        prune_model(trial, PruneConfig(**{**search_cfg, "ratio": ratio}), grad_fn=grad_fn)
        return count_macs(trial)

    while hi - lo > resolution:  # finer ratios than this move no channel at MobileFaceNet widths (8 / 512)
        mid = (lo + hi) / 2
        macs = macs_at(mid)
        if best is None or abs(macs - target_macs) < abs(best[1] - target_macs):
            best = (mid, macs)
        if abs(macs - target_macs) <= tol * target_macs:
            break
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    assert best is not None
    if best[1] > target_macs * (1 + tol) and abs(hi - hi_limit) < 1e-9:
        raise FacekdError(f"--target-macs {target_macs / 1e6:.1f}M is unreachable with --max-layer-ratio "
                          f"{cfg.max_layer_ratio} (reaches {best[1] / 1e6:.1f}M); raise --max-layer-ratio")
    return round(best[0], 4), best[1]
