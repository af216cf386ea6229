"""Margin-softmax heads for face recognition: ArcFace and CosFace with insightface's combined-margin semantics.

insightface `CombinedMarginLoss(s, m1, m2, m3)` gives the target class the logit s * (cos(m1 * theta + m2) - m3).
Its two presets are the ones here:
- ArcFace (m1=1, m2=0.5, m3=0): s * cos(theta + m). With `easy_margin=False`, where theta + m would pass pi
  (cos theta <= cos(pi - m)) cos(theta + m) stops decreasing, so insightface switches to the linear fall-back
  cos(theta) - m * sin(pi - m), which keeps the target logit monotone in theta.
- CosFace (m1=1, m2=0, m3=0.35): s * (cos(theta) - m).
Other classes get s * cos(theta). The class weights (num_classes x D) are L2-normalised in every forward, as are
the embeddings. The head is one dense matrix on every rank; for large class counts `engine.partial_fc.PartialFC`
shards and samples it with the same margin (`combined_margin`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MARGINS = {"arcface": 0.5, "cosface": 0.35}


def combined_margin(target: Tensor, margin: str, m: float) -> Tensor:
    """The margin-penalised cosine of the target class, from its cos(theta) (already clamped to [-1, 1])."""
    if margin == "cosface":
        return target - m
    # arcface; insightface's constants: theta = cos(pi - m), sinmm = sin(pi - m) * m.
    # clamp_min keeps d sqrt / d x finite when cos theta is exactly +-1
    sin = torch.sqrt((1.0 - target * target).clamp_min(1e-12))
    cos_theta_m = target * math.cos(m) - sin * math.sin(m)
    return torch.where(target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m)


class MarginHead(nn.Module):
    """`loss = head(embeddings, labels)`: margin softmax cross-entropy; `head.logits(embeddings)` has no margin.

    `centres` (num_classes x D, e.g. a teacher's normalised class means) initialises the class weights, as
    AdaDistill and logit KD need; otherwise they start as N(0, 0.01) like arcface_torch's Partial FC.
    """

    def __init__(self, embedding_dim: int, num_classes: int, margin: str = "arcface", s: float = 64.0,
                 m: float | None = None, centres: Tensor | None = None) -> None:
        super().__init__()
        if margin not in MARGINS:
            raise ValueError(f"margin must be one of {sorted(MARGINS)}, got {margin!r}")
        self.margin, self.s = margin, float(s)
        self.m = float(MARGINS[margin] if m is None else m)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        if centres is None:
            nn.init.normal_(self.weight, 0.0, 0.01)
        else:
            centres = torch.as_tensor(centres, dtype=torch.float32)
            if tuple(centres.shape) != (num_classes, embedding_dim):
                raise ValueError(f"centres must be ({num_classes}, {embedding_dim}), got {tuple(centres.shape)}")
            with torch.no_grad():
                self.weight.copy_(centres)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def cosine(self, embeddings: Tensor) -> Tensor:
        """cos(theta) between each embedding and each class weight, (B, num_classes), computed in float32."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def logits(self, embeddings: Tensor) -> Tensor:
        """Scaled cosine logits without margin (for evaluation / classification accuracy)."""
        return self.s * self.cosine(embeddings)

    def margin_logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(embeddings).clamp(-1.0, 1.0)
        rows = torch.arange(cos.shape[0], device=cos.device)
        cos = cos.index_put((rows, labels), combined_margin(cos[rows, labels], self.margin, self.m))
        return self.s * cos

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.margin_logits(embeddings, labels), labels)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.num_classes}, margin={self.margin}, s={self.s}, m={self.m}"


class MarginObjective(nn.Module):
    """The plain classification objective for `engine.Trainer`: margin softmax on the batch labels."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, embeddings: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        loss = self.head(embeddings, batch["labels"])
        return {"loss": loss, self.head.margin: loss.detach()}
