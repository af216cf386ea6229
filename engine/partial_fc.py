"""Partial FC: a margin softmax whose class centres are sharded across ranks and sampled (An et al., CVPR 2022).

insightface's arcface_torch (`partial_fc_v2.py`) trains 2M-identity heads this way; this is the same arithmetic:
- rank r of W holds the contiguous class range [start_r, start_r + num_local_r) (C // W classes, the first C % W
  ranks one more), so the weight, its gradient and its momentum cost 1/W of the dense head per rank;
- the embeddings and labels of the whole global batch are all-gathered (the embedding gather is differentiable);
- each rank samples its shard: the classes of the global batch that fall in it (the positives) always, plus random
  negatives up to `sample_rate * num_local` (torch's RNG, which the trainer seeds per rank and checkpoints);
- the margin (ArcFace / CosFace, `engine.margin.combined_margin`, the same as `MarginHead`) is applied to the
  target entry of the sampled cosine logits on the rank that holds the target class;
- the softmax cross-entropy is distributed: the row max and the row sum of exponentials are all-reduced, so no rank
  ever materialises the B x C logits. The loss (mean over the global batch) is the same value on every rank.

Gradients: the weight shard gets the exact gradient of the global loss. The local embeddings get world_size times it
(arcface_torch's `AllGatherFunc` does the same): DDP then averages the backbone's gradients over ranks, which gives
the exact gradient of the global-batch loss. With one process and sample_rate=1 it is `MarginHead` exactly.

The head's weight must stay out of DDP (every rank holds different classes): its parameter carries
`sharded = True`, and `engine.Trainer` leaves such parameters out of DDP and saves them per rank.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from engine.margin import MARGINS, MarginHead, combined_margin

HEADS = ("dense", "partial_fc")
INIT_CHUNK = 65536  # classes per initialisation block: the initial weights do not depend on the world size


def world_info() -> tuple[int, int]:
    """(rank, world size): from the process group when there is one, else from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of the classes rank `rank` holds; as arcface_torch's PartialFC_V2."""
    base, extra = divmod(num_classes, world)
    return base * rank + min(rank, extra), base + (rank < extra)


class _AllGather(torch.autograd.Function):
    """Concatenate x over ranks; backward sums the gradient over ranks and returns this rank's slice times world."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, world = dist.get_rank(), dist.get_world_size()
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows] * world


class _DistCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over rows whose columns are split across ranks; label -1 = not on this rank."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor) -> Tensor:
        rows = torch.arange(len(labels), device=logits.device)
        here = labels >= 0
        top = logits.max(dim=1, keepdim=True).values
        dist.all_reduce(top, dist.ReduceOp.MAX)
        prob = (logits - top).exp_()
        total = prob.sum(dim=1, keepdim=True)
        dist.all_reduce(total)
        prob /= total
        target = torch.zeros(len(labels), dtype=logits.dtype, device=logits.device)
        target[here] = logits[rows[here], labels[here]]
        dist.all_reduce(target)
        loss = (total.squeeze(1).log() + top.squeeze(1) - target).mean()
        ctx.save_for_backward(prob, labels)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        prob, labels = ctx.saved_tensors
        here = labels >= 0
        rows = torch.arange(len(labels), device=prob.device)
        prob[rows[here], labels[here]] -= 1.0
        return prob * (grad / len(labels)), None


class PartialFC(nn.Module):
    """`loss = head(local_embeddings, local_labels)`: sharded, sampled margin softmax over the global batch.

    `centres` (the full num_classes x D, e.g. a teacher's class means) initialises the weights; otherwise they are
    N(0, 0.01) drawn in fixed blocks of classes, so the same seed gives the same full matrix at any world size.
    `rank`/`world` default to the process group or torchrun's RANK / WORLD_SIZE (the trainer creates the group later).
    """

    def __init__(self, embedding_dim: int, num_classes: int, margin: str = "arcface", s: float = 64.0,
                 m: float | None = None, sample_rate: float = 1.0, centres: Tensor | None = None,
                 rank: int | None = None, world: int | None = None) -> None:
        super().__init__()
        if margin not in MARGINS:
            raise ValueError(f"margin must be one of {sorted(MARGINS)}, got {margin!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        env_rank, env_world = world_info()
        self.rank, self.world = env_rank if rank is None else rank, env_world if world is None else world
        self.margin, self.s, self.sample_rate = margin, float(s), float(sample_rate)
        self.m = float(MARGINS[margin] if m is None else m)
        self.num_classes, self.embedding_dim = int(num_classes), int(embedding_dim)
        self.class_start, self.num_local = shard_range(self.num_classes, self.rank, self.world)
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_dim))
        self.weight.sharded = True  # engine.Trainer: not DDP-synchronised, checkpointed per rank
        lo, hi = self.class_start, self.class_start + self.num_local
        with torch.no_grad():
            if centres is not None:
                centres = torch.as_tensor(centres, dtype=torch.float32)
                if tuple(centres.shape) != (num_classes, embedding_dim):
                    raise ValueError(f"centres must be ({num_classes}, {embedding_dim}), got {tuple(centres.shape)}")
                self.weight.copy_(centres[lo:hi])
            else:
                base = int(torch.randint(0, 2 ** 62, ()))  # one draw: every rank's RNG moves the same way
                for chunk in range(lo // INIT_CHUNK, math.ceil(hi / INIT_CHUNK)):
                    a, b = chunk * INIT_CHUNK, min((chunk + 1) * INIT_CHUNK, num_classes)
                    gen = torch.Generator().manual_seed(base + chunk)
                    block = torch.randn(b - a, embedding_dim, generator=gen) * 0.01
                    self.weight[max(a, lo) - lo:min(b, hi) - lo] = block[max(a, lo) - a:min(b, hi) - a]

    def sample(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(weight rows to use, labels as column indices into them or -1 when the class is on another rank)."""
        local = labels - self.class_start
        here = (local >= 0) & (local < self.num_local)
        if self.num_sample >= self.num_local:
            return self.weight, torch.where(here, local, -1)
        positive = torch.unique(local[here], sorted=True)
        if len(positive) >= self.num_sample:  # more positives than the budget: all of them, no negatives
            index = positive
        else:
            score = torch.rand(self.num_local, device=labels.device)
            score[positive] = 2.0
            index = torch.topk(score, k=self.num_sample).indices.sort().values
        columns = torch.full_like(labels, -1)
        columns[here] = torch.searchsorted(index, local[here])
        return self.weight[index], columns

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        distributed = self.world > 1
        with torch.autocast(embeddings.device.type, enabled=False):
            emb = embeddings.float()
            if distributed:
                emb = _AllGather.apply(emb)
                gathered = [torch.empty_like(labels) for _ in range(self.world)]
                dist.all_gather(gathered, labels.contiguous())
                labels = torch.cat(gathered)
            weight, columns = self.sample(labels)
            cos = F.linear(F.normalize(emb, dim=1), F.normalize(weight.float(), dim=1)).clamp(-1.0, 1.0)
            here = columns >= 0
            rows = torch.arange(len(columns), device=cos.device)[here]
            cos = cos.index_put((rows, columns[here]), combined_margin(cos[rows, columns[here]], self.margin, self.m))
            logits = self.s * cos
            if not distributed:
                return F.cross_entropy(logits, columns)
            return _DistCrossEntropy.apply(logits, columns)

    def extra_repr(self) -> str:
        # the shard count is part of the repr (the trainer's fingerprint), so a resume at another world size is
        # refused; the rank is not (the fingerprint is the same on every rank)
        return (f"{self.embedding_dim} -> {self.num_classes} in {self.world} shard(s), sample_rate={self.sample_rate}, "
                f"margin={self.margin}, s={self.s}, m={self.m}")


def make_head(head: str, embedding_dim: int, num_classes: int, *, margin: str = "arcface", s: float = 64.0,
              m: float | None = None, sample_rate: float = 1.0, centres: Tensor | None = None) -> nn.Module:
    """`dense` (`MarginHead`, every rank holds all classes) or `partial_fc` (`engine.partial_fc.PartialFC`, the
    classes sharded over the torchrun ranks and `sample_rate` of each shard used per step)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "dense":
        if sample_rate != 1.0:
            raise ValueError(f"sample_rate {sample_rate} needs head partial_fc; the dense head uses every class")
        return MarginHead(embedding_dim, num_classes, margin=margin, s=s, m=m, centres=centres)
    return PartialFC(embedding_dim, num_classes, margin=margin, s=s, m=m, sample_rate=sample_rate, centres=centres)


def head_bytes(num_classes: int, embedding_dim: int, world: int = 1, sample_rate: float = 1.0,
               batch_size: int = 512, momentum: bool = True) -> dict[str, int]:
    """Computed per-rank memory of a margin head in fp32: `state` = weight + gradient (+ SGD momentum) of the shard;
    `transient` = the normalised copy of the sampled rows and its gradient, and the logits of one global batch over
    them with their softmax; `total` = both (a dense head is world=1: every rank holds every class)."""
    num_local = shard_range(num_classes, 0, world)[1]
    sampled = max(1, int(sample_rate * num_local))
    state = num_local * embedding_dim * 4 * (3 if momentum else 2)
    transient = 2 * sampled * embedding_dim * 4 + 2 * batch_size * sampled * 4
    return {"state": state, "transient": transient, "total": state + transient}
