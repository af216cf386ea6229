"""prune: structured channel pruning of MobileFaceNet (Torch-Pruning), its checkpoint round trip and errors."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from facekd.io import FacekdError
from facekd.models import count_macs, create_model, export_onnx, load_checkpoint, read_checkpoint_metadata, save_checkpoint
from prune.core import IMPORTANCES, ChannelPruner, PruneConfig, protected_layers, prune_model, search_ratio
from prune.run import channel_config, parse_macs


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so a wrong channel mapping changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        if isinstance(m, nn.PReLU):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(create_model("mobilefacenet")).eval()


@pytest.fixture(scope="module")
def pruned(student):
    model = copy.deepcopy(student)
    pruner = ChannelPruner(model, PruneConfig(ratio=0.25, round_to=8))
    pruner.step()
    return model, pruner


def _x(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def test_pruned_model_reloads_strictly_and_exports_with_parity(pruned, student, tmp_path):
    model, _ = pruned
    assert count_macs(model) < 0.75 * count_macs(student)
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    header = read_checkpoint_metadata(path)
    assert header["kwargs"]["channels"] == channel_config(model)  # plain JSON widths, no pickled modules
    assert header["kwargs"]["channels"]["stem"] < 64
    reloaded = load_checkpoint(path)  # rebuilds from kwargs, strict load through safetensors
    with torch.no_grad():
        assert torch.equal(reloaded(_x()), model(_x()))
    import onnxruntime as ort

    onnx_path = export_onnx(model, tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: _x(3).numpy()})[0]
    with torch.no_grad():
        ref = model(_x(3)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_widths_are_multiples_of_round_to_and_head_is_bit_identical(pruned, student):
    model, pruner = pruned
    protected = set(map(id, pruner.protected))
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    changed = 0
    for name, m in convs:
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        if id(m) in protected:
            continue
        assert width % 8 == 0, f"{name}: {width} channels"
        changed += width != dict(student.named_modules())[name].out_channels
    assert changed > 20
    before, after = student.state_dict(), model.state_dict()
    head_keys = [k for k in after if k.split(".")[0] in ("gdc", "linear", "bn")]
    assert len(head_keys) >= 8
    for k in head_keys:
        assert torch.equal(before[k], after[k]), k
    assert {type(m) for m in pruner.protected} >= {nn.Linear, nn.BatchNorm1d, nn.Conv2d}


def test_round_to_one_allows_ragged_widths(student):
    model = prune_model(copy.deepcopy(student), PruneConfig(ratio=0.3, round_to=1))
    widths = channel_config(model)
    assert widths["stem"] == int(64 * 0.7) and any(w % 8 for w in widths["expand"])


def test_magnitude_removes_the_weakest_channels(student):
    model = copy.deepcopy(student)
    weak = [3, 9, 17, 22, 30, 41, 50, 63]  # zero them in the stem conv, its BN and the depthwise conv that follows
    with torch.no_grad():
        for mod in (model.stem[0], model.stem[1], model.stem_dw[0], model.stem_dw[1]):
            mod.weight[weak] = 0
    # the stem's width is tied by residual adds to blocks 0-4: zero there too so the group ranks them last
    with torch.no_grad():
        for blk in model.blocks[:5]:
            blk.project[0].weight[weak] = 0
            blk.project[1].weight[weak] = 0
            blk.expand[0].weight[:, weak] = 0
    keep_norms = model.stem[0].weight.flatten(1).norm(dim=1)
    prune_model(model, PruneConfig(ratio=0.125, importance="magnitude"))
    assert model.stem[0].out_channels == 56
    remaining = model.stem[0].weight.flatten(1).norm(dim=1)
    assert bool((remaining > 0).all())
    assert torch.allclose(remaining, keep_norms[[i for i in range(64) if i not in weak]])


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_every_importance_prunes_to_the_same_widths(student, importance):
    calls = []

    def grad_fn(m):  # a real backward pass, as prune.run does on training batches
        calls.append(1)
        m(_x(4)).pow(2).sum().backward()

    model = prune_model(copy.deepcopy(student), PruneConfig(ratio=0.2, importance=importance, steps=2),
                        grad_fn=grad_fn if importance == "taylor" else None)
    widths = channel_config(model)
    # per-layer pruning: the counts follow from the ratio alone (64 * 0.8 = 51.2 -> 48; 128 * 0.8 = 102.4 -> 104)
    assert widths["stem"] == 48 and widths["expand"][0] == 104 and widths["conv"] == 512
    assert len(calls) == (2 if importance == "taylor" else 0)
    with torch.no_grad():
        assert torch.isfinite(model(_x())).all()


def test_restore_replays_rounds_exactly(student):
    cfg = PruneConfig(ratio=0.3, steps=2, importance="fpgm")
    a = copy.deepcopy(student)
    pa = ChannelPruner(a, cfg)
    pa.step()
    state = pa.state()
    b = copy.deepcopy(student)
    pb = ChannelPruner(b, cfg)
    pb.restore(state)
    assert pb.rounds_done == 1 and channel_config(a) == channel_config(b)
    pa.step()
    pb.step()
    with torch.no_grad():
        assert torch.equal(a(_x()), b(_x()))


def test_target_macs_lands_within_tolerance(student):
    base = count_macs(student)
    target = int(0.7 * base)
    ratio, macs = search_ratio(student, target, PruneConfig())
    assert abs(macs - target) <= 0.03 * target
    pruned = prune_model(copy.deepcopy(student), PruneConfig(ratio=ratio))
    assert count_macs(pruned) == macs
    with pytest.raises(FacekdError, match="not below"):
        search_ratio(student, base + 1, PruneConfig())


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_bad_ratio_is_one_line_error(ratio):
    with pytest.raises(FacekdError, match=r"--ratio must be in \(0, 1\)") as err:
        PruneConfig(ratio=ratio).check()
    assert "\n" not in str(err.value)


def test_bad_importance_and_flags_are_one_line_errors(student):
    with pytest.raises(FacekdError, match="--importance: unknown value 'l1'; choose one of: magnitude, taylor") as err:
        PruneConfig(importance="l1").check()
    assert "\n" not in str(err.value)
    with pytest.raises(FacekdError, match="taylor needs training data"):
        ChannelPruner(copy.deepcopy(student), PruneConfig(importance="taylor"))
    with pytest.raises(FacekdError, match="exceeds --max-layer-ratio"):
        PruneConfig(ratio=0.8, max_layer_ratio=0.7).check()
    with pytest.raises(FacekdError, match="--round-to"):
        PruneConfig(round_to=0).check()
    assert parse_macs("150M") == 150_000_000 and parse_macs("0.2G") == 200_000_000
    with pytest.raises(FacekdError, match="--target-macs"):
        parse_macs("lots")


def test_cli_bad_flag_values_exit_2_with_one_line(student, tmp_path, capsys):
    from prune.run import main

    path = save_checkpoint(student, tmp_path / "student" / "model.safetensors")
    for argv, message in [([str(path), "--ratio", "1.2"], "error: --ratio must be in (0, 1), got 1.2"),
                          ([str(path), "--ratio", "0.2", "--importance", "random"], "error: --importance: unknown value"),
                          ([str(tmp_path / "nope"), "--ratio", "0.2"], "error: student checkpoint not found")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err


def test_insightface_mbf_protects_its_grouped_stem_conv():
    model = create_model("mbf").eval()
    protected = protected_layers(model)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels]
    assert grouped and all(any(g is p for p in protected) for g in grouped)
    assert any(isinstance(p, nn.BatchNorm1d) for p in protected)


@pytest.mark.slow
def test_prune_run_end_to_end_and_resume(student, tmp_path, capsys):
    from facekd.table import read_rows
    from prune.run import main

    ckpt = save_checkpoint(student, tmp_path / "runs" / "demo" / "student" / "model.safetensors")
    out, results = tmp_path / "runs" / "demo" / "pruned", tmp_path / "summary.csv"
    argv = [str(ckpt.parent), "--ratio", "0.2", "--steps", "2", "--finetune-steps", "2", "--batch-size", "8",
            "--preset", "smoke", "--data", "synthfaces:tiny", "--val", "synthfaces:tiny", "--kd", "none",
            "--device", "cpu", "--latency-runs", "5", "--results", str(results)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pruned"]["macs"] == count_macs(prune_model(copy.deepcopy(student), PruneConfig(ratio=0.2)))
    assert metrics["macs_ratio"] < 0.7
    assert set(metrics["accuracy"]) == {"unpruned", "pruned_before_last_finetune", "pruned_finetuned"}
    assert metrics["onnx_parity_rel"] < 1e-3
    assert metrics["latency"]["unpruned_median_ms"] > 0 and metrics["latency"]["ratio_vs_first"] > 0
    model = load_checkpoint(out / "model.safetensors")
    assert channel_config(model) == metrics["pruned"]["channels"]
    assert (out / "rounds" / "round2.safetensors").is_file() and (out / "finetune" / "round2" / "log.jsonl").is_file()
    [row] = [r for r in read_rows(results) if r["stage"] == "pruned"]
    assert row["run"] == "demo" and row["dataset"] == "synthfaces:tiny" and row["kd"] == "none"
    assert int(row["macs"]) == metrics["pruned"]["macs"] and float(row["host_latency_ms"]) > 0
    assert int(row["file_bytes"]) == (out / "model.onnx").stat().st_size
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a second run refuses to overwrite the finished job
        main(argv)
    assert "pass --resume" in capsys.readouterr().err
    assert main(argv + ["--resume", "--latency-runs", "0", "--val"]) == 0  # all rounds done: nothing pruned again
    again = load_checkpoint(out / "model.safetensors")
    x = _x()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
