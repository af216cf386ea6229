"""Model definitions and plumbing: insightface layouts, MobileFaceNet Table 1, checkpoints, pruning round trips."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from facekd.io import FacekdError
from facekd.models import (count_macs, count_params, create_model, list_models, load_checkpoint,
                           load_state_dict_strict, read_checkpoint_metadata, save_checkpoint)
from students.mobilefacenet import channel_config

REFERENCE = json.loads((Path(__file__).parent / "data" / "insightface_state_dicts.json").read_text())


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights AND BatchNorm statistics, so eval outputs depend on every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def _reference_state_dict(name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for key, shape in REFERENCE[name]["keys"].items():
        if device == "meta":
            out[key] = torch.empty(shape, device="meta", dtype=torch.long if key.endswith("num_batches_tracked") else None)
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.1
    return out


@pytest.mark.parametrize("name", ["r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large"])
def test_insightface_layouts_match_reference(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == REFERENCE[name]["keys"]
    assert count_params(model) == REFERENCE[name]["params"]
    # the big ones load strictly on the meta device (keys and shapes checked, nothing allocated)
    load_state_dict_strict(model, _reference_state_dict(name, "meta"), f"reference {name}")


@pytest.mark.parametrize("name", ["r18", "mbf", "mbf_large"])
def test_reference_shaped_weights_load_strictly(name: str) -> None:
    model = create_model(name).eval()
    state = _reference_state_dict(name)
    load_state_dict_strict(model, state, f"random {name}")
    key = next(k for k in state if k.endswith(".weight") and state[k].dim() == 4)
    assert torch.equal(model.state_dict()[key], state[key])
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, REFERENCE[name]["kwargs"]["num_features"] if "kwargs" in REFERENCE[name] else 512)
    assert torch.isfinite(out).all()


def test_iresnet_head_matches_insightface() -> None:
    model = create_model("r18")
    assert not model.features.weight.requires_grad and torch.all(model.features.weight == 1)
    assert model.features.eps == 1e-5 and model.bn2.eps == 1e-5
    assert model.fc.in_features == 512 * 7 * 7
    block = model.layer1[0]
    assert block.conv2.stride == (2, 2) and block.downsample is not None  # stride in the 2nd conv, as insightface
    with torch.device("meta"):  # facekd's `embedding_dim` is insightface's `num_features`
        assert create_model("r50", embedding_dim=128).fc.out_features == 128
        assert create_model("mbf", num_features=256).embedding_dim == 256
        with pytest.raises(FacekdError, match="disagree"):
            create_model("r18", embedding_dim=128, num_features=256)


def test_mismatched_checkpoint_error_lists_keys_on_one_line() -> None:
    model = create_model("r18")
    state = _reference_state_dict("r34")
    state["fc.weight"] = torch.zeros(512, 100)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(FacekdError) as err:
        load_state_dict_strict(model, state, "r34-backbone.pth")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("r34-backbone.pth does not fit model r18")
    assert "unexpected" in msg and "layer1.2.bn1.weight" in msg and "extra.weight" not in msg.split("unexpected")[0]
    assert "1 wrongly shaped (fc.weight [512, 100] vs model [512, 25088])" in msg
    assert "more" in msg  # long lists are truncated with a count
    del state["conv1.weight"]
    with pytest.raises(FacekdError, match=r"1 missing \(conv1.weight\)"):
        load_state_dict_strict(create_model("r18"), state, "x")


def test_mobilefacenet_is_table1() -> None:
    model = create_model("mobilefacenet")
    params, macs = count_params(model), count_macs(model)
    assert abs(params / 0.99e6 - 1) < 0.02, params
    assert abs(macs / 221e6 - 1) < 0.05, macs
    assert model.embedding_dim == 128 and model(torch.randn(2, 3, 112, 112)).shape == (2, 128)
    widths = channel_config(model)
    assert widths["stem"] == 64 and widths["conv"] == 512
    assert widths["expand"] == [128] * 5 + [256] + [256] * 6 + [512] + [256] * 2
    assert widths["out"] == [64] * 5 + [128] * 10
    residual = [b.residual for b in model.blocks]
    assert residual == [False] + [True] * 4 + [False] + [True] * 6 + [False] + [True] * 2
    assert sum(isinstance(m, nn.PReLU) for m in model.modules()) == 2 + 2 * 15 + 1
    assert model.gdc[0].kernel_size == (7, 7) and model.gdc[0].groups == 512


@pytest.mark.parametrize("name,size,dim,kernel", [("mobilefacenet_112x96", (112, 96), 128, (7, 6)),
                                                   ("mobilefacenet_96x96", (96, 96), 128, (6, 6)),
                                                   ("mobilefacenet_m", (112, 112), 512, (7, 7)),
                                                   ("mobilefacenet_s", (112, 112), 128, (7, 7))])
def test_mobilefacenet_variants(name: str, size: tuple[int, int], dim: int, kernel: tuple[int, int]) -> None:
    model = create_model(name).eval()
    assert model.input_size == size and model.preprocessing["input_size"] == list(size)
    assert model.gdc[0].kernel_size == kernel
    assert model(torch.randn(2, 3, *size)).shape == (2, dim) and model.embedding_dim == dim


def test_deployment_activations_and_width() -> None:
    relu = create_model("mobilefacenet_relu")
    assert not any(isinstance(m, nn.PReLU) for m in relu.modules())
    assert any(isinstance(m, nn.LeakyReLU) for m in create_model("mobilefacenet_leakyrelu").modules())
    half = create_model("mobilefacenet", width=0.5, embedding_dim=64)
    assert channel_config(half)["stem"] == 32 and half(torch.randn(2, 3, 112, 112)).shape == (2, 64)
    with pytest.raises(FacekdError, match="unknown activation 'gelu'"):
        create_model("mobilefacenet", act="gelu")


def test_channels_must_respect_residuals() -> None:
    cfg = channel_config(create_model("mobilefacenet"))
    cfg["out"][2] = 48  # block 2 adds its input (64 wide): its output cannot change alone
    with pytest.raises(FacekdError, match="residual bottleneck 2 must keep its input width 64"):
        create_model("mobilefacenet", channels=cfg)
    with pytest.raises(FacekdError, match="15 entries"):
        create_model("mobilefacenet", channels={**cfg, "out": cfg["out"][:3]})


def test_torch_pruning_result_rebuilds_from_channel_config(tmp_path: Path) -> None:
    import torch_pruning as tp  # a required dependency: a broken install fails here, it does not skip
    model = _randomise(create_model("mobilefacenet"))
    x = torch.randn(2, 3, 112, 112)
    pruner = tp.pruner.MagnitudePruner(model, x[:1], importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.4, ignored_layers=[model.linear])
    pruner.step()
    model.eval()
    cfg = channel_config(model)
    assert cfg["conv"] < 512 and cfg["expand"][0] < 128
    rebuilt = create_model("mobilefacenet", channels=json.loads(json.dumps(cfg)))
    load_state_dict_strict(rebuilt, model.state_dict(), "pruned")
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), model(x), atol=1e-5)
    # save_checkpoint notices the pruned widths by itself; the file rebuilds without pickles
    path = save_checkpoint(model, tmp_path / "pruned.safetensors")
    assert read_checkpoint_metadata(path)["kwargs"]["channels"] == cfg
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path)(x), model(x))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _randomise(create_model("mobilefacenet_112x96", embedding_dim=64))
    path = save_checkpoint(model, tmp_path / "m.safetensors", extra={"note": "round trip"})
    meta = read_checkpoint_metadata(path)
    assert meta["arch"] == "mobilefacenet_112x96" and meta["kwargs"]["embedding_dim"] == 64
    assert meta["embedding_dim"] == 64 and meta["input_size"] == [112, 96] and meta["params"] == count_params(model)
    assert meta["preprocessing"]["input_size"] == [112, 96] and meta["note"] == "round trip"
    assert "channels" not in meta["kwargs"] and "provenance" in meta
    loaded = load_checkpoint(path)
    x = torch.randn(3, 3, 112, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(FacekdError, match="holds a 'mobilefacenet_112x96' model, not 'r18'"):
        load_checkpoint(path, arch="r18")


def test_insightface_backbone_pth(tmp_path: Path) -> None:
    model = _randomise(create_model("mbf"))
    plain = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), plain)
    nested = tmp_path / "checkpoint_gpu_0.pt"  # insightface resume file, DDP-prefixed keys
    torch.save({"epoch": 3, "state_dict_backbone": {f"module.{k}": v for k, v in model.state_dict().items()}}, nested)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(load_checkpoint(plain, arch="mbf")(x), want)
        assert torch.equal(load_checkpoint(nested, arch="mbf")(x), want)
        assert torch.equal(create_model("mbf", checkpoint_path=str(plain)).eval()(x), want)
    with pytest.raises(FacekdError, match="say which architecture"):
        load_checkpoint(plain)
    with pytest.raises(FacekdError, match="does not fit model mobilefacenet"):
        load_checkpoint(plain, arch="mobilefacenet")
    pickled = tmp_path / "whole.pth"
    torch.save(create_model("mobilefacenet_s", width=0.25), pickled)
    with pytest.raises(FacekdError, match="pickles a whole module") as err:
        load_checkpoint(pickled, arch="mobilefacenet_s")
    assert "\n" not in str(err.value)
    with pytest.raises(FacekdError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth", arch="r18")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FacekdError, match="cannot read torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pth", arch="r18")


def test_unreadable_checkpoints_are_one_line_errors_without_unsafe_advice(tmp_path: Path) -> None:
    good = save_checkpoint(create_model("mobilefacenet_s", width=0.25), tmp_path / "good.safetensors")
    data = good.read_bytes()
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # a PNG signature and junk: what a wrong file looks like
    cases = {"truncated.safetensors": (data[: len(data) // 2], "cannot read safetensors checkpoint"),
             "image.safetensors": (png, "cannot read safetensors checkpoint"),
             "image.pth": (png, "cannot read torch checkpoint"),
             "notes.pth": (b"hello, not a pickle", "cannot read torch checkpoint")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        for arch in ((None, "mobilefacenet_s") if name.endswith(".safetensors") else ("mobilefacenet_s",)):
            with pytest.raises(FacekdError, match=message) as err:
                load_checkpoint(tmp_path / name, arch=arch)
            # one line, and never torch's advice to load with weights_only=False (it would run code from the file)
            assert "\n" not in str(err.value) and "weights_only" not in str(err.value), (name, str(err.value))
    with pytest.raises(FacekdError, match="cannot read safetensors checkpoint"):
        read_checkpoint_metadata(tmp_path / "truncated.safetensors")


def test_registry() -> None:
    teachers, students = list_models("teacher"), list_models("student")
    assert {"r18", "r34", "r50", "r100", "r200", "sface"} <= set(teachers)
    assert {"mobilefacenet", "mobilefacenet_m", "mobilefacenet_s", "mbf", "mbf_large"} <= set(students)
    with pytest.raises(FacekdError, match="unknown model 'r101'"):
        create_model("r101")
    with pytest.raises(FacekdError, match="cannot build 'r18'"):
        create_model("r18", width=2)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                    reason="optional extra absent: timm (pip install -e '.[timm]'; it brings torchvision)")
def test_timm_backbones(tmp_path: Path) -> None:
    model = create_model("timm:mobilenetv3_small_050", embedding_dim=96).eval()
    assert model.arch == "timm:mobilenetv3_small_050" and model.input_size == (112, 112)
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 96)
    with pytest.raises(FacekdError, match="nothing is ever downloaded"):
        create_model("timm:resnet18", pretrained=True)
    import timm
    backbone = timm.create_model("mobilenetv3_small_050", num_classes=10)  # a local weight file, e.g. ImageNet
    torch.save(backbone.state_dict(), tmp_path / "mnv3.pth")
    model = create_model("timm:mobilenetv3_small_050", pretrained=True, checkpoint_path=str(tmp_path / "mnv3.pth"))
    assert torch.equal(model.body.conv_stem.weight, backbone.conv_stem.weight) and model.model_kwargs == {}
    with pytest.raises(FacekdError, match="timm has no model"):
        create_model("timm:no_such_net")


def test_list_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from students.__main__ import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("mobilefacenet "))
    assert "1,003,136" in row and "220,965,376" in row and "128" in row and "112x112" in row
    with pytest.raises(SystemExit):
        main(["nonsense"])
