"""Distillation losses: pure functions of (student embeddings, teacher embeddings, labels), one `nn.Module` each.

Notation: s_i = student embedding (B x d_s), t_i = teacher embedding (B x d_t), hat(x) = x / ||x||.
When d_s != d_t the student is first mapped by a learnable linear projection P (d_s -> d_t, no bias) that
`DistillObjective` owns and shares between the losses below; the student model itself keeps its d_s embedding.

- `FeatureKD`     cosine: mean_i (1 - <hat(P s_i), hat(t_i)>)        mse: mean_i ||hat(P s_i) - hat(t_i)||^2 / d_t
- `LogitKD`       z^s = k hat(P s) C^T, z^t = k hat(t) C^T over the teacher's class centres C (rows unit norm);
                  L = T^2 * mean_i KL(softmax(z^t_i / T) || softmax(z^s_i / T))                 (Hinton et al. 2015)
- `RelationalKD`  G^s = hat(s) hat(s)^T, G^t = hat(t) hat(t)^T (batch cosine-similarity matrices);
                  L = mean over the B(B-1) off-diagonal entries of (G^s - G^t)^2.  This is the *angle-free*
                  similarity-preserving form (Tung & Mori 2019 with cosine Gram matrices), not RKD's distance or
                  angle potentials; it needs no projection because both Gram matrices are B x B. Under DDP, B is
                  the global batch: both sides are all-gathered, so the loss is the one-process loss of the global
                  batch (each rank's local gradient is scaled by world size, undone by DDP's gradient averaging).
- `AdaDistillHead` AdaDistill (Boutros, Struc, Damer, ECCV 2024); see its docstring for the reading of the paper/code.

Several teachers at once (`--teacher A+B`): the teacher embedding is the concatenation of the K teachers' embeddings
and P maps to all of them (P stacks one projection per teacher). `blocks` (the teachers' dimensions) makes FeatureKD
the mean of the per-teacher losses and LogitKD's logits the mean of the per-teacher cosine logits,
z = k mean_j hat(x_j) hat(C_j)^T, for the student (x = P s) and the teacher (x = t) alike. One block is the single
teacher formula exactly.

The hard-label margin loss (ArcFace / CosFace) is `engine.margin.MarginHead`, used by `DistillObjective`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_METRICS = ("cosine", "mse")


def _split(x: Tensor, blocks: tuple[int, ...] | None) -> tuple[Tensor, ...]:
    return (x,) if blocks is None else torch.split(x, list(blocks), dim=1)


class FeatureKD(nn.Module):
    """Embedding matching between L2-normalised student (already projected to d_t) and teacher embeddings.

    `blocks`: the teachers' dimensions when t concatenates several teachers; the loss is the mean over teachers.
    """

    def __init__(self, metric: str = "cosine", blocks: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if metric not in FEATURE_METRICS:
            raise ValueError(f"metric must be one of {FEATURE_METRICS}, got {metric!r}")
        self.metric, self.blocks = metric, tuple(blocks) if blocks else None

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        losses = []
        for sb, tb in zip(_split(student.float(), self.blocks), _split(teacher.float(), self.blocks)):
            s, t = F.normalize(sb, dim=1), F.normalize(tb, dim=1)
            # mse: mean over B x d_t entries = mean_i ||s_i - t_i||^2 / d_t
            losses.append((1.0 - (s * t).sum(dim=1)).mean() if self.metric == "cosine" else F.mse_loss(s, t))
        return torch.stack(losses).mean()


class LogitKD(nn.Module):
    """Temperature-scaled KL divergence between student and teacher logits over the teacher's class centres.

    `centres` (C x d_t) is registered as a buffer and renormalised; `scale` is the cosine-logit scale k (the ArcFace
    s), `temperature` is T. The T^2 factor keeps gradient magnitudes comparable across temperatures. `blocks`: the
    teachers' dimensions when embeddings and centres concatenate several teachers (logits = mean of theirs).
    """

    def __init__(self, centres: Tensor, temperature: float = 4.0, scale: float = 64.0,
                 blocks: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.blocks = tuple(blocks) if blocks else None
        centres = torch.as_tensor(centres, dtype=torch.float32)
        # not persistent: the centres come from the teacher cache, and C x D floats would bloat every checkpoint
        self.register_buffer("centres", torch.cat([F.normalize(c, dim=1) for c in _split(centres, self.blocks)], 1),
                             persistent=False)
        self.temperature = float(temperature)
        self.scale = float(scale)

    def logits(self, embeddings: Tensor) -> Tensor:
        parts = zip(_split(embeddings.float(), self.blocks), _split(self.centres, self.blocks))
        return self.scale * torch.stack([F.normalize(x, dim=1) @ c.T for x, c in parts]).mean(0)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        T = self.temperature
        log_p_student = F.log_softmax(self.logits(student) / T, dim=1)
        log_p_teacher = F.log_softmax(self.logits(teacher) / T, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return kl * T * T


class RelationalKD(nn.Module):
    """MSE between the off-diagonal entries of the student's and teacher's batch cosine-similarity matrices, over
    the global batch (all-gathered under DDP)."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        student, (teacher,) = _GatherOwnGrad.apply(student.float()), _gather_across_ranks(teacher.float())
        s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
        b = s.shape[0]
        if b < 2:
            return s.new_zeros(())
        off = ~torch.eye(b, dtype=torch.bool, device=s.device)
        return ((s @ s.T - t @ t.T)[off] ** 2).mean()


class AdaDistillHead(nn.Module):
    """AdaDistill: a margin-penalty softmax whose class centres are distilled, adaptively, from teacher embeddings.

    Reading of the paper (arXiv:2407.01332) and the authors' code (github.com/fdbtrs/AdaDistill,
    `utils/losses.py: AdaptiveAArcFace`, `train/train_AdaDistill.py`):
    - The head's class-centre matrix W (C x d_t) is *not* learned by the optimiser (the official script optimises
      only the backbone); it is an EMA of normalised teacher embeddings, updated under no_grad before the loss:
          alpha_i = clamp( cos(hat(s_i), hat(t_i)) * clamp(cos(W_{y_i}, hat(t_i)), 1e-6, 1), 1e-6, 1 )
          W_{y_i} <- alpha_i * W_{y_i} + (1 - alpha_i) * hat(t_i)
      so the momentum adapts per sample without a hyper-parameter: early in training the student disagrees with the
      teacher (small cos(s,t)), alpha is small and the centre is close to the current teacher sample embedding
      (simple sample-to-sample knowledge); as the student catches up alpha grows and W accumulates a class-level
      average (complex sample-to-centre knowledge). The second factor (teacher-to-centre similarity) weighs down
      teacher embeddings far from their class centre (the paper's hard-sample-aware weighting,
      `adaptive_weighted_alpha=True`, the repository's default config; `weighted_alpha=False` here gives
      alpha = cos(hat(s_i), hat(t_i)), the unweighted variant).
    - Loss: ArcFace (or CosFace) margin-penalty softmax cross-entropy of the student against hat(W):
          arcface logit_{i,j} = k cos(theta_ij + m [j = y_i]);  cosface  k (cos theta_ij - m [j = y_i])
      and it is the *only* loss: no separate KD term and no weight to tune. Official defaults: k = 64, m = 0.45
      (their config), W initialised N(0, 0.01^2). The margin math is `engine.margin.MarginHead` (frozen weight =
      W), which adds insightface's monotone fall-back where theta + m > pi; the official code has none (rarely hit).
    - The student embedding enters both the alpha and the logits in the teacher's space; the official code uses a
      512-d MobileFaceNet so no projection exists there. Here a 128-d student goes through the objective's learned
      projection P first (our adaptation).
    Deviation, documented: when a class occurs several times in one batch the official in-place indexed write keeps
    one arbitrary update; here all updates are computed from the pre-batch centre and averaged (deterministic).
    W is the head's frozen parameter, so it is saved with the objective's state and survives resume. Under DDP every
    rank applies the update of the whole global batch (all-gathered), so W stays identical on all ranks (the official
    code updates each rank's copy from its own slice only, and the copies drift apart).
    """

    def __init__(self, embedding_dim: int, num_classes: int, *, margin: str = "arcface", s: float = 64.0,
                 m: float = 0.45, weighted_alpha: bool = True) -> None:
        super().__init__()
        from engine.margin import MarginHead  # the one margin implementation; its weight becomes the EMA centres

        self.head = MarginHead(embedding_dim, num_classes, margin=margin, s=s, m=m)
        self.head.weight.requires_grad_(False)  # never touched by the optimiser, only by `update_centres`
        self.weighted_alpha = weighted_alpha
        self.last_stats: dict[str, Tensor] = {}

    @property
    def centres(self) -> Tensor:
        return self.head.weight

    @torch.no_grad()
    def update_centres(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """EMA step on the centres of the classes in `labels`; returns the per-sample alpha (B,)."""
        w = self.head.weight
        s, t = F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)
        s, t, labels = _gather_across_ranks(s, t, labels)
        alpha = (s * t).sum(dim=1).clamp(-1, 1)
        if self.weighted_alpha:
            alpha = alpha * F.cosine_similarity(w[labels].float(), t, dim=1).clamp(1e-6, 1)
        alpha = alpha.clamp(1e-6, 1.0)
        new = alpha[:, None] * w[labels].float() + (1 - alpha[:, None]) * t
        summed = torch.zeros(w.shape, dtype=torch.float32, device=w.device).index_add_(0, labels, new)
        counts = torch.zeros(w.shape[0], device=w.device).index_add_(0, labels, torch.ones_like(alpha))
        touched = counts > 0
        w[touched] = (summed[touched] / counts[touched, None]).to(w.dtype)
        return alpha

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        alpha = self.update_centres(student, teacher, labels)
        self.last_stats = {"alpha": alpha.mean()}
        return self.head(student, labels)


@torch.no_grad()
def _gather_across_ranks(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Concatenate equal-shaped per-rank tensors over all DDP ranks (identity in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    out = []
    for x in tensors:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


class _GatherOwnGrad(torch.autograd.Function):
    """Concatenate x over DDP ranks (identity in one process). Every rank computes the same loss of the whole
    gathered batch, so the gradient of its own slice is complete locally; it is multiplied by world size because DDP
    averages gradients over ranks (arcface_torch's AllGather does the same)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        ctx.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if ctx.world == 1:
            return x.view_as(x)
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if ctx.world == 1:
            return grad
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows] * ctx.world
