"""`DistillObjective`: the student's training objective for `engine.Trainer`, built from a `--kd` spec.

    loss = w_ce * margin_ce(s, y)                         (engine.margin.MarginHead on the student embedding, or
                                                           engine.partial_fc.PartialFC with head="partial_fc";
                                                           replaced by the AdaDistill head when `adadistill` is on)
         + w_feature * FeatureKD(P s, t) + w_logit * LogitKD(P s, t) + w_relational * RelationalKD(s, t)

t comes from a teacher source: `CachedTeacher` (the knowledge cache, looked up by `batch["indices"]` and
`batch["flipped"]`; no teacher forward at all) or `OnlineTeacher` (runs the teacher on `batch["images"]`, for
augmentations the cache cannot hold). P is one learnable linear projection d_s -> d_t, present when the dimensions
differ and a loss needs the teacher's space; it is training-only (not part of the saved student).

Several teachers (`TeacherEnsemble`, `--teacher A+B`): t is the concatenation of the teachers' unit embeddings, each
scaled by 1/sqrt(K) (so t is unit-norm and its batch Gram matrix is the mean of the teachers'), P stacks one
projection per teacher, and the losses take the teachers' dimensions as `blocks` (see distill/losses.py).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses import AdaDistillHead, FeatureKD, LogitKD, RelationalKD
from facekd.io import FacekdError

KD_NAMES = ("none", "feature", "logit", "relational", "adadistill")
DEFAULT_WEIGHTS = {"ce": 1.0, "feature": 10.0, "logit": 1.0, "relational": 10.0}
# which losses compare in the teacher's space (and so need the projection when d_s != d_t)
_PROJECTED = {"feature", "logit", "adadistill"}


def parse_kd(spec: str) -> tuple[str, ...]:
    """'feature+logit' -> ('feature', 'logit'); 'none' -> (). Unknown names: one-line error listing valid ones."""
    parts = [p.strip() for p in str(spec).replace(",", "+").split("+") if p.strip()]
    bad = [p for p in parts if p not in KD_NAMES]
    if bad or not parts:
        raise FacekdError(f"--kd: unknown value {'+'.join(bad) or spec!r}; choose from {', '.join(KD_NAMES)} "
                          f"or a '+' combination such as feature+logit")
    if "none" in parts and len(parts) > 1:
        raise FacekdError(f"--kd: 'none' cannot be combined with other losses ({spec!r})")
    return tuple(dict.fromkeys(p for p in parts if p != "none"))  # ordered, no duplicates


def kd_label(kd: tuple[str, ...]) -> str:
    return "+".join(kd) or "none"


class CachedTeacher:
    """Teacher embeddings from a `teachers.cache.TeacherCache`: a memory-mapped fp16 lookup, no forward pass."""

    def __init__(self, cache: Any, shift: Tensor | None = None) -> None:
        self.cache = cache
        self.embedding_dim = cache.embedding_dim
        self.shift = shift  # subtracted before renormalising (--centre-teacher: the teacher's mean embedding)

    def __call__(self, batch: Mapping[str, Any]) -> Tensor:
        if "indices" not in batch or "flipped" not in batch:
            raise FacekdError("the cached teacher needs batch['indices'] and batch['flipped'] from the loader")
        flipped = batch["flipped"]
        if not torch.is_tensor(flipped):
            flipped = torch.as_tensor(flipped)
        if flipped.dim() == 0:
            flipped = flipped.expand(len(batch["indices"]))
        emb = self.cache.lookup(batch["indices"], flipped)
        return emb if self.shift is None else F.normalize(emb - self.shift, dim=1)


class TeacherEnsemble:
    """Several teacher sources as one: concatenated unit embeddings scaled by 1/sqrt(K); `blocks` = their dims."""

    def __init__(self, teachers: list[Any]) -> None:
        if len(teachers) < 2:
            raise ValueError("an ensemble needs at least two teachers")
        self.teachers = list(teachers)
        self.blocks = tuple(int(t.embedding_dim) for t in self.teachers)
        self.embedding_dim = sum(self.blocks)

    def __call__(self, batch: Mapping[str, Any]) -> Tensor:
        scale = len(self.teachers) ** -0.5
        return torch.cat([F.normalize(t(batch).float(), dim=1) * scale for t in self.teachers], dim=1)

    @staticmethod
    def join_centres(centres: list[Tensor]) -> Tensor:
        return torch.cat([F.normalize(torch.as_tensor(c, dtype=torch.float32), dim=1) for c in centres], dim=1)


class OnlineTeacher:
    """Runs a frozen teacher model on the (student-normalised) batch images. Not an nn.Module on purpose: the
    teacher must stay out of the objective's parameters (optimiser) and state_dict (checkpoints)."""

    def __init__(self, model: nn.Module, *, student_preprocessing: dict | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.embedding_dim = int(model.embedding_dim)
        self.teacher_pre = dict(getattr(model, "preprocessing", {}) or {})
        self.student_pre = dict(student_preprocessing or self.teacher_pre)

    def _to_teacher_input(self, x: Tensor) -> Tensor:
        sp, tp = self.student_pre, self.teacher_pre
        if not tp or sp == tp:
            return x
        dev = x.device
        s_mean, s_std = (torch.tensor(sp[k], device=dev, dtype=x.dtype).view(1, -1, 1, 1) for k in ("mean", "std"))
        t_mean, t_std = (torch.tensor(tp[k], device=dev, dtype=x.dtype).view(1, -1, 1, 1) for k in ("mean", "std"))
        pixels = x * s_std + s_mean  # back to pixel units, in the student's channel order
        if sp.get("channel_order", "RGB") != tp.get("channel_order", "RGB"):
            pixels = pixels.flip(1)
        x = (pixels - t_mean) / t_std
        size = tuple(tp.get("input_size", x.shape[-2:]))
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any]) -> Tensor:
        images = batch["images"]
        p = next(self.model.parameters(), None)
        if p is not None and p.device != images.device:
            self.model.to(images.device)
        return self.model(self._to_teacher_input(images)).float()


class DistillObjective(nn.Module):
    """`objective(embeddings, batch) -> {"loss", "ce"|"adadistill", "feature", "logit", "relational", ...}`."""

    def __init__(self, kd: str | tuple[str, ...], *, student_dim: int, num_classes: int,
                 teacher: Callable[[Mapping[str, Any]], Tensor] | None = None, teacher_dim: int | None = None,
                 centres: Tensor | None = None, margin: str = "arcface", s: float = 64.0, m: float | None = None,
                 weights: Mapping[str, float] | None = None, temperature: float = 4.0, logit_scale: float = 64.0,
                 feature_metric: str = "cosine", adadistill_m: float = 0.45, head: str = "dense",
                 sample_rate: float = 1.0) -> None:
        super().__init__()
        from engine.partial_fc import make_head

        self.kd = parse_kd(kd) if isinstance(kd, str) else tuple(kd)
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise FacekdError(f"unknown loss weight(s) {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        if self.kd and teacher is None:
            raise FacekdError(f"--kd {kd_label(self.kd)} needs a teacher (cache or online)")
        self.teacher = teacher
        blocks = getattr(teacher, "blocks", None)
        if blocks and "adadistill" in self.kd:
            raise FacekdError("--kd adadistill distils one teacher's centres; use one teacher, or feature/logit/"
                              "relational with several")
        teacher_dim = int(teacher_dim or getattr(teacher, "embedding_dim", 0) or student_dim)
        # several teachers always need P (one projection per teacher, stacked), even when their sum equals d_s
        self.proj = (nn.Linear(student_dim, teacher_dim, bias=False)
                     if (teacher_dim != student_dim or blocks) and _PROJECTED & set(self.kd) else nn.Identity())
        if "adadistill" in self.kd:
            if head != "dense":
                raise FacekdError("--kd adadistill has its own dense head of EMA teacher centres; use --head dense")
            self.adadistill = AdaDistillHead(teacher_dim, num_classes, margin=margin, s=s, m=adadistill_m)
        else:
            self.head = make_head(head, student_dim, num_classes, margin=margin, s=s, m=m, sample_rate=sample_rate)
        if "feature" in self.kd:
            self.feature = FeatureKD(feature_metric, blocks=blocks)
        if "logit" in self.kd:
            if centres is None:
                raise FacekdError("--kd logit needs the teacher's class centres (from the teacher cache)")
            if tuple(centres.shape) != (num_classes, teacher_dim):
                raise FacekdError(f"teacher centres are {tuple(centres.shape)}, expected ({num_classes}, "
                                  f"{teacher_dim}): the cache was built for another dataset or teacher")
            self.logit = LogitKD(centres, temperature=temperature, scale=logit_scale, blocks=blocks)
        if "relational" in self.kd:
            self.relational = RelationalKD()

    def forward(self, embeddings: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        labels = batch["labels"]
        out: dict[str, Tensor] = {}
        total = embeddings.new_zeros((), dtype=torch.float32)
        t = None
        if self.kd:
            t = self.teacher(batch).to(embeddings.device, torch.float32, non_blocking=True)
        if "adadistill" not in self.kd:
            loss = self.head(embeddings, labels)
            out["ce"] = loss.detach()
            total = total + self.weights["ce"] * loss
        # KD terms in float32 whatever the trainer's autocast: cosine logits at scale 64 need the mantissa
        with torch.autocast(embeddings.device.type, enabled=False):
            projected = self.proj(embeddings.float()) if self.kd else None
            if "adadistill" in self.kd:
                loss = self.adadistill(projected, t, labels)
                out["adadistill"] = loss.detach()
                out["adadistill_alpha"] = self.adadistill.last_stats["alpha"]
                total = total + loss
            for name in ("feature", "logit"):
                if name in self.kd:
                    loss = getattr(self, name)(projected, t)
                    out[name] = loss.detach()
                    total = total + self.weights[name] * loss
            if "relational" in self.kd:
                loss = self.relational(embeddings.float(), t)
                out["relational"] = loss.detach()
                total = total + self.weights["relational"] * loss
        out["loss"] = total
        return out
