"""Partial FC against the dense MarginHead: loss and gradients in one process and in two (gloo, CPU, spawn).
The same two processes check distill's RelationalKD over the all-gathered batch against one process.

The reference is `engine.margin.MarginHead` on the whole global batch in one process (itself checked against
insightface's acos formula in test_engine.py). With sample_rate < 1 the reference is MarginHead restricted to the
classes Partial FC sampled (the rows of the dense weight it used, with the labels remapped).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from engine.margin import MarginHead
from engine.partial_fc import PartialFC, head_bytes, make_head, shard_range

C, D, B = 11, 8, 6


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, D, generator=gen)
    emb = torch.randn(2 * B, D, generator=gen)
    labels = torch.tensor([0, 3, 3, 10, 5, 1, 9, 2, 3, 7, 10, 6])
    emb[4] = -50 * weight[5]  # theta near pi: arcface's fall-back branch
    return weight, emb, labels


def _dense(weight, emb, labels, margin):
    head = MarginHead(D, weight.shape[0], margin, centres=weight)
    e = emb.clone().requires_grad_(True)
    loss = head(e, labels)
    loss.backward()
    return loss.detach(), e.grad, head.weight.grad


@pytest.mark.parametrize("margin", ["arcface", "cosface"])
def test_one_process_full_rate_equals_dense_margin_head(margin: str) -> None:
    weight, emb, labels = _problem()
    loss, g_emb, g_w = _dense(weight, emb, labels, margin)
    pfc = PartialFC(D, C, margin, centres=weight, rank=0, world=1)
    e = emb.clone().requires_grad_(True)
    got = pfc(e, labels)
    got.backward()
    assert torch.equal(got.detach(), loss)
    assert torch.equal(e.grad, g_emb) and torch.equal(pfc.weight.grad, g_w)


def test_sampling_keeps_every_positive_and_matches_dense_on_the_sampled_classes() -> None:
    weight, emb, labels = _problem()
    n = 64
    weight = torch.cat([weight, torch.randn(n - C, D, generator=torch.Generator().manual_seed(1))])
    pfc = PartialFC(D, n, "arcface", sample_rate=0.25, centres=weight, rank=0, world=1)
    torch.manual_seed(3)
    rows, columns = pfc.sample(labels)
    assert rows.shape == (16, D)
    torch.manual_seed(3)
    e = emb.clone().requires_grad_(True)
    loss = pfc(e, labels)
    loss.backward()
    index = torch.tensor([int((weight == r).all(dim=1).nonzero()) for r in rows.detach()])
    assert set(labels.tolist()) <= set(index.tolist()) and torch.equal(index, index.sort().values)
    assert torch.equal(index[columns], labels)
    ref_loss, ref_emb, ref_w = _dense(weight[index], emb, columns, "arcface")
    torch.testing.assert_close(loss.detach(), ref_loss)
    torch.testing.assert_close(e.grad, ref_emb)
    full = torch.zeros(n, D).index_add_(0, index, ref_w)
    torch.testing.assert_close(pfc.weight.grad, full)  # unsampled classes get exactly zero gradient


def test_more_positives_than_the_budget_uses_only_the_positives() -> None:
    pfc = PartialFC(D, 40, sample_rate=0.05, rank=0, world=1)  # budget 2 classes, 4 positives
    rows, columns = pfc.sample(torch.tensor([3, 30, 7, 3, 12]))
    assert rows.shape[0] == 4 and columns.tolist() == [0, 3, 1, 0, 2]


def test_shards_partition_the_classes_and_initial_weights_do_not_depend_on_world_size() -> None:
    n = 70001
    for world in (1, 2, 3, 8):
        ranges = [shard_range(n, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and sum(c for _, c in ranges) == n
        assert all(a + c == b for (a, c), (b, _) in zip(ranges, ranges[1:]))
    torch.manual_seed(5)
    one = PartialFC(4, n, rank=0, world=1).weight.detach()
    parts = []
    for r in range(3):
        torch.manual_seed(5)
        parts.append(PartialFC(4, n, rank=r, world=3).weight.detach())
    assert torch.equal(torch.cat(parts), one)
    assert abs(float(one.std()) - 0.01) < 1e-3


def test_make_head_and_computed_memory() -> None:
    assert isinstance(make_head("dense", D, C), MarginHead)
    assert isinstance(make_head("partial_fc", D, C, sample_rate=0.5), PartialFC)
    with pytest.raises(ValueError, match="needs head partial_fc"):
        make_head("dense", D, C, sample_rate=0.5)
    with pytest.raises(ValueError, match="sample_rate must be in"):
        PartialFC(D, C, sample_rate=0.0, rank=0, world=1)
    eight = head_bytes(1_000_000, 512, world=8, sample_rate=0.1, batch_size=512)
    assert eight["state"] == 125_000 * 512 * 4 * 3 and eight["total"] <= 1e9  # the target
    assert eight["transient"] == 2 * 12_500 * 512 * 4 + 2 * 512 * 12_500 * 4
    assert head_bytes(1_000_000, 512, world=1)["state"] == 8 * eight["state"]


# ---------------------------------------------------------------------------------------------- two processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = [(1.0, "arcface"), (1.0, "cosface"), (0.5, "arcface")]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for sample_rate, margin in CONFIGS:
            out[(rank, sample_rate, margin)] = _one_rank(rank, sample_rate, margin)
        from distill.losses import RelationalKD

        s, t = _relational_problem()
        local = slice(rank * B, (rank + 1) * B)
        s_local = s[local].clone().requires_grad_(True)
        loss = RelationalKD()(s_local, t[local])
        loss.backward()
        out[(rank, "relational")] = {"loss": loss.detach(), "grad": s_local.grad}
    finally:
        dist.destroy_process_group()


def _one_rank(rank: int, sample_rate: float, margin: str) -> dict:
    weight, emb, labels = _problem()
    pfc = PartialFC(D, weight.shape[0], margin, sample_rate=sample_rate, centres=weight)
    torch.manual_seed(100 + rank)
    local = slice(rank * B, (rank + 1) * B)
    e = emb[local].clone().requires_grad_(True)
    loss = pfc(e, labels[local])
    loss.backward()
    torch.manual_seed(100 + rank)  # the same draw again: which classes this rank sampled
    rows, _ = pfc.sample(labels)
    start = pfc.class_start
    index = [start + int((weight[start:start + pfc.num_local] == r).all(dim=1).nonzero()) for r in rows]
    return {"loss": loss.detach(), "emb_grad": e.grad, "w_grad": pfc.weight.grad, "index": index}


def _relational_problem() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2 * B, D, generator=gen), torch.randn(2 * B, 5, generator=gen)


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        return dict(out)


@pytest.mark.parametrize("sample_rate,margin", CONFIGS)
def test_two_processes_equal_dense_loss_and_gradients(two_ranks: dict, sample_rate: float, margin: str) -> None:
    weight, emb, labels = _problem()
    out = {r: two_ranks[(r, sample_rate, margin)] for r in (0, 1)}
    index = torch.tensor(out[0]["index"] + out[1]["index"])
    assert set(labels.tolist()) <= set(index.tolist())
    if sample_rate == 1.0:
        assert index.tolist() == list(range(C))
    remap = torch.full((C,), -1, dtype=torch.long)
    remap[index] = torch.arange(len(index))
    ref_loss, ref_emb, ref_w = _dense(weight[index], emb, remap[labels], margin)
    for r in (0, 1):
        torch.testing.assert_close(out[r]["loss"], ref_loss, rtol=1e-6, atol=1e-6)
        # the local embedding gradient is world x the exact one; DDP's averaging over ranks divides it back
        torch.testing.assert_close(out[r]["emb_grad"] / 2, ref_emb[r * B:(r + 1) * B], rtol=1e-5, atol=1e-7)
    w_grad = torch.cat([out[0]["w_grad"], out[1]["w_grad"]])
    torch.testing.assert_close(w_grad, torch.zeros(C, D).index_add_(0, index, ref_w), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- in the trainer

def _pfc_trainer(data, out, steps, sample_rate):
    from engine.margin import MarginObjective
    from engine.trainer import TrainConfig, Trainer
    from test_engine import TinyNet

    torch.manual_seed(0)
    model = TinyNet(bn=False)
    head = PartialFC(model.embedding_dim, data.num_classes, "arcface", sample_rate=sample_rate)
    cfg = TrainConfig(steps=steps, batch_size=16, lr=0.05, warmup_steps=1, ckpt_every=2, log_every=1, workers=0,
                      out=str(out))
    return Trainer(model, MarginObjective(head), data, cfg)


def test_trainer_with_sampled_partial_fc_resumes_exactly(tmp_path) -> None:
    import facedata

    data = facedata.open_train_set("synthfaces:tiny")
    ref = _pfc_trainer(data, tmp_path / "ref", 4, 0.25)
    ref.fit()
    _pfc_trainer(data, tmp_path / "run", 2, 0.25).fit()
    resumed = _pfc_trainer(data, tmp_path / "run", 4, 0.25)
    resumed.fit(resume=True)
    assert torch.equal(ref.objective.head.weight, resumed.objective.head.weight)
    for a, b in zip(ref.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_relational_kd_over_the_all_gathered_batch_equals_one_process(two_ranks: dict) -> None:
    from distill.losses import RelationalKD

    s, t = _relational_problem()
    s = s.requires_grad_(True)
    ref = RelationalKD()(s, t)
    ref.backward()
    for r in (0, 1):
        got = two_ranks[(r, "relational")]
        torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["grad"] / 2, s.grad[r * B:(r + 1) * B], rtol=1e-5, atol=1e-8)
